"""e5kit.Index: exact search equals brute force, approximate backends reach exact results, save/load
round trips, deletes, and clear errors for corrupt or mismatched files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from e5kit import E5, Index, IndexFileError, IndexMismatchError
from e5kit.index import chunked_topk


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, dim: int, seed: int = 0, centers: int = 50) -> np.ndarray:
    """Vectors with structure (like text embeddings), not uniform noise."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, dim))
    return unit(c[rng.integers(0, centers, n)] + 0.4 * rng.standard_normal((n, dim)))


def brute_force(q: np.ndarray, x: np.ndarray, k: int, alive: np.ndarray | None = None):
    s = q @ x.T
    if alive is not None:
        s[:, ~alive] = -np.inf
    order = np.lexsort((np.broadcast_to(np.arange(x.shape[0]), s.shape), -s), axis=1)[:, :k]
    return np.take_along_axis(s, order, axis=1), order


@pytest.fixture(scope="module")
def data():
    x = clustered(3000, 48)
    x[100] = x[7]  # exact ties: same vector twice
    x[2000] = x[7]
    q = unit(np.vstack([clustered(40, 48, seed=1), x[7:8]]))
    return x, q, [f"doc-{i}" for i in range(len(x))]


def recall(rows_a: np.ndarray, rows_b: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(rows_a, rows_b)]))


@pytest.mark.parametrize("chunk_rows", [1, 97, 65536])
def test_exact_equals_brute_force(data, chunk_rows):
    x, q, ids = data
    idx = Index(dim=48, chunk_rows=chunk_rows)
    idx.add(ids[:1234], embeddings=x[:1234])
    idx.add(ids[1234:], embeddings=x[1234:])
    s, r = idx.search_vectors(q, 10)
    bs, br = brute_force(q, x, 10)
    np.testing.assert_array_equal(r, br)  # ties broken by insertion order, as in the brute force
    np.testing.assert_allclose(s, bs, rtol=0, atol=1e-5)
    hits = idx.search(q[-1], k=3)
    assert [h.id for h in hits] == ["doc-7", "doc-100", "doc-2000"]


def test_chunked_topk_fewer_rows_than_k_and_query_blocks(data):
    x = unit(np.random.default_rng(3).standard_normal((5, 8)))
    s, r = chunked_topk(x[:2], 5, 10, lambda q, a, b: q @ x[a:b].T, chunk_rows=2)
    assert r.shape == (2, 5) and sorted(r[0]) == list(range(5)) and r[0, 0] == 0
    big, q, _ = data
    s, r = chunked_topk(q, len(big), 7, lambda qq, a, b: qq @ big[a:b].T, chunk_rows=500, query_block=3)
    bs, br = brute_force(q, big, 7)
    np.testing.assert_array_equal(r, br)


def test_delete_and_upsert(data):
    x, q, ids = data
    idx = Index(dim=48, chunk_rows=500)
    idx.add(ids, embeddings=x, metadata=[{"n": i} for i in range(len(ids))])
    _, top = brute_force(q, x, 1)
    gone = sorted({ids[i] for i in top[:, 0]})
    assert idx.delete(gone) == len(gone)
    assert len(idx) == len(ids) - len(gone) and gone[0] not in idx
    alive = np.array([i not in set(gone) for i in ids])
    s, r = idx.search_vectors(q, 10)
    bs, br = brute_force(q, x, 10, alive)
    np.testing.assert_array_equal(r, br)
    with pytest.raises(KeyError, match="not in the index"):
        idx.delete(["no-such-id"])
    assert idx.delete(["no-such-id"], missing_ok=True) == 0
    with pytest.raises(ValueError, match="already in the index"):
        idx.add([ids[5]], embeddings=x[:1])
    idx.upsert([ids[5]], embeddings=-x[5:6], metadata=[{"n": "new"}])
    assert idx.metadata(ids[5]) == {"n": "new"}
    assert idx.search(-x[5], k=1)[0].id == ids[5]
    idx.compact()
    assert len(idx.row_ids()) == len(idx) and idx.search(-x[5], k=1)[0].id == ids[5]


