"""PostgreSQL + pgvector (a real server from the pgserver wheel, on a local socket) and LanceDB:
SciFact retrieval from each store equals the exact e5kit Index; idempotent loads; bad input."""

from __future__ import annotations

import numpy as np
import pytest

pgserver = pytest.importorskip("pgserver", reason="[required] pgserver (PostgreSQL + pgvector) is not installed")
pytest.importorskip("psycopg", reason="[required] psycopg is not installed")
pytest.importorskip("lancedb", reason="[required] lancedb is not installed")

from e5kit import E5, Index  # noqa: E402
from e5kit.scale.shards import write_vectors  # noqa: E402
from e5kit.stores import StoreError, load_vectors, open_store  # noqa: E402
from e5kit.stores.lancedb import LanceDBStore  # noqa: E402


@pytest.fixture(scope="module")
def pg(tmp_path_factory):
    srv = pgserver.get_server(tmp_path_factory.mktemp("pgdata"), cleanup_mode="delete")
    yield srv.get_uri()
    srv.cleanup()


def uri(pg: str, table: str) -> str:
    return f"{pg}&table={table}"


@pytest.fixture(scope="module")
def scifact_vectors(ml_e5, scifact_subset, tmp_path_factory):
    """The shared SciFact subset (all test queries, their relevant documents, distractors; tests/conftest.py)
    embedded once and written as parquet vectors."""
    from e5kit.evaluate.data import load_beir
    from e5kit.prompts import beir_document

    data = load_beir(scifact_subset, "test")
    ids, qids = sorted(data.corpus), sorted(data.qrels)
    model = E5(ml_e5)  # the same vectors go into every store: what is compared is the search
    vec = model.encode_passages([beir_document(*data.corpus[d]) for d in ids])
    out = tmp_path_factory.mktemp("vectors")
    write_vectors(str(out), str(ml_e5), ids, vec, [{"title": data.corpus[d][0]} for d in ids])
    exact = Index(model)
    exact.add(ids, embeddings=vec)
    queries = [data.queries[q] for q in qids]
    return model, str(out), exact, qids, queries, {q: data.qrels[q] for q in qids}


def ndcg10(qids, hits, qrels) -> float:
    from e5kit.evaluate.metrics import retrieval_scores

    run = {q: {h.id: h.score for h in hs} for q, hs in zip(qids, hits)}
    return retrieval_scores(qrels, run, [10])[0]["ndcg_at_10"]


def recall10(hits, ref) -> float:
    return float(np.mean([len({h.id for h in a} & {h.id for h in b}) / len(b) for a, b in zip(hits, ref)]))


def test_scifact_from_pgvector_and_lancedb_equals_exact_index(pg, scifact_vectors, tmp_path):
    model, vectors, exact, qids, queries, qrels = scifact_vectors
    qv = model.encode_queries(queries)
    ref = exact.search(qv, k=10)
    base = ndcg10(qids, ref, qrels)
    assert base > 0.5  # the real model retrieves (SciFact nDCG@10 ~0.67 for multilingual-e5-small)
    stores = {"pgvector": open_store(uri(pg, "scifact"), create=True, dim=model.dim),
              "lancedb": LanceDBStore(str(tmp_path / "ldb"), "scifact", create=True, dim=model.dim)}
    for name, store in stores.items():
        r = load_vectors(vectors, store)
        assert r["rows"] == len(exact) == len(store)
        if name == "lancedb":
            store.create_index(min_rows=0)  # the ANN index even on this small subset
        # the searches below go through the ANN index (so what is checked is ANN recall), exact=True does not
        ann = "ANNSubIndex" if name == "lancedb" else "Index Scan using scifact_vector_hnsw"
        assert ann in store.explain(qv[0]) and ann not in store.explain(qv[0], exact=True), name
        hits = store.search(qv, k=10)  # HNSW (pgvector ef_search=100; LanceDB IVF_HNSW_SQ, refine x4)
        assert recall10(hits, ref) >= 0.99, name
        assert round(ndcg10(qids, hits, qrels), 3) == round(base, 3), name
        flat = store.search(qv, k=10, exact=True)
        assert [[h.id for h in a] for a in flat] == [[h.id for h in b] for b in ref], name
        assert max(abs(a.score - b.score) for x, y in zip(flat, ref) for a, b in zip(x, y)) < 1e-5
        assert hits[0][0].metadata["title"]
        text = store.with_model(model).search(queries[:5], k=10)  # text queries: formatted as encode_queries does
        assert [[h.id for h in a] for a in text] == [[h.id for h in b] for b in hits[:5]], name
        load_vectors(vectors, store)  # loading again is an idempotent upsert
        assert len(store) == len(exact)


