"""`e5kit index build` / `e5kit search`: formats and fields, resuming after a real interruption
(an exception mid-build, and SIGKILL of a running process), and clear errors."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from e5kit import E5, Index
from e5kit.cli import main
from e5kit.index.build import Corpus, build_index

SRC = Path(__file__).resolve().parents[1] / "src"
WORDS = "the cell study gene cancer risk patients protein women day marathon mountain leaders government".split()


def make_docs(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"doc_id": f"d{i:05d}", "heading": f"title {i}", "body": " ".join(rng.choice(WORDS, 6 + i % 9)),
             "source": f"s{i % 3}"} for i in range(n)]


def write_corpus(path: Path, docs: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    elif path.suffix == ".csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(docs[0]))
            w.writeheader()
            w.writerows(docs)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(docs), path)
    return path


FIELDS = ["--id-field", "doc_id", "--title-field", "heading", "--text-field", "body", "--metadata-field", "source"]


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def assert_same_index(a: Path, b: Path) -> None:
    x, y = Index.load(a), Index.load(b)
    assert x.ids == y.ids and len(set(x.ids)) == len(x.ids)
    np.testing.assert_allclose(np.asarray(x._all_vectors()), np.asarray(y._all_vectors()), atol=1e-6)
    assert [x.metadata(i) for i in x.ids] == [y.metadata(i) for i in y.ids]


def test_build_formats_and_search(tmp_path, tiny_bert):
    docs = make_docs(60)
    outs = []
    for suffix in (".jsonl", ".csv", ".parquet"):
        corpus = write_corpus(tmp_path / f"corpus{suffix}", docs)
        out = tmp_path / f"ix{suffix}"
        r = invoke("index", "build", str(corpus), "--out", str(out), "-m", str(tiny_bert), "--part-size", "16", *FIELDS)
        assert r.exit_code == 0, r.output
        outs.append(out)
    assert_same_index(outs[0], outs[1])
    assert_same_index(outs[0], outs[2])
    idx = Index.load(outs[0])
    assert len(idx) == 60 and idx.metadata("d00007") == {"source": "s1", "title": "title 7", "text": docs[7]["body"]}
    # the stored vectors are the model's passage embeddings of "title text"
    model = E5(str(tiny_bert))
    np.testing.assert_allclose(idx.vector("d00007"), model.encode_passages(f"title 7 {docs[7]['body']}"), atol=1e-5)

    r = invoke("search", str(outs[0]), "cancer risk", "-k", "3", "--format", "jsonl")
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in r.output.splitlines()]
    expected = idx.search(model.encode_queries("cancer risk"), k=3)
    assert [x["id"] for x in lines] == [h.id for h in expected] and lines[0]["rank"] == 1
    assert lines[0]["score"] == pytest.approx(expected[0].score, abs=1e-5)
    r = invoke("search", str(outs[0]), "cancer risk", "gene study", "-k", "2")
    assert r.exit_code == 0 and r.output.count("query: ") == 2 and expected[0].id in r.output

    r = invoke("index", "build", str(tmp_path / "corpus.jsonl"), "--out", str(outs[0]), "-m", str(tiny_bert), *FIELDS)
    assert r.exit_code != 0 and "already holds a finished index" in r.output


def test_resume_after_exception_equals_uninterrupted(tmp_path, tiny_bert):
    corpus_path = write_corpus(tmp_path / "c.jsonl", make_docs(100))
    model = E5(str(tiny_bert))
    corpus = Corpus(corpus_path, id_field="doc_id", title_field="heading", text_field="body")
    build_index(corpus, tmp_path / "full", model, part_size=16)

    def stop_after_two(chunk: int) -> None:
        if chunk == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_index(corpus, tmp_path / "resumed", model, part_size=16, on_part=stop_after_two)
    assert not (tmp_path / "resumed" / "index.json").exists()
    assert len(list((tmp_path / "resumed" / ".build").glob("part-*.npz"))) == 3
    done = []
    build_index(corpus, tmp_path / "resumed", model, part_size=16, on_part=done.append)
    assert done == [3, 4, 5, 6]  # only the missing chunks were embedded
    assert not (tmp_path / "resumed" / ".build").exists()
    assert_same_index(tmp_path / "full", tmp_path / "resumed")


def test_resume_after_sigkill_equals_uninterrupted(tmp_path, tiny_bert):
    corpus = write_corpus(tmp_path / "c.jsonl", make_docs(3000))
    args = [sys.executable, "-m", "e5kit", "index", "build", str(corpus), "-m", str(tiny_bert), "--part-size", "25",
            *FIELDS]
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = tmp_path / "killed"
    proc = subprocess.Popen(args + ["--out", str(out)], env=env, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / ".build").glob("part-*.npz"))) < 3 and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    parts = len(list((out / ".build").glob("part-*.npz")))
    assert not (out / "index.json").exists() and 3 <= parts < 120, "the build finished before it could be killed"
    r = subprocess.run(args + ["--out", str(out)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"resuming: {parts} of 120 parts" in r.stderr or "resuming:" in r.stderr
    r = subprocess.run(args + ["--out", str(tmp_path / "clean")], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert_same_index(tmp_path / "clean", out)
    assert len(Index.load(out)) == 3000


def test_changed_corpus_is_not_resumed(tmp_path, tiny_bert):
    path = write_corpus(tmp_path / "c.jsonl", make_docs(50))
    model = E5(str(tiny_bert))
    corpus = Corpus(path, id_field="doc_id", title_field="heading", text_field="body")

    def stop(chunk: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_index(corpus, tmp_path / "ix", model, part_size=10, on_part=stop)
    write_corpus(path, make_docs(50, seed=1))
    r = invoke("index", "build", str(path), "--out", str(tmp_path / "ix"), "-m", str(tiny_bert), "--part-size", "10",
               *FIELDS)
    assert r.exit_code != 0 and "interrupted build of a different corpus" in r.output
    r = invoke("index", "build", str(path), "--out", str(tmp_path / "ix"), "-m", str(tiny_bert), "--part-size", "10",
               "--force", *FIELDS)
    assert r.exit_code == 0, r.output
    assert len(Index.load(tmp_path / "ix")) == 50


def test_bad_corpus_and_index_errors(tmp_path, tiny_bert, tiny_xlmr):
    docs = make_docs(5)
    docs[3]["doc_id"] = docs[1]["doc_id"]
    dup = write_corpus(tmp_path / "dup.jsonl", docs)
    r = invoke("index", "build", str(dup), "--out", str(tmp_path / "a"), "-m", str(tiny_bert), *FIELDS)
    assert r.exit_code != 0 and "appears twice (documents 2 and 4)" in r.output
    r = invoke("index", "build", str(dup), "--out", str(tmp_path / "a"), "-m", str(tiny_bert), "--id-field", "doc_id",
               "--text-field", "nope")
    assert r.exit_code != 0 and "no string field 'nope'" in r.output and "dup.jsonl:1" in r.output
    (tmp_path / "bad.jsonl").write_text('{"id": "1", "text": "x"}\n{not json\n')
    r = invoke("index", "build", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "b"), "-m", str(tiny_bert))
    assert r.exit_code != 0 and "bad.jsonl:2: not valid JSON" in r.output
    (tmp_path / "x.txt").write_text("hello")
    r = invoke("index", "build", str(tmp_path / "x.txt"), "--out", str(tmp_path / "c"), "-m", str(tiny_bert))
    assert r.exit_code != 0 and "--format" in r.output

    good = write_corpus(tmp_path / "good.jsonl", make_docs(5))
    r = invoke("index", "build", str(good), "--out", str(tmp_path / "ix"), "-m", str(tiny_bert), *FIELDS)
    assert r.exit_code == 0, r.output
    r = invoke("search", str(tmp_path / "ix"), "cancer", "-m", str(tiny_xlmr))
    assert r.exit_code != 0 and "was built with model" in r.output
    docs_file = next((tmp_path / "ix").glob("docs-*.jsonl"))
    docs_file.write_text(docs_file.read_text().replace("d00001", "d99999"))
    r = invoke("search", str(tmp_path / "ix"), "cancer")
    assert r.exit_code != 0 and "corrupt" in r.output and "Traceback" not in r.output
    r = invoke("search", str(tmp_path / "nowhere"), "cancer")
    assert r.exit_code != 0


def test_option_errors_come_before_embedding_and_name_the_flags(tmp_path, tiny_bert):
    corpus = write_corpus(tmp_path / "c.jsonl", make_docs(30))
    out = tmp_path / "ix"
    r = invoke("index", "build", str(corpus), "--out", str(out), "-m", str(tiny_bert), "--index-type", "ivfpq", *FIELDS)
    assert r.exit_code != 0 and "--index-type ivfpq needs at least 256 vectors" in r.output
    assert "the corpus gives 30" in r.output and "kind=" not in r.output
    assert not out.exists() or not any(out.iterdir())  # nothing embedded, nothing staged
    r = invoke("index", "build", str(corpus), "--out", str(out), "-m", str(tiny_bert), "--index-type", "hnsw",
               "--storage", "binary", *FIELDS)
    assert r.exit_code != 0 and "--storage" in r.output and "Traceback" not in r.output


def long_docs(n: int = 6) -> list[dict]:
    """Documents of ~30 to ~1600 tokens of the tiny model."""
    rng = np.random.default_rng(5)
    return [{"doc_id": f"d{i}", "heading": f"title {i}", "body": ". ".join(" ".join(rng.choice(WORDS, 10))
                                                                          for _ in range(3 + 40 * (i % 3))),
             "source": f"s{i % 2}"} for i in range(n)]


def test_long_mean_and_chunk_alias(tmp_path, tiny_bert):
    docs = long_docs()
    corpus = write_corpus(tmp_path / "c.jsonl", docs)
    model = E5(str(tiny_bert))
    common = ["-m", str(tiny_bert), "--chunk-overlap", "16", "--part-size", "4", *FIELDS]
    r = invoke("index", "build", str(corpus), "--out", str(tmp_path / "mean"), "--long", "mean", *common)
    assert r.exit_code == 0, r.output
    assert "indexed 6 documents" in r.output and "truncated" not in r.output
    idx = Index.load(tmp_path / "mean")
    assert not idx.chunked and idx.ids == [d["doc_id"] for d in docs]  # one row per document
    want = model.encode_passages([d["body"] for d in docs], long="mean", chunk_overlap=16,
                                 titles=[d["heading"] for d in docs])
    np.testing.assert_allclose(np.stack([idx.vector(d["doc_id"]) for d in docs]), want, atol=1e-6)
    assert idx.metadata("d2") == {"source": "s0", "title": "title 2", "text": docs[2]["body"]}

    r = invoke("index", "build", str(corpus), "--out", str(tmp_path / "chunk"), "--chunk", *common)
    assert r.exit_code == 0, r.output
    r = invoke("index", "build", str(corpus), "--out", str(tmp_path / "chunks"), "--long", "chunks", *common)
    assert r.exit_code == 0 and "indexed 6 documents in" in r.output, r.output
    assert_same_index(tmp_path / "chunk", tmp_path / "chunks")  # --chunk is --long chunks
    assert Index.load(tmp_path / "chunks").chunked
    r = invoke("index", "build", str(corpus), "--out", str(tmp_path / "x"), "--chunk", "--long", "mean", *common)
    assert r.exit_code != 0 and "contradicts --long mean" in r.output

    def stop(part: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # an interrupted mean build is not resumed as another mode
        build_index(Corpus(corpus, id_field="doc_id", title_field="heading", text_field="body"), tmp_path / "ix",
                    model, part_size=4, long="mean", chunk_overlap=16, on_part=stop)
    r = invoke("index", "build", str(corpus), "--out", str(tmp_path / "ix"), "--long", "chunks", *common)
    assert r.exit_code != 0 and "interrupted build of different settings" in r.output


def test_chunked_ivfpq_too_small_keeps_the_embedded_chunks(tmp_path, tiny_bert):
    """A chunked index's vector count is known only after chunking: IVF-PQ on too few chunks fails after
    embedding, with the vectors kept staged, and a rerun with another index type reuses them."""
    corpus = write_corpus(tmp_path / "c.jsonl", long_docs())
    out = tmp_path / "ix"
    common = ["--out", str(out), "-m", str(tiny_bert), "--chunk", "--chunk-overlap", "16", "--part-size", "4", *FIELDS]
    r = invoke("index", "build", str(corpus), "--index-type", "ivfpq", *common)
    assert r.exit_code != 0 and "needs at least 256 vectors" in r.output and " chunks. Use" in r.output, r.output
    assert "are kept in" in r.output and "Traceback" not in r.output
    assert sorted(p.name for p in (out / ".build").glob("part-*.npz")) == ["part-000000.npz", "part-000001.npz"]
    r = invoke("index", "build", str(corpus), "--index-type", "hnsw", *common)
    assert r.exit_code == 0, r.output
    assert "resuming: 2 of 2 parts (6 documents) already embedded" in r.output
    fresh = invoke("index", "build", str(corpus), "--index-type", "hnsw", *common[2:], "--out", str(tmp_path / "fresh"))
    assert fresh.exit_code == 0 and "resuming" not in fresh.output, fresh.output
    assert_same_index(out, tmp_path / "fresh")  # as if built in one go


def test_sinks_lancedb_and_index_copy(tmp_path, tiny_bert):
    pytest.importorskip("lancedb")
    from e5kit.stores import open_store

    corpus = write_corpus(tmp_path / "c.jsonl", make_docs(40))
    db = f"lancedb:{tmp_path / 'ldb'}?table=docs"
    r = invoke("index", "build", str(corpus), "--out", str(tmp_path / "ix"), "-m", str(tiny_bert), *FIELDS,
               "--sink", db, "--sink", f"index:{tmp_path / 'copy'}")
    assert r.exit_code == 0, r.output
    assert f"loaded 40 rows into {db}" in r.output
    assert_same_index(tmp_path / "ix", tmp_path / "copy")
    idx, store = Index.load(tmp_path / "ix"), open_store(db)
    assert len(store) == 40 and store.info["model"] == idx.model_name
    q = E5(str(tiny_bert)).encode_queries("cancer risk")
    hits, want = store.search(q, k=5), idx.search(q, k=5)
    assert [(h.id, h.metadata) for h in hits] == [(h.id, idx.metadata(h.id)) for h in want]
    np.testing.assert_allclose([h.score for h in hits], [h.score for h in want], atol=1e-5)

    r = invoke("index", "build", str(corpus), "--out", str(tmp_path / "ix2"), "-m", str(tiny_bert), *FIELDS,
               "--sink", "mysql://db/x")
    assert r.exit_code != 0 and "unknown sink 'mysql://db/x'" in r.output and not (tmp_path / "ix2").exists()
    open_store(f"lancedb:{tmp_path / 'ldb'}?table=small", create=True, dim=8)
    r = invoke("index", "build", str(corpus), "--out", str(tmp_path / "ix2"), "-m", str(tiny_bert), *FIELDS,
               "--sink", f"lancedb:{tmp_path / 'ldb'}?table=small")
    assert r.exit_code != 0 and "holds 8-d vectors" in r.output  # refused before anything is embedded
    assert not (tmp_path / "ix2").exists()


def test_old_chunk_size_flag_still_works(tmp_path, tiny_bert):
    corpus = write_corpus(tmp_path / "c.jsonl", make_docs(20))
    r = CliRunner().invoke(main, ["index", "build", str(corpus), "--out", str(tmp_path / "ix"), "-m", str(tiny_bert),
                                  "--chunk-size", "7", *FIELDS])
    assert r.exit_code == 0, r.output
    assert "--chunk-size is now --part-size" in r.output and len(Index.load(tmp_path / "ix")) == 20
    help_text = invoke("index", "build", "--help").output
    assert "--part-size" in help_text and "--chunk-size" not in help_text


def test_search_help_names_the_index_model_as_default():
    out = " ".join(invoke("search", "--help").output.split())
    assert "the model the index was built with" in out and "intfloat/" not in out


def test_failed_save_leaves_no_orphan_files(tmp_path):
    x = np.random.default_rng(0).standard_normal((10, 16)).astype(np.float32)
    good = Index(dim=16)
    good.add([f"d{i}" for i in range(10)], embeddings=x)
    good.save(tmp_path / "ix")
    before = sorted(p.name for p in (tmp_path / "ix").iterdir())
    bad = Index(dim=16, kind="ivfpq")  # cannot train on 10 vectors: fails after writing its first files
    bad.add([f"d{i}" for i in range(10)], embeddings=x)
    with pytest.raises(ValueError, match="ivfpq needs at least"):
        bad.save(tmp_path / "ix")
    assert sorted(p.name for p in (tmp_path / "ix").iterdir()) == before
    assert Index.load(tmp_path / "ix").search(x[3], k=1)[0].id == "d3"
    with pytest.warns(DeprecationWarning, match="kind="):
        assert Index(dim=16, backend="hnsw").kind == "hnsw"
