"""The embed service: everything between an HTTP request and its vectors, once for every route.

    read + validate the body -> pick the model -> admission -> prepare (tokenize, off the event loop)
    -> submit to the model's batcher -> await (client gone? drain expired?) -> finish -> meter

The model runs only on the batchers' worker threads; tokenization, large-body parsing and large
JSON rendering run on a small thread pool (``--tokenize-workers``), so the event loop stays free for
``/health`` and for the next request.

Seams for a hosted service (``e5kit.service`` plugs in through :func:`e5kit.server.create_app`):

- ``authenticate``: an async callable ``(request) -> Identity`` used as every protected route's
  FastAPI dependency. It may raise :class:`~e5kit.server.errors.APIError` (401, 403, 429 for a
  per-key limit, ...). The default checks Bearer keys against a :class:`~e5kit.server.auth.KeyStore`.
- ``meter``: an async callable ``(identity, model, n_inputs, tokens) -> None`` awaited after the
  vectors are computed and BEFORE the 200 response is sent (so a usage ledger never misses a
  delivered response); raising APIError (e.g. 402 over quota) answers that error instead. The
  default records per-key usage in memory (``/v1/usage``) and Prometheus counters.
- ``usage_route=False``: no built-in ``GET /v1/usage``, for a service that reports its own ledger there.

``Identity.key_id`` labels metrics and usage (never the key itself).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

import numpy as np
from fastapi import Request
from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.requests import ClientDisconnect

from ..api import E5
from ..engine import InputTooLongError
from ..pipeline import Prepared
from .batcher import Batcher, QueueFull, ShuttingDown, TooManyTokens
from .config import ServerConfig
from .errors import APIError
from .metrics import Metrics
from .schemas import INPUT_SHAPE_MSG, TokenId, request_models

log = logging.getLogger("e5kit.server")

OFF_LOOP_BYTES = 256 << 10  # bodies and responses larger than this are parsed / rendered in the pool
IDS_CHUNK = 1 << 15  # token ids validated per call (each call holds the interpreter, and so the event loop)
_IDS = TypeAdapter(list[TokenId])


@dataclass(frozen=True)
class Identity:
    """Who is calling: ``key_id`` labels metrics and usage; ``account`` is for hosted services."""

    key_id: str
    account: str | None = None


Authenticate = Callable[[Request], Awaitable[Identity]]
Meter = Callable[[Identity, str, int, int], Awaitable[None]]


@dataclass
class ServedModel:
    name: str
    model: E5
    batcher: Batcher
    aliases: set[str] = field(default_factory=set)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def dim(self) -> int:
        return self.model.dim


class Lifecycle:
    """Started / draining / drain expired, shared by the routes, the service and `e5kit serve`."""

    def __init__(self):
        self.started = False
        self.draining = False
        self.expired: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.expired = loop, asyncio.Event()

    def begin_drain(self, timeout: float) -> None:
        """From any thread (a signal handler): /ready turns 503; after ``timeout`` s waiting requests get 503."""
        self.draining = True
        if self.loop is not None and self.expired is not None:
            loop, expired = self.loop, self.expired
            try:
                loop.call_soon_threadsafe(lambda: loop.call_later(timeout, expired.set))
            except RuntimeError:  # the loop has closed
                pass


class ClientGone(Exception):
    """The client disconnected before its vectors were ready (answered 499, never seen by anyone)."""


def served_name(value: str) -> str:
    """The id a model is served under by default: a local directory's name, else the hub id (never a path)."""
    p = Path(value)
    return p.resolve().name if p.exists() else value


