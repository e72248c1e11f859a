"""``create_app``: wiring only. The pieces live by concern:

- :mod:`.config` the settings, :mod:`.schemas` request/response bodies (the OpenAPI document),
- :mod:`.service` the one embed service (model, admission, prepare, batcher, finish, meter),
- :mod:`.routes` one router per API family (OpenAI, native, operations),
- :mod:`.middleware` request metrics, log redaction, the slow-client guard, :mod:`.errors` the error shape.

Everything a client can send is answered with a 2xx or a 4xx in OpenAI's error shape; a 5xx means
a bug, a broken machine, or a request cut off by shutdown (503 + Retry-After).
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import Sequence

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..api import E5
from .auth import KeyStore
from .config import ServerConfig
from .errors import APIError, error_response, openai_status
from .metrics import Metrics, UsageMeter
from .middleware import MetricsMiddleware
from .routes import native, openai, operations
from .service import Authenticate, ClientGone, EmbedService, Identity, Lifecycle, Meter, validation_error

log = logging.getLogger("e5kit.server")


def create_app(models: Sequence[tuple[str, E5]] | dict[str, E5], config: ServerConfig | None = None,
               keys: KeyStore | None = None, *, authenticate: Authenticate | None = None,
               meter: Meter | None = None, usage_route: bool = True) -> FastAPI:
    """A FastAPI app serving ``models`` (served id -> loaded :class:`E5`); the first is the default.

    ``authenticate`` and ``meter`` replace the key check and the in-memory usage meter (see
    :mod:`e5kit.server.service` for their contracts); by default ``keys`` decides who may call.
    ``usage_route=False`` leaves ``GET /v1/usage`` to the caller (``e5kit.service`` serves its ledger there).
    """
    config = config or ServerConfig()
    metrics = Metrics()
    usage = UsageMeter(metrics, config.price_per_million)
    authenticate = authenticate or key_authenticator(keys or KeyStore())

    async def record_usage(identity: Identity, model: str, n_inputs: int, tokens: int) -> None:
        usage.record(identity.key_id, model, n_inputs, tokens)

    lifecycle = Lifecycle()
    pairs = list(models.items()) if isinstance(models, dict) else list(models)
    service = EmbedService(pairs, config, metrics, meter or record_usage, lifecycle)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        yield
        await service.stop()
        log.info("drained; all workers stopped")

    app = FastAPI(title="e5kit embedding server", version=_version(), lifespan=lifespan,
                  description="OpenAI-compatible and native embedding API for E5 models.")
    app.state.service = service
    app.state.lifecycle = lifecycle
    app.state.metrics = metrics
    app.state.meter = usage
    app.state.config = config
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    def is_openai(request: Request) -> bool:
        return request.url.path.startswith("/v1/")

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response(openai=is_openai(request))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return validation_error(exc.errors()).response(openai=is_openai(request))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        msg = {404: f"no route {request.method} {request.url.path}",
               405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        status = openai_status(exc.status_code) if is_openai(request) else exc.status_code
        return error_response(status, msg, code="not_found" if exc.status_code == 404 else None,
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: ClientGone):
        return Response(status_code=499)  # nobody reads it; the access log and metrics do

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal server error ({type(exc).__name__})", "server_error")

    report = (lambda identity: usage.report(identity.key_id)) if usage_route else None
    app.include_router(openai.router(service, authenticate, report))
    app.include_router(native.router(service, authenticate))
    app.include_router(operations.router(service, authenticate))
    return app


def key_authenticator(keys: KeyStore) -> Authenticate:
    """The default ``authenticate``: Bearer keys from ``keys``; everyone is "anonymous" without keys
    (and the OpenAPI document then declares no security)."""

    def label(request: Request, key_id: str) -> Identity:
        request.scope.setdefault("e5kit", {"model": "-", "key": "-"})["key"] = key_id
        return Identity(key_id)

    if not keys.enabled:
        async def anonymous(request: Request) -> Identity:
            return label(request, "anonymous")

        return anonymous

    bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")

    async def check(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Identity:
        if creds is None:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        key_id = keys.check(f"Bearer {creds.credentials}")
        if key_id is None:
            raise APIError(401, "invalid API key", code="invalid_api_key")
        return label(request, key_id)

    return check


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("e5kit")
    except Exception:
        return "0"


__all__ = ["create_app", "key_authenticator", "ServerConfig"]
