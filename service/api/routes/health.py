"""Liveness and readiness probes (left out of the request metrics).

Readiness 503s that mark the normal life cycle, `not_ready` while loading and `shutting_down`
after SIGTERM, are answers, not errors: they are built here instead of raised, so they stay out
of `diffprompt_errors_total` (which would otherwise grow with the probe frequency at every
start). `engine_failed` is a failure and is counted, from either probe: the DiffPromptEngineFailed
alert (deploy/prometheus/alerts.yml) fires on it even when no traffic reaches the replica.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from diffprompt.service.api.deps import EngineDep
from diffprompt.service.engine import EngineState
from diffprompt.service.errors import EngineFailed, NotReady, ServiceError, ShuttingDown, error_response
from diffprompt.service.schemas import ErrorResponse, HealthResponse, ReadyResponse

router = APIRouter(tags=["health"])

_503 = {503: {"model": ErrorResponse, "description": "not_ready, shutting_down or engine_failed"}}


def _uncounted(state: ServiceError) -> JSONResponse:
    return error_response(state.status, state.code, state.message, state.detail, state.headers)


@router.get("/livez", response_model=HealthResponse, responses=_503)
async def livez(engine: EngineDep) -> HealthResponse:
    """200 while the process can serve or is getting there; 503 once the engine has failed (restart me)."""
    health = engine.check_health()
    if not health.alive:
        raise EngineFailed(health.message)
    return HealthResponse(status=health.state.value, message=health.message)


@router.get("/readyz", response_model=ReadyResponse, responses=_503)
async def readyz(engine: EngineDep) -> ReadyResponse | JSONResponse:
    """200 once the model is loaded and warmed up; 503 while loading, after SIGTERM, or when failed."""
    health = engine.check_health()
    if health.state is EngineState.FAILED:
        raise EngineFailed(health.message)
    if health.state in (EngineState.DRAINING, EngineState.STOPPED):
        return _uncounted(ShuttingDown(health.message))
    if not health.ready:
        return _uncounted(NotReady(health.message))
    return ReadyResponse(status=health.state.value, message=health.message, model=engine.describe())
