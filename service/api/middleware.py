"""Pure ASGI middleware: request timing (outermost) and the request-body cap.

Pure ASGI rather than `BaseHTTPMiddleware`, so the body is never buffered and nothing runs in an
extra task.
"""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from diffprompt.service.errors import BodyTooLarge, error_response
from diffprompt.service.metrics import Metrics

UNTIMED_PATHS = frozenset({"/metrics", "/livez", "/readyz"})


class RequestMetricsMiddleware:
    """Times every HTTP request by route template (not raw path, to bound label cardinality) and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNTIMED_PATHS:
            await self.app(scope, receive, send)
            return
        status = 500  # if the app raises before answering, the server answers 500
        start = time.perf_counter()

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_and_record)
        finally:
            self.metrics.in_flight.dec()
            self.metrics.request_duration.labels(route=route_template(scope), method=scope["method"],
                                                 status=str(status)).observe(time.perf_counter() - start)


def route_template(scope: Scope) -> str:
    """The path template of the route the router picked ("unmatched" for 404s); read after the call."""
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) and path else "unmatched"


class BodySizeLimitMiddleware:
    """413 `body_too_large` when the body is longer than `max_bytes`.

    The check sits in `receive`, so it runs after routing and authentication, when the handler
    first asks for the body: a Content-Length over the cap is refused before a single body byte
    is read, and a chunked body as soon as the running total passes the cap. The exception
    handlers answer it (the route is known, so the request metrics name it); the connection closes.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, metrics: Metrics):
        self.app, self.max_bytes, self.metrics = app, max_bytes, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        declared_bytes = int(declared) if declared.isdigit() else None
        received, started = 0, False

        async def limited_receive() -> Message:
            nonlocal received
            if declared_bytes is not None and declared_bytes > self.max_bytes:
                raise self._error(f"Content-Length {declared_bytes}")
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._error(f"more than {self.max_bytes} bytes streamed")
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as e:  # only reaches here if raised outside a route's exception handling
            if started:
                raise
            self.metrics.errors.labels(reason=e.code).inc()
            await error_response(e.status, e.code, e.message, e.detail, e.headers)(scope, receive, send)

    def _error(self, what: str) -> BodyTooLarge:
        return BodyTooLarge(f"request body too large ({what}); the limit is max_body_bytes = {self.max_bytes}",
                            detail={"max_bytes": self.max_bytes}, headers={"Connection": "close"})
