"""The native family: /embed (TEI-style), /similarity, /tokenize. Validation errors here are 422."""

from __future__ import annotations

import json
from functools import partial

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from ..errors import APIError
from ..schemas import EMBED_RESPONSE, SimilarityResponse, TokenizeResponse, body_doc, error_doc
from ...chunking import ChunkedEmbeddings, chunk, finish_chunks
from ...pipeline import Prepared, finish
from ..service import EmbedService, Identity, split_inputs

NATIVE_ERRORS = error_doc(400, 401, 404, 408, 413, 415, 422, 429, 503)


def router(service: EmbedService, authenticate) -> APIRouter:
    r = APIRouter(tags=["native"])
    models = service.request_models
    config = service.config

    @r.post("/embed", summary="Embed texts (TEI-style: returns a list of vectors)", openapi_extra=body_doc(models.embed),
            responses={200: EMBED_RESPONSE, **NATIVE_ERRORS})
    async def embed(request: Request, identity: Identity = Depends(authenticate)):
        req = await service.parse(request, models.embed, ("inputs",))
        sm = service.pick(request, req.model)
        if req.precision in ("int8", "uint8") and not req.normalize:
            raise APIError(422, f"precision {req.precision} maps [-1, 1] onto 256 levels and needs normalize=true",
                           param="precision", code="invalid_value")
        # int8/uint8 over the fixed range [-1, 1] (normalised vectors): a row does not depend on the
        # rest of the request.
        width = req.dimensions or sm.dim
        ranges = np.stack([-np.ones(width, np.float32), np.ones(width, np.float32)])
        options = dict(normalize=req.normalize, dimensions=req.dimensions, precision=req.precision,
                       ranges=ranges if req.precision in ("int8", "uint8") else None)
        headers = {"x-e5kit-model": sm.name}
        if req.long == "truncate":
            p, pooled = await service.embed_inputs(request, sm, req.inputs, req.input_type, req.task, req.truncate,
                                                   req.dimensions, "inputs")
            vecs = finish(pooled, **options)
            render: tuple = (_rows_json, vecs)
            n_texts = None
        else:  # exactly what encode_passages(long=...) makes of the same chunk vectors
            p, pooled, chunks, n_texts = await _embed_chunks(service, request, sm, req)
            out = finish_chunks(pooled, chunks, n_texts, req.long, **options)
            vecs = out.vectors if req.long == "chunks" else out
            render = (_chunks_json, out, n_texts) if req.long == "chunks" else (_rows_json, vecs)
            headers["x-e5kit-chunks"] = str(len(chunks))
        body = await service.render(*render, size_hint=vecs.size * 12)
        headers |= {"x-e5kit-tokens": str(p.n_tokens), "x-e5kit-truncated": str(len(p.truncated))}
        response = Response(body, media_type="application/json", headers=headers)
        await service.meter(identity, sm, p, n_texts)  # the last step: a request that fails is never billed
        return response

    @r.post("/similarity", summary="Score passages against a query (cosine x 100) and rank them",
            openapi_extra=body_doc(models.similarity), responses={200: {"model": SimilarityResponse}, **NATIVE_ERRORS})
    async def similarity(request: Request, identity: Identity = Depends(authenticate)):
        req = await service.parse(request, models.similarity)
        sm = service.pick(request, req.model)
        q = await service.prepare(sm, [req.query], None, req.query_type, req.task, req.truncate, "query")
        ps = await service.prepare(sm, list(req.passages), None, req.passage_type, None, req.truncate, "passages")
        p = Prepared(ids=q.ids + ps.ids, truncated=q.truncated + [i + 1 for i in ps.truncated])
        vecs = finish(await service.embed(request, sm, p))
        scores = (vecs[1:] @ vecs[0]) * 100.0
        order = np.argsort(-scores, kind="stable")
        n = p.n_tokens
        response = JSONResponse({"object": "similarity", "model": sm.name, "scores": scores.tolist(),
                                 "ranking": [{"index": int(i), "score": float(scores[i])} for i in order],
                                 "usage": {"prompt_tokens": n, "total_tokens": n}})
        await service.meter(identity, sm, p)  # the last step: a request that fails is never billed
        return response

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


async def _embed_chunks(service: EmbedService, request: Request, sm, req) -> tuple[Prepared, np.ndarray, list, int]:
    """long=mean/chunks: split each text with :func:`e5kit.chunk` (in the pool), then prepare, admit, queue
    and meter the chunks like any inputs. Returns (the chunks' Prepared, their pooled vectors, the chunks, n texts)."""
    texts, _ = split_inputs(req.inputs)
    if texts is None:
        raise APIError(422, f"long={req.long} splits texts into chunks; send texts, not token ids", param="inputs",
                       code="invalid_value")
    if req.input_type not in (None, "passage"):
        raise APIError(422, f"long={req.long} embeds passages; input_type must be passage or absent, not "
                            f"{req.input_type!r}", param="input_type", code="invalid_value")
    service.check_dims(sm, req.dimensions)
    service.admit(sm, len(texts))  # refuse before chunking when the queue is already full
    try:
        per_text = await service.run(partial(chunk, texts, sm.model, overlap=req.chunk_overlap),
                                     cost=sum(map(len, texts)))
    except ValueError as e:
        raise APIError(422, f"'inputs' cannot be chunked: {e}", param="inputs", code="invalid_value")
    chunks = [c for cs in per_text for c in cs]
    p = await service.prepare(sm, [c.text for c in chunks], None, "passage", None, False, "inputs")
    return p, await service.embed(request, sm, p), chunks, len(texts)


def _chunks_json(out: ChunkedEmbeddings, n_texts: int) -> bytes:
    """Per input, its chunks in order: ``{"span": [start, end], "embedding": [...]}``."""
    per: list[list[str]] = [[] for _ in range(n_texts)]
    for d, (a, b), v in zip(out.doc.tolist(), out.spans.tolist(), out.vectors):
        per[d].append(f'{{"span":[{a},{b}],"embedding":{json.dumps(v.tolist())}}}')
    return ("[" + ",".join("[" + ",".join(p) + "]" for p in per) + "]").encode()


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