def test_index_build_sinks_chunks_into_pgvector(pg, tiny_bert, tmp_path):
    import json

    from click.testing import CliRunner

    from e5kit.cli import main

    rng = np.random.default_rng(3)
    words = "the cell study gene cancer risk patients protein women day marathon mountain".split()
    docs = [{"_id": f"d{i}", "title": f"title {i}", "text": " ".join(rng.choice(words, 20 + 700 * (i % 3)))}
            for i in range(6)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    table = uri(pg, "chunks")
    r = CliRunner().invoke(main, ["index", "build", str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "ix"), "-m",
                                  str(tiny_bert), "--long", "chunks", "--sink", table])
    assert r.exit_code == 0, r.output
    idx = Index.load(tmp_path / "ix")
    assert idx.chunked and len(idx) > len(docs) and f"loaded {len(idx)} rows into {table}" in r.output
    store = open_store(table)
    assert len(store) == len(idx) and store.dim == idx.dim and store.info["model"] == idx.model_name
    for row in ("d1#0", "d1#1", "d2#2"):  # each chunk row with its vector and its document id and span
        (h,) = store.search(idx.vector(row)[None, :], k=1, exact=True)
        assert h[0].id == row and abs(h[0].score - 1) < 1e-5 and h[0].metadata == idx.metadata(row)
    (index,) = store.conn.execute("SELECT indexdef FROM pg_indexes WHERE tablename = 'chunks' AND indexdef "
                                  "LIKE '%hnsw%'").fetchone()
    assert "vector_ip_ops" in index  # the ANN index was built


def test_pgvector_upserts_are_idempotent_and_bad_input_is_refused(pg):
    rng = np.random.default_rng(1)
    v = rng.standard_normal((50, 8)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    ids = [f"x{i}" for i in range(50)]
    s = open_store(uri(pg, "small"), create=True, dim=8)
    s.upsert(ids[:20], v[:20], [{"n": i} for i in range(20)])  # a load that stopped part way ...
    s.upsert(ids, v, [{"n": i} for i in range(50)])  # ... rerun: every row once
    s.create_index()
    assert len(s) == 50
    (h,) = s.search(v[7:8], k=1)
    assert h[0].id == "x7" and abs(h[0].score - 1) < 1e-5 and h[0].metadata == {"n": 7}

    with pytest.raises(StoreError, match="appears twice in one batch"):
        s.upsert(["y1", "y1"], v[:2])
    with pytest.raises(StoreError, match="8-d vectors"):
        s.upsert(["y1"], np.ones((1, 16), np.float32))
    with pytest.raises(StoreError, match="holds 8-d vectors"):
        open_store(uri(pg, "small"), dim=16)
    assert len(s) == 50  # nothing half-written
    with pytest.raises(StoreError, match="cannot connect to PostgreSQL"):
        open_store("postgresql://postgres@127.0.0.1:1/postgres", create=True, dim=8)
    with pytest.raises(StoreError, match="no e5kit table"):
        open_store(uri(pg, "missing"))


def test_lancedb_upserts_are_idempotent_and_bad_input_is_refused(tmp_path):
    v = np.eye(6, dtype=np.float32)
    s = open_store(f"lancedb:{tmp_path / 'db'}?table=t", create=True, dim=6)
    s.upsert(list("abc"), v[:3])
    s.upsert(list("abcdef"), v, [{"i": i} for i in range(6)])
    assert len(s) == 6
    (h,) = s.search(v[4:5], k=2)
    assert h[0].id == "e" and abs(h[0].score - 1) < 1e-6 and h[0].metadata == {"i": 4}
    with pytest.raises(StoreError, match="6-d vectors"):
        s.upsert(["z"], np.ones((1, 3), np.float32))
    with pytest.raises(StoreError, match="holds 6-d vectors"):
        open_store(f"lancedb:{tmp_path / 'db'}?table=t", dim=3)
    assert len(s) == 6
