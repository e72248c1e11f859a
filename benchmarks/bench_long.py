"""Long documents: SciFact abstracts concatenated into long documents, retrieval by truncation vs
chunks ranked by their best chunk (MaxP) vs one mean vector per document, with the shared model.

Each relevant abstract of the chosen test queries is placed at a random depth among 5-10 other
abstracts (drawn from abstracts no chosen query judges relevant); a long document is relevant to a
query when it contains an abstract relevant to it (with that abstract's grade). Seeded throughout.

    flock /tmp/e5kit-cpu.lock python benchmarks/bench_long.py [--queries 100] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def long_corpus(scifact: Path, n_queries: int | None, seed: int, lo: int = 5, hi: int = 10):
    """(doc ids, long texts, queries {id: text}, qrels {query: {long doc: grade}})."""
    from e5kit.evaluate.data import load_beir

    data = load_beir(scifact, "test")
    rng = np.random.default_rng(seed)
    q_ids = sorted(q for q in data.qrels if q in data.queries)
    if n_queries and n_queries < len(q_ids):
        q_ids = sorted(rng.choice(q_ids, n_queries, replace=False).tolist())
    relevant = sorted({d for q in q_ids for d in data.qrels[q] if d in data.corpus})
    rel_set = set(relevant)
    pool = [d for d in sorted(data.corpus) if d not in rel_set]
    rng.shuffle(pool)
    abstract = {d: f"{data.corpus[d][0]}\n{data.corpus[d][1]}".strip() for d in data.corpus}
    ids, texts, where = [], [], {}
    for n, d in enumerate(relevant):
        others = [pool.pop() for _ in range(int(rng.integers(lo, hi + 1)))]
        others.insert(int(rng.integers(0, len(others) + 1)), d)  # the relevant one at a random depth
        ids.append(f"long{n}")
        texts.append("\n\n".join(abstract[x] for x in others))
        where[d] = f"long{n}"
    qrels = {q: {} for q in q_ids}
    for q in q_ids:
        for d, grade in data.qrels[q].items():
            if d in where:
                qrels[q][where[d]] = max(grade, qrels[q].get(where[d], 0))
    return ids, texts, {q: data.queries[q] for q in q_ids}, qrels


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="Model dir (default: the shared multilingual-e5-small copy).")
    ap.add_argument("--queries", type=int, default=100, help="Seeded subset of SciFact test queries (0: all 300).")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overlap", type=int, default=64, help="Chunk overlap in tokens.")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    from bench_eval import SHARED, shared_model

    from e5kit import E5, Index
    from e5kit.chunking import mean_of_chunks
    from e5kit.evaluate.metrics import retrieval_scores
    from e5kit.pipeline import finish

    ids, texts, queries, qrels = long_corpus(SHARED / "data" / "scifact", args.queries or None, args.seed)
    model = E5(args.model or str(shared_model()), threads=args.threads)
    n_tokens = model.engine.count_tokens(model.format(texts, "passage"))
    print(f"{len(queries)} queries, {len(ids)} long documents, tokens per document (with prefix): median "
          f"{int(np.median(n_tokens))}, min {min(n_tokens)}, max {max(n_tokens)}", flush=True)
    q_ids = list(queries)
    q = model.encode_queries([queries[i] for i in q_ids])

    results = {}
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # every document is over the limit: that is the point
        trunc = model.encode_passages(texts)
    results["truncate (first 512 tokens)"] = (Index(dim=model.dim), trunc, time.perf_counter() - t,
                                               sum(min(n, model.max_tokens) for n in n_tokens))
    t = time.perf_counter()
    chunks = model.encode_passages(texts, long="chunks", chunk_overlap=args.overlap)
    t_chunks = time.perf_counter() - t
    chunk_tokens = sum(c.n_tokens for c in chunks.chunks)
    mean = finish(mean_of_chunks(chunks.vectors, chunks.doc, len(ids)))
    results["mean of chunk vectors"] = (Index(dim=model.dim), mean, t_chunks, chunk_tokens)
    print(f"{len(chunks)} chunks (overlap {args.overlap}), {chunk_tokens:,} tokens embedded in {t_chunks:.1f} s",
          flush=True)

    rows = []
    for name, (index, vectors, secs, tokens) in results.items():
        index.add(ids, embeddings=vectors)
        s, r = index.search_vectors(q, 10)
        run = {qi: {ids[j]: float(x) for x, j in zip(srow, rrow) if j >= 0} for qi, srow, rrow in zip(q_ids, s, r)}
        rows.append((name, retrieval_scores(qrels, run, [10])[0], secs, tokens))
    chunked = Index(dim=model.dim, chunked=True)
    chunked.add_documents(ids, texts, chunks=chunks)
    for aggregate, label in [("max", "chunks, MaxP (best chunk)"), ("sum", "chunks, sum of best 3"),
                             ("mean", "chunks, mean of best 3")]:
        hits = chunked.search(q, k=10, aggregate=aggregate, top_chunks=3)
        run = {qi: {h.id: h.score for h in hs} for qi, hs in zip(q_ids, hits)}
        rows.append((label, retrieval_scores(qrels, run, [10])[0], t_chunks, chunk_tokens))

    base = rows[0][1]["ndcg_at_10"]
    print("\n| documents as | nDCG@10 | Recall@10 | vs truncate | tokens embedded | embedding time |")
    print("|---|---|---|---|---|---|")
    for name, m, secs, tokens in rows:
        print(f"| {name} | {100 * m['ndcg_at_10']:.2f} | {100 * m['recall_at_10']:.2f} | "
              f"{m['ndcg_at_10'] / base:.2f}x | {tokens:,} | {secs:.1f} s |")


if __name__ == "__main__":
    main()
