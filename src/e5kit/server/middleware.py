"""Cross-cutting pieces: request metrics (ASGI middleware), key redaction in access logs, and the
uvicorn protocol that closes connections whose request headers do not arrive in time (slowloris)."""

from __future__ import annotations

import logging
import re
import time

from .metrics import Metrics


class MetricsMiddleware:
    """Counts every HTTP request by matched route, status, model and key, and times it."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        labels = scope.setdefault("e5kit", {"model": "-", "key": "-"})
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        t0 = time.perf_counter()
        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.requests.labels(route, str(status[0]), labels["model"], labels["key"]).inc()
            self.metrics.latency.labels(route, labels["model"]).observe(time.perf_counter() - t0)


_SECRET_PARAM = re.compile(r"((?:^|[?&])[^=&]*(?:key|token|secret|auth|password|bearer)[^=&]*=)[^&]*", re.I)


def redact(path: str) -> str:
    """``path?api_key=sk-...`` -> ``path?api_key=REDACTED`` (any parameter named like a credential)."""
    return _SECRET_PARAM.sub(r"\1REDACTED", path) if "?" in path else path


class RedactFilter(logging.Filter):
    """For uvicorn's access logger, whose args are (client, method, path with query, http version, status)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            record.args = (*args[:2], redact(args[2]), *args[3:])
        return True


def header_timeout_protocol(timeout: float):
    """uvicorn's h11 protocol plus a deadline: a connection that has not sent a complete request head
    within ``timeout`` seconds of connecting (or of its previous response) is closed."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        _head_timer = None

        def _arm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(timeout, self._head_deadline)

        def _head_deadline(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()  # no request line + headers yet: nothing to answer

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

    return Protocol
