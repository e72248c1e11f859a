"""A vector index for E5 embeddings: add passages with ids and metadata, search, delete, save, load.

* ``backend="exact"``: brute-force inner product, computed chunk by chunk so memory stays bounded
  (``chunk_rows`` stored vectors x the query batch at a time) however many vectors are stored.
* ``backend="hnsw"`` / ``"ivfpq"``: approximate search through FAISS (``faiss-cpu``, the ``search`` extra).
* ``storage="int8"`` / ``"binary"`` (exact backend; ``int8`` also for HNSW): the first pass scans
  compact codes (4x / 32x smaller than float32), then the best ``k x rescore_multiplier`` candidates
  are rescored with the float vectors. After :meth:`Index.load` the float vectors are memory-mapped,
  so only the codes need to fit in RAM.

Saving is crash-safe: every file is written under a new generation name, fsync'ed and renamed, and
the manifest (``index.json``) is replaced last, atomically; a crash at any point leaves the previous
complete index readable. A loaded index checks file sizes and SHA-256 digests and refuses an index
built with a different model or dimension.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from .api import E5

FORMAT = "e5kit-index"
FORMAT_VERSION = 1
MANIFEST = "index.json"
BACKENDS = ("exact", "hnsw", "ivfpq")
STORAGES = ("float32", "int8", "binary")
METRICS = ("cosine", "ip")


class IndexFileError(ValueError):
    """An index directory is missing, truncated, corrupt or of an unknown format."""


class IndexMismatchError(ValueError):
    """An index was built with a different model or embedding dimension than the one given."""


@dataclass(frozen=True)
class Hit:
    """One search result."""

    id: str
    score: float
    metadata: dict | None = None

    def as_dict(self) -> dict:
        d = {"id": self.id, "score": self.score}
        if self.metadata is not None:
            d["metadata"] = self.metadata
        return d


# ---- exact top-k ------------------------------------------------------------------------------


def chunked_topk(
    queries: np.ndarray,
    n_rows: int,
    k: int,
    score_chunk,
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


def _float_scores(vectors: np.ndarray):
    def score(q: np.ndarray, start: int, stop: int) -> np.ndarray:
        return q @ np.asarray(vectors[start:stop], dtype=np.float32).T

    return score


def _int8_scores(codes: np.ndarray, ranges: np.ndarray):
    """Asymmetric int8 scores: float query x dequantised codes, without materialising floats."""
    starts, steps = ranges[0], np.maximum((ranges[1] - ranges[0]) / 255, 1e-12)

    def score(q: np.ndarray, start: int, stop: int) -> np.ndarray:
        # dequant(c) = starts + (c + 128) * steps  =>  q.dequant = (q*steps).c + q.(starts + 128 steps)
        base = q @ (starts + 128 * steps)
        return (q * steps) @ codes[start:stop].astype(np.float32).T + base[:, None]

    return score


def _binary_scores(codes: np.ndarray, dim: int):
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


# ---- files ------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write) -> None:
    """Write ``path`` via ``write(fileobj)`` into a temp file, fsync it, then rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_fingerprint(model: "E5") -> str | None:
    """A cheap identity for a checkpoint: its config, and the head and tail of its weights file.

    Two copies of one model in different directories match; a fine-tune of the same base does not.
    """
    path = Path(model.engine.checkpoint.path)
    h = hashlib.sha256()
    found = False
    for name in ("config.json", "model.safetensors", "pytorch_model.bin"):
        f = path / name
        if not f.exists():
            continue
        found = True
        size = f.stat().st_size
        h.update(f"{name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), os.SEEK_END)
                h.update(fh.read())
    return h.hexdigest()[:32] if found else None


# ---- the index --------------------------------------------------------------------------------


class Index:
    """Embeddings with string ids and optional metadata, searchable by inner product.

    >>> model = E5("intfloat/e5-small-v2")
    >>> index = Index(model)                              # exact search, float32 vectors
    >>> index.add(["d1", "d2"], texts=["passage one", "passage two"], metadata=[{"src": "a"}, None])
    >>> index.search("query text", k=5)                   # -> [Hit(id, score, metadata), ...]
    >>> index.save("my-index"); index = Index.load("my-index", model)

    Without a model, give vectors (``add(ids, embeddings=...)``, ``search(vectors)``) and ``dim``.
    ``metric="cosine"`` L2-normalises stored and query vectors (E5's similarity); ``"ip"`` uses them
    as given.
    """

    def __init__(
        self,
        model: "E5 | str | os.PathLike | None" = None,
        *,
        dim: int | None = None,
        backend: str = "exact",
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
    ):
        if isinstance(model, (str, os.PathLike)):
            from .api import E5

            model = E5(model)
        self.model = model
        if model is not None:
            if dim is not None and dim != model.dim:
                raise IndexMismatchError(f"dim={dim} but model {model.name} embeds in {model.dim} dimensions")
            dim = model.dim
        if dim is None or int(dim) < 1:
            raise ValueError("give a model or a positive embedding dimension (dim=...)")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
        if storage not in STORAGES:
            raise ValueError(f"storage must be one of {STORAGES}, not {storage!r}")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, not {metric!r}")
        if backend == "ivfpq" and storage != "float32":
            raise ValueError("ivfpq stores product-quantised codes itself; leave storage='float32'")
        if backend == "hnsw" and storage == "binary":
            raise ValueError("binary storage is for the exact backend; use storage='int8' or 'float32' with hnsw")
        if backend != "exact":
            _require_faiss()
        self.dim = int(dim)
        self.backend, self.storage, self.metric = backend, storage, metric
        self.params: dict[str, Any] = dict(hnsw_m=hnsw_m, ef_construction=ef_construction, ef_search=ef_search,
                                           nlist=nlist, pq_m=pq_m, pq_bits=pq_bits, nprobe=nprobe,
                                           rescore=rescore, rescore_multiplier=rescore_multiplier)
        self.chunk_rows = int(chunk_rows)
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

    def __repr__(self) -> str:
        return (f"Index({len(self)} vectors, dim={self.dim}, backend={self.backend!r}, storage={self.storage!r}, "
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
        if metadata is not None:
            metadata = list(metadata)
            if len(metadata) != len(ids):
                raise ValueError(f"{len(ids)} ids but {len(metadata)} metadata entries")
            for m in metadata:
                if m is not None and not isinstance(m, dict):
                    raise TypeError(f"metadata entries must be dicts or None, got {type(m).__name__}")
            json.dumps(metadata)  # fail now, not at save time, on values JSON cannot hold
        if texts is not None:
            texts = list(texts)
            if len(texts) != len(ids):
                raise ValueError(f"{len(ids)} ids but {len(texts)} texts")
            emb = self._require_model().encode_passages(texts, batch_size=batch_size,
                                                         show_progress_bar=show_progress_bar)
        else:
            emb = embeddings
        emb = self._prepare(emb, "embeddings")
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
        self._codes = None
        if self.backend == "ivfpq" or (self.backend == "hnsw" and self.storage == "int8"):
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
        self._codes = self._ranges = None
        self._faiss, self._faiss_rows = None, 0

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
    ) -> list[Hit] | list[list[Hit]]:
        """The ``k`` best passages for each query, best first.

        Text queries are embedded with the model's query convention (``task`` selects the
        instruction of instruct models); a 2-d array is used as query vectors. A single string or
        1-d vector gives one list of hits, otherwise one list per query.
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
        if self.backend == "exact" and self.storage == "float32":
            return chunked_topk(q, n, k_eff, _float_scores(vectors), self.chunk_rows, excluded)
        rescore = self.params["rescore"] and (self.storage != "float32" or self.backend == "ivfpq")
        depth = min(len(self), k_eff * max(1, int(self.params["rescore_multiplier"]))) if rescore else k_eff
        if self.backend == "exact":
            self._ensure_codes()
            scorer = (_int8_scores(self._codes, self._ranges) if self.storage == "int8"
                      else _binary_scores(self._codes, self.dim))
            s, r = chunked_topk(q, n, depth, scorer, self.chunk_rows, excluded)
        else:
            s, r = self._faiss_search(q, depth, excluded, ef_search, nprobe)
        if not rescore:
            return s[:, :k_eff], r[:, :k_eff]
        return _rescore(q, vectors, s, r, k_eff)

    def row_ids(self) -> list[str]:
        """Id of every stored row (deleted rows included), as numbered by :meth:`search_vectors`."""
        return self._ids

    # ---- persistence -------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write the index to directory ``path`` (created if needed), crash-safely."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        gen = uuid.uuid4().hex[:12]
        vectors = self._all_vectors()
        files: dict[str, dict] = {}

        def put(kind: str, suffix: str, write) -> None:
            name = f"{kind}-{gen}.{suffix}"
            atomic_write(path / name, write)
            files[kind] = {"name": name, "bytes": (path / name).stat().st_size, "sha256": _sha256(path / name)}

        put("vectors", "npy", lambda f: np.save(f, np.ascontiguousarray(vectors, dtype=np.float32)))
        put("deleted", "npy", lambda f: np.save(f, self._deleted))

        def write_docs(f):
            for i, m in zip(self._ids, self._meta):
                f.write((json.dumps([i, m], ensure_ascii=False) + "\n").encode("utf-8"))

        put("docs", "jsonl", write_docs)
        if self.storage != "float32" and self.backend == "exact":
            self._ensure_codes()
            put("codes", "npy", lambda f: np.save(f, self._codes))
            if self._ranges is not None:
                put("ranges", "npy", lambda f: np.save(f, self._ranges))
        if self.backend != "exact" and len(self._ids):
            import faiss

            self._ensure_faiss()
            put("faiss", "index", lambda f: f.write(faiss.serialize_index(self._faiss).tobytes()))
        manifest = {
            "format": FORMAT, "version": FORMAT_VERSION, "generation": gen,
            "model": self.model_name, "model_fingerprint": self.model_fingerprint,
            "prompt_style": self.model.prompt_style if self.model is not None else None,
            "dim": self.dim, "count": len(self._ids), "live": len(self), "backend": self.backend,
            "storage": self.storage, "metric": self.metric, "params": self.params, "files": files,
        }
        atomic_write(path / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=2).encode("utf-8")))
        keep = {f["name"] for f in files.values()} | {MANIFEST}
        for old in path.iterdir():  # files of earlier generations, and temp files of crashed saves
            if old.name not in keep and (old.name.endswith(".tmp") or _is_generation_file(old.name)):
                old.unlink(missing_ok=True)
        return path

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
        if isinstance(model, (str, os.PathLike)):
            from .api import E5

            model = E5(model)
        if model is not None:
            check_model(manifest, model, path)
        idx = cls.__new__(cls)
        idx.model = model
        idx.dim = manifest["dim"]
        idx.backend, idx.storage, idx.metric = manifest["backend"], manifest["storage"], manifest["metric"]
        idx.params = dict(manifest["params"])
        idx.chunk_rows = 65536
        idx.model_name, idx.model_fingerprint = manifest["model"], manifest.get("model_fingerprint")
        files = manifest["files"]

        def file(kind: str) -> Path:
            f = path / files[kind]["name"]
            if not f.exists():
                raise IndexFileError(f"{f} is missing; the index at {path} is incomplete")
            if f.stat().st_size != files[kind]["bytes"]:
                raise IndexFileError(f"{f} has {f.stat().st_size} bytes, the manifest says {files[kind]['bytes']}: "
                                     f"the file is truncated or was overwritten")
            if verify and _sha256(f) != files[kind]["sha256"]:
                raise IndexFileError(f"{f} does not match its SHA-256 digest in {MANIFEST}: the file is corrupt")
            return f

        def array(kind: str, mmap_mode=None) -> np.ndarray:
            f = file(kind)
            try:
                return np.load(f, mmap_mode=mmap_mode, allow_pickle=False)
            except (ValueError, OSError, EOFError) as e:
                raise IndexFileError(f"{f} is not a readable .npy array ({e})") from e

        n = manifest["count"]
        idx._vectors = array("vectors", "r" if mmap else None)
        if idx._vectors.shape != (n, idx.dim) or idx._vectors.dtype != np.float32:
            raise IndexFileError(f"{path}: vectors have shape {idx._vectors.shape} {idx._vectors.dtype}, "
                                 f"expected ({n}, {idx.dim}) float32")
        idx._deleted = np.array(array("deleted"), dtype=bool)
        idx._ids, idx._meta = [], []
        docs = file("docs")
        try:
            with open(docs, encoding="utf-8") as fh:
                for line in fh:
                    i, m = json.loads(line)
                    idx._ids.append(i)
                    idx._meta.append(m)
        except (ValueError, UnicodeDecodeError) as e:
            raise IndexFileError(f"{docs} is corrupt ({e})") from e
        if len(idx._ids) != n or len(idx._deleted) != n:
            raise IndexFileError(f"{path}: {len(idx._ids)} ids and {len(idx._deleted)} flags for {n} vectors")
        idx._row = {i: r for r, (i, dead) in enumerate(zip(idx._ids, idx._deleted)) if not dead}
        idx._pending = []
        idx._codes = array("codes") if "codes" in files else None
        idx._ranges = array("ranges") if "ranges" in files else None
        idx._faiss, idx._faiss_rows = None, 0
        if "faiss" in files:
            import faiss

            f = file("faiss")
            try:
                idx._faiss = faiss.deserialize_index(np.fromfile(f, dtype=np.uint8))
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

    def _prepare(self, x, what: str) -> np.ndarray:
        from .api import _as_2d

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
        if self._codes is not None and len(self._codes) == len(vectors):
            return
        if self.storage == "binary":
            self._codes = np.packbits(vectors > 0, axis=1)
            return
        self._ranges = quantization_ranges(vectors) if len(vectors) else None
        # int8 codes as sentence-transformers' quantize_embeddings defines them, one chunk at a time.
        from .api import quantize_embeddings

        self._codes = np.concatenate([
            quantize_embeddings(np.asarray(vectors[i:i + self.chunk_rows]), "int8", self._ranges)
            for i in range(0, len(vectors), self.chunk_rows)
        ]) if len(vectors) else np.zeros((0, self.dim), np.int8)

    def _ensure_faiss(self) -> None:
        import faiss

        vectors = self._all_vectors()
        n = len(vectors)
        if self._faiss is None:
            p = self.params
            metric = faiss.METRIC_INNER_PRODUCT
            if self.backend == "hnsw":
                if self.storage == "int8":
                    index = faiss.IndexHNSWSQ(self.dim, faiss.ScalarQuantizer.QT_8bit, p["hnsw_m"], metric)
                    index.train(_training_sample(vectors))
                else:
                    index = faiss.IndexHNSWFlat(self.dim, p["hnsw_m"], metric)
                index.hnsw.efConstruction = p["ef_construction"]
            else:
                nlist = p["nlist"] or max(1, min(int(4 * np.sqrt(n)), n // 39))
                pq_m = p["pq_m"] or next(m for m in (self.dim // 8, self.dim // 4, self.dim // 2, self.dim)
                                         if m >= 1 and self.dim % m == 0)
                if self.dim % pq_m:
                    raise ValueError(f"pq_m={pq_m} must divide the dimension {self.dim}")
                if n < max(nlist, 2 ** p["pq_bits"]):
                    raise ValueError(f"ivfpq needs at least {max(nlist, 2 ** p['pq_bits'])} vectors to train "
                                     f"(nlist={nlist}, pq_bits={p['pq_bits']}); the index has {n}. "
                                     f"Use backend='exact' or 'hnsw' for small collections")
                quantizer = faiss.IndexFlatIP(self.dim)
                index = faiss.IndexIVFPQ(quantizer, self.dim, nlist, pq_m, p["pq_bits"], metric)
                index.train(_training_sample(vectors, min(200_000, max(50 * nlist, 100 * 2 ** p["pq_bits"]))))
                p["nlist"], p["pq_m"] = nlist, pq_m
            self._faiss, self._faiss_rows = index, 0
        if self._faiss_rows < n:
            for i in range(self._faiss_rows, n, self.chunk_rows):
                self._faiss.add(np.ascontiguousarray(vectors[i:min(i + self.chunk_rows, n)], dtype=np.float32))
            self._faiss_rows = n

    def _faiss_search(self, q, k, excluded, ef_search, nprobe):
        import faiss

        self._ensure_faiss()
        sel = None
        if excluded is not None:
            sel = faiss.IDSelectorBitmap(np.packbits(~excluded, bitorder="little"))
        if self.backend == "hnsw":
            params = faiss.SearchParametersHNSW(efSearch=max(int(ef_search or self.params["ef_search"]), k))
        else:
            params = faiss.SearchParametersIVF(nprobe=int(nprobe or self.params["nprobe"]))
        if sel is not None:
            params.sel = sel
        s, r = self._faiss.search(q, k, params=params)
        r = r.astype(np.int64)
        s = np.where(r < 0, -np.inf, s).astype(np.float32)
        return s, r


def _rescore(q: np.ndarray, vectors: np.ndarray, s: np.ndarray, r: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
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


def _training_sample(vectors: np.ndarray, size: int = 100_000, seed: int = 0) -> np.ndarray:
    if len(vectors) <= size:
        return np.ascontiguousarray(vectors, dtype=np.float32)
    rows = np.sort(np.random.default_rng(seed).choice(len(vectors), size, replace=False))
    return np.ascontiguousarray(vectors[rows], dtype=np.float32)


def _is_generation_file(name: str) -> bool:
    stem = name.split(".")[0]
    kind, _, gen = stem.rpartition("-")
    return kind in ("vectors", "deleted", "docs", "codes", "ranges", "faiss") and len(gen) == 12


def _require_faiss() -> None:
    try:
        import faiss  # noqa: F401  (availability check)
    except ImportError as e:
        raise ImportError("approximate backends need FAISS: pip install faiss-cpu (or e5kit[search])") from e


def read_manifest(path: Path) -> dict:
    """The manifest of the index at ``path``, checked for format and required fields."""
    f = Path(path) / MANIFEST
    if not Path(path).is_dir():
        raise IndexFileError(f"{path} is not a directory holding an e5kit index")
    if not f.exists():
        raise IndexFileError(f"{f} is missing: {path} is not an e5kit index (or its save never completed)")
    try:
        m = json.loads(f.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise IndexFileError(f"{f} is corrupt ({e}); restore the index from a backup or rebuild it") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise IndexFileError(f"{f} is not an e5kit index manifest")
    if m.get("version") != FORMAT_VERSION:
        raise IndexFileError(f"{f} has format version {m.get('version')}; this e5kit reads version {FORMAT_VERSION}")
    missing = [k for k in ("dim", "count", "backend", "storage", "metric", "params", "files") if k not in m]
    if missing or not {"vectors", "deleted", "docs"} <= set(m.get("files", {})):
        raise IndexFileError(f"{f} lacks {missing or 'file entries'}; the manifest is corrupt")
    return m


def check_model(manifest: dict, model: "E5", path: Path | str = "") -> None:
    """Raise :class:`IndexMismatchError` unless ``model`` is the model the index was built with."""
    where = f"the index at {path}" if path else "this index"
    if model.dim != manifest["dim"]:
        raise IndexMismatchError(f"{where} holds {manifest['dim']}-d vectors from {manifest.get('model')}, "
                                 f"but {model.name} embeds in {model.dim} dimensions; use the same model")
    built_fp, fp = manifest.get("model_fingerprint"), model_fingerprint(model)
    same = (built_fp == fp) if (built_fp and fp) else (manifest.get("model") in (None, model.name))
    if not same:
        raise IndexMismatchError(f"{where} was built with model {manifest.get('model')!r}, not {model.name!r} "
                                 f"(different weights): queries would not match its vectors. Load it with "
                                 f"the model it was built with, or rebuild the index")


__all__ = ["Index", "Hit", "IndexFileError", "IndexMismatchError", "chunked_topk", "atomic_write"]
