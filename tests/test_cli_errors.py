"""Every command, given a user mistake, exits non-zero with a message and no traceback."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from e5kit.cli import main
from helpers import run_python

SRC = Path(__file__).resolve().parents[1] / "src"
NO_CUDA = not torch.cuda.is_available()


def _cases(m: str, d: Path, scifact: str) -> list[tuple[list[str], str]]:
    (d / "train.jsonl").write_text(json.dumps({"query": "a", "positive": "b", "negatives": ["c"]}) + "\n")
    (d / "list.yaml").write_text("- a\n")
    (d / "bad.yaml").write_text("data: [unclosed\n")
    data = str(d / "train.jsonl")
    db = f"sqlite:///{d / 'service.db'}"
    cases = [
        (["embed", "-m", m, "--device", "tpu", "x"], "--device"),
        (["embed", "-m", str(d / "nope"), "x"], "nope"),
        (["embed", "-m", m, "--dtype", "float8", "x"], "dtype must be one of"),
        (["embed", "-m", m, "--backend", "onnx", "x"], "backend must be one of"),
        (["embed", "-m", m, "-i", str(d / "missing.txt")], "does not exist"),
        (["embed", "-m", m, "-o", str(d / "out.csv"), "x"], "--output"),
        (["embed", "-m", m, "--threads", "0", "x"], "--threads"),
        (["embed", "-m", m, "--batch-size", "0", "x"], "--batch-size"),
        (["info", str(d / "nope")], "nope"),
        (["models", "--bogus"], "No such option"),
        (["train"], "--data"),
        (["train", "-d", str(d / "missing.jsonl"), "-m", m], "missing.jsonl"),
        (["train", "-d", data, "-m", m, "--precision", "fp8"], "--precision"),
        (["train", "-d", data, "-m", m, "--batch-size", "0"], "--batch-size"),
        (["train", str(d / "missing.yaml")], "missing.yaml"),
        (["train", str(d / "list.yaml")], "expected a mapping"),
        (["train", str(d / "bad.yaml")], "bad.yaml"),
        (["train", "-d", data, "-m", m, "--eval-data", str(d / "nobeir")], "nobeir"),
        (["train", "-d", data, "-m", m, "--eval-every", "5"], "--eval-data"),
        (["train", "-d", data, "-m", m, "--dtype", "bfloat16", "--precision", "fp32"], "disagree"),
        (["train", "-d", data, "-m", str(d / "nope")], "nope"),
        (["mine", "-o", str(d / "o.jsonl"), "-m", m], "--beir"),
        (["mine", "--beir", str(d / "nobeir"), "-o", str(d / "o.jsonl"), "-m", m], "nobeir"),
        (["filter", "-i", str(d / "missing.jsonl"), "-o", str(d / "o.jsonl")], "missing.jsonl"),
        (["eval", "-o", str(d / "ev")], "--beir"),
        (["eval", "--beir", str(d / "nobeir"), "-o", str(d / "ev")], "nobeir"),
        (["eval", "-m", m, "--beir", scifact, "--split", "dev", "-o", str(d / "ev")], "dev.tsv is missing"),
        (["serve", "-m", str(d / "nope")], "nope"),
        (["index", "build", str(d / "missing.jsonl"), "--out", str(d / "ix")], "missing.jsonl"),
        (["search", str(d / "noindex"), "q"], "noindex"),
        (["train", "-d", data, "-m", m, "--backend", "int8"], "int8 is an inference backend"),
        (["train", "-d", data, "-m", m, "--threads", "0"], "--threads must be at least 1"),
        (["embed-corpus", "--out", str(d / "vecs")], "Missing argument"),
        (["embed-corpus", str(d / "missing.jsonl"), "--out", str(d / "vecs")], "missing.jsonl does not exist"),
        (["embed-corpus", str(d / "train.jsonl"), "--out", str(d / "vecs"), "--format", "csv"], "--format"),
        (["load-vectors", str(d / "novecs"), "--into", f"index:{d / 'ix'}"], "holds no manifest.json"),
        (["load-vectors", str(d / "novecs")], "--into"),
        (["accounts", "create", "not-an-email", "--password", "pw", "--database-url", db], "look like an email"),
        (["accounts", "set-limits", "a@example.com", "--rps", "0", "--database-url", db], "--rps"),
        (["accounts", "frobnicate"], "No such command"),
        (["keys", "create", "nobody@example.com", "--database-url", db], "no account nobody@example.com"),
        (["keys", "revoke", "no-such-key", "--database-url", db], "no key no-such-key"),
        (["keys", "list", "nobody@example.com", "--database-url", db], "no account nobody@example.com"),
    ]
    if NO_CUDA:
        cases += [(["embed", "-m", m, "--device", "cuda", "x"], "--device"),
                  (["train", "-d", data, "-m", m, "--device", "cuda"], "--device"),
                  (["eval", "-m", m, "--beir", scifact, "--device", "cuda:1", "-o", str(d / "ev")], "--device")]
    return cases


def _failures(cases: list[tuple[list[str], str]]) -> list[str]:
    """The cases that crash, exit 0 or do not say ``expect``."""
    runner = CliRunner()
    failures = []
    for args, expect in cases:
        r = runner.invoke(main, args, catch_exceptions=True)
        crashed = r.exception is not None and not isinstance(r.exception, SystemExit)
        if crashed or r.exit_code == 0 or expect not in r.output:
            failures.append(f"e5kit {' '.join(args)} -> exit {r.exit_code}, {r.exception!r}: {r.output[-300:]}")
    return failures


def test_user_mistakes_give_a_message_not_a_traceback(tiny_bert, scifact, tmp_path):
    failures = _failures(_cases(str(tiny_bert), tmp_path, str(scifact)))
    assert not failures, "\n".join(failures)


def test_service_and_scale_mistakes_give_a_message_not_a_traceback(tmp_path):
    from e5kit.scale.shards import FORMAT, FORMAT_VERSION, MANIFEST

    (tmp_path / "bad-vecs").mkdir()
    (tmp_path / "bad-vecs" / MANIFEST).write_text("not json")
    (tmp_path / "vecs").mkdir()
    (tmp_path / "vecs" / MANIFEST).write_text(json.dumps({"format": FORMAT, "version": FORMAT_VERSION, "model": "m",
                                                          "dim": 4, "shards": []}))
    failures = _failures([
        (["accounts", "list", "--database-url", f"sqlite:///{tmp_path / 'no-dir' / 's.db'}"], "s.db"),
        (["keys", "list", "--database-url", "bogus://x"], "bogus"),
        (["load-vectors", str(tmp_path / "bad-vecs"), "--into", f"index:{tmp_path / 'ix'}"], MANIFEST),
        (["load-vectors", str(tmp_path / "vecs"), "--into", "bogus:x"], "bogus:x"),
    ])
    assert not failures, "\n".join(failures)


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    return run_python("-c", code, *args, env={"HF_HUB_OFFLINE": "1"}, clean_env=True, timeout=300)


@pytest.mark.skipif(not NO_CUDA, reason="needs a torch without CUDA")
def test_cuda_on_cpu_only_torch_is_a_clear_error(tiny_bert):
    r = _run("import sys; from e5kit.cli import main; sys.argv[0] = 'e5kit'; main()",
             "embed", "-m", str(tiny_bert), "--device", "cuda", "hello")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "'cuda'" in r.stderr and ("CPU-only build" in r.stderr or "no CUDA GPU" in r.stderr)


def test_eval_without_its_extra_fails_before_loading_the_model(tmp_path, shared_dir):
    """scipy hidden (as without `pip install e5kit[eval]`): the error comes before any model is
    loaded (a model that does not exist would be the error otherwise)."""
    code = ("import sys; sys.modules['scipy'] = None; from e5kit.cli import main; sys.argv[0] = 'e5kit'; main()")
    r = _run(code, "eval", "-m", str(tmp_path / "no-model"), "--sts", str(shared_dir / "data" / "stsbenchmark"),
             "-o", str(tmp_path / "o"))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "`e5kit eval` needs scipy: pip install 'e5kit[eval]'" in r.stderr and "no-model" not in r.stderr
