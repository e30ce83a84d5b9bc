"""GET /metrics in the Prometheus text format (or OpenMetrics when the scraper asks for it)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from diffprompt.service.api.deps import MetricsDep

router = APIRouter(tags=["monitoring"])


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "metrics"}})
async def metrics(request: Request, registry: MetricsDep) -> Response:
    """Prometheus exposition of this process's metrics (service/README.md lists them)."""
    body, content_type = registry.exposition(request.headers.get("accept"))
    return Response(content=body, media_type=content_type)
