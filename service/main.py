"""The FastAPI app: `create_app(settings)` wires routes, middleware, error handlers and the engine's lifespan.

    uvicorn --factory diffprompt.service.main:create_app          # settings from DIFFPROMPT_* / .env
    python -m diffprompt.service                                  # the same, with graceful SIGTERM handling (server.py)

The lifespan validates the artifact (a missing or altered file fails start-up at once), then loads
the sessions and warms up in the background: /livez answers 200 at once, /readyz 503 until the
model is warm. At shutdown it lets admitted requests finish before stopping the engine.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline

from diffprompt import __version__
from diffprompt.service.api.handlers import install_error_handlers
from diffprompt.service.api.middleware import BodySizeLimitMiddleware, RequestMetricsMiddleware
from diffprompt.service.api.routes import demo, ground, health, metrics
from diffprompt.service.engine import Engine
from diffprompt.service.metrics import Metrics
from diffprompt.service.settings import Settings, get_settings

DESCRIPTION = """Visual grounding with Diff-Prompt, served from an exported ONNX artifact.

`POST /v1/ground` takes an image (multipart file `image`, or JSON `image_base64`) and a referring
expression, and returns ranked boxes as `[x0, y0, x1, y1]` pixels (`box_format: "xyxy_pixels"`)
and, with `return_mask`, the mask the diffusion model generated. Every error answers
`{"error": {"code", "message", "detail"}}`."""


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Validate the artifact (fail fast), load + warm up in the background, drain at shutdown."""
    engine = Engine(app.state.settings, app.state.metrics)
    try:
        await engine.validate()
    except BaseException:
        await engine.close()
        raise
    app.state.engine = engine
    engine.start()
    try:
        yield
    finally:
        await engine.close()


def create_app(settings: Settings | None = None) -> FastAPI:
    """A new app with its own metrics registry; `settings` defaults to the process-wide `get_settings()`."""
    settings = settings or get_settings()
    # fastapi-offline: /docs serves the Swagger UI files from its package (under /static-offline-docs),
    # not from a CDN, so the docs work on a machine without internet.
    app = FastAPIOffline(title="Diff-Prompt grounding service", version=__version__, description=DESCRIPTION,
                         lifespan=lifespan, docs_url="/docs", redoc_url=None, favicon_url=demo.FAVICON_URL,
                         swagger_ui_parameters={"validatorUrl": None})
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.engine = None
    install_error_handlers(app)
    app.include_router(ground.router)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(demo.router)
    app.mount("/static", StaticFiles(directory=demo.STATIC_DIR), name="static")
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes, metrics=app.state.metrics,
                       drain_bytes=settings.body_drain_bytes, drain_seconds=settings.body_drain_timeout_s)
    app.add_middleware(RequestMetricsMiddleware, metrics=app.state.metrics)  # added last = outermost
    return app
