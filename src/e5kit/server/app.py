"""The HTTP layer: routes that parse and check a request, format and tokenize its texts, hand the
token ids to the model's :class:`~e5kit.server.batcher.Batcher`, and shape the answer.

No route runs the model: the batcher's worker thread does. Everything a client can send is
answered with a 2xx or a 4xx in OpenAI's error shape; a 5xx means a bug or a broken machine.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..api import E5
from ..engine import InputTooLongError
from ..pipeline import Prepared, finish
from ..prompts import format_texts
from .auth import KeyStore
from .batcher import Batcher, QueueFull, ShuttingDown, TooManyTokens
from .errors import APIError, error_response
from .metrics import Metrics, UsageMeter

log = logging.getLogger("e5kit.server")

INPUT_TYPES = ("query", "passage", "raw")
InputTypeField = Optional[Literal["query", "passage", "raw"]]
# OpenAI's `input`: a string, strings, one token-id list, or token-id lists.
InputsField = Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]]
INPUT_SHAPE_MSG = "must be a string, a list of strings, a list of token ids or a list of lists of token ids"
OFF_LOOP_CHARS = 20_000  # tokenize bigger requests in a thread so the event loop stays responsive


@dataclass
class ServerConfig:
    """Limits and defaults (every one is a `e5kit serve` flag and an E5KIT_* variable)."""

    max_batch_tokens: int = 16384
    max_batch_size: int = 32
    max_wait_ms: float = 2.0
    max_queued_tokens: int = 1 << 20
    max_inputs: int = 2048
    max_body_bytes: int = 16 << 20
    default_input_type: str = "query"
    auto_truncate: bool = True
    price_per_million: float = 0.0

    def __post_init__(self):
        if self.default_input_type not in INPUT_TYPES:
            raise ValueError(f"default input type must be one of {INPUT_TYPES}, not {self.default_input_type!r}")
        if self.max_inputs < 1 or self.max_body_bytes < 1:
            raise ValueError("max_inputs and max_body_bytes must be positive")

    def describe(self) -> str:
        return (f"max_inputs={self.max_inputs} max_body_bytes={self.max_body_bytes} "
                f"max_batch_tokens={self.max_batch_tokens} max_batch_size={self.max_batch_size} "
                f"max_wait_ms={self.max_wait_ms} max_queued_tokens={self.max_queued_tokens} "
                f"default_input_type={self.default_input_type} auto_truncate={self.auto_truncate} "
                f"price_per_million={self.price_per_million}")


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


# ---- request bodies (also the OpenAPI schema) ---------------------------------------------------

class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class EmbeddingsRequest(_Body):
    """OpenAI's embeddings request, plus E5's `input_type`, `task` and `truncate`."""

    input: InputsField = Field(description="Text, texts (1..max_inputs), token ids, or lists of token ids.")
    model: Optional[StrictStr] = Field(None, description="A served model id (default: the first one).")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[StrictInt] = Field(None, ge=1, description="Keep the first N dimensions, re-normalised.")
    user: Optional[StrictStr] = None
    input_type: InputTypeField = Field(None, description="query, passage or raw (default: the server's).")
    task: Optional[StrictStr] = Field(None, description="Task name or instruction (instruct models).")
    truncate: Optional[StrictBool] = Field(None, description="Cut over-long inputs (default: the server's).")


class EmbedRequest(_Body):
    """Native embedding request (TEI-style)."""

    inputs: InputsField
    model: Optional[StrictStr] = None
    normalize: StrictBool = True
    truncate: Optional[StrictBool] = None
    input_type: InputTypeField = None
    task: Optional[StrictStr] = None
    dimensions: Optional[StrictInt] = Field(None, ge=1)
    precision: Literal["float32", "int8", "uint8", "binary", "ubinary"] = "float32"


class SimilarityRequest(_Body):
    """One query against passages: cosine x 100 and the ranking, as on the model cards."""

    query: StrictStr
    passages: list[StrictStr]
    model: Optional[StrictStr] = None
    task: Optional[StrictStr] = None
    query_type: Literal["query", "passage", "raw"] = "query"
    passage_type: Literal["query", "passage", "raw"] = "passage"
    truncate: Optional[StrictBool] = None


class TokenizeRequest(_Body):
    inputs: Union[StrictStr, list[StrictStr]]
    model: Optional[StrictStr] = None
    input_type: InputTypeField = None
    task: Optional[StrictStr] = None
    truncate: Optional[StrictBool] = None


def _body_doc(model: type[BaseModel]) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


# ---- helpers --------------------------------------------------------------------------------------

def _labels(request: Request) -> dict:
    return request.scope.setdefault("e5kit", {"model": "-", "key": "-"})


async def _read_json(request: Request, limit: int) -> Any:
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
    raw = b"".join(chunks)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"request body is not valid UTF-8 (bad byte at offset {e.start})", code="invalid_encoding")
    if not text.strip():
        raise APIError(422, "request body is empty; expected a JSON object", code="invalid_json")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise APIError(422, f"request body is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})",
                       code="invalid_json")
    except RecursionError:
        raise APIError(422, "request body is nested too deeply", code="invalid_json")


def _validation_error(errors: Sequence[dict], input_field: str | None) -> APIError:
    """The first problem of a pydantic error list, as one OpenAI-shaped 422."""
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = loc[0] if loc else None
    if param is not None and param == input_field:
        return APIError(422, f"'{param}' {INPUT_SHAPE_MSG}", param=param, code="invalid_type")
    where = ".".join(loc) or "body"
    return APIError(422, f"'{where}': {first.get('msg', 'invalid value')}", param=param,
                    code="missing_field" if first.get("type") == "missing" else "invalid_value")


async def _parse(request: Request, cls: type[BaseModel], limit: int, input_field: str | None) -> Any:
    data = await _read_json(request, limit)
    if not isinstance(data, dict):
        raise APIError(422, f"request body must be a JSON object, not {type(data).__name__}", code="invalid_type")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e.errors(include_url=False, include_input=False), input_field)


def _split_inputs(value: Any, param: str, limit: int) -> tuple[list[str] | None, list[list[int]] | None]:
    """(texts, None) or (None, token-id lists), with the 1..limit item check."""
    if isinstance(value, str):
        items: list = [value]
    elif value and all(isinstance(v, int) for v in value):
        items = [list(value)]  # one token-id list is one input
    else:
        items = list(value)
    if not items:
        raise APIError(422, f"'{param}' must hold 1 to {limit} items, got none", param=param, code="invalid_value")
    if len(items) > limit:
        raise APIError(413, f"'{param}' has {len(items)} items; this server accepts at most {limit} per request",
                       param=param, code="too_many_inputs")
    if isinstance(items[0], str):
        for i, t in enumerate(items):
            if t == "":
                raise APIError(400, f"'{param}' item {i} is an empty string", param=param, code="empty_input")
            try:
                t.encode("utf-8")
            except UnicodeEncodeError:
                raise APIError(400, f"'{param}' item {i} is not valid Unicode (it holds a lone surrogate)",
                               param=param, code="invalid_encoding")
        return items, None
    return None, items


def _check_dims(dimensions: int | None, dim: int) -> None:
    """Refuse ``dimensions`` beyond the model's before any work is queued."""
    if dimensions is not None and dimensions > dim:
        raise APIError(400, f"'dimensions' is {dimensions} but this model's embeddings have {dim}",
                       param="dimensions", code="invalid_value")


