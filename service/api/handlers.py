"""Exception handlers: every failure becomes an `ErrorResponse` and counts in `diffprompt_errors_total`."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from diffprompt.service.errors import HTTP_CODES, ClientDisconnected, InvalidParameter, ServiceError, error_response

log = logging.getLogger(__name__)


def _respond(request: Request, status: int, code: str, message: str, detail: Any = None,
             headers: dict[str, str] | None = None) -> JSONResponse:
    request.app.state.metrics.errors.labels(reason=code).inc()
    return error_response(status, code, message, detail, headers)


async def service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return _respond(request, exc.status, exc.code, exc.message, exc.detail, exc.headers)


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = HTTP_CODES.get(exc.status_code, "http_error")
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    return _respond(request, exc.status_code, code, message, None, dict(exc.headers or {}))


async def validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    detail = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
              for e in exc.errors()]
    fields = ", ".join(".".join(str(p) for p in d["loc"][1:]) or "body" for d in detail)
    return _respond(request, InvalidParameter.status, InvalidParameter.code, f"invalid parameters: {fields}", detail)


async def client_disconnected(request: Request, exc: Exception) -> JSONResponse:
    return await service_error(request, ClientDisconnected("the client disconnected while sending the body"))


async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return _respond(request, 500, "internal_error", "internal server error (logged)")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(ClientDisconnect, client_disconnected)
    app.add_exception_handler(Exception, unexpected_error)
