"""Our retrieval metrics against pytrec_eval and ranx on hand-made qrels and runs (ties, queries
with no relevant documents, queries missing from the run), and MTEB's classification subsampling."""

from __future__ import annotations

import json

import numpy as np
import pytest
import pytrec_eval

from e5kit.evaluate.metrics import retrieval_scores, top_k, trec_order
from e5kit.evaluate.tasks import mteb_undersample
from helpers import run_python

QRELS = {
    "q1": {"d1": 1, "d3": 2, "d7": 1},
    "q2": {"d5": 0, "d6": 0},  # judged, nothing relevant
    "q3": {"d2": 1},
    "q4": {"d9": 3, "d1": 1, "d4": 2},
    "q5": {"d1": 1},  # judged but absent from the run: not scored (trec_eval / BEIR / MTEB)
}
RUN = {
    "q1": {"d1": 0.5, "d2": 0.5, "d3": 0.5, "d4": 0.1, "d7": -0.2, "d8": 0.05},  # three-way tie at the top
    "q2": {"d5": 1.0, "d6": 0.2, "d1": 0.2},
    "q3": {"d9": 0.9, "d2": 0.9, "d1": 0.9, "d10": 0.95},
    "q4": {f"d{i}": 1.0 / i for i in range(1, 15)},
    "q6": {"d1": 1.0},  # not judged: ignored
}
K = (1, 3, 5, 10)


def test_agrees_with_pytrec_eval_including_ties():
    means, per_query = retrieval_scores(QRELS, RUN, K)
    assert set(per_query) == {"q1", "q2", "q3", "q4"}
    ev = pytrec_eval.RelevanceEvaluator(QRELS, {"ndcg_cut.1,3,5,10", "map_cut.1,3,5,10", "recall.1,3,5,10",
                                                "P.1,3,5,10"}).evaluate(RUN)
    for q, vals in ev.items():
        for k in K:
            assert per_query[q][f"ndcg_at_{k}"] == pytest.approx(vals[f"ndcg_cut_{k}"], abs=1e-12)
            assert per_query[q][f"map_at_{k}"] == pytest.approx(vals[f"map_cut_{k}"], abs=1e-12)
            assert per_query[q][f"recall_at_{k}"] == pytest.approx(vals[f"recall_{k}"], abs=1e-12)
            assert per_query[q][f"precision_at_{k}"] == pytest.approx(vals[f"P_{k}"], abs=1e-12)
    for k in K:
        assert means[f"ndcg_at_{k}"] == pytest.approx(np.mean([v[f"ndcg_cut_{k}"] for v in ev.values()]))
    # no relevant document: every metric is 0 and the query still counts in the mean
    assert all(v == 0 for v in per_query["q2"].values())
    # q1: trec_eval breaks the tie by descending doc id -> d3 (rel 2), d2, d1
    assert per_query["q1"]["ndcg_at_1"] == 1.0 and per_query["q1"]["mrr_at_1"] == 1.0
    # q3: d10 first, then the tie d9 > d2 > d1 -> the relevant d2 is third
    assert per_query["q3"]["mrr_at_10"] == pytest.approx(1 / 3) and per_query["q3"]["mrr_at_1"] == 0


def test_mrr_matches_pytrec_eval_recip_rank_on_the_cut_run():
    _, per_query = retrieval_scores(QRELS, RUN, K)
    for k in K:
        rr = pytrec_eval.RelevanceEvaluator(QRELS, {"recip_rank"}).evaluate(top_k(RUN, k))
        for q, vals in rr.items():
            assert per_query[q][f"mrr_at_{k}"] == pytest.approx(vals["recip_rank"])
    assert trec_order({"a": 1.0, "c": 1.0, "b": 2.0}) == [("b", 2.0), ("c", 1.0), ("a", 1.0)]


def test_agrees_with_ranx():
    """ranx orders tied documents differently from trec_eval; on a run whose ties are broken the
    trec_eval way (by nudging scores) both libraries, and ours, agree."""
    untied = {}
    for q, docs in RUN.items():
        order = trec_order(docs)
        untied[q] = {d: float(len(order) - i) for i, (d, _) in enumerate(order)}
    judged_run = {q: d for q, d in untied.items() if q in QRELS}
    qrels = {q: d for q, d in QRELS.items() if q in judged_run}
    _, ours_tied = retrieval_scores(QRELS, RUN, K)
    _, ours = retrieval_scores(QRELS, untied, K)
    assert ours == ours_tied  # only the order matters
    metrics = [f"{m}@{k}" for m in ("ndcg", "map", "recall", "precision", "mrr") for k in K]
    # ranx in its own process with numba's JIT off: compiling its metrics takes ~35 s on the 2-core CI
    # machine, interpreting them on these few queries milliseconds (same code, same results).
    code = ("import json, sys; from ranx import Qrels, Run, evaluate; a = json.load(sys.stdin); "
            "got = evaluate(Qrels(a['qrels']), Run(a['run']), a['metrics'], return_mean=False, make_comparable=True); "
            "print(json.dumps({'queries': list(Run(a['run']).keys()), **{m: list(map(float, v)) for m, v in got.items()}}))")
    proc = run_python("-c", code, env={"NUMBA_DISABLE_JIT": "1"},
                      stdin=json.dumps({"qrels": qrels, "run": judged_run, "metrics": metrics}))
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    for m in metrics:
        name, k = m.split("@")
        ours_vals = [ours[q][f"{name}_at_{k}"] for q in got["queries"]]
        np.testing.assert_allclose(got[m], ours_vals, atol=1e-9, err_msg=m)


def test_mteb_undersampling_protocol():
    labels = [f"l{i % 7}" for i in range(200)]
    subsets = mteb_undersample(labels, n_experiments=3, samples_per_label=4, seed=42)
    assert len(subsets) == 3 and all(len(s) == 28 for s in subsets)
    for s in subsets:
        assert sorted(np.unique([labels[i] for i in s], return_counts=True)[1]) == [4] * 7
    assert subsets[0] != subsets[1]  # the list is reshuffled before each experiment
    # MTEB's recipe written out: one list, reshuffled in place by a fresh RandomState(seed) each time
    idxs = list(range(200))
    np.random.RandomState(42).shuffle(idxs)
    np.random.RandomState(42).shuffle(idxs)
    seen: dict[str, int] = {}
    second = [i for i in idxs if seen.setdefault(labels[i], 0) < 4 and not seen.__setitem__(labels[i], seen[labels[i]] + 1)]
    assert subsets[1] == second
