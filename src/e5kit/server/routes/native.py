"""The native family: /embed (TEI-style), /similarity, /tokenize. Validation errors here are 422."""

from __future__ import annotations

import json

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from ..errors import APIError
from ..schemas import SimilarityResponse, TokenizeResponse, body_doc, error_doc
from ...pipeline import Prepared, finish
from ..service import EmbedService, Identity, split_inputs

NATIVE_ERRORS = error_doc(400, 401, 404, 408, 413, 415, 422, 429, 503)


def router(service: EmbedService, authenticate) -> APIRouter:
    r = APIRouter(tags=["native"])
    models = service.request_models
    config = service.config

    @r.post("/embed", summary="Embed texts (TEI-style: returns a list of vectors)", openapi_extra=body_doc(models.embed),
            responses={200: {"content": {"application/json": {"schema": {"type": "array", "items": {
                "type": "array", "items": {"type": "number"}}}}}, "description": "One vector per input"},
                **NATIVE_ERRORS})
    async def embed(request: Request, identity: Identity = Depends(authenticate)):
        req = await service.parse(request, models.embed, ("inputs",))
        sm = service.pick(request, req.model)
        if req.precision in ("int8", "uint8") and not req.normalize:
            raise APIError(422, f"precision {req.precision} maps [-1, 1] onto 256 levels and needs normalize=true",
                           param="precision", code="invalid_value")
        p, vecs = await service.embed_inputs(request, sm, req.inputs, req.input_type, req.task, req.truncate,
                                             req.dimensions, "inputs")
        # int8/uint8 over the fixed range [-1, 1] (normalised vectors): a row does not depend on the
        # rest of the request.
        width = req.dimensions or sm.dim
        ranges = np.stack([-np.ones(width, np.float32), np.ones(width, np.float32)])
        vecs = finish(vecs, normalize=req.normalize, dimensions=req.dimensions, precision=req.precision,
                      ranges=ranges if req.precision in ("int8", "uint8") else None)
        n = await service.meter(identity, sm, p)
        body = await service.render(_rows_json, vecs, size_hint=vecs.size * 12)
        headers = {"x-e5kit-model": sm.name, "x-e5kit-tokens": str(n), "x-e5kit-truncated": str(len(p.truncated))}
        return Response(body, media_type="application/json", headers=headers)

    @r.post("/similarity", summary="Score passages against a query (cosine x 100) and rank them",
            openapi_extra=body_doc(models.similarity), responses={200: {"model": SimilarityResponse}, **NATIVE_ERRORS})
    async def similarity(request: Request, identity: Identity = Depends(authenticate)):
        req = await service.parse(request, models.similarity)
        sm = service.pick(request, req.model)
        q = await service.prepare(sm, [req.query], None, req.query_type, req.task, req.truncate, "query")
        ps = await service.prepare(sm, list(req.passages), None, req.passage_type, None, req.truncate, "passages")
        p = Prepared(ids=q.ids + ps.ids, truncated=q.truncated + [i + 1 for i in ps.truncated])
        vecs = finish(await service.embed(request, sm, p))
        n = await service.meter(identity, sm, p)
        scores = (vecs[1:] @ vecs[0]) * 100.0
        order = np.argsort(-scores, kind="stable")
        return JSONResponse({"object": "similarity", "model": sm.name, "scores": scores.tolist(),
                             "ranking": [{"index": int(i), "score": float(scores[i])} for i in order],
                             "usage": {"prompt_tokens": n, "total_tokens": n}})

    @r.post("/tokenize", summary="The exact text the model sees (after the prefix) and its tokens with offsets",
            openapi_extra=body_doc(models.tokenize), responses={200: {"model": TokenizeResponse}, **NATIVE_ERRORS})
    async def tokenize(request: Request, identity: Identity = Depends(authenticate)):
        # Parsing, tokenizing and rendering in /tokenize's own bounded pool, apart from the embedding routes'.
        req = await service.parse(request, models.tokenize, ("inputs",), pool=service.tokenize_pool)
        sm = service.pick(request, req.model)
        texts, _ = split_inputs(req.inputs)
        p = await service.prepare(sm, texts, None, req.input_type, req.task, req.truncate, "inputs", embed=False)
        body = await service.run(_tokenize_json, p, sm.name, config.max_response_bytes,
                                 cost=sum(map(len, p.texts)), pool=service.tokenize_pool)
        return Response(body, media_type="application/json")

    return r


def _rows_json(vecs: np.ndarray) -> bytes:
    return ("[" + ",".join(json.dumps(v.tolist()) for v in vecs) + "]").encode()


def _tokenize_json(p: Prepared, name: str, limit: int) -> bytes:
    """Per input: the text the model sees and its tokens (``p.ids`` with ``p.spans``), built item by
    item and refused with 413 as soon as it would pass ``limit`` bytes."""
    cut = set(p.truncated)
    parts, size = [], 0
    for i, (text, ids, sp) in enumerate(zip(p.texts, p.ids, p.spans)):
        tokens = [{"id": tid, "text": piece, "start": s, "stop": t, "special": special}
                  for tid, piece, (s, t), special in zip(ids, sp.pieces, sp.offsets, sp.special)]
        part = json.dumps({"index": i, "text": text, "truncated": i in cut, "tokens": tokens}, ensure_ascii=False)
        size += len(part)
        if size > limit:
            raise APIError(413, f"the response would be more than {limit} bytes (--max-response-bytes) by input "
                                f"{i} of {len(p.texts)}; send fewer or shorter inputs", param="inputs",
                           code="response_too_large")
        parts.append(part)
    return ('{"object":"list","model":' + json.dumps(name) + ',"data":[' + ",".join(parts) + "]}").encode()
