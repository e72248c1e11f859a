"""Exact top-k over stored rows, the scorers for float / int8 / binary storage, and rescoring."""

from __future__ import annotations

from typing import Callable

import numpy as np

ScoreChunk = Callable[[np.ndarray, int, int], np.ndarray]


def chunked_topk(
    queries: np.ndarray,
    n_rows: int,
    k: int,
    score_chunk: ScoreChunk,
    chunk_rows: int = 65536,
    excluded: np.ndarray | None = None,
    query_block: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` rows by score, scanning ``n_rows`` stored rows ``chunk_rows`` at a time.

    Memory beyond the inputs is bounded by ``query_block x chunk_rows`` scores, however many rows.

    ``score_chunk(queries, start, stop)`` returns the (n_queries, stop - start) scores of that slice;
    rows where ``excluded`` is True never appear. Returns (scores, rows), each (n_queries, k'),
    sorted by descending score, ties by ascending row; k' = min(k, rows available), and rows that
    could not be filled (fewer live rows than k) hold -1 with score -inf.
    """
    if queries.shape[0] > query_block:  # bound the score block to query_block x chunk_rows floats
        parts = [chunked_topk(queries[i:i + query_block], n_rows, k, score_chunk, chunk_rows, excluded, query_block)
                 for i in range(0, queries.shape[0], query_block)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    nq = queries.shape[0]
    k = max(0, min(k, n_rows))
    best_s = np.full((nq, k), -np.inf, dtype=np.float32)
    best_r = np.full((nq, k), -1, dtype=np.int64)
    if k == 0 or nq == 0:
        return best_s, best_r
    for start in range(0, n_rows, chunk_rows):
        stop = min(start + chunk_rows, n_rows)
        s = np.asarray(score_chunk(queries, start, stop), dtype=np.float32)
        if excluded is not None:
            dead = excluded[start:stop]
            if dead.any():
                s[:, dead] = -np.inf
        rows = np.arange(start, stop, dtype=np.int64)
        if s.shape[1] > k:
            part = np.argpartition(-s, k - 1, axis=1)[:, :k]
            s = np.take_along_axis(s, part, axis=1)
            r = rows[part]
        else:
            r = np.broadcast_to(rows, s.shape)
        all_s = np.concatenate([best_s, s], axis=1)
        all_r = np.concatenate([best_r, r], axis=1)
        # lexsort: last key is primary -> descending score, then ascending row (-1 fillers last).
        order = np.lexsort((np.where(all_r < 0, np.iinfo(np.int64).max, all_r), -all_s), axis=1)[:, :k]
        best_s = np.take_along_axis(all_s, order, axis=1)
        best_r = np.take_along_axis(all_r, order, axis=1)
    best_r[~np.isfinite(best_s)] = -1
    return best_s, best_r


def float_scores(vectors: np.ndarray) -> ScoreChunk:
    def score(q: np.ndarray, start: int, stop: int) -> np.ndarray:
        return q @ np.asarray(vectors[start:stop], dtype=np.float32).T

    return score


def int8_scores(codes: np.ndarray, ranges: np.ndarray) -> ScoreChunk:
    """Asymmetric int8 scores: float query x dequantised codes, without materialising floats."""
    starts, steps = ranges[0], np.maximum((ranges[1] - ranges[0]) / 255, 1e-12)

    def score(q: np.ndarray, start: int, stop: int) -> np.ndarray:
        # dequant(c) = starts + (c + 128) * steps  =>  q.dequant = (q*steps).c + q.(starts + 128 steps)
        base = q @ (starts + 128 * steps)
        return (q * steps) @ codes[start:stop].astype(np.float32).T + base[:, None]

    return score


def binary_scores(codes: np.ndarray, dim: int) -> ScoreChunk:
    """Asymmetric binary scores: float query x the +-1 sign vector of each stored embedding."""

    def score(q: np.ndarray, start: int, stop: int) -> np.ndarray:
        bits = np.unpackbits(codes[start:stop], axis=1, count=dim).astype(np.float32)
        return q @ (2 * bits - 1).T

    return score


def quantization_ranges(vectors: np.ndarray, sample: int = 100_000, seed: int = 0) -> np.ndarray:
    """Per-dimension (min, max) calibration for int8 codes, from at most ``sample`` rows."""
    if len(vectors) > sample:
        rows = np.sort(np.random.default_rng(seed).choice(len(vectors), sample, replace=False))
        vectors = vectors[rows]
    return np.stack([vectors.min(axis=0), vectors.max(axis=0)]).astype(np.float32)


def quantize_codes(vectors: np.ndarray, storage: str, chunk_rows: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(codes, ranges) of ``vectors`` for int8 or binary storage, computed ``chunk_rows`` at a time."""
    dim = vectors.shape[1]
    if storage == "binary":
        return np.packbits(vectors > 0, axis=1), None
    if not len(vectors):
        return np.zeros((0, dim), np.int8), None
    ranges = quantization_ranges(vectors)
    # int8 codes as sentence-transformers' quantize_embeddings defines them.
    from ..api import quantize_embeddings

    codes = np.concatenate([quantize_embeddings(np.asarray(vectors[i:i + chunk_rows]), "int8", ranges)
                            for i in range(0, len(vectors), chunk_rows)])
    return codes, ranges


def rescore(q: np.ndarray, vectors: np.ndarray, s: np.ndarray, r: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Replace approximate scores of the candidates by float inner products; keep the best ``k``."""
    valid = r >= 0
    cand = np.where(valid, r, 0)
    uniq, inv = np.unique(cand, return_inverse=True)
    exact = np.asarray(vectors[uniq], dtype=np.float32)  # one gather (page-ins for a memmap)
    sc = np.einsum("qd,qcd->qc", q, exact[inv.reshape(cand.shape)])
    sc = np.where(valid, sc, -np.inf).astype(np.float32)
    order = np.lexsort((np.where(valid, r, np.iinfo(np.int64).max), -sc), axis=1)[:, :k]
    s2, r2 = np.take_along_axis(sc, order, axis=1), np.take_along_axis(r, order, axis=1)
    r2[~np.isfinite(s2)] = -1
    return s2, r2
