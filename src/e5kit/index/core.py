"""The Index: embeddings with string ids and metadata, add / delete / search / save / load."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import numpy as np

from . import faiss_backends
from .scoring import binary_scores, chunked_topk, float_scores, int8_scores, quantize_codes, rescore
from .storage import (GenerationReader, GenerationWriter, IndexFileError, IndexMismatchError, check_model,
                      model_fingerprint, read_manifest)

if TYPE_CHECKING:  # pragma: no cover
    from ..api import E5
    from ..chunking import ChunkedEmbeddings

KINDS = ("exact", "hnsw", "ivfpq")
STORAGES = ("float32", "int8", "binary")
METRICS = ("cosine", "ip")


AGGREGATES = ("max", "sum", "mean")
DOC, SPAN = "_doc", "_span"  # metadata keys of chunk rows: the document id and the character span


@dataclass(frozen=True)
class Hit:
    """One search result. From an index of chunks: the document, its best chunk's ``span`` in the
    document text and that chunk's text as ``highlight`` (when the index keeps text)."""

    id: str
    score: float
    metadata: dict | None = None
    span: tuple[int, int] | None = None
    highlight: str | None = None

    def as_dict(self) -> dict:
        d = {"id": self.id, "score": self.score}
        if self.metadata is not None:
            d["metadata"] = self.metadata
        if self.span is not None:
            d["span"] = list(self.span)
        if self.highlight is not None:
            d["highlight"] = self.highlight
        return d


def chunk_rows(doc_id: str, text: str, chunks: Sequence, metadata: dict | None) -> tuple[list[str], list[dict]]:
    """Row ids and metadata for the chunks of one document: ``doc#n``, the document's metadata
    (its ``text``, when kept, replaced by the chunk's part of ``text``), the document id and the span."""
    meta = dict(metadata or {})
    had_text = meta.pop("text", None) is not None
    ids, metas = [], []
    for n, c in enumerate(chunks):
        m = {**meta, DOC: doc_id, SPAN: list(c.span)}
        if had_text:
            m["text"] = text[c.span[0]:c.span[1]]
        ids.append(f"{doc_id}#{n}")
        metas.append(m)
    return ids, metas


def _load_model(model):
    if isinstance(model, (str, os.PathLike)):
        from ..api import E5

        return E5(model)
    return model


