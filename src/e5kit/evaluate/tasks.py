"""Retrieval, STS and classification evaluation following the E5 authors' protocol.

* Retrieval (BEIR): queries ``query: q``, documents ``passage: title text`` (instruct models: the
  task instruction on queries, nothing on documents), L2-normalised, exact inner-product search
  over the whole corpus; nDCG/MAP/MRR/Recall/Precision@k via pytrec_eval.
* STS: ``query: `` on both sides; Spearman (and Pearson) of the cosine with the gold scores.
* Classification: ``query: `` texts, embeddings *not* L2-normalised (as in the E5 authors' MTEB
  script), logistic regression as MTEB runs it (10 experiments, 8 samples per label, seed 42,
  ``LogisticRegression(max_iter=100)``), and once more on the full training set.

``prompt_style="none"`` gives the no-prefix ablation.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from ..pipeline import finish
from ..prompts import beir_document
from .data import load_beir, load_classification, load_sts
from .metrics import DEFAULT_K, drop_identical_ids, retrieval_scores

if TYPE_CHECKING:  # pragma: no cover
    from ..api import E5


@dataclass
class TaskRun:
    """One task's result: MTEB-style scores plus what the report plots."""

    task_name: str
    task_type: str  # "Retrieval", "STS" or "Classification"
    split: str
    scores: dict  # MTEB's per-subset score dict (main_score, hf_subset, languages, metrics)
    evaluation_time: float
    details: dict = field(default_factory=dict)

    @property
    def main_score(self) -> float:
        return float(self.scores["main_score"])


@dataclass
class Timer:
    seconds: float = 0.0

    def __enter__(self):
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds += time.perf_counter() - self._t


def embed(model: "E5", texts: Sequence[str], input_type: str, prompt_style: str | None = None,
          task: str | None = None, normalize: bool = True, batch_size: int = 32,
          progress: bool | None = None) -> np.ndarray:
    """Embed texts with the given prompt convention (the model's own unless ``prompt_style``)."""
    return embed_counted(model, texts, input_type, prompt_style, task, normalize, batch_size, progress)[0]


def embed_counted(model: "E5", texts: Sequence[str], input_type: str, prompt_style: str | None = None,
                  task: str | None = None, normalize: bool = True, batch_size: int = 32,
                  progress: bool | None = None) -> tuple[np.ndarray, int]:
    """:func:`embed` and the number of tokens the model read (long BEIR documents are cut, as everywhere)."""
    prepared = model.prepare(list(texts), input_type, prompt_style=prompt_style, task=task)
    pooled = model.embed(prepared, batch_size=batch_size, progress=progress)
    return finish(pooled, normalize=normalize), prepared.n_tokens


def _scores_entry(metrics: dict, main: str, languages: Sequence[str]) -> dict:
    return {"main_score": float(metrics[main]), "hf_subset": "default", "languages": list(languages), **metrics}


def default_task_name(path: str | Path, fallback: str) -> str:
    """MTEB's name for a dataset folder (``scifact`` -> ``SciFact``), else the folder name."""
    from ..prompts import TASK_INSTRUCTIONS

    stem = Path(path).name if Path(path).is_dir() else Path(path).parent.name
    key = stem.lower().replace("-", "").replace("_", "")
    for name in TASK_INSTRUCTIONS:
        n = name.lower()
        if key in (n, n.removesuffix("retrieval"), n.removesuffix("classification")):
            return name
    return stem or fallback


