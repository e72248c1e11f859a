"""Accounts, billing and pages on top of the embedding server: :func:`create_service_app`.

The server keeps doing the embedding; this module builds it through its seams
(:func:`e5kit.server.create_app`): an ``authenticate`` that knows key-file keys, database keys and
logged-in users (and admits them past their rate limits), a ``meter`` that commits each request to
the ledger before the 200 is sent, ``usage_route=False`` plus a ``/v1/usage`` router that reports
the ledger, and the pages.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import time
from dataclasses import dataclass, field

from typing import Sequence

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.exc import SQLAlchemyError

from ..api import E5
from ..server import ServerConfig, create_app
from ..server.auth import KeyStore
from ..server.errors import APIError
from . import accounts
from .accounts import Identity
from .db import ApiKey, User, open_db
from .ledger import DEFAULT_PRICES, Ledger
from .limits import LimitExceeded, Limits, admit

log = logging.getLogger("e5kit.service")
SESSION_COOKIE = "e5kit_session"


@dataclass
class ServiceConfig:
    """`e5kit serve --database-url ...` and friends."""

    database_url: str
    prices: dict[str, float] = field(default_factory=dict)  # served id or checkpoint -> USD / Mtoken
    default_price: float | None = None  # for models without a price (None: DEFAULT_PRICES, else 0)
    key_limits: Limits = field(default_factory=Limits)  # defaults for keys without their own
    account_limits: Limits = field(default_factory=Limits)  # defaults for accounts without their own
    session_hours: float = 12.0
    cookie_secure: bool = True
    login_attempts: int = 5  # failed logins per account and per client address in 5 minutes
    # A database key's lookup is reused this long: one query per key and period instead of one per
    # request. Revoking a key on this server's account page ends it at once; revocation, disabling
    # or new limits from elsewhere (the CLI, another replica) take effect within this time.
    key_cache_seconds: float = 1.0


def _limits_of(row, default: Limits) -> Limits:
    return default.merged(Limits(row.rps_limit, row.tpm_limit, row.monthly_quota))


class Service:
    """The database, the ledger and the identity rules of one server process."""

    def __init__(self, config: ServiceConfig, keys: KeyStore | None = None, models: dict[str, E5] | None = None):
        self.config = config
        self.keys = keys or KeyStore()
        self.engine, self.db = open_db(config.database_url)
        prices = {}
        for name, m in (models or {}).items():
            price = config.prices.get(name, config.prices.get(m.spec.name))
            if price is None:
                price = config.default_price if config.default_price is not None else DEFAULT_PRICES.get(m.spec.name, 0.0)
            prices[name] = float(price)
        self.ledger = Ledger(self.db, prices)
        # sha256(token) -> (valid until, public id, user id, key row id, limits): live keys only
        self._key_cache: dict[bytes, tuple] = {}

    # ---- identities ----
    def _scopes_key(self, key: ApiKey) -> tuple:
        scopes = []
        kl = _limits_of(key, self.config.key_limits)
        if kl.any:
            scopes.append((f"key {key.public_id}", kl))
        al = _limits_of(key.user, self.config.account_limits)
        if al.any:
            scopes.append((f"account {key.user_id}", al))
        return tuple(scopes)

    def _scopes_user(self, user: User) -> tuple:
        al = _limits_of(user, self.config.account_limits)
        return ((f"account {user.id}", al),) if al.any else ()

    def identify_bearer(self, token: str, request_key: str | None) -> Identity | None:
        """The caller of a Bearer token (key file first, then the database), admitted past the limits."""
        label = self.keys.check(f"Bearer {token}")
        if label is not None:
            kl = self.config.key_limits
            ident = Identity(key_id=f"file:{label}", kind="file", request_key=request_key,
                             limits=((f"key {label}", kl),) if kl.any else ())
        else:
            found = self._database_key(token)
            if found is None:
                return None
            public_id, user_id, key_row, limits = found
            ident = Identity(key_id=public_id, user_id=user_id, api_key_id=key_row, kind="key",
                             request_key=request_key, limits=limits)
        self.admit(ident)
        return ident

    def _database_key(self, token: str) -> tuple | None:
        """(public id, user id, key row id, limits) of a live database key, cached for key_cache_seconds."""
        digest, now = hashlib.sha256(token.encode()).digest(), time.monotonic()
        hit = self._key_cache.get(digest)
        if hit is not None and hit[0] > now:
            return hit[1:]
        with self.db() as s:
            key = accounts.check_key(s, token)
            if key is None:
                self._key_cache.pop(digest, None)
                return None
            found = (key.public_id, key.user_id, key.id, self._scopes_key(key))
        if self.config.key_cache_seconds > 0:
            if len(self._key_cache) > 10_000:  # expired entries of keys no longer used
                self._key_cache = {d: h for d, h in self._key_cache.items() if h[0] > now}
            self._key_cache[digest] = (now + self.config.key_cache_seconds, *found)
        return found

    def forget_key(self, public_id: str) -> None:
        """Drop a key's cached lookup (it was revoked here)."""
        self._key_cache = {d: h for d, h in self._key_cache.items() if h[1] != public_id}

    def identify_session(self, token: str | None, request_key: str | None) -> tuple[Identity, str] | None:
        found = accounts.get_session(self.db, token)
        if found is None:
            return None
        ws, user = found
        ident = Identity(key_id=f"session:{user.id}", user_id=user.id, kind="session", request_key=request_key,
                         limits=self._scopes_user(user))
        return ident, ws.csrf_token

    def admit(self, ident: Identity) -> None:
        if ident.limits:
            with self.db.begin() as s:
                admit(s, ident.limits)