class Index:
    """Embeddings with string ids and optional metadata, searchable by inner product.

    >>> model = E5("intfloat/e5-small-v2")
    >>> index = Index(model)                              # exact search, float32 vectors
    >>> index.add(["d1", "d2"], texts=["passage one", "passage two"], metadata=[{"src": "a"}, None])
    >>> index.search("query text", k=5)                   # -> [Hit(id, score, metadata), ...]
    >>> index.save("my-index"); index = Index.load("my-index", model)

    Without a model, give vectors (``add(ids, embeddings=...)``, ``search(vectors)``) and ``dim``.
    ``kind``: "exact" (chunked brute force, bounded memory), "hnsw" or "ivfpq" (FAISS).
    ``storage``: "float32", or "int8" / "binary" codes scanned first, then the best
    ``k x rescore_multiplier`` candidates rescored with the float vectors.
    ``metric="cosine"`` L2-normalises stored and query vectors (E5's similarity); ``"ip"`` uses them
    as given. (``backend=`` is the old name of ``kind=``.)

    ``chunked=True``: an index of long documents split into chunks (:meth:`add_documents`); each
    row is a chunk, and :meth:`search` ranks documents by their best chunk (MaxP) or by the sum or
    mean of their best chunks, with the best chunk's span as the highlight.
    """

    def __init__(
        self,
        model: "E5 | str | os.PathLike | None" = None,
        *,
        dim: int | None = None,
        kind: str | None = None,
        storage: str = "float32",
        metric: str = "cosine",
        hnsw_m: int = 32,
        ef_construction: int = 200,
        ef_search: int = 128,
        nlist: int | None = None,
        pq_m: int | None = None,
        pq_bits: int = 8,
        nprobe: int = 16,
        rescore: bool = True,
        rescore_multiplier: int = 4,
        chunk_rows: int = 65536,
        chunked: bool = False,
        backend: str | None = None,
    ):
        if backend is not None:
            warnings.warn("Index(backend=...) is now Index(kind=...) (backend names the model's torch/int8 path)",
                          DeprecationWarning, stacklevel=2)
            if kind is not None and kind != backend:
                raise ValueError(f"kind={kind!r} and backend={backend!r} disagree; give kind= only")
            kind = backend
        kind = kind or "exact"
        model = _load_model(model)
        self.model = model
        if model is not None:
            if dim is not None and dim != model.dim:
                raise IndexMismatchError(f"dim={dim} but model {model.name} embeds in {model.dim} dimensions")
            dim = model.dim
        if dim is None or int(dim) < 1:
            raise ValueError("give a model or a positive embedding dimension (dim=...)")
        check_options(kind, storage, metric, kind_name="kind" if backend is None else "backend")
        if kind != "exact":
            faiss_backends.require_faiss()
        self.dim = int(dim)
        self.kind, self.storage, self.metric = kind, storage, metric
        self.params: dict[str, Any] = dict(hnsw_m=hnsw_m, ef_construction=ef_construction, ef_search=ef_search,
                                           nlist=nlist, pq_m=pq_m, pq_bits=pq_bits, nprobe=nprobe,
                                           rescore=rescore, rescore_multiplier=rescore_multiplier)
        self.chunk_rows = int(chunk_rows)
        self.chunked = bool(chunked)
        self._docs: dict[str, list[int]] | None = None  # chunked: document id -> its live rows
        self.model_name: str | None = model.name if model is not None else None
        self.model_fingerprint: str | None = model_fingerprint(model) if model is not None else None
        self._ids: list[str] = []
        self._row: dict[str, int] = {}
        self._meta: list[dict | None] = []
        self._deleted = np.zeros(0, dtype=bool)
        self._vectors = np.zeros((0, self.dim), dtype=np.float32)  # may become a read-only memmap
        self._pending: list[np.ndarray] = []
        self._codes: np.ndarray | None = None  # int8 / packed-binary codes, derived from the vectors
        self._ranges: np.ndarray | None = None
        self._faiss = None  # built lazily; holds the first ``_faiss_rows`` rows
        self._faiss_rows = 0

    @property
    def backend(self) -> str:
        """Deprecated name of :attr:`kind`."""
        warnings.warn("Index.backend is now Index.kind", DeprecationWarning, stacklevel=2)
        return self.kind

    # ---- contents ----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._ids) - int(self._deleted.sum())

    def __contains__(self, id: str) -> bool:
        return id in self._row

    @property
    def ids(self) -> list[str]:
        """Live ids in insertion order."""
        return [i for i, dead in zip(self._ids, self._deleted) if not dead]

    def metadata(self, id: str) -> dict | None:
        return self._meta[self._row[id]]

    def vector(self, id: str) -> np.ndarray:
        return np.array(self._all_vectors()[self._row[id]])

    def rows(self, batch_rows: int = 8192) -> Iterator[tuple[list[str], np.ndarray, list[dict | None]]]:
        """Live rows in insertion order, ``batch_rows`` at a time: (ids, float32 vectors, metadata)."""
        vectors = self._all_vectors()
        live = np.flatnonzero(~self._deleted)
        for a in range(0, len(live), batch_rows):
            r = live[a:a + batch_rows]
            yield [self._ids[i] for i in r], np.asarray(vectors[r], dtype=np.float32), [self._meta[i] for i in r]

    def __repr__(self) -> str:
        return (f"Index({len(self)} vectors, dim={self.dim}, kind={self.kind!r}, storage={self.storage!r}, "
                f"model={self.model_name!r})")

    def add(
        self,
        ids: Sequence[str],
        texts: Sequence[str] | None = None,
        *,
        embeddings: np.ndarray | None = None,
        metadata: Sequence[dict | None] | None = None,
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
    ) -> None:
        """Add passages (embedded with the model's passage convention) or precomputed embeddings.

        Ids must be new strings (see :meth:`upsert` to replace); the batch is added all or nothing.
        """
        ids = list(ids)
        if (texts is None) == (embeddings is None):
            raise ValueError("give either texts or embeddings")
        self._check_new_ids(ids)
        metadata = _check_metadata(metadata, len(ids))
        if self.chunked and (metadata is None or any(m is None or DOC not in m or SPAN not in m for m in metadata)):
            raise ValueError("an index of chunks takes documents through add_documents()")
        if texts is not None:
            texts = list(texts)
            if len(texts) != len(ids):
                raise ValueError(f"{len(ids)} ids but {len(texts)} texts")
            embeddings = self._require_model().encode_passages(texts, batch_size=batch_size,
                                                               show_progress_bar=show_progress_bar)
        emb = self._prepare(embeddings, "embeddings")
        if len(emb) != len(ids):
            raise ValueError(f"{len(ids)} ids but {len(emb)} embeddings")
        if not len(ids):
            return
        start = len(self._ids)
        self._ids.extend(ids)
        self._row.update({i: start + n for n, i in enumerate(ids)})
        self._meta.extend(metadata if metadata is not None else [None] * len(ids))
        self._deleted = np.concatenate([self._deleted, np.zeros(len(ids), dtype=bool)])
        self._pending.append(emb)
        self._codes, self._docs = None, None
        if self.kind == "ivfpq" or (self.kind == "hnsw" and self.storage == "int8"):
            self._faiss, self._faiss_rows = None, 0  # trained quantisers are refit on the grown data

    def upsert(self, ids: Sequence[str], texts: Sequence[str] | None = None, **kwargs) -> None:
        """Add, replacing any existing entries with the same ids."""
        self.delete([i for i in ids if i in self._row])
        self.add(ids, texts, **kwargs)

    def delete(self, ids: Iterable[str], missing_ok: bool = False) -> int:
        """Remove ids; returns how many were removed. Unknown ids raise KeyError unless ``missing_ok``."""
        ids = list(ids)
        missing = [i for i in ids if i not in self._row]
        if missing and not missing_ok:
            raise KeyError(f"{len(missing)} id(s) not in the index, e.g. {missing[:3]}")
        removed = 0
        for i in ids:
            row = self._row.pop(i, None)
            if row is not None:
                self._deleted[row] = True
                self._meta[row] = None
                removed += 1
        self._docs = None
        return removed  # codes and FAISS entries of deleted rows stay; searches mask them out

    def compact(self) -> None:
        """Drop deleted rows for good (rebuilds codes and any FAISS index on the next search)."""
        if not self._deleted.any():
            return
        keep = ~self._deleted
        vectors = np.ascontiguousarray(self._all_vectors()[keep])
        self._ids = [i for i, k in zip(self._ids, keep) if k]
        self._meta = [m for m, k in zip(self._meta, keep) if k]
        self._row = {i: n for n, i in enumerate(self._ids)}
        self._deleted = np.zeros(len(self._ids), dtype=bool)
        self._vectors, self._pending = vectors, []
        self._codes = self._ranges = self._docs = None
        self._faiss, self._faiss_rows = None, 0

    # ---- documents in chunks -----------------------------------------------------------------

    def add_documents(
        self,
        ids: Sequence[str],
        texts: Sequence[str],
        *,
        titles: Sequence[str | None] | None = None,
        metadata: Sequence[dict | None] | None = None,
        overlap: int = 64,
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
        chunks: "ChunkedEmbeddings | None" = None,
    ) -> None:
        """Add documents of any length to a chunked index: each is split with :func:`e5kit.chunk`
        (``titles`` repeated on every chunk, ``overlap`` tokens between chunks) and every chunk is
        embedded whole. Metadata is kept on every chunk, with the document id and the chunk's span.
        ``chunks``: the texts' chunk embeddings already made (``encode_passages(texts, long="chunks")``)."""
        from ..chunking import encode_long

        if not self.chunked:
            raise ValueError("add_documents() needs an index of chunks: Index(model, chunked=True)")
        ids, texts = list(ids), list(texts)
        if len(texts) != len(ids):
            raise ValueError(f"{len(ids)} ids but {len(texts)} texts")
        self._check_new_ids(ids)
        known = [i for i in ids if i in self.documents()]
        if known:
            raise ValueError(f"{len(known)} document(s) already in the index, e.g. {known[:3]}")
        metadata = _check_metadata(metadata, len(ids)) or [None] * len(ids)
        emb = chunks if chunks is not None else encode_long(
            self._require_model(), texts, "chunks", overlap=overlap, titles=titles, batch_size=batch_size,
            show_progress_bar=show_progress_bar)
        per_doc: list[list] = [[] for _ in ids]
        for c in emb.chunks:
            per_doc[c.doc].append(c)
        row_ids, row_meta = [], []
        for doc_id, text, chunks, meta in zip(ids, texts, per_doc, metadata):
            r_ids, r_meta = chunk_rows(doc_id, text, chunks, meta)
            row_ids += r_ids
            row_meta += r_meta
        self.add(row_ids, embeddings=emb.vectors, metadata=row_meta)

    def documents(self) -> dict[str, list[int]]:
        """Chunked index: every live document id and the rows of its chunks."""
        if self._docs is None:
            docs: dict[str, list[int]] = {}
            for row, (m, dead) in enumerate(zip(self._meta, self._deleted)):
                if not dead and m is not None and DOC in m:
                    docs.setdefault(m[DOC], []).append(row)
            self._docs = docs
        return self._docs

    def delete_documents(self, ids: Iterable[str], missing_ok: bool = False) -> int:
        """Chunked index: remove documents with all their chunks; returns how many documents."""
        ids, docs = list(ids), self.documents()
        missing = [i for i in ids if i not in docs]
        if missing and not missing_ok:
            raise KeyError(f"{len(missing)} document(s) not in the index, e.g. {missing[:3]}")
        rows = [r for i in ids for r in docs.get(i, [])]
        self.delete([self._ids[r] for r in rows])
        return len(ids) - len(missing)

    # ---- search ------------------------------------------------------------------------------

    def search(
        self,
        queries: "str | Sequence[str] | np.ndarray",
        k: int = 10,
        *,
        task: str | None = None,
        ef_search: int | None = None,
        nprobe: int | None = None,
        batch_size: int = 32,
        aggregate: str = "max",
        top_chunks: int = 3,
    ) -> list[Hit] | list[list[Hit]]:
        """The ``k`` best passages (chunked index: documents) for each query, best first.

        Text queries are embedded with the model's query convention (``task`` selects the
        instruction of instruct models); a 2-d array is used as query vectors. A single string or
        1-d vector gives one list of hits, otherwise one list per query. A chunked index scores a
        document by its best chunk (``aggregate="max"``, MaxP) or by the sum / mean of its best
        ``top_chunks`` chunks.
        """
        single = isinstance(queries, str) or (isinstance(queries, np.ndarray) and queries.ndim == 1)
        if not isinstance(queries, (str, np.ndarray)):
            queries = list(queries)
            if not queries:
                return []
        if isinstance(queries, str) or (isinstance(queries, list) and isinstance(queries[0], str)):
            q = self._require_model().encode_queries(queries, task=task, batch_size=batch_size)
        else:
            q = queries
        if self.chunked:
            out = self._search_documents(q, k, aggregate, top_chunks, ef_search, nprobe)
            return out[0] if single else out
        scores, rows = self.search_vectors(q, k, ef_search=ef_search, nprobe=nprobe)
        out = [[Hit(self._ids[r], float(s), self._meta[r]) for s, r in zip(srow, rrow) if r >= 0]
               for srow, rrow in zip(scores, rows)]
        return out[0] if single else out

    def search_vectors(self, queries: np.ndarray, k: int = 10, *, ef_search: int | None = None,
                       nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Low-level search: (scores, rows) arrays of shape (n_queries, k); row -1 = no result.

        Row numbers index :meth:`row_ids`.
        """
        q = self._prepare(queries, "queries")
        if k < 1:
            raise ValueError("k must be at least 1")
        n = len(self._ids)
        k_eff = min(k, len(self))
        if n == 0 or k_eff == 0:
            return np.full((len(q), 0), -np.inf, np.float32), np.full((len(q), 0), -1, np.int64)
        excluded = self._deleted if self._deleted.any() else None
        vectors = self._all_vectors()
        if self.kind == "exact" and self.storage == "float32":
            return chunked_topk(q, n, k_eff, float_scores(vectors), self.chunk_rows, excluded)
        do_rescore = self.params["rescore"] and (self.storage != "float32" or self.kind == "ivfpq")
        depth = min(len(self), k_eff * max(1, int(self.params["rescore_multiplier"]))) if do_rescore else k_eff
        if self.kind == "exact":
            self._ensure_codes()
            scorer = (int8_scores(self._codes, self._ranges) if self.storage == "int8"
                      else binary_scores(self._codes, self.dim))
            s, r = chunked_topk(q, n, depth, scorer, self.chunk_rows, excluded)
        else:
            self._ensure_faiss()
            s, r = faiss_backends.search(self._faiss, self.kind, q, depth, excluded,
                                         ef_search or self.params["ef_search"], nprobe or self.params["nprobe"])
        if not do_rescore:
            return s[:, :k_eff], r[:, :k_eff]
        return rescore(q, vectors, s, r, k_eff)

    def _search_documents(self, queries, k: int, aggregate: str, top_chunks: int, ef_search, nprobe) -> list[list[Hit]]:
        if aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {AGGREGATES}, not {aggregate!r}")
        if top_chunks < 1:
            raise ValueError("top_chunks must be at least 1")
        q = self._prepare(queries, "queries")
        docs = self.documents()
        k = min(k, len(docs))
        if k < 1:
            return [[] for _ in q]
        # Enough best chunks to see k distinct documents: then the top k by best chunk are exact.
        depth = min(len(self), max(4 * k, k + 16))
        while True:
            scores, rows = self.search_vectors(q, depth, ef_search=ef_search, nprobe=nprobe)
            seen = [len({self._meta[r][DOC] for r in row if r >= 0}) for row in rows]
            if min(seen) >= k or depth >= len(self):
                break
            depth = min(len(self), depth * 4)
        vectors = self._all_vectors()
        out = []
        for qi, (srow, rrow) in enumerate(zip(scores, rows)):
            best: dict[str, tuple[float, int]] = {}  # document -> (score, row of its best chunk)
            for s, r in zip(srow, rrow):
                if r >= 0 and self._meta[r][DOC] not in best:
                    best[self._meta[r][DOC]] = (float(s), int(r))
            if aggregate != "max":  # exact over all chunks of every candidate document
                for d in best:
                    own = np.asarray(docs[d])
                    sc = np.sort(np.asarray(vectors[own], dtype=np.float32) @ q[qi])[::-1][:top_chunks]
                    best[d] = (float(sc.sum() if aggregate == "sum" else sc.mean()), best[d][1])
            ranked = sorted(best.items(), key=lambda item: -item[1][0])[:k]  # stable: ties keep chunk order
            out.append([self._document_hit(d, s, r) for d, (s, r) in ranked])
        return out

    def _document_hit(self, doc: str, score: float, row: int) -> Hit:
        m = self._meta[row]
        meta = {key: v for key, v in m.items() if key not in (DOC, SPAN, "text")}
        return Hit(doc, score, meta or None, tuple(m[SPAN]), m.get("text"))

    def row_ids(self) -> list[str]:
        """Id of every stored row (deleted rows included), as numbered by :meth:`search_vectors`."""
        return self._ids

    # ---- persistence -------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write the index to directory ``path`` (created if needed), crash-safely."""
        with GenerationWriter(Path(path)) as out:
            out.put_array("vectors", np.ascontiguousarray(self._all_vectors(), dtype=np.float32))
            out.put_array("deleted", self._deleted)

            def write_docs(f):
                for i, m in zip(self._ids, self._meta):
                    f.write((json.dumps([i, m], ensure_ascii=False) + "\n").encode("utf-8"))

            out.put("docs", "jsonl", write_docs)
            if self.storage != "float32" and self.kind == "exact":
                self._ensure_codes()
                out.put_array("codes", self._codes)
                if self._ranges is not None:
                    out.put_array("ranges", self._ranges)
            if self.kind != "exact" and len(self._ids):
                self._ensure_faiss()
                out.put("faiss", "index", lambda f: f.write(faiss_backends.serialize(self._faiss)))
            out.commit({
                "model": self.model_name, "model_fingerprint": self.model_fingerprint,
                "prompt_style": self.model.prompt_style if self.model is not None else None,
                "dim": self.dim, "count": len(self._ids), "live": len(self),
                "backend": self.kind,  # the manifest's historical key for the kind
                "storage": self.storage, "metric": self.metric, "params": self.params, "chunked": self.chunked,
            })
        return out.path

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        model: "E5 | str | os.PathLike | None" = None,
        *,
        mmap: bool = True,
        verify: bool = True,
    ) -> "Index":
        """Read an index saved by :meth:`save`.

        ``model``: the model to embed text queries with; it must be the one the index was built
        with (else :class:`IndexMismatchError`). ``mmap``: memory-map the float vectors instead
        of reading them. ``verify``: check every file's SHA-256 (a full read).
        """
        path = Path(path)
        manifest = read_manifest(path)
        model = _load_model(model)
        if model is not None:
            check_model(manifest, model, path)
        try:
            idx = cls(model, dim=manifest["dim"], kind=manifest["backend"], storage=manifest["storage"],
                      metric=manifest["metric"], chunked=manifest.get("chunked", False), **manifest["params"])
        except (TypeError, ValueError) as e:
            raise IndexFileError(f"{path / 'index.json'} holds settings this e5kit cannot use ({e})") from e
        idx.model_name, idx.model_fingerprint = manifest["model"], manifest.get("model_fingerprint")
        files = GenerationReader(path, manifest, verify)
        n = manifest["count"]
        vectors = files.array("vectors", "r" if mmap else None)
        if vectors.shape != (n, idx.dim) or vectors.dtype != np.float32:
            raise IndexFileError(f"{path}: vectors have shape {vectors.shape} {vectors.dtype}, "
                                 f"expected ({n}, {idx.dim}) float32")
        deleted = np.array(files.array("deleted"), dtype=bool)
        docs = files.jsonl("docs")
        if len(docs) != n or len(deleted) != n:
            raise IndexFileError(f"{path}: {len(docs)} ids and {len(deleted)} flags for {n} vectors")
        idx._vectors, idx._deleted = vectors, deleted
        idx._ids = [d[0] for d in docs]
        idx._meta = [d[1] for d in docs]
        idx._row = {i: r for r, (i, dead) in enumerate(zip(idx._ids, deleted)) if not dead}
        idx._codes = files.array("codes") if "codes" in files else None
        idx._ranges = files.array("ranges") if "ranges" in files else None
        if "faiss" in files:
            f = files.file("faiss")
            try:
                idx._faiss = faiss_backends.deserialize(np.fromfile(f, dtype=np.uint8))
            except RuntimeError as e:
                raise IndexFileError(f"{f} is not a readable FAISS index ({e})") from e
            if idx._faiss.ntotal != n or idx._faiss.d != idx.dim:
                raise IndexFileError(f"{f} holds {idx._faiss.ntotal} x {idx._faiss.d} vectors, expected {n} x {idx.dim}")
            idx._faiss_rows = n
        return idx

    # ---- internals ---------------------------------------------------------------------------

    def _require_model(self) -> "E5":
        if self.model is None:
            raise ValueError("this index has no model: pass vectors, or give a model to Index(...) / Index.load(...)")
        return self.model

    def _check_new_ids(self, ids: list[str]) -> None:
        for i in ids:
            if not isinstance(i, str) or not i:
                raise TypeError(f"ids must be non-empty strings, got {i!r}")
        dup = [i for i in ids if i in self._row]
        if dup:
            raise ValueError(f"{len(dup)} id(s) already in the index, e.g. {dup[:3]}; use upsert() to replace")
        if len(set(ids)) != len(ids):
            seen: set[str] = set()
            twice = [i for i in ids if i in seen or seen.add(i)]
            raise ValueError(f"duplicate ids in this batch, e.g. {twice[:3]}")

    def _prepare(self, x, what: str) -> np.ndarray:
        from ..api import _as_2d

        x = _as_2d(x)
        if x.ndim != 2:
            raise ValueError(f"{what} must be a 2-d array, got shape {x.shape}")
        if x.shape[1] != self.dim:
            raise IndexMismatchError(f"{what} have dimension {x.shape[1]}, the index holds {self.dim}-d vectors"
                                     + (f" from {self.model_name}" if self.model_name else ""))
        if not np.isfinite(x).all():
            raise ValueError(f"{what} contain NaN or infinite values")
        if self.metric == "cosine":
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return np.ascontiguousarray(x, dtype=np.float32)

    def _all_vectors(self) -> np.ndarray:
        if self._pending:
            parts = ([] if len(self._vectors) == 0 else [np.asarray(self._vectors)]) + self._pending
            self._vectors = np.concatenate(parts).astype(np.float32, copy=False)
            self._pending = []
        return self._vectors

    def _ensure_codes(self) -> None:
        vectors = self._all_vectors()
        if self._codes is None or len(self._codes) != len(vectors):
            self._codes, self._ranges = quantize_codes(vectors, self.storage, self.chunk_rows)

    def _ensure_faiss(self) -> None:
        vectors = self._all_vectors()
        n = len(vectors)
        if self._faiss is None:
            self._faiss = faiss_backends.build(self.kind, self.storage, self.dim, vectors, self.params)
            self._faiss_rows = 0
        for i in range(self._faiss_rows, n, self.chunk_rows):
            self._faiss.add(np.ascontiguousarray(vectors[i:min(i + self.chunk_rows, n)], dtype=np.float32))
        self._faiss_rows = n


def check_options(kind: str, storage: str, metric: str, kind_name: str = "kind") -> None:
    """Raise ValueError for a search kind / storage / metric combination the index cannot hold."""
    if kind not in KINDS:
        raise ValueError(f"{kind_name} must be one of {KINDS}, not {kind!r}")
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {STORAGES}, not {storage!r}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, not {metric!r}")
    if kind == "ivfpq" and storage != "float32":
        raise ValueError("ivfpq stores product-quantised codes itself; leave storage='float32'")
    if kind == "hnsw" and storage == "binary":
        raise ValueError("binary storage is for the exact kind; use storage='int8' or 'float32' with hnsw")


def _check_metadata(metadata: Sequence[dict | None] | None, n: int) -> list[dict | None] | None:
    if metadata is None:
        return None
    metadata = list(metadata)
    if len(metadata) != n:
        raise ValueError(f"{n} ids but {len(metadata)} metadata entries")
    for m in metadata:
        if m is not None and not isinstance(m, dict):
            raise TypeError(f"metadata entries must be dicts or None, got {type(m).__name__}")
    json.dumps(metadata)  # fail now, not at save time, on values JSON cannot hold
    return metadata
