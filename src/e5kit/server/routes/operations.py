"""Operations: /health (liveness), /ready (readiness), /metrics (Prometheus text)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from ..errors import error_response
from ..schemas import Health, Ready, error_doc
from ..service import EmbedService, Identity


def router(service: EmbedService, authenticate) -> APIRouter:
    r = APIRouter(tags=["operations"])
    life = service.lifecycle

    @r.get("/health", summary="Liveness", responses={200: {"model": Health}})
    async def health():
        return {"status": "ok"}

    @r.get("/ready", summary="Readiness: models loaded, workers running, not draining",
           responses={200: {"model": Ready}, **error_doc(503)})
    async def ready():
        dead = [sm.name for sm in service.served.values() if not sm.batcher.alive]
        if life.draining or not life.started or dead:
            why = "draining" if life.draining else "starting" if not life.started else f"worker down: {dead}"
            return error_response(503, f"not ready ({why})", "server_error", code="not_ready",
                                  headers={"Retry-After": "1"})
        return {"status": "ready", "models": list(service.served)}

    # response_class=Response: the 200 is text/plain while the 401 stays JSON (ErrorBody) in the document.
    @r.get("/metrics", summary="Prometheus metrics", response_class=Response,
           responses={200: {"description": "Prometheus text format", "content": {"text/plain": {"schema": {
               "type": "string"}}}}, **error_doc(401)})
    async def metrics(identity: Identity = Depends(authenticate)):
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return r