def _limit_error(e: LimitExceeded) -> APIError:
    headers = {"Retry-After": str(e.retry_after)} if e.retry_after else None
    return APIError(429, e.message, type="insufficient_quota" if e.code == "insufficient_quota" else None,
                    code=e.code, headers=headers)


def create_service_app(models: Sequence[tuple[str, E5]] | dict[str, E5], config: ServiceConfig,
                       server_config: ServerConfig | None = None, keys: KeyStore | None = None) -> FastAPI:
    """The embedding server of :func:`e5kit.server.create_app` with accounts, ledger, limits and pages.

    ``keys`` (``--api-key`` / ``--api-key-file``) keep working next to database keys; their usage is
    billed under ``file:<label>``. The :class:`Service` is ``app.state.accounts``.
    """
    pairs = list(models.items()) if isinstance(models, dict) else list(models)
    service = Service(config, keys, dict(pairs))
    bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")

    async def authenticate(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Identity:
        labels = request.scope.setdefault("e5kit", {"model": "-", "key": "-"})
        request_key = request.headers.get("idempotency-key")
        if request_key is not None and not (0 < len(request_key) <= 200 and request_key.isascii()):
            raise APIError(400, "Idempotency-Key must be 1 to 200 ASCII characters", code="invalid_value")
        try:
            if creds is not None:
                ident = await asyncio.to_thread(service.identify_bearer, creds.credentials, request_key)
                if ident is None:
                    raise APIError(401, "invalid API key", code="invalid_api_key")
            else:
                found = await asyncio.to_thread(service.identify_session, request.cookies.get(SESSION_COOKIE),
                                                request_key)
                if found is None:
                    raise APIError(401, "missing API key: send 'Authorization: Bearer <key>' (or log in)",
                                   code="invalid_api_key")
                ident, csrf = found
                if request.method not in ("GET", "HEAD") and not _same(request.headers.get("x-csrf-token"), csrf):
                    raise APIError(403, "missing or wrong X-CSRF-Token for a logged-in request", code="csrf_failed")
                await asyncio.to_thread(service.admit, ident)
        except LimitExceeded as e:
            raise _limit_error(e)
        except SQLAlchemyError:
            log.exception("database error while authenticating")
            raise APIError(503, "the account database is unavailable", "server_error", code="database_unavailable")
        labels["key"] = ident.key_id
        return ident

    async def meter(identity: Identity, model: str, n_inputs: int, tokens: int) -> None:
        try:
            await asyncio.wrap_future(service.ledger.submit(identity, model, n_inputs, tokens))
        except LimitExceeded as e:
            raise _limit_error(e)
        except SQLAlchemyError:
            log.exception("database error while recording usage")
            raise APIError(503, "the usage ledger is unavailable; this request was not billed", "server_error",
                           code="ledger_unavailable")
        # the server's own per-key Prometheus counters, as without a database
        app.state.meter.record(identity.key_id, model, n_inputs, tokens)

    app = create_app(pairs, server_config, keys, authenticate=authenticate, meter=meter, usage_route=False)
    app.state.accounts = service
    usage_router = APIRouter(prefix="/v1", tags=["metering"])

    @usage_router.get("/usage", summary="Usage from the ledger: per key or account, per model, per day or month")
    async def usage(request: Request, group_by: str = "day", scope: str = "key", model: str | None = None,
                    key: str | None = None, since: str | None = None, until: str | None = None,
                    ident: Identity = Depends(authenticate)):
        if group_by not in ("day", "month", "total"):
            raise APIError(422, "'group_by' must be day, month or total", param="group_by", code="invalid_value")
        if scope not in ("key", "account"):
            raise APIError(422, "'scope' must be key or account", param="scope", code="invalid_value")
        bounds = {}
        for name, value in (("since", since), ("until", until)):
            if value is not None:
                try:
                    bounds[name] = dt.datetime.fromisoformat(value).replace(tzinfo=None)
                except ValueError:
                    raise APIError(422, f"'{name}' must be an ISO date or time", param=name, code="invalid_value")
        where: dict = {}
        if key is not None:  # one key of the caller's own account
            mine = ident.user_id is not None and any(
                k.public_id == key for k in await asyncio.to_thread(accounts.list_keys, service.db, ident.user_id))
            if not mine:
                raise APIError(404, "no such key on your account", param="key", code="key_not_found")
            where["key_label"] = key
        elif scope == "account" or ident.kind == "session":
            if ident.user_id is None:
                raise APIError(422, "a key-file key has no account; use scope=key", param="scope", code="invalid_value")
            where["user_id"] = ident.user_id
        else:
            where["key_label"] = ident.key_id
        rep = await asyncio.to_thread(service.ledger.report, group_by=group_by, model=model, **where, **bounds)
        rep.update(scope="key" if "key_label" in where else "account",
                   key=where.get("key_label"), prices=service.ledger.prices)
        return rep

    app.include_router(usage_router)
    from .pages import add_pages

    add_pages(app, service)
    return app


def _same(a: str | None, b: str) -> bool:
    import hmac

    return a is not None and hmac.compare_digest(a.encode(), b.encode())
