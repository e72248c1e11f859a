"""The `e5kit` command line, run as a real subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from e5kit import E5

SRC = str(Path(__file__).resolve().parents[1] / "src")


def run(*args, stdin=None, check=True):
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-m", "e5kit", *args], input=stdin, capture_output=True, text=True,
                         env=env, timeout=120)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def test_embed_arguments_to_jsonl(tiny_bert):
    out = run("embed", "-m", str(tiny_bert), "how much protein", "summit define")
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["text"] for r in rows] == ["how much protein", "summit define"]
    ref = E5(str(tiny_bert)).encode_queries(["how much protein", "summit define"])
    assert np.abs(np.array([r["embedding"] for r in rows]) - ref).max() <= 1e-6


def test_embed_jsonl_file_to_npy_as_passages(tiny_bert, tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text("\n".join(json.dumps({"body": t}) for t in ["the cell", "gene study", "protein"]) + "\n")
    out_file = tmp_path / "docs.npy"
    run("embed", "-m", str(tiny_bert), "-i", str(src), "--field", "body", "--type", "passage", "-o", str(out_file))
    ref = E5(str(tiny_bert)).encode_passages(["the cell", "gene study", "protein"])
    assert np.abs(np.load(out_file) - ref).max() <= 1e-6


def test_embed_stdin_raw_and_precision(tiny_bert, tmp_path):
    out_file = tmp_path / "b.npy"
    run("embed", "-m", str(tiny_bert), "--type", "raw", "--precision", "ubinary", "-o", str(out_file),
        stdin="query: a\n\nquery: b\n")
    arr = np.load(out_file)
    assert arr.dtype == np.uint8 and arr.shape == (2, 32 // 8)


def test_embed_errors_are_clear(tiny_bert, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    out = run("embed", "-m", str(tiny_bert), "-i", str(bad), check=False)
    assert out.returncode != 0 and "bad.jsonl:2: not valid JSON" in out.stderr
    out = run("embed", "-m", str(tmp_path / "missing-model"), "x", check=False)
    assert out.returncode != 0 and "does not exist" in out.stderr and "Traceback" not in out.stderr
    out = run("embed", "-m", str(tiny_bert), "--no-truncate", "word " * 600, check=False)
    assert out.returncode != 0 and "more than the model's limit of 512" in out.stderr


def test_models_and_info(tiny_xlmr):
    out = run("models")
    assert "intfloat/multilingual-e5-large-instruct" in out.stdout and "instruct" in out.stdout
    out = run("info", str(tiny_xlmr))
    assert "xlm-roberta" in out.stdout and "position_offset    2" in out.stdout


@pytest.mark.parametrize("cmd", [[], ["embed"], ["models"], ["info"]])
def test_help(cmd):
    out = run(*cmd, "--help")
    assert "Usage:" in out.stdout
