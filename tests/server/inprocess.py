"""The app in this process: ``create_app`` on a background event loop with its lifespan running,
reached through httpx's ASGITransport (sync callers go through a bridging transport, so the real
``openai`` client and plain ``httpx.Client`` calls work unchanged)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Awaitable, Callable

import httpx
import openai

BASE = "http://e5kit.test"


class InProcessServer:
    def __init__(self, app, key: str | None = None):
        self.app, self.key, self.url = app, key, BASE
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="app-loop", daemon=True)
        self._thread.start()
        self._lifespan = app.router.lifespan_context(app)
        self.run(self._lifespan.__aenter__())
        self.asgi = httpx.ASGITransport(app=app)
        self.client = httpx.Client(transport=_Bridge(self), base_url=BASE, timeout=120)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    @property
    def service(self):
        return self.app.state.service

    def run(self, coro: Awaitable, timeout: float = 300) -> Any:
        """Run ``coro`` on the app's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def async_client(self, **kw) -> httpx.AsyncClient:
        """For coroutines run with :meth:`run` (they share the app's loop)."""
        return httpx.AsyncClient(transport=self.asgi, base_url=BASE, timeout=kw.pop("timeout", 120), **kw)

    def openai(self, key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=BASE + "/v1", api_key=key or self.key or "unused", max_retries=0,
                             http_client=httpx.Client(transport=_Bridge(self), timeout=120))

    def stop(self) -> None:
        self.run(self._lifespan.__aexit__(None, None, None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


class _Bridge(httpx.BaseTransport):
    """A sync transport that runs each request through the ASGI transport on the app's loop."""

    def __init__(self, server: InProcessServer):
        self.server = server

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        chunked = "content-length" not in request.headers
        headers = [(k, v) for k, v in request.headers.raw if k.lower() != b"transfer-encoding"]

        async def go() -> httpx.Response:
            if chunked:  # keep it chunked: several http.request messages, no Content-Length
                async def stream():
                    for i in range(0, len(body), 65536):
                        yield body[i:i + 65536]
                content: Any = stream()
            else:
                content = body
            areq = httpx.Request(request.method, request.url, headers=headers, content=content)
            resp = await self.server.asgi.handle_async_request(areq)
            data = await resp.aread()
            return httpx.Response(resp.status_code, headers=resp.headers, content=data, request=request)

        return self.server.run(go())


def run_async(server: InProcessServer, fn: Callable[[], Awaitable]) -> Any:
    return server.run(fn())
