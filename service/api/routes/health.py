"""Liveness and readiness probes (left out of the request metrics)."""

from __future__ import annotations

from fastapi import APIRouter

from diffprompt.service.api.deps import EngineDep
from diffprompt.service.engine import EngineState
from diffprompt.service.errors import EngineFailed, NotReady, ShuttingDown
from diffprompt.service.schemas import ErrorResponse, HealthResponse, ReadyResponse

router = APIRouter(tags=["health"])

_503 = {503: {"model": ErrorResponse, "description": "not_ready, shutting_down or engine_failed"}}


@router.get("/livez", response_model=HealthResponse, responses=_503)
async def livez(engine: EngineDep) -> HealthResponse:
    """200 while the process can serve or is getting there; 503 once the engine has failed (restart me)."""
    health = engine.check_health()
    if not health.alive:
        raise EngineFailed(health.message)
    return HealthResponse(status=health.state.value, message=health.message)


@router.get("/readyz", response_model=ReadyResponse, responses=_503)
async def readyz(engine: EngineDep) -> ReadyResponse:
    """200 once the model is loaded and warmed up; 503 while loading, after SIGTERM, or when failed."""
    health = engine.check_health()
    if health.state is EngineState.FAILED:
        raise EngineFailed(health.message)
    if health.state in (EngineState.DRAINING, EngineState.STOPPED):
        raise ShuttingDown(health.message)
    if not health.ready:
        raise NotReady(health.message)
    return ReadyResponse(status=health.state.value, message=health.message, model=engine.describe())
