"""Hard-negative mining and the consistency filter.

Both embed texts with a model (E5 prefixes by its prompt style) and rank passages by exact
inner-product search (embeddings are normalised, so cosine).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..pipeline import finish
from ..prompts import beir_document


def embed_texts(model, texts: Sequence[str], input_type: str, max_length: int | None = None,
                batch_size: int = 64, task: str | None = None, progress: bool | None = None) -> torch.Tensor:
    """(n, dim) normalised float32 embeddings of ``texts`` with the model's prefixes, cut at
    ``max_length`` tokens (default: the model's limit). ``model`` is an :class:`e5kit.E5`."""
    prepared = model.prepare(list(texts), input_type, task=task, max_tokens=max_length)
    return torch.from_numpy(finish(model.embed(prepared, batch_size=batch_size, progress=progress)))


def exact_search(queries: torch.Tensor, corpus: torch.Tensor, k: int, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` (scores, indices) of ``corpus`` rows for each query by inner product, exactly,
    a chunk of queries at a time (memory: chunk x corpus scores)."""
    k = min(k, corpus.shape[0])
    scores, idx = [], []
    for i in range(0, queries.shape[0], chunk):
        s, j = torch.topk(queries[i:i + chunk] @ corpus.T, k, dim=1)
        scores.append(s)
        idx.append(j)
    if not scores:
        return torch.empty(0, k), torch.empty(0, k, dtype=torch.long)
    return torch.cat(scores), torch.cat(idx)


def pick_mined(ranked: Sequence[int], positives: set[int], n: int, skip_top: int) -> list[int]:
    """The first ``n`` non-positive corpus indices of a ranking after skipping ``skip_top`` ranks
    (the top ranks are often unlabelled positives)."""
    out = []
    for j in list(ranked)[skip_top:]:
        if j not in positives:
            out.append(j)
            if len(out) == n:
                break
    return out


# ---- inputs -------------------------------------------------------------------------------------

@dataclass
class BeirSplit:
    doc_ids: list[str]
    docs: list[str]  # "title text", as E5 embeds BEIR documents (prefix added later)
    titles: list[str]
    texts: list[str]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]


def load_beir(root: str | Path, split: str) -> BeirSplit:
    """A BEIR split (read by :func:`e5kit.evaluate.data.load_beir`) as parallel lists for embedding."""
    from ..evaluate.data import load_beir as read_beir

    data = read_beir(root, split)
    doc_ids = list(data.corpus)
    titles = [data.corpus[d][0] for d in doc_ids]
    texts = [data.corpus[d][1] for d in doc_ids]
    docs = [beir_document(t, x) for t, x in zip(titles, texts)]
    return BeirSplit(doc_ids, docs, titles, texts, data.queries, data.qrels)


def mine_beir(model, root: str | Path, split: str, negatives: int, skip_top: int, max_length: int | None,
              batch_size: int, task: str | None = None, progress: bool | None = None) -> list[dict]:
    """Training examples for every relevant (query, document) pair of a BEIR split, with mined negatives."""
    b = load_beir(root, split)
    pos_of = {d: i for i, d in enumerate(b.doc_ids)}
    pairs = [(q, d) for q, rel in b.qrels.items() if q in b.queries for d, s in rel.items() if s > 0 and d in pos_of]
    if not pairs:
        raise ValueError(f"no relevant (query, document) pairs in {root}/qrels/{split}.tsv that match the corpus and queries")
    qids = list(dict.fromkeys(q for q, _ in pairs))
    corpus = embed_texts(model, b.docs, "passage", max_length, batch_size, task, progress)
    qemb = embed_texts(model, [b.queries[q] for q in qids], "query", max_length, batch_size, task, progress)
    _, ranked = exact_search(qemb, corpus, skip_top + negatives + 1 + max(len(b.qrels[q]) for q in qids))
    rank_of = {q: ranked[i].tolist() for i, q in enumerate(qids)}
    out = []
    for q, d in pairs:
        positives = {pos_of[x] for x, s in b.qrels[q].items() if s > 0 and x in pos_of}
        neg = pick_mined(rank_of[q], positives, negatives, skip_top)
        doc = lambda j: {"title": b.titles[j], "text": b.texts[j]}  # noqa: E731
        out.append({"query": b.queries[q], "positive": doc(pos_of[d]), "negatives": [doc(j) for j in neg],
                    "query_id": q, "positive_id": d, "negative_ids": [b.doc_ids[j] for j in neg]})
    return out


def mine_pairs(model, examples: list[dict], corpus_texts: list[str] | None, negatives: int, skip_top: int,
               max_length: int | None, batch_size: int, task: str | None = None,
               progress: bool | None = None) -> list[dict]:
    """Mined negatives for (query, positive) examples from ``corpus_texts`` (default: every
    example's positive). Passages equal to one of the query's positives are never negatives."""
    from .data import passage_text

    positives_text = [passage_text(e["positive"], "'positive'") for e in examples]
    pool = list(dict.fromkeys(corpus_texts if corpus_texts is not None else positives_text))
    index = {t: i for i, t in enumerate(pool)}
    by_query: dict[str, set[int]] = {}
    for e, p in zip(examples, positives_text):
        if p in index:
            by_query.setdefault(e["query"], set()).add(index[p])
    corpus = embed_texts(model, pool, "passage", max_length, batch_size, task, progress)
    queries = list(dict.fromkeys(e["query"] for e in examples))
    qemb = embed_texts(model, queries, "query", max_length, batch_size, task, progress)
    extra = max((len(v) for v in by_query.values()), default=0)
    _, ranked = exact_search(qemb, corpus, skip_top + negatives + extra)
    rank_of = {q: ranked[i].tolist() for i, q in enumerate(queries)}
    out = []
    for e in examples:
        neg = pick_mined(rank_of[e["query"]], by_query.get(e["query"], set()), negatives, skip_top)
        out.append({**e, "negatives": [pool[j] for j in neg]})
    return out


def consistency_filter(model, queries: list[str], passages: list[str], top_k: int = 2, sample: int = 1000,
                       seed: int = 0, max_length: int | None = None, batch_size: int = 64, task: str | None = None,
                       progress: bool | None = None) -> list[bool]:
    """E5's consistency filter: keep pair i when its passage ranks within ``top_k`` for its query
    among itself plus ``sample`` passages drawn from the other pairs. Returns a keep flag per pair."""
    pool = list(dict.fromkeys(passages))
    index = {t: i for i, t in enumerate(pool)}
    pemb = embed_texts(model, pool, "passage", max_length, batch_size, task, progress)
    qemb = embed_texts(model, queries, "query", max_length, batch_size, task, progress)
    rng = random.Random(seed)
    keep = []
    for i, q in enumerate(qemb):
        own = index[passages[i]]
        others = [j for j in rng.sample(range(len(pool)), min(len(pool), sample + 1)) if j != own][:sample]
        own_score = float(q @ pemb[own])
        higher = int((pemb[others] @ q > own_score).sum()) if others else 0
        keep.append(higher < top_k)
    return keep


__all__ = ["embed_texts", "exact_search", "pick_mined", "load_beir", "mine_beir", "mine_pairs", "consistency_filter"]