async def _wait_disconnect(request: Request) -> None:
    # The body is consumed, so the next ASGI message is http.disconnect when the client goes away.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class _ClientGone(Exception):
    pass


# ---- the app ---------------------------------------------------------------------------------------

def create_app(models: Sequence[tuple[str, E5]] | dict[str, E5], config: ServerConfig | None = None,
               keys: KeyStore | None = None) -> FastAPI:
    """A FastAPI app serving ``models`` (served id -> loaded :class:`E5`); the first is the default."""
    config = config or ServerConfig()
    keys = keys or KeyStore()
    metrics = Metrics()
    meter = UsageMeter(metrics, config.price_per_million)
    pairs = list(models.items()) if isinstance(models, dict) else list(models)
    if not pairs:
        raise ValueError("serve at least one model")
    served: dict[str, ServedModel] = {}
    lookup: dict[str, ServedModel] = {}
    for name, m in pairs:
        if name in served:
            raise ValueError(f"model id {name!r} is given twice")
        b = Batcher(m.engine, name, max_batch_tokens=config.max_batch_tokens, max_batch_size=config.max_batch_size,
                    max_wait=config.max_wait_ms / 1000, max_queued_tokens=config.max_queued_tokens)
        metrics.watch(name, b)
        sm = served[name] = ServedModel(name=name, model=m, batcher=b)
        sm.aliases = {name, Path(name).name, m.spec.name, Path(m.spec.name).name}
    for sm in served.values():  # exact ids first, then the short aliases that are unambiguous
        lookup[sm.name] = sm
    for sm in served.values():
        for a in sm.aliases:
            lookup.setdefault(a, sm)
    default = served[pairs[0][0]]
    state = {"draining": False, "started": False}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for sm in served.values():
            sm.batcher.start()
        state["started"] = True
        yield
        state["draining"] = True
        for sm in served.values():
            await asyncio.to_thread(sm.batcher.stop, 60)
        log.info("drained; all workers stopped")

    app = FastAPI(title="e5kit embedding server", version=_version(), lifespan=lifespan,
                  description="OpenAI-compatible and native embedding API for E5 models.")
    app.state.e5kit = state
    app.state.metrics = metrics
    app.state.meter = meter
    app.state.models = served
    app.state.config = config
    app.state.meter_hook = None  # async (identity, model, n_inputs, tokens); raising refuses the request
    app.add_middleware(_MetricsMiddleware, metrics=metrics)
    bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")

    # ---- errors ----
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return _validation_error(exc.errors(), None).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        msg = {404: f"no route {request.method} {request.url.path}",
               405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return error_response(exc.status_code, msg, code="not_found" if exc.status_code == 404 else None,
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal server error ({type(exc).__name__})", "server_error")

    # ---- shared steps ----
    async def authorize(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> str:
        labels = _labels(request)
        if not keys.enabled:
            labels["key"] = "anonymous"
            return "anonymous"
        if creds is None:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        label = keys.check(f"Bearer {creds.credentials}")
        if label is None:
            raise APIError(401, "invalid API key", code="invalid_api_key")
        labels["key"] = label
        return label

    app.state.authorize = authorize  # the auth seam: app.dependency_overrides[app.state.authorize]

    def pick_model(request: Request, name: str | None) -> ServedModel:
        # While draining, requests that reached us are still served: uvicorn has stopped accepting
        # connections and closes kept-alive ones after their current response.
        if not state["started"]:
            raise APIError(503, "the server is starting", "server_error", code="not_ready")
        sm = default if name is None else lookup.get(name)
        if sm is None:
            raise APIError(404, f"model {name!r} is not served here; available: {sorted(served)}", param="model",
                           code="model_not_found")
        _labels(request)["model"] = sm.name
        return sm

    async def tokenize(sm: ServedModel, texts: list[str] | None, ids: list[list[int]] | None,
                       input_type: str | None, task: str | None, truncate: bool | None, param: str) -> Prepared:
        truncate = config.auto_truncate if truncate is None else truncate
        engine = sm.model.engine
        # Under overload, refuse before spending CPU on tokenizing: a cheap lower bound on the token
        # count (half the whitespace-separated words plus the special tokens) must fit in the queue.
        limit = engine.max_tokens
        if ids is not None:
            at_least = sum(min(len(s), limit) for s in ids)
        else:
            at_least = sum(min(len(t.split()) // 2 + 2, limit) for t in texts)
        try:
            sm.batcher.check_room(at_least)
        except QueueFull as e:
            metrics.rejected.labels(sm.name).inc()
            raise APIError(429, str(e), code="queue_full", headers={"Retry-After": str(e.retry_after)})
        try:
            if ids is not None:
                return sm.model.prepare_ids(ids, truncate=truncate)
            input_type = input_type or config.default_input_type
            if sum(len(t) for t in texts) > OFF_LOOP_CHARS:
                return await asyncio.to_thread(sm.model.prepare, texts, input_type, task=task, truncate=truncate)
            return sm.model.prepare(texts, input_type, task=task, truncate=truncate)
        except InputTooLongError as e:
            raise APIError(422, f"'{param}' item {e.index} has {e.n_tokens} tokens, more than the model's limit of "
                                f"{e.limit}; shorten it or send truncate=true", param=param, code="input_too_long")
        except ValueError as e:
            raise APIError(400, f"'{param}': {e}", param=param, code="invalid_value")

    async def embed(request: Request, sm: ServedModel, tok: Prepared) -> np.ndarray:
        """Pooled, unnormalised vectors of prepared inputs through the batching queue."""
        try:
            job = sm.batcher.submit(tok.ids)
        except QueueFull as e:
            metrics.rejected.labels(sm.name).inc()
            raise APIError(429, str(e), code="queue_full", headers={"Retry-After": str(e.retry_after)})
        except TooManyTokens as e:
            raise APIError(413, str(e), code="request_too_large")
        except ShuttingDown as e:
            raise APIError(503, str(e), "server_error", code="not_ready")
        watcher = asyncio.ensure_future(_wait_disconnect(request))
        try:
            done, _ = await asyncio.wait({job.future, watcher}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            sm.batcher.cancel(job)
            watcher.cancel()
            raise
        if job.future not in done:
            sm.batcher.cancel(job)
            raise _ClientGone()
        watcher.cancel()
        exc = job.future.exception()
        if exc is not None:
            raise APIError(500, f"the model failed on this batch: {exc}", "server_error")
        out = job.future.result()
        if not np.isfinite(out).all():
            raise APIError(500, "the model produced non-finite values", "server_error")
        return out

    async def meter_usage(key: str, sm: ServedModel, tok: Prepared) -> int:
        n = tok.n_tokens
        if app.state.meter_hook is not None:  # e.g. the service's ledger: committed before the 200
            await app.state.meter_hook(key, sm.name, len(tok.ids), n)
        meter.record(str(key), sm.name, len(tok.ids), n)
        return n

    # ---- OpenAI ----
    @app.post("/v1/embeddings", tags=["openai"], openapi_extra=_body_doc(EmbeddingsRequest),
              summary="Create embeddings (OpenAI-compatible)")
    async def openai_embeddings(request: Request, key: str = Depends(authorize)):
        req = await _parse(request, EmbeddingsRequest, config.max_body_bytes, "input")
        sm = pick_model(request, req.model)
        _check_dims(req.dimensions, sm.dim)
        texts, ids = _split_inputs(req.input, "input", config.max_inputs)
        tok = await tokenize(sm, texts, ids, req.input_type, req.task, req.truncate, "input")
        try:
            vecs = await embed(request, sm, tok)
        except _ClientGone:
            return Response(status_code=499)
        vecs = finish(vecs, dimensions=req.dimensions)
        n = await meter_usage(key, sm, tok)
        if req.encoding_format == "base64":
            data = [{"object": "embedding", "index": i, "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode()}
                    for i, v in enumerate(vecs)]
        else:
            data = [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vecs)]
        headers = {"x-e5kit-truncated": str(len(tok.truncated))} if tok.truncated else None
        return JSONResponse({"object": "list", "data": data, "model": sm.name,
                             "usage": {"prompt_tokens": n, "total_tokens": n}}, headers=headers)

    @app.get("/v1/models", tags=["openai"], summary="List served models")
    async def list_models(request: Request, key: str = Depends(authorize)):
        return {"object": "list", "data": [_model_card(sm) for sm in served.values()]}

    @app.get("/v1/models/{model_id:path}", tags=["openai"], summary="Describe one model")
    async def get_model(model_id: str, request: Request, key: str = Depends(authorize)):
        sm = lookup.get(model_id)
        if sm is None:
            raise APIError(404, f"model {model_id!r} is not served here; available: {sorted(served)}",
                           param="model", code="model_not_found")
        return _model_card(sm)

    @app.get("/v1/usage", tags=["metering"], summary="Tokens, requests and cost for the calling key")
    async def usage(request: Request, key: str = Depends(authorize)):
        return meter.report(key)

    # ---- native ----
    @app.post("/embed", tags=["native"], openapi_extra=_body_doc(EmbedRequest),
              summary="Embed texts (TEI-style: returns a list of vectors)")
    async def native_embed(request: Request, key: str = Depends(authorize)):
        req = await _parse(request, EmbedRequest, config.max_body_bytes, "inputs")
        sm = pick_model(request, req.model)
        if req.precision in ("int8", "uint8") and not req.normalize:
            raise APIError(422, f"precision {req.precision} maps [-1, 1] onto 256 levels and needs normalize=true",
                           param="precision", code="invalid_value")
        _check_dims(req.dimensions, sm.dim)
        texts, ids = _split_inputs(req.inputs, "inputs", config.max_inputs)
        tok = await tokenize(sm, texts, ids, req.input_type, req.task, req.truncate, "inputs")
        try:
            vecs = await embed(request, sm, tok)
        except _ClientGone:
            return Response(status_code=499)
        # int8/uint8 over the fixed range [-1, 1] (normalised vectors): a row does not depend on the
        # rest of the request.
        width = req.dimensions or sm.dim
        ranges = np.stack([-np.ones(width, np.float32), np.ones(width, np.float32)])
        vecs = finish(vecs, normalize=req.normalize, dimensions=req.dimensions, precision=req.precision,
                      ranges=ranges if req.precision in ("int8", "uint8") else None)
        n = await meter_usage(key, sm, tok)  # after finish: a request that fails is not billed
        headers = {"x-e5kit-model": sm.name, "x-e5kit-tokens": str(n), "x-e5kit-truncated": str(len(tok.truncated))}
        return JSONResponse(vecs.tolist(), headers=headers)

    @app.post("/similarity", tags=["native"], openapi_extra=_body_doc(SimilarityRequest),
              summary="Score passages against a query (cosine x 100) and rank them")
    async def similarity(request: Request, key: str = Depends(authorize)):
        req = await _parse(request, SimilarityRequest, config.max_body_bytes, None)
        sm = pick_model(request, req.model)
        if len(req.passages) + 1 > config.max_inputs:
            raise APIError(413, f"'passages' has {len(req.passages)} items; this server accepts at most "
                                f"{config.max_inputs - 1} with the query", param="passages", code="too_many_inputs")
        q_texts, _ = _split_inputs(req.query, "query", 1)
        p_texts, _ = _split_inputs(req.passages, "passages", config.max_inputs)
        q_tok = await tokenize(sm, q_texts, None, req.query_type, req.task, req.truncate, "query")
        p_tok = await tokenize(sm, p_texts, None, req.passage_type, None, req.truncate, "passages")
        tok = Prepared(ids=q_tok.ids + p_tok.ids, truncated=q_tok.truncated + [i + 1 for i in p_tok.truncated])
        try:
            vecs = finish(await embed(request, sm, tok))
        except _ClientGone:
            return Response(status_code=499)
        n = await meter_usage(key, sm, tok)
        scores = (vecs[1:] @ vecs[0]) * 100.0
        order = np.argsort(-scores, kind="stable")
        return {"object": "similarity", "model": sm.name, "scores": scores.tolist(),
                "ranking": [{"index": int(i), "score": float(scores[i])} for i in order],
                "usage": {"prompt_tokens": n, "total_tokens": n}}

    @app.post("/tokenize", tags=["native"], openapi_extra=_body_doc(TokenizeRequest),
              summary="The exact text (after the prefix) and tokens with character offsets")
    async def tokenize_route(request: Request, key: str = Depends(authorize)):
        req = await _parse(request, TokenizeRequest, config.max_body_bytes, "inputs")
        sm = pick_model(request, req.model)
        texts, _ = _split_inputs(req.inputs, "inputs", config.max_inputs)
        formatted = format_texts(texts, req.input_type or config.default_input_type, sm.model.prompt_style, req.task)
        truncate = config.auto_truncate if req.truncate is None else req.truncate
        engine = sm.model.engine
        encs = await asyncio.to_thread(engine.tokenizer.encode_batch, formatted, add_special_tokens=True)
        data = []
        for i, (text, e) in enumerate(zip(formatted, encs)):
            if e.overflowing and not truncate:
                n = engine.count_tokens([text])[0]
                raise APIError(422, f"'inputs' item {i} has {n} tokens, more than the model's limit of "
                                    f"{engine.max_tokens}; shorten it or send truncate=true", param="inputs",
                               code="input_too_long")
            data.append({"index": i, "text": text, "truncated": bool(e.overflowing), "tokens": [
                {"id": tid, "text": piece, "start": s, "stop": t, "special": bool(sp)}
                for tid, piece, (s, t), sp in zip(e.ids, e.tokens, e.offsets, e.special_tokens_mask)
            ]})
        return {"object": "list", "model": sm.name, "data": data}

    # ---- operations ----
    @app.get("/health", tags=["operations"], summary="Liveness")
    async def health():
        return {"status": "ok"}

    @app.get("/ready", tags=["operations"], summary="Readiness: models loaded, workers running, not draining")
    async def ready():
        dead = [sm.name for sm in served.values() if not sm.batcher.alive]
        if state["draining"] or not state["started"] or dead:
            why = "draining" if state["draining"] else "starting" if not state["started"] else f"worker down: {dead}"
            return error_response(503, f"not ready ({why})", "server_error", code="not_ready")
        return {"status": "ready", "models": list(served)}

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics")
    async def prometheus(request: Request, key: str = Depends(authorize)):
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def _model_card(sm: ServedModel) -> dict:
    m = sm.model
    return {"id": sm.name, "object": "model", "created": sm.created, "owned_by": "e5kit",
            "dimensions": m.dim, "max_tokens": m.max_tokens, "prompt_style": m.prompt_style,
            "device": str(m.device), "dtype": str(m.dtype).replace("torch.", ""), "backend": m.backend,
            "languages": m.spec.languages, "license": m.spec.license}


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("e5kit")
    except Exception:
        return "0"


class _MetricsMiddleware:
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


__all__ = ["create_app", "ServerConfig", "ServedModel", "EmbeddingsRequest", "EmbedRequest", "SimilarityRequest",
           "TokenizeRequest"]
