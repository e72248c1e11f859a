"""Ray embed-corpus vs the one-process engine on the same SciFact passages, and sink write rates.

    flock /tmp/e5kit-cpu.lock python benchmarks/bench_scale.py --n 300 --rows 50000

1. one process: ``E5(model, threads=CPUS).encode_passages`` (model loaded, warmed up);
2. Ray: ``embed_corpus`` on a local cluster of CPUS CPUs, CPUS actors x 1 thread; wall time counts
   from the job's start (actor start-up and model loading included) and, separately, the actors' busy time;
3. pgvector (pgserver) and LanceDB: ``load_vectors`` of ROWS random unit 384-d vectors (rows/s), then the
   ANN index build.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import SCIFACT, random_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def scifact_records(n: int, seed: int = 0) -> list[dict]:
    recs = [json.loads(x) for x in (SCIFACT / "corpus.jsonl").read_text().splitlines() if x.strip()]
    idx = np.random.default_rng(seed).choice(len(recs), n, replace=False)
    return [{"_id": recs[i]["_id"], "title": recs[i]["title"], "text": recs[i]["text"]} for i in sorted(idx)]


def bench_embed(model_dir: Path, recs: list[dict], cpus: int, tmp: Path) -> dict:
    import ray

    from e5kit import E5
    from e5kit.prompts import beir_document
    from e5kit.scale.ray_job import embed_corpus
    from e5kit.scale.shards import Fields, iter_vectors

    corpus = tmp / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in recs))
    docs = [beir_document(r["title"], r["text"]) for r in recs]
    m = E5(model_dir, threads=cpus)
    tokens = sum(map(len, m.tokenize(m.format(docs, "passage"))))
    m.encode_passages(docs[:16])
    t0 = time.perf_counter()
    ref = m.encode_passages(docs)
    one = time.perf_counter() - t0
    del m

    ray.init(num_cpus=cpus, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT / "src")}})
    busy = []
    shard_mb = corpus.stat().st_size / (1 << 20) / (4 * cpus)  # ~4 shards per worker
    t0 = time.perf_counter()
    s = embed_corpus([str(corpus)], str(tmp / "vecs"), str(model_dir), fields=Fields(store_text=False),
                     shard_mb=shard_mb, workers=cpus, cpus_per_worker=1, on_shard=lambda r: busy.append(r["seconds"]))
    wall = time.perf_counter() - t0
    ray.shutdown()
    got = {}
    for ids, vec, _ in iter_vectors(str(tmp / "vecs")):
        got.update(zip(ids, vec))
    diff = float(np.abs(np.stack([got[r["_id"]] for r in recs]) - ref).max())
    return {"passages": len(recs), "tokens": tokens, "one_s": one, "one_tok_s": tokens / one, "ray_wall_s": wall,
            "ray_tok_s": tokens / wall, "ray_busy_tok_s": tokens / (sum(busy) / cpus), "shards": s["shards"],
            "workers": cpus, "max_abs_diff": diff}


def bench_sinks(rows: int, dim: int, tmp: Path) -> dict:
    import pgserver

    from e5kit.scale.shards import write_vectors
    from e5kit.stores import load_vectors, open_store

    v = np.random.default_rng(0).standard_normal((rows, dim)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    write_vectors(str(tmp / "rand"), "random", [f"r{i}" for i in range(rows)], v, [{"i": i} for i in range(rows)])
    srv = pgserver.get_server(tmp / "pg", cleanup_mode="delete")
    out = {}
    try:
        for name, uri in [("pgvector", srv.get_uri() + "&table=bench"), ("lancedb", f"lancedb:{tmp / 'ldb'}?table=bench")]:
            store = open_store(uri, dim=dim, create=True)
            r = load_vectors(str(tmp / "rand"), store)
            t0 = time.perf_counter()
            load_vectors(str(tmp / "rand"), store, index=False)  # the same rows again: an all-update upsert
            reupsert = rows / (time.perf_counter() - t0)
            # near-duplicate queries (a stored vector plus noise) ranked through the ANN index vs exact
            q = v[:100] + 0.5 * np.random.default_rng(1).standard_normal((100, dim)).astype(np.float32) / np.sqrt(dim)
            exact = np.argsort(-(q @ v.T), axis=1)[:, :10]
            t0 = time.perf_counter()
            hits = store.search_vectors(q, 10)
            qps = len(q) / (time.perf_counter() - t0)
            recall = np.mean([len({int(i[1:]) for i, _, _ in h} & set(e)) / 10 for h, e in zip(hits, exact)])
            out[name] = {"rows": rows, "rows_per_s": r["rows_per_s"], "index_s": r["index_seconds"],
                         "reupsert_rows_per_s": reupsert, "count": len(store), "recall_at_10": float(recall), "qps": qps}
    finally:
        srv.cleanup()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300, help="SciFact passages for the embedding comparison")
    ap.add_argument("--rows", type=int, default=50_000, help="vectors for the sink write rates")
    ap.add_argument("--cpus", type=int, default=os.cpu_count())
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        s = bench_sinks(args.rows, 384, Path(d))
        for name, r in s.items():
            print(f"{name}: {r['rows_per_s']:,.0f} rows/s first load, {r['reupsert_rows_per_s']:,.0f} rows/s re-upsert, "
                  f"index {r['index_s']:.1f} s, {r['count']} rows; recall@10 {r['recall_at_10']:.3f} at {r['qps']:.0f} q/s",
                  flush=True)
        e = bench_embed(random_model("small"), scifact_records(args.n), args.cpus, Path(d))
        print(f"one process ({args.cpus} threads): {e['one_tok_s']:,.0f} tok/s ({e['tokens']:,} tokens, {e['one_s']:.1f} s)")
        print(f"ray ({e['workers']} actors x 1 thread, {e['shards']} shards): {e['ray_tok_s']:,.0f} tok/s end to end "
              f"({e['ray_wall_s']:.1f} s, x{e['ray_tok_s'] / e['one_tok_s']:.2f}); busy actors {e['ray_busy_tok_s']:,.0f} "
              f"tok/s (x{e['ray_busy_tok_s'] / e['one_tok_s']:.2f}); max abs diff {e['max_abs_diff']:.1e}")
        print(json.dumps({"embed": e, "sinks": s}))


if __name__ == "__main__":
    main()
