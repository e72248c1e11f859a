"""FAISS HNSW vs exact search through e5kit.Index on random unit vectors.

    flock /tmp/e5kit-cpu.lock python benchmarks/bench_faiss.py --n 1000000 --dim 384

Measures, side by side in one process on the same vectors and queries: build time, memory
(resident-set growth), queries/s (a batch of queries), and recall@10 against the exact top 10 for
several HNSW efSearch values. Random unit vectors are the hardest case for a graph index (no
cluster structure), so the recall here is a lower bound for real embeddings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from e5kit.index import Index  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def unit_vectors(n: int, dim: int, seed: int, chunk: int = 100_000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for i in range(0, n, chunk):
        x = rng.standard_normal((min(chunk, n - i), dim), dtype=np.float32)
        out[i:i + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def clustered_unit_vectors(n: int, dim: int, seed: int, centers: np.ndarray, noise: float = 0.05,
                           chunk: int = 100_000) -> np.ndarray:
    """Unit vectors around shared random centres: neighbourhoods exist, as with text embeddings."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for i in range(0, n, chunk):
        m = min(chunk, n - i)
        x = centers[rng.integers(0, len(centers), m)] + noise * rng.standard_normal((m, dim), dtype=np.float32)
        out[i:i + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def timed_search(index: Index, q: np.ndarray, k: int, **kw) -> tuple[np.ndarray, float]:
    t = time.perf_counter()
    _, rows = index.search_vectors(q, k, **kw)
    return rows, time.perf_counter() - t


def recall(rows: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(rows, truth)]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--hnsw-m", type=int, default=16)
    ap.add_argument("--ef-construction", type=int, default=80)
    ap.add_argument("--ef-search", default="16,64,128,256,512")
    ap.add_argument("--ivfpq", action="store_true", help="Also measure IVF-PQ (training takes minutes at 1M).")
    ap.add_argument("--data", choices=["uniform", "clustered"], default="uniform",
                    help="uniform random unit vectors, or unit vectors around 10,000 random centres")
    ap.add_argument("--out", default=".bench/faiss.json")
    args = ap.parse_args()
    import faiss

    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, n={args.n:,} dim={args.dim}", flush=True)
    if args.data == "uniform":
        x = unit_vectors(args.n, args.dim, seed=0)
        q = unit_vectors(args.queries, args.dim, seed=1)
    else:
        centers = unit_vectors(10_000, args.dim, seed=2)
        x = clustered_unit_vectors(args.n, args.dim, 0, centers)
        q = clustered_unit_vectors(args.queries, args.dim, 1, centers)
    ids = [str(i) for i in range(args.n)]
    results: dict = {"data": args.data, "n": args.n, "dim": args.dim, "queries": args.queries, "k": args.k}

    m0 = rss_mb()
    t = time.perf_counter()
    exact = Index(dim=args.dim, metric="ip")
    exact.add(ids, embeddings=x)
    exact.search_vectors(q[:1], 1)  # consolidate storage
    exact_build = time.perf_counter() - t
    exact_mem = rss_mb() - m0
    truth, t_exact = timed_search(exact, q, args.k)
    results["exact"] = {"build_s": exact_build, "memory_mb": exact_mem, "qps": args.queries / t_exact}
    print(f"exact: build {exact_build:.1f} s, +{exact_mem:.0f} MB, {args.queries / t_exact:.1f} queries/s", flush=True)
    single = [timed_search(exact, q[i:i + 1], args.k)[1] for i in range(5)]
    results["exact"]["single_query_ms"] = 1000 * float(np.median(single))

    m0 = rss_mb()
    t = time.perf_counter()
    del exact  # memory below = the HNSW Index's own float copy + FAISS's vectors and graph
    hnsw = Index(dim=args.dim, metric="ip", kind="hnsw", hnsw_m=args.hnsw_m, ef_construction=args.ef_construction)
    hnsw.add(ids, embeddings=x)
    hnsw.search_vectors(q[:1], 1)  # builds the graph
    hnsw_build = time.perf_counter() - t
    hnsw_mem = rss_mb() - m0
    results["hnsw"] = {"M": args.hnsw_m, "ef_construction": args.ef_construction, "build_s": hnsw_build,
                       "memory_mb": hnsw_mem, "by_ef_search": {}}
    print(f"hnsw M={args.hnsw_m} efC={args.ef_construction}: build {hnsw_build:.1f} s, +{hnsw_mem:.0f} MB", flush=True)
    for ef in [int(e) for e in args.ef_search.split(",")]:
        rows, dt = timed_search(hnsw, q, args.k, ef_search=ef)
        r = {"recall_at_10": recall(rows, truth), "qps": args.queries / dt}
        results["hnsw"]["by_ef_search"][ef] = r
        print(f"  efSearch={ef:4d}: recall@10 {r['recall_at_10']:.4f}, {r['qps']:.0f} queries/s "
              f"({r['qps'] / results['exact']['qps']:.1f}x exact)", flush=True)

    if args.ivfpq:
        del hnsw
        m0 = rss_mb()
        t = time.perf_counter()
        ivf = Index(dim=args.dim, metric="ip", kind="ivfpq", pq_m=48)
        ivf.add(ids, embeddings=x)
        ivf.search_vectors(q[:1], 1)  # trains and fills the inverted lists
        build = time.perf_counter() - t
        results["ivfpq"] = {"nlist": ivf.params["nlist"], "pq_m": 48, "build_s": build,
                            "memory_mb": rss_mb() - m0, "by_nprobe": {}}
        print(f"ivfpq nlist={ivf.params['nlist']} m=48: build {build:.1f} s", flush=True)
        for nprobe in (8, 32, 128):
            rows, dt = timed_search(ivf, q, args.k, nprobe=nprobe)
            r = {"recall_at_10": recall(rows, truth), "qps": args.queries / dt}
            results["ivfpq"]["by_nprobe"][nprobe] = r
            print(f"  nprobe={nprobe}: recall@10 {r['recall_at_10']:.4f} (rescored), {r['qps']:.0f} queries/s", flush=True)

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    main()