def evaluate_retrieval(
    model: "E5",
    folder: str | Path,
    split: str = "test",
    *,
    task_name: str | None = None,
    prompt_style: str | None = None,
    k_values: Sequence[int] = DEFAULT_K,
    batch_size: int = 32,
    ignore_identical_ids: bool = False,
    languages: Sequence[str] = ("eng-Latn",),
    progress: bool | None = None,
    negatives_per_query: int = 20,
) -> TaskRun:
    """Embed a BEIR folder's corpus and judged queries, search exactly, score with pytrec_eval."""
    from ..index import Index

    t0 = time.perf_counter()
    task_name = task_name or default_task_name(folder, "Retrieval")
    data = load_beir(folder, split)
    doc_ids = list(data.corpus)
    q_ids = list(data.queries)
    docs = [beir_document(*data.corpus[d]) for d in doc_ids]
    with Timer() as t_docs:
        d_emb, n_doc_tokens = embed_counted(model, docs, "passage", prompt_style, task_name, batch_size=batch_size,
                                            progress=progress)
    with Timer() as t_queries:
        q_emb = embed(model, [data.queries[q] for q in q_ids], "query", prompt_style, task_name, batch_size=batch_size)
    depth = max(k_values) + (1 if ignore_identical_ids else 0)
    with Timer() as t_search:
        index = Index(dim=d_emb.shape[1], metric="ip")
        index.add(doc_ids, embeddings=d_emb)
        scores, rows = index.search_vectors(q_emb, depth)
    run = {q: {doc_ids[r]: float(s) for s, r in zip(srow, rrow) if r >= 0} for q, srow, rrow in zip(q_ids, scores, rows)}
    if ignore_identical_ids:
        run = drop_identical_ids(run)
    means, per_query = retrieval_scores(data.qrels, run, k_values)

    # Score distributions for the report: judged-relevant pairs, random pairs, top-10 non-relevant.
    row_of = {d: i for i, d in enumerate(doc_ids)}
    rng = np.random.default_rng(0)
    pos, neg, hard = [], [], []
    for qi, q in enumerate(q_ids):
        rel = {d for d, r in data.qrels.get(q, {}).items() if r > 0}
        pos += [float(q_emb[qi] @ d_emb[row_of[d]]) for d in rel if d in row_of]
        sample = rng.choice(len(doc_ids), size=min(negatives_per_query, len(doc_ids)), replace=False)
        neg += [float(q_emb[qi] @ d_emb[j]) for j in sample if doc_ids[j] not in rel]
        hard += [s for d, s in list(run[q].items())[:10] if d not in rel]
    n_q = len(q_ids)
    details = {
        "per_query_ndcg_at_10": {q: v.get("ndcg_at_10", 0.0) for q, v in per_query.items()},
        "positive_scores": pos, "negative_scores": neg, "hard_negative_scores": hard,
        "n_documents": len(doc_ids), "n_queries": n_q, "n_document_tokens": n_doc_tokens,
        "corpus_embedding_seconds": t_docs.seconds, "query_embedding_seconds": t_queries.seconds,
        "search_seconds": t_search.seconds,
        "seconds_per_query": (t_queries.seconds + t_search.seconds) / max(n_q, 1),
        "run": {q: dict(list(docs_.items())[:max(k_values)]) for q, docs_ in run.items()},
    }
    return TaskRun(task_name, "Retrieval", split, _scores_entry(means, "ndcg_at_10", languages),
                   time.perf_counter() - t0, details)


def evaluate_sts(
    model: "E5",
    path: str | Path,
    *,
    split: str = "test",
    task_name: str | None = None,
    prompt_style: str | None = None,
    batch_size: int = 32,
    languages: Sequence[str] = ("eng-Latn",),
) -> TaskRun:
    """Spearman/Pearson correlation of cosine similarity with gold scores; ``query: `` both sides."""
    from scipy.stats import pearsonr, spearmanr

    t0 = time.perf_counter()
    path = Path(path)
    task_name = task_name or ("STSBenchmark" if "stsbenchmark" in str(path).lower() else path.stem)
    if path.is_dir():
        path = path / f"sts-{split}.csv"
    s1, s2, gold = load_sts(path)
    uniq = list(dict.fromkeys(s1 + s2))  # each sentence embedded once
    emb = embed(model, uniq, "query", prompt_style, task_name, batch_size=batch_size)
    pos = {s: i for i, s in enumerate(uniq)}
    a, b = emb[[pos[s] for s in s1]], emb[[pos[s] for s in s2]]
    cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    metrics = {
        "cosine_spearman": float(spearmanr(gold, cos).statistic),
        "cosine_pearson": float(pearsonr(gold, cos).statistic),
    }
    metrics["spearman"], metrics["pearson"] = metrics["cosine_spearman"], metrics["cosine_pearson"]
    gold_arr = np.asarray(gold)
    details = {"cosine": cos.tolist(), "gold": gold,
               "positive_scores": cos[gold_arr >= 4].tolist(), "negative_scores": cos[gold_arr <= 1].tolist(),
               "n_pairs": len(gold)}
    return TaskRun(task_name, "STS", split, _scores_entry(metrics, "cosine_spearman", languages),
                   time.perf_counter() - t0, details)