class EmbedService:
    """Model lookup, admission, preparation, the batchers, rendering and metering."""

    def __init__(self, models: Sequence[tuple[str, E5]], config: ServerConfig, metrics: Metrics, meter: Meter,
                 lifecycle: Lifecycle):
        if not models:
            raise ValueError("serve at least one model")
        self.config, self.metrics, self.meter_hook, self.lifecycle = config, metrics, meter, lifecycle
        self.served: dict[str, ServedModel] = {}
        for name, m in models:
            if name in self.served:
                raise ValueError(f"model id {name!r} is given twice; name them with ID=PATH")
            b = Batcher(m.engine, name, max_batch_tokens=config.max_batch_tokens, max_batch_size=config.max_batch_size,
                        max_wait=config.max_wait_ms / 1000, max_queued_tokens=config.max_queued_tokens,
                        max_queue_wait=config.max_queue_wait)
            metrics.watch(name, b)
            sm = self.served[name] = ServedModel(name=name, model=m, batcher=b)
            sm.aliases = {name, Path(name).name, m.spec.name, Path(m.spec.name).name}
        self.lookup: dict[str, ServedModel] = dict((sm.name, sm) for sm in self.served.values())
        for sm in self.served.values():  # exact ids first, then the short aliases that are unambiguous
            for a in sm.aliases:
                self.lookup.setdefault(a, sm)
        self.default = next(iter(self.served.values()))
        self.request_models = request_models(config)
        # The embedding routes' pool, and /tokenize's own (one thread): a /tokenize backlog never
        # delays the tokenization of requests to embed. Each bounds its backlog.
        self.pool = BoundedPool(config.tokenize_workers, 2 * config.max_body_bytes, "e5kit-tokenize")
        self.tokenize_pool = BoundedPool(1, 2 * config.max_body_bytes, "e5kit-tokenize-route")

    # ---- lifecycle ----

    async def start(self) -> None:
        self.lifecycle.bind(asyncio.get_running_loop())
        for sm in self.served.values():
            sm.batcher.start()
        for sm in self.served.values():  # each worker measures its throughput once before serving
            # The untruncated tokenizer (counts for truncate=false errors) is built now: building it holds
            # the interpreter for up to ~2 s with a 250k vocabulary, which must not happen mid-serving.
            await asyncio.to_thread(sm.model.engine.untruncated_tokenizer)
            await asyncio.to_thread(sm.batcher.ready.wait)
        self.lifecycle.started = True

    async def stop(self) -> None:
        self.lifecycle.draining = True
        for sm in self.served.values():
            await asyncio.to_thread(sm.batcher.stop, 60)
        for pool in (self.pool, self.tokenize_pool):
            pool.executor.shutdown(wait=False, cancel_futures=True)

    # ---- the thread pools ----

    async def run(self, fn: Callable, *args, cost: int = 0, pool: "BoundedPool | None" = None) -> Any:
        """``fn(*args)`` on ``pool`` (default: the embedding routes' pool)."""
        return await (pool or self.pool).run(fn, *args, cost=cost)

    # ---- bodies ----

    async def parse(self, request: Request, cls: type[BaseModel], input_fields: Sequence[str] = (),
                    pool: "BoundedPool | None" = None) -> Any:
        """The body as ``cls``, or an APIError that names the first problem (large bodies: in ``pool``)."""
        ctype = request.headers.get("content-type")
        if ctype is not None:
            mime = ctype.split(";")[0].strip().lower()
            if mime != "application/json" and not mime.endswith("+json"):
                raise APIError(415, f"content type must be application/json, not {ctype!r}", code="invalid_json")
        try:
            raw = await asyncio.wait_for(self._read(request), self.config.request_timeout)
        except ClientDisconnect:  # the client hung up while sending: nobody to answer
            raise ClientGone()
        except asyncio.TimeoutError:
            raise APIError(408, f"the request body did not arrive within {self.config.request_timeout:g} s",
                           code="request_timeout")
        if len(raw) > OFF_LOOP_BYTES:
            return await self.run(_decode, raw, cls, input_fields, self.config.max_inputs, cost=len(raw), pool=pool)
        return _decode(raw, cls, input_fields, self.config.max_inputs)

    async def _read(self, request: Request) -> bytes:
        limit = self.config.max_body_bytes
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit:
            raise APIError(413, f"request body is {int(length)} bytes, more than the limit of {limit} bytes",
                           code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"request body is more than the limit of {limit} bytes", code="request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    # ---- models ----

    def pick(self, request: Request, name: str | None) -> ServedModel:
        # While draining, requests that reached us are still served: uvicorn has stopped accepting
        # connections and closes kept-alive ones after their current response.
        if not self.lifecycle.started:
            raise APIError(503, "the server is starting", "server_error", code="not_ready",
                           headers={"Retry-After": "1"})
        sm = self.default if name is None else self.lookup.get(name)
        if sm is None:
            raise APIError(404, f"model {name!r} is not served here; available: {sorted(self.served)}",
                           param="model", code="model_not_found")
        request.scope.setdefault("e5kit", {"model": "-", "key": "-"})["model"] = sm.name
        return sm

    def check_dims(self, sm: ServedModel, dimensions: int | None) -> None:
        """Refuse ``dimensions`` beyond the model's before any work is queued."""
        if dimensions is not None and dimensions > sm.dim:
            raise APIError(400, f"'dimensions' is {dimensions} but this model's embeddings have {sm.dim}",
                           param="dimensions", code="invalid_value")

    # ---- the pipeline ----

    @contextmanager
    def admission(self, sm: ServedModel):
        """The batcher's refusals as HTTP errors: 429 + Retry-After (busy now), 413 (never: split it;
        400 on /v1)."""
        try:
            yield
        except QueueFull as e:
            self.metrics.rejected.labels(sm.name).inc()
            raise APIError(429, str(e), code="queue_full", headers={"Retry-After": str(e.retry_after)})
        except TooManyTokens as e:
            raise APIError(413, str(e), code="too_many_tokens")

    def admit(self, sm: ServedModel, at_least: int) -> None:
        with self.admission(sm):
            sm.batcher.check_room(at_least)

    async def prepare(self, sm: ServedModel, texts: list[str] | None, ids: list[list[int]] | None,
                      input_type: str | None, task: str | None, truncate: bool | None, param: str,
                      embed: bool = True) -> Prepared:
        """Admission on a cheap lower bound of the tokens, then the model's own prepare, in the pool
        (whose backlog is bounded too). ``embed=False`` (/tokenize): no model admission, the tokens'
        spans too, in /tokenize's own pool."""
        truncate = self.config.auto_truncate if truncate is None else truncate
        limit = sm.model.max_tokens
        if embed and ids is not None:
            self.admit(sm, sum(min(len(s), limit) for s in ids))
        elif embed:  # half the whitespace-separated words plus the special tokens: never more than the real count
            self.admit(sm, sum(min(len(t.split()) // 2 + 2, limit) for t in texts))
        try:
            if ids is not None:
                if sum(map(len, ids)) > OFF_LOOP_BYTES // 8:
                    return await self.run(_prepare_ids, sm.model, ids, truncate, cost=8 * sum(map(len, ids)))
                return _prepare_ids(sm.model, ids, truncate)
            return await self.run(_prepare, sm.model, texts, input_type or self.config.default_input_type, task,
                                  truncate, not embed, cost=sum(map(len, texts)),
                                  pool=None if embed else self.tokenize_pool)
        except InputTooLongError as e:
            raise APIError(422, f"'{param}' item {e.index} has {e.n_tokens} tokens, more than the model's limit of "
                                f"{e.limit}; shorten it or send truncate=true", param=param, code="input_too_long")
        except ValueError as e:
            raise APIError(400, f"'{param}': {e}", param=param, code="invalid_value")

    async def embed_inputs(self, request: Request, sm: ServedModel, inputs: Any, input_type: str | None,
                           task: str | None, truncate: bool | None, dimensions: int | None,
                           param: str) -> tuple[Prepared, np.ndarray]:
        """A validated ``input``/``inputs`` value -> (its Prepared, pooled unnormalised vectors)."""
        self.check_dims(sm, dimensions)
        texts, ids = split_inputs(inputs)
        p = await self.prepare(sm, texts, ids, input_type, task, truncate, param)
        return p, await self.embed(request, sm, p)

    async def embed(self, request: Request, sm: ServedModel, prepared: Prepared) -> np.ndarray:
        """Pooled, unnormalised vectors of ``prepared`` through the model's batching queue.

        Raises :class:`ClientGone` when the client disconnects first (its queued inputs are dropped) and a
        503 when the drain after SIGTERM runs out first.
        """
        try:
            with self.admission(sm):
                job = sm.batcher.submit(prepared.ids)
        except ShuttingDown as e:
            raise APIError(503, str(e), "server_error", code="not_ready", headers={"Retry-After": "5"})
        watchers = {asyncio.ensure_future(_wait_disconnect(request))}
        if self.lifecycle.expired is not None:
            watchers.add(asyncio.ensure_future(self.lifecycle.expired.wait()))
        try:
            done, _ = await asyncio.wait({job.future, *watchers}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            sm.batcher.cancel(job)
            raise
        finally:
            for w in watchers:
                w.cancel()
        if job.future not in done:
            sm.batcher.cancel(job)
            if self.lifecycle.expired is not None and self.lifecycle.expired.is_set():
                raise APIError(503, f"the server is shutting down and could not finish this request within "
                                    f"its drain limit ({self.config.drain_timeout:g} s); retry on another replica",
                               "server_error", code="shutting_down", headers={"Retry-After": "5"})
            raise ClientGone()
        exc = job.future.exception()
        if exc is not None:
            raise APIError(500, f"the model failed on this batch: {exc}", "server_error")
        out = job.future.result()
        if not np.isfinite(out).all():
            raise APIError(500, "the model produced non-finite values", "server_error")
        return out

    async def meter(self, identity: Identity, sm: ServedModel, prepared: Prepared, n_inputs: int | None = None) -> None:
        """Record the request's usage (inputs: the client's inputs, default one per prepared sequence)."""
        await self.meter_hook(identity, sm.name, len(prepared.ids) if n_inputs is None else n_inputs, prepared.n_tokens)

    async def render(self, fn: Callable[..., bytes], *args, size_hint: int = 0) -> bytes:
        """A response body built by ``fn``; in the pool when large."""
        return await self.run(fn, *args, cost=size_hint) if size_hint > OFF_LOOP_BYTES else fn(*args)


class BoundedPool:
    """A thread pool whose backlog (bytes of input queued or running) is bounded: beyond it, 429."""

    def __init__(self, workers: int, limit: int, name: str):
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix=name)
        self.limit, self.cost = limit, 0

    async def run(self, fn: Callable, *args, cost: int = 0) -> Any:
        if self.cost and self.cost + cost > self.limit:
            raise APIError(429, "the server is busy tokenizing; retry in 1 s", code="queue_full",
                           headers={"Retry-After": "1"})
        self.cost += cost
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
        finally:
            self.cost -= cost


async def _wait_disconnect(request: Request) -> None:
    # The body is consumed, so the next ASGI message is http.disconnect when the client goes away.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# ---- bodies (pure functions, run on the loop or in the pool) -------------------------------------

def _decode(raw: bytes, cls: type[BaseModel], input_fields: Sequence[str], max_inputs: int) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"request body is not valid UTF-8 (bad byte at offset {e.start})", code="invalid_encoding")
    if not text.strip():
        raise APIError(422, "request body is empty; expected a JSON object", code="invalid_json")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise APIError(422, f"request body is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})",
                       code="invalid_json")
    except RecursionError:
        raise APIError(422, "request body is nested too deeply", code="invalid_json")
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise APIError(422, f"request body has a value JSON cannot hold here: {e}", code="invalid_json")
    if not isinstance(data, dict):
        raise APIError(422, f"request body must be a JSON object, not {type(data).__name__}", code="invalid_type")
    bad = _surrogate_field(data)
    if bad is not None:
        raise APIError(400, f"'{bad}' is not valid Unicode (it holds a lone surrogate)", param=bad,
                       code="invalid_encoding")
    try:
        long_ids = _cut_long_ids(data, input_fields, max_inputs)
        req = cls.model_validate(data)
        for name, value in long_ids.items():  # checked in full by _cut_long_ids
            setattr(req, name, value)
        return req
    except ValidationError as e:
        errors = e.errors(include_url=False, include_input=False)
        param = str(errors[0]["loc"][0]) if errors[0].get("loc") else None
        if param in input_fields:
            explain_inputs(data.get(param), param, max_inputs)
        raise validation_error(errors)
    except RecursionError:
        raise APIError(422, "request body is nested too deeply", code="invalid_json")


def _cut_long_ids(data: dict, fields: Sequence[str], max_inputs: int) -> dict[str, Any]:
    """Token-id lists in ``fields`` longer than IDS_CHUNK: their tails checked here chunk by chunk, then cut
    from ``data`` (the full values returned, to put back after validation). One pydantic call over a
    16 MB body's 8M ids would hold the interpreter ~0.4 s; chunks let the event loop in between."""
    full = {}
    for name in fields:
        v = data.get(name)
        if not isinstance(v, list) or not v:
            continue
        flat = isinstance(v[0], int)
        lists = [v] if flat else v
        if not any(isinstance(s, list) and len(s) > IDS_CHUNK for s in lists):
            continue
        for s in lists:
            for i in range(IDS_CHUNK, len(s) if isinstance(s, list) else 0, IDS_CHUNK):
                try:
                    _IDS.validate_python(s[i:i + IDS_CHUNK])
                except ValidationError:
                    explain_inputs(v, name, max_inputs)  # raises the precise error
        cut = [s[:IDS_CHUNK] if isinstance(s, list) else s for s in lists]
        full[name], data[name] = v, cut[0] if flat else cut
    return full


def _surrogate_field(data: dict) -> str | None:
    """The top-level field holding a string with a lone surrogate (JSON allows them, UTF-8 does not)."""
    for k, v in data.items():
        for s in _strings(v):
            try:
                s.encode("utf-8")
            except UnicodeEncodeError:
                return k
        try:
            k.encode("utf-8")
        except UnicodeEncodeError:
            return "body"
    return None


def _strings(v: Any, depth: int = 0):
    if isinstance(v, str):
        yield v
    elif isinstance(v, list) and depth < 2 and v and not isinstance(v[0], (int, float)):
        for x in v:
            if isinstance(x, list) and x and isinstance(x[0], (int, float)):
                continue  # token ids
            yield from _strings(x, depth + 1)
    elif isinstance(v, dict) and depth < 2:
        for k, x in v.items():
            yield k
            yield from _strings(x, depth + 1)


def validation_error(errors: Sequence[dict]) -> APIError:
    """The first problem of a pydantic error list, as one OpenAI-shaped 422 (400 on /v1)."""
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = loc[0] if loc else None
    where = ".".join(loc) or "body"
    kind = first.get("type", "")
    if kind == "too_long" and param is not None:
        return APIError(413, f"'{param}' has too many items: {first.get('msg', '')}", param=param,
                        code="too_many_inputs")
    if kind == "string_too_short":
        return APIError(400, f"'{where}' is an empty string", param=param, code="empty_input")
    return APIError(422, f"'{where}': {first.get('msg', 'invalid value')}", param=param,
                    code="missing_field" if kind == "missing" else "invalid_value")


def explain_inputs(value: Any, param: str, limit: int) -> None:
    """Raise the precise APIError for an ``input``/``inputs`` value the schema refused."""
    if value is None:
        raise APIError(422, f"'{param}' is required: it {INPUT_SHAPE_MSG}", param=param, code="missing_field")
    items = [value] if isinstance(value, str) else value if isinstance(value, list) else None
    if items is None:
        raise APIError(422, f"'{param}' {INPUT_SHAPE_MSG}", param=param, code="invalid_type")
    if not items:
        raise APIError(422, f"'{param}' must hold 1 to {limit} items, got none", param=param, code="invalid_value")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        items = [items]  # one token-id list
    if len(items) > limit:
        raise APIError(413, f"'{param}' has {len(items)} items; this server accepts at most {limit} per request",
                       param=param, code="too_many_inputs")
    if all(isinstance(v, str) for v in items):
        for i, t in enumerate(items):
            if t == "":
                raise APIError(400, f"'{param}' item {i} is an empty string", param=param, code="empty_input")
    elif all(isinstance(v, list) for v in items):
        for i, s in enumerate(items):
            if not s:
                raise APIError(400, f"'{param}' item {i} has no tokens", param=param, code="invalid_value")
            if all(isinstance(t, int) and not isinstance(t, bool) for t in s):
                bad = next((t for t in s if t < 0 or t > 2**31 - 1), None)
                if bad is not None:
                    raise APIError(400, f"'{param}' item {i} has token id {bad} outside the vocabulary",
                                   param=param, code="invalid_value")
    raise APIError(422, f"'{param}' {INPUT_SHAPE_MSG}", param=param, code="invalid_type")


def split_inputs(value: Any) -> tuple[list[str] | None, list[list[int]] | None]:
    """A validated ``input`` as (texts, None) or (None, token-id lists)."""
    if isinstance(value, str):
        return [value], None
    if value and isinstance(value[0], int):
        return None, [list(value)]  # one token-id list is one input
    if isinstance(value[0], str):
        return list(value), None
    return None, [list(s) for s in value]


def _prepare(model: E5, texts: list[str], input_type: str, task: str | None, truncate: bool, spans: bool) -> Prepared:
    return model.prepare(texts, input_type, task=task, truncate=truncate, spans=spans)


def _prepare_ids(model: E5, ids: list[list[int]], truncate: bool) -> Prepared:
    prepared = model.prepare_ids(ids, truncate=truncate)
    _check_own_ids(prepared.ids, model)
    return prepared


def _check_own_ids(seqs: Sequence[Sequence[int]], model: E5) -> None:
    """Token ids must be the model's own, as /tokenize gives them: between its opening and closing
    special tokens ([CLS] ... [SEP], <s> ... </s>; a cut list keeps its closing one). Ids from
    another tokenizer (LangChain's OpenAIEmbeddings sends tiktoken ids) would otherwise be embedded
    as this vocabulary's tokens: wrong vectors, no error."""
    edges = model.engine.edge_ids
    if len(edges) < 2:  # a bare vocabulary: nothing to check against
        return
    first, last = edges[0], edges[-1]
    bad = next((i for i, s in enumerate(seqs) if s[0] != first or len(s) < 2 or s[-1] != last), None)
    if bad is not None:
        raise APIError(400, f"input item {bad} does not start and end with this model's special tokens (ids {first} "
                            f"and {last}): token ids must be the model's own, as POST /tokenize returns them. Ids from "
                            "another tokenizer embed as wrong vectors (LangChain's OpenAIEmbeddings sends tiktoken ids "
                            "unless check_embedding_ctx_length=False; better: e5kit.integrations.langchain); send text",
                       code="foreign_token_ids")


__all__ = ["EmbedService", "Identity", "Lifecycle", "ServedModel", "Authenticate", "Meter", "served_name",
           "split_inputs", "validation_error", "ClientGone"]