@pytest.mark.parametrize("storage,min_recall", [("int8", 0.97), ("binary", 0.4)])
def test_quantized_storage_with_rescoring(storage, min_recall):
    # 384-d as e5-small; noise-dominated neighbourhoods are hard for 1-bit codes, hence 0.4 at 4x rescoring
    x = clustered(3000, 384, seed=5)
    q, ids = unit(clustered(40, 384, seed=6)), [f"doc-{i}" for i in range(len(x))]
    idx = Index(dim=384, storage=storage, chunk_rows=700)
    idx.add(ids, embeddings=x)
    _, br = brute_force(q, x, 10)
    _, r = idx.search_vectors(q, 10)
    assert recall(r, br) >= min_recall
    # Rescoring with float vectors: with every row as a candidate the result is exact.
    full = Index(dim=384, storage=storage, rescore_multiplier=len(x))
    full.add(ids, embeddings=x)
    s, r = full.search_vectors(q, 10)
    np.testing.assert_array_equal(r, br)
    no_rescore = Index(dim=384, storage=storage, rescore=False)
    no_rescore.add(ids, embeddings=x)
    assert recall(no_rescore.search_vectors(q, 10)[1], br) <= recall(r, br)


@pytest.mark.parametrize("backend,storage,kw,min_recall", [
    ("hnsw", "float32", {}, 0.95),
    ("hnsw", "int8", {}, 0.95),
    ("ivfpq", "float32", {"nlist": 16, "nprobe": 16, "pq_m": 12}, 0.9),
])
def test_faiss_backends(data, backend, storage, kw, min_recall):
    x, q, ids = data
    idx = Index(dim=48, kind=backend, storage=storage, **kw)
    idx.add(ids[:2000], embeddings=x[:2000])
    idx.search_vectors(q, 10)  # builds the FAISS index, then grows it
    idx.add(ids[2000:], embeddings=x[2000:])
    _, br = brute_force(q, x, 10)
    s, r = idx.search_vectors(q, 10)
    assert recall(r, br) >= min_recall
    # deleted rows are filtered inside FAISS
    victim = ids[br[0, 0]]
    idx.delete([victim])
    assert victim not in [h.id for h in idx.search(q[0], k=10)]


@pytest.mark.parametrize("backend,storage", [("exact", "float32"), ("exact", "int8"), ("exact", "binary"),
                                             ("hnsw", "float32"), ("ivfpq", "float32")])
def test_save_load_round_trip(tmp_path, data, backend, storage):
    x, q, ids = data
    kw = {"nlist": 8, "pq_m": 12} if backend == "ivfpq" else {}
    idx = Index(dim=48, kind=backend, storage=storage, **kw)
    idx.add(ids, embeddings=x, metadata=[{"i": i, "tag": "é"} if i % 2 else None for i in range(len(ids))])
    idx.delete(["doc-3", "doc-10"])
    before = idx.search(q, k=10)
    idx.save(tmp_path / "ix")
    for mmap in (True, False):
        loaded = Index.load(tmp_path / "ix", mmap=mmap)
        assert len(loaded) == len(idx) and loaded.ids == idx.ids
        assert loaded.search(q, k=10) == before
        assert loaded.metadata("doc-1") == {"i": 1, "tag": "é"} and loaded.metadata("doc-2") is None
        assert "doc-3" not in loaded
    # a loaded (memory-mapped) index accepts more vectors and saves again
    loaded.add(["extra"], embeddings=x[:1] * -1)
    loaded.save(tmp_path / "ix")
    again = Index.load(tmp_path / "ix")
    assert again.search(-x[0], k=1)[0].id == "extra" and len(again) == len(idx) + 1
    assert sorted(p.name for p in (tmp_path / "ix").iterdir() if p.name != "index.json")  # old generations gone
    assert len(list((tmp_path / "ix").glob("vectors-*.npy"))) == 1


def test_interrupted_save_leaves_previous_index(tmp_path, data):
    x, q, ids = data
    idx = Index(dim=48)
    idx.add(ids[:100], embeddings=x[:100])
    idx.save(tmp_path / "ix")
    # What a save killed before its manifest rename leaves behind: new-generation files and a temp file.
    (tmp_path / "ix" / "vectors-aaaaaaaaaaaa.npy").write_bytes(b"partial")
    (tmp_path / "ix" / ".index.json.1234abcd.tmp").write_text("{")
    loaded = Index.load(tmp_path / "ix")
    assert len(loaded) == 100 and loaded.search(q[:2], k=5) == idx.search(q[:2], k=5)
    loaded.save(tmp_path / "ix")
    names = {p.name for p in (tmp_path / "ix").iterdir()}
    assert "vectors-aaaaaaaaaaaa.npy" not in names and ".index.json.1234abcd.tmp" not in names