def mteb_undersample(labels: Sequence[str], n_experiments: int = 10, samples_per_label: int = 8,
                     seed: int = 42) -> list[list[int]]:
    """Training rows of each of MTEB's classification experiments.

    MTEB reshuffles one index list with a freshly seeded RandomState before each experiment and
    keeps the first ``samples_per_label`` rows of every label.
    """
    idxs = list(range(len(labels)))
    out = []
    for _ in range(n_experiments):
        np.random.RandomState(seed).shuffle(idxs)
        count: dict[str, int] = {}
        chosen = []
        for i in idxs:
            if count.get(labels[i], 0) < samples_per_label:
                chosen.append(i)
                count[labels[i]] = count.get(labels[i], 0) + 1
        out.append(chosen)
    return out


def _classify(x_train, y_train, x_test, y_test, seed: int, max_iter: int) -> dict:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    clf = LogisticRegression(max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x_train, y_train)
    pred = clf.predict(x_test)
    return {"accuracy": float(accuracy_score(y_test, pred)), "f1": float(f1_score(y_test, pred, average="macro")),
            "f1_weighted": float(f1_score(y_test, pred, average="weighted"))}


def evaluate_classification(
    model: "E5",
    folder: str | Path,
    *,
    split: str = "test",
    task_name: str | None = None,
    prompt_style: str | None = None,
    normalize: bool = False,
    n_experiments: int = 10,
    samples_per_label: int = 8,
    seed: int = 42,
    full_train: bool = True,
    batch_size: int = 32,
    languages: Sequence[str] = ("eng-Latn",),
) -> TaskRun:
    """Logistic regression on embeddings: MTEB's n-shot experiments, and on the full training set."""
    t0 = time.perf_counter()
    task_name = task_name or default_task_name(folder, "Classification")
    train_x, train_y = load_classification(folder, "train")
    test_x, test_y = load_classification(folder, split)
    subsets = mteb_undersample(train_y, n_experiments, samples_per_label, seed)
    needed = list(range(len(train_x))) if full_train else sorted(set().union(*subsets))
    e_train = embed(model, [train_x[i] for i in needed], "query", prompt_style, task_name, normalize, batch_size)
    row = {i: n for n, i in enumerate(needed)}
    e_test = embed(model, test_x, "query", prompt_style, task_name, normalize, batch_size)
    experiments = []
    for chosen in subsets:
        rows = [row[i] for i in chosen]
        experiments.append(_classify(e_train[rows], [train_y[i] for i in chosen], e_test, test_y, seed, 100))
    metrics = {k: float(np.mean([e[k] for e in experiments])) for k in experiments[0]}
    metrics["scores_per_experiment"] = experiments
    details: dict = {"n_train": len(train_x), "n_test": len(test_x), "normalized": normalize,
                     "samples_per_label": samples_per_label, "n_experiments": n_experiments}
    if full_train:
        # The full training set needs more solver iterations than MTEB's 8-per-label subsets.
        full = _classify(e_train, [train_y[i] for i in needed], e_test, test_y, seed, 1000)
        metrics.update({f"full_train_{k}": v for k, v in full.items()})
    return TaskRun(task_name, "Classification", split, _scores_entry(metrics, "accuracy", languages),
                   time.perf_counter() - t0, details)
