"""The approximate search kinds through FAISS: HNSW (flat or 8-bit SQ) and IVF-PQ."""

from __future__ import annotations

from typing import Any

import numpy as np


class TooFewVectorsError(ValueError):
    """IVF-PQ cannot train its quantisers on this few vectors."""

    def __init__(self, needed: int, have: int, nlist: int, pq_bits: int):
        self.needed, self.have = needed, have
        super().__init__(f"ivfpq needs at least {needed} vectors to train (nlist={nlist}, pq_bits={pq_bits}); "
                         f"the index has {have}. Use kind='exact' or 'hnsw' for small collections")


def require_faiss() -> None:
    try:
        import faiss  # noqa: F401  (availability check)
    except ImportError as e:
        raise ImportError("approximate search kinds need FAISS: pip install faiss-cpu (or e5kit[search])") from e


def ivfpq_shape(n: int, dim: int, params: dict[str, Any]) -> tuple[int, int]:
    """(nlist, pq_m) for ``n`` vectors of ``dim``; raises before any training when they cannot work."""
    nlist = params["nlist"] or max(1, min(int(4 * np.sqrt(n)), n // 39))
    pq_m = params["pq_m"] or next(m for m in (dim // 8, dim // 4, dim // 2, dim) if m >= 1 and dim % m == 0)
    if dim % pq_m:
        raise ValueError(f"pq_m={pq_m} must divide the dimension {dim}")
    needed = max(nlist, 2 ** params["pq_bits"])
    if n < needed:
        raise TooFewVectorsError(needed, n, nlist, params["pq_bits"])
    return nlist, pq_m


def build(kind: str, storage: str, dim: int, vectors: np.ndarray, params: dict[str, Any]):
    """A new, trained (still empty) FAISS index; fills in the chosen nlist / pq_m in ``params``."""
    import faiss

    metric = faiss.METRIC_INNER_PRODUCT
    if kind == "hnsw":
        if storage == "int8":
            index = faiss.IndexHNSWSQ(dim, faiss.ScalarQuantizer.QT_8bit, params["hnsw_m"], metric)
            index.train(training_sample(vectors))
        else:
            index = faiss.IndexHNSWFlat(dim, params["hnsw_m"], metric)
        index.hnsw.efConstruction = params["ef_construction"]
        return index
    nlist, pq_m = ivfpq_shape(len(vectors), dim, params)
    index = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, nlist, pq_m, params["pq_bits"], metric)
    index.train(training_sample(vectors, min(200_000, max(50 * nlist, 100 * 2 ** params["pq_bits"]))))
    params["nlist"], params["pq_m"] = nlist, pq_m
    return index


def search(index, kind: str, q: np.ndarray, k: int, excluded: np.ndarray | None, ef_search: int,
           nprobe: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, rows) from FAISS, deleted rows filtered inside the search; row -1 / -inf = no result."""
    import faiss

    if kind == "hnsw":
        params = faiss.SearchParametersHNSW(efSearch=max(int(ef_search), k))
    else:
        params = faiss.SearchParametersIVF(nprobe=int(nprobe))
    if excluded is not None:
        params.sel = faiss.IDSelectorBitmap(np.packbits(~excluded, bitorder="little"))
    s, r = index.search(q, k, params=params)
    r = r.astype(np.int64)
    return np.where(r < 0, -np.inf, s).astype(np.float32), r


def serialize(index) -> bytes:
    import faiss

    return faiss.serialize_index(index).tobytes()


def deserialize(data: np.ndarray):
    import faiss

    return faiss.deserialize_index(data)


def training_sample(vectors: np.ndarray, size: int = 100_000, seed: int = 0) -> np.ndarray:
    if len(vectors) <= size:
        return np.ascontiguousarray(vectors, dtype=np.float32)
    rows = np.sort(np.random.default_rng(seed).choice(len(vectors), size, replace=False))
    return np.ascontiguousarray(vectors[rows], dtype=np.float32)
