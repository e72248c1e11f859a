"""Vector-database sinks for e5kit embeddings: PostgreSQL + pgvector and LanceDB.

Each store holds (id, vector, metadata) rows and answers ``search(queries, k)`` like
:class:`e5kit.Index` (E5 query formatting through the model, lists of :class:`e5kit.index.Hit`).
A store is named by a URI:

    postgresql://user@host:5432/db?table=passages     PostgreSQL with pgvector (table default: e5kit)
    lancedb:/path/to/db?table=passages                LanceDB, embedded, on disk

(``index:DIR``, an e5kit Index, is the third sink of the commands.) :func:`load_vectors` loads an
``e5kit embed-corpus`` output into any of them, so a corpus is embedded once and loaded into
several stores; :func:`load_rows` loads any (ids, vectors, metadata) batches, e.g. ``Index.rows()``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable, Iterable, Sequence
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from ..api import E5
    from ..index import Hit

DEFAULT_TABLE = "e5kit"
SCHEMES = ("postgresql", "postgres", "lancedb")


class StoreError(ValueError):
    """A store cannot be reached or does not match what is written to it (dimension, model, ids)."""


def is_store_uri(target: str) -> bool:
    return str(target).split(":", 1)[0].lower() in SCHEMES and ":" in str(target)


def check_sink(uri: str) -> None:
    """Refuse a sink URI that names no known store, before any work is done."""
    if not (str(uri).startswith("index:") or is_store_uri(uri)):
        raise StoreError(f"unknown sink {uri!r}: expected postgresql://...?table=T, lancedb:DIR?table=T or index:DIR")


def split_uri(uri: str) -> tuple[str, str, str]:
    """(scheme, location without the table parameter, table)."""
    scheme = uri.split(":", 1)[0].lower()
    if not is_store_uri(uri):
        raise StoreError(f"{uri!r} is not a store URI: postgresql://user@host/db?table=T or lancedb:DIR?table=T")
    parts = urlsplit(uri)
    query = parse_qsl(parts.query)
    table = next((v for k, v in query if k == "table"), DEFAULT_TABLE)
    rest = urlencode([(k, v) for k, v in query if k != "table"])
    if scheme == "lancedb":
        return scheme, uri.split(":", 1)[1].split("?", 1)[0].removeprefix("//"), table
    return "postgresql", urlunsplit(parts._replace(scheme="postgresql", query=rest)), table


def open_store(uri: str, model: "E5 | None" = None, *, dim: int | None = None, create: bool = False, **options):
    """The store at ``uri`` (``create=True`` makes its table when missing, with ``dim`` or the model's dimension)."""
    scheme, where, table = split_uri(uri)
    try:
        if scheme == "lancedb":
            from .lancedb import LanceDBStore

            return LanceDBStore(where, table, model, dim=dim, create=create, **options)
        from .pgvector import PgVectorStore

        return PgVectorStore(where, table, model, dim=dim, create=create, **options)
    except ImportError as e:
        extra = "lancedb" if scheme == "lancedb" else "pgvector"
        raise StoreError(f"{extra} stores need pip install 'e5kit[{extra}]' ({e})") from e


class VectorStore:
    """What the stores share: query embedding and the Index-style ``search``."""

    model: "E5 | None"
    dim: int
    info: dict  # what the store recorded at creation: model, dim

    def search(self, queries: "str | Sequence[str] | np.ndarray", k: int = 10, *, task: str | None = None,
               batch_size: int = 32, **search_options) -> "list[Hit] | list[list[Hit]]":
        """The ``k`` best rows for each query, best first (inner product = cosine for E5's unit vectors)."""
        from ..index import Hit

        single = isinstance(queries, str) or (isinstance(queries, np.ndarray) and queries.ndim == 1)
        if not single and len(queries) == 0:
            return []
        if isinstance(queries, str) or (not isinstance(queries, np.ndarray) and queries and isinstance(queries[0], str)):
            if self.model is None:
                raise StoreError("text queries need a model; open the store with one, or pass query vectors")
            q = self.model.encode_queries([queries] if isinstance(queries, str) else list(queries), task=task,
                                          batch_size=batch_size)
        else:
            q = np.asarray(queries, dtype=np.float32)
        q = np.atleast_2d(q)
        if q.shape[1] != self.dim:
            raise StoreError(f"query vectors have {q.shape[1]} dimensions, the store holds {self.dim}")
        out = [[Hit(i, s, m) for i, s, m in rows] for rows in self.search_vectors(q, k, **search_options)]
        return out[0] if single else out

    def search_vectors(self, queries: np.ndarray, k: int, **options) -> list[list[tuple[str, float, dict | None]]]:
        raise NotImplementedError

    def upsert(self, ids: Sequence[str], vectors: np.ndarray, metadata: Sequence[dict | None] | None = None) -> None:
        raise NotImplementedError

    def create_index(self) -> None:
        raise NotImplementedError

    def _check_batch(self, ids: Sequence[str], vectors: np.ndarray) -> np.ndarray:
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(ids):
            raise StoreError(f"expected {len(ids)} vectors, got an array of shape {vectors.shape}")
        if vectors.shape[1] != self.dim:
            raise StoreError(f"vectors have {vectors.shape[1]} dimensions but the table holds {self.dim}-d vectors "
                             f"(model {self.info.get('model')}); load them into another table")
        if len(set(ids)) != len(ids):
            seen, dup = set(), None
            for i in ids:
                if i in seen:
                    dup = i
                    break
                seen.add(i)
            raise StoreError(f"id {dup!r} appears twice in one batch; ids must be unique")
        return vectors

    def with_model(self, model: "E5") -> "VectorStore":
        """This store, embedding text queries with ``model`` (checked against the stored dimension)."""
        self._check_model(model)
        self.model = model
        return self

    def _check_model(self, model: "E5 | None") -> None:
        if model is None:
            return
        if model.dim != self.dim:
            raise StoreError(f"the store holds {self.dim}-d vectors (model {self.info.get('model')}), but "
                             f"{model.name} embeds in {model.dim} dimensions")

def load_rows(store: VectorStore, batches: Iterable[tuple[list[str], np.ndarray, list[dict | None]]], *,
              total: int | None = None, index: bool = True, log: Callable[[str], None] = lambda m: None) -> dict:
    """Upsert (ids, vectors, metadata) batches into ``store`` (idempotent), then build its ANN index."""
    t0, rows = time.perf_counter(), 0
    for ids, vec, meta in batches:
        store.upsert(ids, vec, meta)
        rows += len(ids)
        log(f"{rows}/{total if total is not None else '?'} rows")
    t_write = time.perf_counter() - t0
    if index:
        store.create_index()
    return {"rows": rows, "write_seconds": t_write, "rows_per_s": rows / t_write if t_write else 0.0,
            "index_seconds": time.perf_counter() - t0 - t_write}


def load_vectors(vectors_dir: str, store: VectorStore, *, batch_rows: int = 8192, index: bool = True,
                 log: Callable[[str], None] = lambda m: None) -> dict:
    """Upsert every row of an ``e5kit embed-corpus`` output into ``store`` (idempotent), then build its ANN index."""
    from ..scale.shards import iter_vectors, read_manifest

    m = read_manifest(vectors_dir)
    if m["dim"] != store.dim:
        raise StoreError(f"{vectors_dir} holds {m['dim']}-d vectors but the store holds {store.dim}-d ones")
    return load_rows(store, iter_vectors(vectors_dir, batch_rows), total=m["rows"], index=index, log=log)
