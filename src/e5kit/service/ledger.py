"""The usage ledger: one committed row per successful embedding request, written before its 200.

A request's row, its token-limit counters and its key's last-use time are one transaction: either
all are committed (and only then is the response sent) or none is (and the client gets an error,
so nothing is billed for it). A client that lost a response (the server died after the commit)
can retry with the same ``Idempotency-Key``: the retry gets its 200 and is not billed twice.
"""

from __future__ import annotations

import datetime as dt
import queue
import threading
import time
from concurrent.futures import Future

from sqlalchemy import func, insert, literal_column, or_, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import sessionmaker

from .accounts import Identity
from .db import ApiKey, Usage, utcnow
from .limits import LimitExceeded, charge, lock_budgets

# Prices in USD per million tokens, by checkpoint (the seed's hosted e5-large-v2: $0.010 / Mtoken).
DEFAULT_PRICES = {"intfloat/e5-large-v2": 0.010}
# PostgreSQL's deadlock_detected and serialization_failure: the transaction was rolled back, so it can be retried.
RETRYABLE = {"40P01", "40001"}


class Ledger:
    """Writes usage rows with group commit: one writer thread takes every record waiting, writes
    them in one transaction and answers each caller after the commit (one fsync for many requests)."""

    def __init__(self, db: sessionmaker, prices: dict[str, float] | None = None, max_batch: int = 512):
        self.db = db
        self.prices = dict(prices or {})
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def price(self, model: str) -> float:
        return float(self.prices.get(model, 0.0))

    def submit(self, identity: Identity, model: str, inputs: int, tokens: int) -> Future:
        """A future that is True once the row is committed, False if this Idempotency-Key was billed
        already; its exception is LimitExceeded (nothing written) or the database's error."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._writer, name="e5kit-ledger", daemon=True)
                self._thread.start()
        fut: Future = Future()
        self._queue.put((identity, model, inputs, tokens, fut))
        return fut

    def record(self, identity: Identity, model: str, inputs: int, tokens: int) -> bool:
        """Commit one request's usage (blocking); see :meth:`submit`."""
        return self.submit(identity, model, inputs, tokens).result()

    def _writer(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                results = self._commit(batch)
            except IntegrityError:  # a concurrent replica committed one of these Idempotency-Keys
                results = []
                for item in batch:
                    try:
                        results.append(self._commit([item])[0])
                    except IntegrityError:
                        results.append(False)
                    except Exception as e:  # noqa: BLE001 - handed to the waiting request
                        results.append(e)
            except Exception as e:  # noqa: BLE001 - the database is down: every waiting request fails
                results = [e] * len(batch)
            for (*_, fut), res in zip(batch, results):
                if isinstance(res, BaseException):
                    fut.set_exception(res)
                else:
                    fut.set_result(res)

    def _commit(self, batch: list) -> list:
        """:meth:`_write`, once more if PostgreSQL aborted it as a deadlock or serialization failure
        (rolled back whole, so nothing was billed; the retry re-reads what is billed already)."""
        try:
            return self._write(batch)
        except DBAPIError as e:
            if isinstance(e, IntegrityError) or getattr(e.orig, "sqlstate", None) not in RETRYABLE:
                raise
            return self._write(batch)

    def _write(self, batch: list) -> list:
        """One transaction for the whole batch: one INSERT (executemany), one last-use UPDATE."""
        now, t = utcnow(), time.time()
        results: list = []
        rows: list[dict] = []
        key_ids: set[int] = set()
        with self.db.begin() as s:
            wanted = [i.request_key for i, *_ in batch if i.request_key is not None]
            billed = set(s.execute(select(Usage.key_label, Usage.request_key)
                                   .where(Usage.request_key.in_(wanted))).all()) if wanted else set()
            lock_budgets(s, [i.limits for i, *_ in batch], t)
            for identity, model, inputs, tokens, _ in batch:
                rk = (identity.key_id, identity.request_key)
                if identity.request_key is not None and rk in billed:
                    results.append(False)
                    continue
                try:
                    charge(s, identity.limits, tokens, t)
                except LimitExceeded as e:
                    results.append(e)
                    continue
                billed.add(rk)
                price = self.price(model)
                rows.append(dict(created_at=now, user_id=identity.user_id, key_id=identity.api_key_id,
                                 key_label=identity.key_id, request_key=identity.request_key, model=model,
                                 inputs=inputs, tokens=tokens, price_per_million=price, cost_usd=tokens * price / 1e6))
                if identity.api_key_id is not None:
                    key_ids.add(identity.api_key_id)
                results.append(True)
            if rows:  # in one order too: replicas inserting the same Idempotency-Keys wait, never deadlock
                rows.sort(key=lambda r: (r["key_label"], r["request_key"] or ""))
                s.execute(insert(Usage), rows)
            if key_ids:  # at most one write a minute per key
                s.execute(update(ApiKey).where(ApiKey.id.in_(key_ids), or_(
                    ApiKey.last_used_at.is_(None), ApiKey.last_used_at < now - dt.timedelta(seconds=60)))
                    .values(last_used_at=now))
        return results

    def report(self, *, user_id: int | None = None, key_label: str | None = None, group_by: str = "day",
               model: str | None = None, since: dt.datetime | None = None, until: dt.datetime | None = None) -> dict:
        """Requests, inputs, tokens and cost by period x model x key, and their totals."""
        if user_id is None and key_label is None:
            raise ValueError("report needs a user or a key")
        with self.db() as s:
            period = _period(s.bind.dialect.name, group_by)
            keys = [Usage.model, Usage.key_label] if group_by == "total" else [period, Usage.model, Usage.key_label]
            q = (select(period.label("period"), Usage.model, Usage.key_label, func.count(Usage.id),
                        func.sum(Usage.inputs), func.sum(Usage.tokens), func.sum(Usage.cost_usd))
                 .group_by(*keys).order_by(*keys))
            if user_id is not None:
                q = q.where(Usage.user_id == user_id)
            if key_label is not None:
                q = q.where(Usage.key_label == key_label)
            if model is not None:
                q = q.where(Usage.model == model)
            if since is not None:
                q = q.where(Usage.created_at >= since)
            if until is not None:
                q = q.where(Usage.created_at < until)
            rows = s.execute(q).all()
        data = [{"period": str(p), "model": m, "key": k, "requests": int(n), "inputs": int(i), "tokens": int(t),
                 "cost_usd": float(c)} for p, m, k, n, i, t, c in rows]
        total = {f: sum(d[f] for d in data) for f in ("requests", "inputs", "tokens", "cost_usd")}
        return {"object": "usage", "group_by": group_by, "data": data, "total": total}

    def daily_tokens(self, user_id: int, days: int = 30) -> list[tuple[str, int, float]]:
        """(YYYY-MM-DD, tokens, cost) for each of the last ``days`` days, zeros included (for the plot)."""
        today = utcnow().date()
        start = today - dt.timedelta(days=days - 1)
        rep = self.report(user_id=user_id, group_by="day", since=dt.datetime.combine(start, dt.time()))
        by_day: dict[str, list] = {}
        for d in rep["data"]:
            acc = by_day.setdefault(d["period"][:10], [0, 0.0])
            acc[0] += d["tokens"]
            acc[1] += d["cost_usd"]
        dates = [(start + dt.timedelta(days=i)).isoformat() for i in range(days)]
        return [(d, *by_day.get(d, (0, 0.0))) for d in dates]


def _period(dialect: str, group_by: str):
    if group_by not in ("day", "month", "total"):
        raise ValueError("group_by must be day, month or total")
    if group_by == "total":
        return literal_column("'all'")
    if dialect == "postgresql":
        return func.to_char(Usage.created_at, "YYYY-MM-DD" if group_by == "day" else "YYYY-MM")
    return func.strftime("%Y-%m-%d" if group_by == "day" else "%Y-%m", Usage.created_at)
