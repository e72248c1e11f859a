"""e5kit embed-corpus on a local Ray cluster (2 CPUs, 2 actors): parity with the one-process
encode_passages, every id exactly once, a killed actor, an interrupted driver, bad input, long documents."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="[required] ray is not installed")
pq = pytest.importorskip("pyarrow.parquet", reason="[required] pyarrow is not installed")

from e5kit import E5  # noqa: E402
from e5kit.prompts import beir_document  # noqa: E402
from e5kit.scale.ray_job import FAULT_ENV, embed_corpus  # noqa: E402
from e5kit.scale.shards import CorpusInputError, Fields, document, iter_vectors, plan_shards, read_records  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"
WORDS = "the protein cell gene study results patients treatment effect of in and with a".split()


def start_cluster() -> str:
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": {"PYTHONPATH": str(SRC)}})
    return ray.get_runtime_context().gcs_address


@pytest.fixture(scope="module")
def cluster():
    yield start_cluster()
    ray.shutdown()


def write_corpus(folder: Path, n: int = 160, start: int = 0) -> list[dict]:
    """A jsonl file and a parquet file of passages of varied length (ids d<start>..)."""
    import pyarrow as pa

    rng = np.random.default_rng(start)
    recs = [{"_id": f"d{i}", "title": f"title {i}" if i % 3 else "",
             "text": " ".join(rng.choice(WORDS, size=int(rng.integers(3, 60)))), "year": 2000 + i % 20}
            for i in range(start, start + n)]
    folder.mkdir(parents=True, exist_ok=True)
    half = n // 2
    (folder / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[:half]))
    pq.write_table(pa.Table.from_pylist(recs[half:]), folder / "b.parquet", row_group_size=16)
    return recs


def read_out(out: Path) -> tuple[list[str], np.ndarray, list[dict]]:
    ids, vecs, meta = [], [], []
    for i, v, m in iter_vectors(str(out)):
        ids += i
        vecs.append(v)
        meta += m
    return ids, np.concatenate(vecs), meta


def reference(model_dir: Path, recs: list[dict]) -> dict[str, np.ndarray]:
    vec = E5(model_dir).encode_passages([beir_document(r["title"], r["text"]) for r in recs])
    return {r["_id"]: v for r, v in zip(recs, vec)}


def check_complete(out: Path, ref: dict[str, np.ndarray]) -> None:
    ids, vec, _ = read_out(out)
    assert len(ids) == len(set(ids)) == len(ref)  # every id exactly once
    assert set(ids) == set(ref)
    diff = np.abs(vec - np.stack([ref[i] for i in ids])).max()
    assert diff <= 1e-6, diff


def run(corpus: Path, out: Path, model: Path, **kw) -> dict:
    return embed_corpus([str(corpus / "*")], str(out), str(model), fields=Fields(metadata_fields=("year",)),
                        shard_mb=0.002, shard_rows=24, workers=2, **kw)


def test_shard_plan_is_stable_and_covers_each_line_once(tmp_path):
    recs = write_corpus(tmp_path / "c", 120)
    specs = plan_shards([str(tmp_path / "c" / "*")], shard_mb=0.001, shard_rows=25)
    assert specs == plan_shards([str(tmp_path / "c")], shard_mb=0.001, shard_rows=25)  # glob or folder, same plan
    assert [s.shard for s in specs] == list(range(len(specs))) and len(specs) > 5
    got = [rec["_id"] for s in specs for _, rec in read_records(s)]
    assert got == [r["_id"] for r in recs]


def test_killed_worker_is_retried_within_one_run(cluster, tiny_bert, tmp_path, monkeypatch):
    recs = write_corpus(tmp_path / "c", 60)
    marker = tmp_path / "crashed-once"
    monkeypatch.setenv(FAULT_ENV, f"1:{marker}")  # the actor embedding shard 1 dies (os._exit) the first time
    s = run(tmp_path / "c", tmp_path / "out", tiny_bert)
    assert marker.exists()  # the actor failure did happen ...
    assert s["shards_embedded"] == s["shards"] >= 4 and s["rows"] == len(recs)  # ... and this one run finished:
    check_complete(tmp_path / "out", reference(tiny_bert, recs))  # Ray restarted the actor and retried the shard


def test_interrupted_driver_rerun_ends_complete_and_equal_to_one_process(cluster, tiny_bert, tmp_path):
    recs = write_corpus(tmp_path / "c")
    seen = []

    def stop_after_three(r):
        seen.append(r)
        if len(seen) == 3:
            raise KeyboardInterrupt  # the driver is interrupted mid-run

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "c", tmp_path / "out", tiny_bert, on_shard=stop_after_three)
    assert not (tmp_path / "out" / "manifest.json").exists()
    finished = len(list((tmp_path / "out" / "shards").glob("shard-*.parquet")))
    assert finished >= 3
    s = run(tmp_path / "c", tmp_path / "out", tiny_bert)
    assert s["shards_embedded"] <= s["shards"] - finished  # finished shards were kept, not redone
    assert s["rows"] == len(recs) and s["shards"] > 4 and s["tokens"] > 0
    check_complete(tmp_path / "out", reference(tiny_bert, recs))  # every id once, vectors == encode_passages
    _, _, meta = read_out(tmp_path / "out")
    assert all(set(m) >= {"year", "text"} for m in meta)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["rows"] == len(recs)


def long_corpus(folder: Path, n: int = 6) -> list[dict]:
    """A few documents of ~500 to ~2000 tokens (jsonl)."""
    rng = np.random.default_rng(7)
    recs = [{"_id": f"L{i}", "title": f"title {i}" if i % 2 else "",
             "text": ". ".join(" ".join(rng.choice(WORDS, 12)) for _ in range(20 + 12 * i))} for i in range(n)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return recs


def test_long_mean_and_chunks(cluster, tiny_bert, tmp_path):
    from click.testing import CliRunner

    from e5kit import Index, chunk
    from e5kit.cli import main

    recs = long_corpus(tmp_path / "c")
    model = E5(tiny_bert)
    texts, titles = [r["text"] for r in recs], [r["title"] or None for r in recs]
    s = embed_corpus([str(tmp_path / "c")], str(tmp_path / "mean"), str(tiny_bert), shard_mb=0.01, workers=2,
                     long="mean", chunk_overlap=16)
    assert s["shards"] >= 2 and s["truncated"] == 0
    ids, vec, _ = read_out(tmp_path / "mean")
    want = model.encode_passages(texts, long="mean", chunk_overlap=16, titles=titles)  # one vector per document
    assert ids == [r["_id"] for r in recs]
    assert np.abs(vec - want).max() <= 1e-6, np.abs(vec - want).max()

    with pytest.raises(CorpusInputError, match="other settings"):  # --long is part of the resumable job's state
        embed_corpus([str(tmp_path / "c")], str(tmp_path / "mean"), str(tiny_bert), shard_mb=0.01, long="chunks")

    r = CliRunner().invoke(main, ["embed-corpus", str(tmp_path / "c"), "--out", str(tmp_path / "chunks"), "-m",
                                  str(tiny_bert), "--shard-mb", "0.01", "--workers", "2", "--long", "chunks",
                                  "--chunk-overlap", "16", "--sink", f"index:{tmp_path / 'ix'}"])
    assert r.exit_code == 0, r.output
    expected = chunk(texts, model, overlap=16, titles=titles)
    ids, vec, meta = read_out(tmp_path / "chunks")
    assert ids == [f"{d['_id']}#{n}" for d, cs in zip(recs, expected) for n in range(len(cs))]
    assert [(m["_doc"], tuple(m["_span"])) for m in meta] == [(d["_id"], c.span) for d, cs in zip(recs, expected)
                                                             for c in cs]
    np.testing.assert_allclose(vec, model.encode_passages([c.text for cs in expected for c in cs]), atol=1e-6)
    idx = Index.load(tmp_path / "ix", model)  # loaded as an index of chunks: it ranks documents
    assert idx.chunked and sorted(idx.documents()) == sorted(r["_id"] for r in recs)
    hit = idx.search(recs[3]["text"][:200], k=1)[0]  # a document, its best chunk's span and text
    assert hit.highlight == {d["_id"]: d["text"] for d in recs}[hit.id][hit.span[0]:hit.span[1]]


def test_bad_input_errors_then_rerun_finishes(cluster, tiny_bert, tmp_path):
    recs = write_corpus(tmp_path / "c")
    good = (tmp_path / "c" / "a.jsonl").read_text()
    lines = good.splitlines(keepends=True)
    bad = dict(json.loads(lines[5]))
    del bad["text"]
    (tmp_path / "c" / "a.jsonl").write_text("".join(lines[:5]) + json.dumps(bad) + "\n" + "".join(lines[6:]))
    with pytest.raises(CorpusInputError, match=r"a.jsonl at byte \d+: no string field 'text'"):
        run(tmp_path / "c", tmp_path / "out", tiny_bert)
    # A CLI rerun is a new driver process: the failed run's actors are gone with the old one. In this
    # process, Ray Data may hold a failed run's actors (and so this 2-CPU cluster) for minutes.
    ray.shutdown()
    start_cluster()
    no_id = dict(json.loads(lines[5]))
    del no_id["_id"]
    (tmp_path / "c" / "a.jsonl").write_text("".join(lines[:5]) + json.dumps(no_id) + "\n" + "".join(lines[6:]))
    # what the actors run on each record, here without Ray: a second failing job in a row on this
    # 2-CPU cluster can wait forever for the CPUs of the first one's actors, which Ray Data releases late
    with pytest.raises(CorpusInputError, match=r"a.jsonl at byte \d+: no id in field '_id' or 'id'"):
        for spec in plan_shards([str(tmp_path / "c")]):
            for where, rec in read_records(spec):
                document(where, rec, Fields())

    # fixed, but with an id that the parquet file also has
    dup = dict(json.loads(lines[-1]), _id=recs[-1]["_id"])
    (tmp_path / "c" / "a.jsonl").write_text("".join(lines[:-1]) + json.dumps(dup) + "\n")
    with pytest.raises(CorpusInputError, match=rf"appear more than once, e.g. '{recs[-1]['_id']}'"):
        run(tmp_path / "c", tmp_path / "out", tiny_bert)
    assert not (tmp_path / "out" / "manifest.json").exists()

    (tmp_path / "c" / "a.jsonl").write_text(good)
    s = run(tmp_path / "c", tmp_path / "out", tiny_bert)
    assert s["shards_embedded"] < s["shards"]  # the parquet file's shards were kept
    check_complete(tmp_path / "out", reference(tiny_bert, recs))


def test_cli_embeds_into_lancedb_and_searches(cluster, tiny_bert, tmp_path):
    from click.testing import CliRunner

    from e5kit.cli import main

    recs = write_corpus(tmp_path / "c", 60)
    db = f"lancedb:{tmp_path / 'ldb'}?table=docs"
    r = CliRunner().invoke(main, ["embed-corpus", str(tmp_path / "c"), "--out", str(tmp_path / "v"), "-m", str(tiny_bert),
                                  "--shard-mb", "0.002", "--workers", "2", "--sink", db])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["rows"] == 60 and f"loaded 60 rows into {db}" in r.stderr
    r = CliRunner().invoke(main, ["search", db, recs[7]["text"], "-k", "3", "--format", "jsonl"])
    assert r.exit_code == 0, r.output
    hits = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(hits) == 3 and hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    q = E5(tiny_bert).encode_queries([recs[7]["text"]])[0]
    exact = sorted(((float(q @ v), i) for i, v in reference(tiny_bert, recs).items()), reverse=True)[:3]
    assert [h["id"] for h in hits] == [i for _, i in exact]
    r = CliRunner().invoke(main, ["load-vectors", str(tmp_path / "v"), "--into", f"lancedb:{tmp_path / 'ldb'}?table=other"])
    assert r.exit_code == 0 and "loaded 60 rows" in r.stderr, r.output
