"""The `e5kit` command line, run as a real subprocess."""

import json
from pathlib import Path

import numpy as np
import pytest

from e5kit import E5
from helpers import run_e5kit

SRC = str(Path(__file__).resolve().parents[1] / "src")


def run(*args, stdin=None, check=True):
    out = run_e5kit(*args, stdin=stdin, timeout=120)
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


def test_embed_keeps_ids_uses_titles_and_writes_parquet(tiny_bert, tmp_path):
    """jsonl records keep their _id and are embedded as title + ' ' + text, as `index build` does."""
    import pyarrow.parquet as pq

    src = tmp_path / "corpus.jsonl"
    docs = [{"_id": "d1", "title": "Protein", "text": "grams per day"}, {"_id": "d2", "text": "the summit"}]
    src.write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    expected = E5(str(tiny_bert)).encode_passages(["Protein grams per day", "the summit"])
    out = run("embed", "-m", str(tiny_bert), "--type", "passage", "-i", str(src))
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["_id"] for r in rows] == ["d1", "d2"] and rows[0]["text"] == "Protein grams per day"
    np.testing.assert_allclose([r["embedding"] for r in rows], expected, atol=1e-6)
    run("embed", "-m", str(tiny_bert), "--type", "passage", "-i", str(src), "-o", str(tmp_path / "e.parquet"))
    t = pq.read_table(tmp_path / "e.parquet").to_pydict()
    assert t["_id"] == ["d1", "d2"]
    np.testing.assert_allclose(t["embedding"], expected, atol=1e-6)
    # --title-field '' embeds the text alone
    out = run("embed", "-m", str(tiny_bert), "--type", "passage", "-i", str(src), "--title-field", "")
    np.testing.assert_allclose(json.loads(out.stdout.splitlines()[0])["embedding"],
                               E5(str(tiny_bert)).encode_passages(["grams per day"])[0], atol=1e-6)
    # an output type it cannot write is refused before any work, not written as jsonl
    bad = run("embed", "-m", str(tiny_bert), "x", "-o", str(tmp_path / "out.csv"), check=False)
    assert bad.returncode == 2 and "--output" in bad.stderr and not (tmp_path / "out.csv").exists()


def test_truncation_is_reported_once_without_a_source_line(tiny_bert):
    out = run("embed", "-m", str(tiny_bert), "short", "word " * 600)
    assert len(out.stdout.splitlines()) == 2
    assert out.stderr.count("truncated") == 1 and "warnings.warn" not in out.stderr and ".py:" not in out.stderr
    assert "input numbers [2]" in out.stderr
