"""Retrieval metrics as BEIR and MTEB compute them, through ``pytrec_eval`` (trec_eval's code).

trec_eval conventions hold throughout: documents are ranked by descending score and ties are
broken by descending document id; a document is relevant when its qrel is >= 1; a query is scored
when it appears in both the qrels and the run (a judged query with no relevant document scores 0).
MRR@k is trec_eval's reciprocal rank over each query's top k (trec_eval has no cut-off for it).
"""

from __future__ import annotations

from typing import Iterable, Mapping

Qrels = Mapping[str, Mapping[str, int]]
Run = Mapping[str, Mapping[str, float]]

DEFAULT_K = (1, 3, 5, 10, 100)
_MEASURES = {"ndcg": "ndcg_cut", "map": "map_cut", "recall": "recall", "precision": "P"}


def trec_order(scores: Mapping[str, float]) -> list[tuple[str, float]]:
    """(doc, score) best first, ties by descending doc id, exactly as trec_eval orders a ranking."""
    return sorted(scores.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)


def top_k(run: Run, k: int) -> dict[str, dict[str, float]]:
    """Each query's first ``k`` documents in trec_eval's order."""
    return {q: dict(trec_order(docs)[:k]) for q, docs in run.items()}


def drop_identical_ids(run: Run) -> dict[str, dict[str, float]]:
    """Remove a query's own id from its ranking (BEIR/MTEB option for ArguAna, Quora...)."""
    return {q: {d: s for d, s in docs.items() if d != q} for q, docs in run.items()}


def retrieval_scores(
    qrels: Qrels, run: Run, k_values: Iterable[int] = DEFAULT_K
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Mean and per-query ndcg_at_k, map_at_k, recall_at_k, precision_at_k and mrr_at_k (MTEB's names).

    Returns (means over the evaluated queries, {query: {metric: value}}).
    """
    import pytrec_eval

    k_values = sorted(set(int(k) for k in k_values))
    qrels = {str(q): {str(d): int(r) for d, r in docs.items()} for q, docs in qrels.items()}
    run = {str(q): {str(d): float(s) for d, s in docs.items()} for q, docs in run.items()}
    ks = ",".join(str(k) for k in k_values)
    measures = {f"{m}.{ks}" for m in _MEASURES.values()}
    per_query: dict[str, dict[str, float]] = {}
    raw = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    for q, vals in raw.items():
        per_query[q] = {f"{name}_at_{k}": vals[f"{trec}_{k}"] for name, trec in _MEASURES.items() for k in k_values}
    for k in k_values:
        rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top_k(run, k))
        for q, vals in rr.items():
            per_query[q][f"mrr_at_{k}"] = vals["recip_rank"]
    names = [f"{n}_at_{k}" for n in ("ndcg", "map", "recall", "precision", "mrr") for k in k_values]
    n = len(per_query)
    means = {name: (sum(v[name] for v in per_query.values()) / n if n else 0.0) for name in names}
    return means, per_query


__all__ = ["retrieval_scores", "trec_order", "top_k", "drop_identical_ids", "DEFAULT_K"]
