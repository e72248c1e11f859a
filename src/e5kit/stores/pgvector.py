"""PostgreSQL + pgvector: a table (id text primary key, vector vector(dim), metadata jsonb) with an
HNSW index on inner product (``vector_ip_ops``; E5 vectors are unit length, so it ranks as cosine).

Writes are idempotent upserts: each batch is COPYed (binary) into a temporary staging table, then
``INSERT ... ON CONFLICT (id) DO UPDATE`` in the same transaction, so a batch lands whole or not at
all and a rerun rewrites rows instead of duplicating them (unchanged rows are left alone, so
resuming a load does not rewrite the HNSW index for rows already there).
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Sequence

import numpy as np

from . import StoreError, VectorStore

if TYPE_CHECKING:  # pragma: no cover
    from ..api import E5

DEFAULT_EF_SEARCH = 100


def _redact(dsn: str) -> str:
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", dsn)


class PgVectorStore(VectorStore):
    """A pgvector table. ``create=True`` makes the extension, table and its metadata when missing."""

    def __init__(self, dsn: str, table: str = "e5kit", model: "E5 | None" = None, *, dim: int | None = None,
                 create: bool = False, model_name: str | None = None, hnsw_m: int = 16, ef_construction: int = 64,
                 ef_search: int = DEFAULT_EF_SEARCH, connect_timeout: int = 10):
        import psycopg
        from psycopg import sql

        self.model, self.table, self.sql = model, table, sql
        self.hnsw_m, self.ef_construction, self.ef_search = hnsw_m, ef_construction, ef_search
        try:
            self.conn = psycopg.connect(dsn, connect_timeout=connect_timeout, autocommit=True)
        except psycopg.OperationalError as e:
            raise StoreError(f"cannot connect to PostgreSQL at {_redact(dsn)}: {str(e).strip()}") from e
        self.t = sql.Identifier(table)
        have = self.conn.execute("SELECT atttypmod, obj_description(attrelid, 'pg_class') FROM pg_attribute "
                                 "WHERE attrelid = to_regclass(%s) AND attname = 'vector'", (table,)).fetchone()
        if have is None:
            if not create:
                raise StoreError(f"PostgreSQL at {_redact(dsn)} has no e5kit table {table!r}")
            dim = dim or (model.dim if model is not None else None)
            if not dim:
                raise StoreError("creating a table needs the vector dimension (a model or dim=...)")
            self.info = {"e5kit": 1, "model": model.name if model is not None else model_name, "dim": int(dim)}
            self._create(int(dim))
        else:
            try:
                self.info = json.loads(have[1] or "{}")
            except ValueError:
                self.info = {}
            self.info["dim"] = int(have[0])
            if dim is not None and int(dim) != self.info["dim"]:
                raise StoreError(f"table {table!r} holds {self.info['dim']}-d vectors (model {self.info.get('model')}), "
                                 f"not {dim}-d; load these vectors into another table")
        self.dim = self.info["dim"]
        self._check_model(model)
        from pgvector.psycopg import register_vector

        register_vector(self.conn)

    def _create(self, dim: int) -> None:
        sql = self.sql
        with self.conn.transaction():
            self.conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            self.conn.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} (id text PRIMARY KEY, vector vector({}) NOT NULL, "
                                      "metadata jsonb)").format(self.t, sql.Literal(dim)))
            self.conn.execute(sql.SQL("COMMENT ON TABLE {} IS {}").format(self.t, sql.Literal(json.dumps(self.info))))

    def __len__(self) -> int:
        return self.conn.execute(self.sql.SQL("SELECT count(*) FROM {}").format(self.t)).fetchone()[0]

    def __repr__(self) -> str:
        return f"PgVectorStore(table={self.table!r}, dim={self.dim}, model={self.info.get('model')!r})"

    def upsert(self, ids: Sequence[str], vectors: np.ndarray, metadata: Sequence[dict | None] | None = None) -> None:
        """Insert or replace rows by id, in one transaction (binary COPY into a staging table, then merge)."""
        from psycopg.types.json import Jsonb

        sql, ids = self.sql, [str(i) for i in ids]
        vectors = self._check_batch(ids, vectors)
        metadata = metadata if metadata is not None else [None] * len(ids)
        stage = sql.Identifier(f"_e5kit_stage_{self.table}")
        with self.conn.transaction():
            self.conn.execute(sql.SQL("CREATE TEMP TABLE {} (LIKE {}) ON COMMIT DROP").format(stage, self.t))
            with self.conn.cursor() as cur:
                with cur.copy(sql.SQL("COPY {} (id, vector, metadata) FROM STDIN (FORMAT BINARY)").format(stage)) as cp:
                    cp.set_types(["text", "vector", "jsonb"])
                    for i, v, m in zip(ids, vectors, metadata):
                        cp.write_row((i, v, Jsonb(m) if m is not None else None))
            self.conn.execute(sql.SQL("INSERT INTO {} (id, vector, metadata) SELECT id, vector, metadata FROM {} "
                                      "ON CONFLICT (id) DO UPDATE SET vector = EXCLUDED.vector, "
                                      "metadata = EXCLUDED.metadata WHERE ({t}.vector, {t}.metadata) IS DISTINCT FROM "
                                      "(EXCLUDED.vector, EXCLUDED.metadata)").format(self.t, stage, t=self.t))

    def create_index(self) -> None:
        """The HNSW index on inner product (kept up to date by PostgreSQL on later upserts)."""
        sql = self.sql
        with self.conn.transaction():
            self.conn.execute("SET LOCAL maintenance_work_mem = '512MB'")
            self.conn.execute(sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} USING hnsw (vector vector_ip_ops) "
                                      "WITH (m = {}, ef_construction = {})").format(
                sql.Identifier(f"{self.table}_vector_hnsw"), self.t, sql.Literal(self.hnsw_m),
                sql.Literal(self.ef_construction)))

    def search_vectors(self, queries: np.ndarray, k: int = 10, *, ef_search: int | None = None, exact: bool = False,
                       **_) -> list[list[tuple[str, float, dict | None]]]:
        """Top-k by inner product per query: through the HNSW index (``ef_search``), or exact (a full scan)."""
        out = []
        with self.conn.transaction():
            self._set_search(k, ef_search, exact)
            for q in np.asarray(queries, dtype=np.float32):
                rows = self.conn.execute(self._search_sql(), {"q": q, "k": k}).fetchall()
                out.append([(i, float(s), m) for i, s, m in rows])
        return out

    def explain(self, query: np.ndarray, k: int = 10, *, ef_search: int | None = None, exact: bool = False) -> str:
        """PostgreSQL's plan for :meth:`search_vectors` of one query: shows whether the HNSW index is used
        (the planner may prefer a full scan of a small table)."""
        with self.conn.transaction():
            self._set_search(k, ef_search, exact)
            rows = self.conn.execute(self.sql.SQL("EXPLAIN ") + self._search_sql(),
                                     {"q": np.asarray(query, dtype=np.float32), "k": k}).fetchall()
        return "\n".join(r[0] for r in rows)

    def _search_sql(self):
        return self.sql.SQL("SELECT id, -(vector <#> %(q)s) AS score, metadata FROM {} ORDER BY vector <#> %(q)s "
                            "LIMIT %(k)s").format(self.t)

    def _set_search(self, k: int, ef_search: int | None, exact: bool) -> None:
        """This transaction's search settings: the HNSW breadth, or (exact) no index scan."""
        self.conn.execute(self.sql.SQL("SET LOCAL hnsw.ef_search = {}").format(
            self.sql.Literal(min(1000, max(k, ef_search or self.ef_search)))))
        if exact:
            self.conn.execute("SET LOCAL enable_indexscan = off")
            self.conn.execute("SET LOCAL enable_seqscan = on")  # even where the session turned it off

    def close(self) -> None:
        self.conn.close()
