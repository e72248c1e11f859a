"""Rate limits (requests/s, tokens/min) and monthly token quotas, per key and per account.

Counts live in the ``counters`` table as fixed windows, bumped with one conditional upsert
(``INSERT .. ON CONFLICT DO UPDATE .. WHERE value + n <= limit``), so every replica that shares the
database sees the same counts and two replicas can never both take the last unit of a limit.
Requests/s is taken when a request is admitted; tokens (per minute and per month) are taken in the
ledger's transaction, so a request that would cross a limit is refused and not billed. The ledger
locks a batch's token counters in sorted order first (:func:`lock_budgets`), so replicas never deadlock.
"""

from __future__ import annotations

import calendar
import datetime as dt
import time
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from .db import Counter


@dataclass(frozen=True)
class Limits:
    """None means unlimited."""

    rps: int | None = None
    tpm: int | None = None
    monthly_quota: int | None = None

    def merged(self, override: "Limits") -> "Limits":
        """``override``'s limits where set, else these (the server's defaults)."""
        return Limits(*(o if o is not None else d for o, d in
                        zip((override.rps, override.tpm, override.monthly_quota), (self.rps, self.tpm, self.monthly_quota))))

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.rps, self.tpm, self.monthly_quota))


class LimitExceeded(Exception):
    def __init__(self, message: str, code: str, retry_after: int | None):
        super().__init__(message)
        self.message, self.code, self.retry_after = message, code, retry_after


def _month(now: float) -> int:
    t = time.gmtime(now)
    return t.tm_year * 100 + t.tm_mon


def _to_next_month(now: float) -> int:
    t = time.gmtime(now)
    y, m = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return max(1, int(calendar.timegm((y, m, 1, 0, 0, 0)) - now))


def bump(s: Session, scope: str, period: int, n: int, limit: int | None) -> int | None:
    """Add ``n`` to a counter unless that takes it over ``limit``: the new value, or None if refused."""
    if limit is not None and n > limit:
        return None
    if s.bind.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    stmt = insert(Counter).values(scope=scope, period=period, value=n)
    stmt = stmt.on_conflict_do_update(
        index_elements=[Counter.scope, Counter.period], set_={"value": Counter.value + n},
        where=(Counter.value + n <= limit) if limit is not None else None,
    ).returning(Counter.value)
    return s.execute(stmt).scalar()


def current(s: Session, scope: str, period: int) -> int:
    return s.scalar(select(Counter.value).where(Counter.scope == scope, Counter.period == period)) or 0


def admit(s: Session, scopes: tuple, now: float | None = None) -> None:
    """Take one request from each scope's requests/s budget and check its token budgets are not spent.

    ``scopes``: ((name, Limits), ...). Raises LimitExceeded; the caller rolls back on it.
    """
    now = time.time() if now is None else now
    for name, lim in scopes:
        if lim.rps is not None and bump(s, f"{name}:r", int(now), 1, lim.rps) is None:
            raise LimitExceeded(f"rate limit of {lim.rps} requests per second reached for {name}; retry shortly",
                                "rate_limit_exceeded", 1)
        if lim.tpm is not None and current(s, f"{name}:t", int(now // 60)) >= lim.tpm:
            raise LimitExceeded(f"rate limit of {lim.tpm} tokens per minute reached for {name}",
                                "rate_limit_exceeded", 60 - int(now % 60))
        if lim.monthly_quota is not None and current(s, f"{name}:m", _month(now)) >= lim.monthly_quota:
            raise LimitExceeded(f"monthly quota of {lim.monthly_quota} tokens is used up for {name}",
                                "insufficient_quota", _to_next_month(now))


def token_budgets(scopes: tuple, now: float) -> list[tuple[str, int, int]]:
    """(counter, period, limit) of each tokens/min and monthly budget of ``scopes`` at ``now``."""
    out = []
    for name, lim in scopes:
        if lim.tpm is not None:
            out.append((f"{name}:t", int(now // 60), lim.tpm))
        if lim.monthly_quota is not None:
            out.append((f"{name}:m", _month(now), lim.monthly_quota))
    return out


def lock_budgets(s: Session, scopes: list[tuple], now: float) -> None:
    """Lock every token counter that charging these requests' ``scopes`` may bump, in one global
    order (a missing row is created at 0). Group commits of several replicas then lock shared
    counters in the same order and cannot deadlock on them."""
    for counter, period in sorted({(c, p) for sc in scopes for c, p, _ in token_budgets(sc, now)}):
        bump(s, counter, period, 0, None)


def charge(s: Session, scopes: tuple, tokens: int, now: float | None = None) -> None:
    """Take ``tokens`` from each scope's per-minute and monthly budgets, or raise LimitExceeded."""
    now = time.time() if now is None else now
    taken: list[tuple[str, int]] = []  # given back if a later budget refuses, so a refusal changes nothing
    for counter, period, limit in token_budgets(scopes, now):
        if bump(s, counter, period, tokens, limit) is None:
            for c, p in taken:
                bump(s, c, p, -tokens, None)
            name = counter[:-2]
            if counter.endswith(":t"):
                raise LimitExceeded(f"this request's {tokens} tokens would exceed the limit of {limit} tokens "
                                    f"per minute for {name}", "rate_limit_exceeded", 60 - int(now % 60))
            raise LimitExceeded(f"this request's {tokens} tokens would exceed the monthly quota of {limit} tokens "
                                f"for {name}", "insufficient_quota", _to_next_month(now))
        taken.append((counter, period))


def hit(s: Session, scope: str, window_s: int, limit: int, now: float | None = None) -> bool:
    """Count one event (e.g. a failed login) in a ``window_s`` window: False once ``limit`` is reached."""
    now = time.time() if now is None else now
    return bump(s, scope, int(now // window_s), 1, limit) is not None


def count(s: Session, scope: str, window_s: int, now: float | None = None) -> int:
    now = time.time() if now is None else now
    return current(s, scope, int(now // window_s))


def month_period(d: dt.datetime) -> int:
    return d.year * 100 + d.month
