"""LanceDB (embedded, on disk): a table (id, vector fixed-size float32 list, metadata JSON string)
with an IVF_HNSW_SQ index on dot product. Upserts are ``merge_insert`` on id (idempotent)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Sequence

import numpy as np

from . import StoreError, VectorStore

if TYPE_CHECKING:  # pragma: no cover
    from ..api import E5

META_KEY = b"e5kit"


class LanceDBStore(VectorStore):
    """A LanceDB table in the database folder ``path``; ``create=True`` makes it when missing."""

    def __init__(self, path: str, table: str = "e5kit", model: "E5 | None" = None, *, dim: int | None = None,
                 create: bool = False, model_name: str | None = None, nprobe: int = 20, ef_search: int = 100,
                 refine_factor: int | None = 4):
        import lancedb
        import pyarrow as pa

        self.model, self.path, self.table = model, path, table
        self.nprobe, self.ef_search, self.refine_factor = nprobe, ef_search, refine_factor
        try:
            self.db = lancedb.connect(path)
            names = set(self.db.list_tables().tables if hasattr(self.db, "list_tables") else self.db.table_names())
        except (OSError, ValueError) as e:
            raise StoreError(f"cannot open LanceDB at {path}: {e}") from e
        if table in names:
            self.tbl = self.db.open_table(table)
            schema = self.tbl.schema
            self.info = json.loads((schema.metadata or {}).get(META_KEY, b"{}"))
            self.info["dim"] = schema.field("vector").type.list_size
            if dim is not None and int(dim) != self.info["dim"]:
                raise StoreError(f"LanceDB table {table!r} holds {self.info['dim']}-d vectors (model "
                                 f"{self.info.get('model')}), not {dim}-d; load these vectors into another table")
        else:
            if not create:
                raise StoreError(f"LanceDB at {path} has no table {table!r}")
            dim = dim or (model.dim if model is not None else None)
            if not dim:
                raise StoreError("creating a table needs the vector dimension (a model or dim=...)")
            self.info = {"e5kit": 1, "model": model.name if model is not None else model_name, "dim": int(dim)}
            schema = pa.schema([("id", pa.string()), ("vector", pa.list_(pa.float32(), int(dim))),
                                ("metadata", pa.string())], metadata={META_KEY: json.dumps(self.info).encode()})
            self.tbl = self.db.create_table(table, schema=schema, exist_ok=True)
        self.dim = self.info["dim"]
        self._check_model(model)

    def __len__(self) -> int:
        return self.tbl.count_rows()

    def __repr__(self) -> str:
        return f"LanceDBStore({self.path!r}, table={self.table!r}, dim={self.dim}, model={self.info.get('model')!r})"

    def upsert(self, ids: Sequence[str], vectors: np.ndarray, metadata: Sequence[dict | None] | None = None) -> None:
        from ..scale.shards import vectors_table

        ids = [str(i) for i in ids]
        vectors = self._check_batch(ids, vectors)
        meta = [json.dumps(m, ensure_ascii=False) if m is not None else None
                for m in (metadata if metadata is not None else [None] * len(ids))]
        data = vectors_table(ids, vectors, meta).cast(self.tbl.schema.remove_metadata())
        (self.tbl.merge_insert("id").when_matched_update_all().when_not_matched_insert_all().execute(data))

    def create_index(self, min_rows: int = 256) -> None:
        """IVF_HNSW_SQ on dot product (~1 partition per 100k rows); a table under ``min_rows`` stays a flat scan."""
        n = len(self)
        if n < min_rows:
            return
        from lancedb.index import HnswSq  # IVF partitions, each an HNSW graph over scalar-quantised vectors

        self.tbl.create_index("vector", config=HnswSq(distance_type="dot", num_partitions=max(1, n // 100_000)),
                              replace=True)

    def search_vectors(self, queries: np.ndarray, k: int = 10, *, nprobe: int | None = None, ef_search: int | None = None,
                       exact: bool = False, **_) -> list[list[tuple[str, float, dict | None]]]:
        """Top-k by dot product per query: through the ANN index (``nprobe``, ``ef_search``, refined), or exact."""
        out = []
        for q in np.asarray(queries, dtype=np.float32):
            t = self._query(q, k, nprobe, ef_search, exact).select(["id", "metadata", "_distance"]).to_arrow()
            # LanceDB's "dot" distance is 1 - <q, v>
            out.append([(i, 1.0 - float(d), json.loads(m) if m else None)
                        for i, d, m in zip(t["id"].to_pylist(), t["_distance"].to_pylist(), t["metadata"].to_pylist())])
        return out

    def explain(self, query: np.ndarray, k: int = 10, *, nprobe: int | None = None, ef_search: int | None = None,
                exact: bool = False) -> str:
        """LanceDB's plan for :meth:`search_vectors` of one query: shows whether the ANN index is used."""
        return self._query(np.asarray(query, dtype=np.float32), k, nprobe, ef_search, exact).explain_plan(verbose=True)

    def _query(self, q: np.ndarray, k: int, nprobe: int | None, ef_search: int | None, exact: bool):
        s = self.tbl.search(q, vector_column_name="vector").distance_type("dot").limit(k)
        if exact:
            return s.bypass_vector_index()
        s = s.nprobes(nprobe or self.nprobe).ef(max(k, ef_search or self.ef_search))
        return s.refine_factor(self.refine_factor) if self.refine_factor else s