def test_corrupt_files_give_clear_errors(tmp_path, data):
    x, _, ids = data
    idx = Index(dim=48)
    idx.add(ids[:50], embeddings=x[:50])
    d = idx.save(tmp_path / "ix")
    vec = next(d.glob("vectors-*.npy"))
    raw = bytearray(vec.read_bytes())
    raw[-5] ^= 0xFF
    vec.write_bytes(bytes(raw))
    with pytest.raises(IndexFileError, match="SHA-256.*corrupt"):
        Index.load(d)
    vec.write_bytes(bytes(raw[:-100]))
    with pytest.raises(IndexFileError, match="truncated"):
        Index.load(d)
    vec.write_bytes(b"not an npy file" + bytes(len(raw) - 15))
    with pytest.raises(IndexFileError, match="not a readable .npy"):
        Index.load(d, verify=False)
    (d / "index.json").write_text('{"format": "e5kit-index", "vers')
    with pytest.raises(IndexFileError, match="index.json is corrupt"):
        Index.load(d)
    with pytest.raises(IndexFileError, match="not a directory"):
        Index.load(tmp_path / "nothing-here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IndexFileError, match="index.json is missing"):
        Index.load(tmp_path / "empty")


def test_bad_input_errors(data):
    x, _, ids = data
    idx = Index(dim=48)
    with pytest.raises(IndexMismatchError, match="dimension 16"):
        idx.add(["a"], embeddings=np.ones((1, 16)))
    with pytest.raises(ValueError, match="NaN"):
        idx.add(["a"], embeddings=np.full((1, 48), np.nan))
    with pytest.raises(ValueError, match="duplicate ids"):
        idx.add(["a", "a"], embeddings=x[:2])
    with pytest.raises(ValueError, match="2 ids but 1 metadata"):
        idx.add(["a", "b"], embeddings=x[:2], metadata=[{}])
    with pytest.raises(TypeError, match="JSON serializable"):
        idx.add(["a"], embeddings=x[:1], metadata=[{"x": object()}])
    assert len(idx) == 0  # failed adds add nothing
    with pytest.raises(ValueError, match="no model"):
        idx.search("a text query")
    small = Index(dim=48, kind="ivfpq")
    small.add(ids[:10], embeddings=x[:10])
    with pytest.raises(ValueError, match="ivfpq needs at least"):
        small.search_vectors(x[:1], 3)
    with pytest.raises(ValueError, match="backend must be"):
        Index(dim=48, backend="annoy")


def test_text_index_with_model_and_mismatch(tmp_path, tiny_bert, tiny_xlmr):
    model = E5(str(tiny_bert))
    texts = ["the cell study of gene", "cancer risk in patients", "protein for women per day",
             "marathon in the mountain", "government leaders meeting"]
    ids = [f"t{i}" for i in range(len(texts))]
    idx = Index(model)
    idx.add(ids, texts, metadata=[{"text": t} for t in texts])
    p = model.encode_passages(texts)
    qv = model.encode_queries(["cancer risk"])
    expected = [ids[i] for i in np.argsort(-(qv @ p.T)[0], kind="stable")]
    hits = idx.search("cancer risk", k=5)
    assert [h.id for h in hits] == expected
    np.testing.assert_allclose([h.score for h in hits], -np.sort(-(qv @ p.T)[0]), atol=1e-5)
    idx.save(tmp_path / "ix")
    same = Index.load(tmp_path / "ix", str(tiny_bert))  # a path string loads the model
    assert same.search("cancer risk", k=5) == hits
    other = E5(str(tiny_xlmr))  # same dimension, different weights
    with pytest.raises(IndexMismatchError, match="was built with model"):
        Index.load(tmp_path / "ix", other)
    small = Index(dim=16)
    small.add(["a"], embeddings=np.ones((1, 16)))
    small.save(tmp_path / "ix16")
    with pytest.raises(IndexMismatchError, match="holds 16-d vectors.*32 dimensions"):
        Index.load(tmp_path / "ix16", model)
    with pytest.raises(IndexMismatchError):
        Index(model, dim=16)
    meta = json.loads((tmp_path / "ix" / "index.json").read_text())
    assert meta["model"] == model.name and meta["dim"] == 32 and meta["prompt_style"] == "e5"
