"""The OpenAI family: /v1/embeddings, /v1/models, /v1/usage. Errors here use OpenAI's status codes."""

from __future__ import annotations

import base64
import json

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from ..schemas import EmbeddingsResponse, ModelList, ModelCard, UsageReport, body_doc, error_doc
from ...pipeline import finish
from ..service import EmbedService, Identity, ServedModel
from ..errors import APIError


def router(service: EmbedService, authenticate, usage_report=None) -> APIRouter:
    """``usage_report(identity) -> dict`` answers /v1/usage; None: no such route here."""
    r = APIRouter(prefix="/v1", tags=["openai"])
    models = service.request_models

    @r.post("/embeddings", summary="Create embeddings (OpenAI-compatible)", openapi_extra=body_doc(models.embeddings),
            responses={200: {"model": EmbeddingsResponse}, **error_doc(400, 401, 404, 408, 413, 429, 503)})
    async def embeddings(request: Request, identity: Identity = Depends(authenticate)):
        req = await service.parse(request, models.embeddings, ("input",))
        sm = service.pick(request, req.model)
        p, vecs = await service.embed_inputs(request, sm, req.input, req.input_type, req.task, req.truncate,
                                             req.dimensions, "input")
        vecs = finish(vecs, dimensions=req.dimensions)
        body = await service.render(_embeddings_json, vecs, req.encoding_format, sm.name, p.n_tokens,
                                    size_hint=vecs.size * 12)
        await service.meter(identity, sm, p)  # the last step: a request that fails is never billed
        headers = {"x-e5kit-truncated": str(len(p.truncated))} if p.truncated else None
        return Response(body, media_type="application/json", headers=headers)

    @r.get("/models", summary="List served models", responses={200: {"model": ModelList}, **error_doc(401)})
    async def list_models(identity: Identity = Depends(authenticate)):
        return {"object": "list", "data": [model_card(sm) for sm in service.served.values()]}

    @r.get("/models/{model_id:path}", summary="Describe one model",
           responses={200: {"model": ModelCard}, **error_doc(401, 404)})
    async def get_model(model_id: str, identity: Identity = Depends(authenticate)):
        sm = service.lookup.get(model_id)
        if sm is None:
            raise APIError(404, f"model {model_id!r} is not served here; available: {sorted(service.served)}",
                           param="model", code="model_not_found")
        return model_card(sm)

    if usage_report is not None:
        @r.get("/usage", tags=["metering"], summary="Tokens, requests and cost for the calling key",
               responses={200: {"model": UsageReport}, **error_doc(401)})
        async def usage(identity: Identity = Depends(authenticate)):
            return usage_report(identity)

    return r


def model_card(sm: ServedModel) -> dict:
    m = sm.model
    return {"id": sm.name, "object": "model", "created": sm.created, "owned_by": "e5kit",
            "dimensions": m.dim, "max_tokens": m.max_tokens, "prompt_style": m.prompt_style,
            "device": str(m.device), "dtype": str(m.dtype).replace("torch.", ""), "backend": m.backend,
            "languages": m.spec.languages, "license": m.spec.license}


def _embeddings_json(vecs: np.ndarray, fmt: str, model: str, n_tokens: int) -> bytes:
    """The response, rendered row by row (so a large one never holds the GIL in one long call)."""
    if fmt == "base64":
        rows = ['"' + base64.b64encode(v.astype("<f4").tobytes()).decode() + '"' for v in vecs]
    else:
        rows = [json.dumps(v.tolist()) for v in vecs]
    data = ",".join(f'{{"object":"embedding","index":{i},"embedding":{e}}}' for i, e in enumerate(rows))
    usage = f'{{"prompt_tokens":{n_tokens},"total_tokens":{n_tokens}}}'
    return f'{{"object":"list","data":[{data}],"model":{json.dumps(model)},"usage":{usage}}}'.encode()
