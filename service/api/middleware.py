"""Pure ASGI middleware: request timing (outermost) and the request-body cap.

Pure ASGI rather than `BaseHTTPMiddleware`, so the body is never buffered and nothing runs in an
extra task.
"""

from __future__ import annotations

import asyncio
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
    """The template of the route the router picked, read after the call: "/v1/ground", "/openapi.json",
    "/static/{path}" for the static files, or "unmatched" (404s).

    FastAPI names its API routes in `scope["route"]`; for plain Starlette routes (/openapi.json) and
    mounts it leaves only `scope["endpoint"]`, which is looked up among the app's routes.
    """
    path = getattr(scope.get("route"), "path", None)
    if isinstance(path, str) and path:
        return path
    endpoint = scope.get("endpoint")
    if endpoint is not None:
        for route in getattr(scope.get("app"), "routes", ()):
            if endpoint is getattr(route, "endpoint", None) or endpoint is getattr(route, "app", None):
                return route.path_format  # a mount's is its prefix + "/{path}"
    return "unmatched"


class BodySizeLimitMiddleware:
    """413 `body_too_large` when the body is longer than `max_bytes`, answered so that every client reads it.

    The check sits in `receive`, so it runs after routing and authentication, when the handler
    first asks for the body: a Content-Length over the cap is refused before a single body byte
    is read, and a chunked body as soon as the running total passes the cap. The exception
    handlers answer it (the route is known, so the request metrics name it), with `Connection: close`.

    Closing a socket whose receive buffer still holds body bytes makes the kernel answer with a
    reset, and a client that writes its whole body before it reads (Python's urllib, many SDKs)
    then sees ConnectionResetError instead of the 413. So the 413 is written first, then the rest
    of the body is read and thrown away (a "lingering close", as nginx and Apache do), and only then
    is the response completed and the connection closed. Memory stays bounded: each chunk is
    dropped as it arrives, and uvicorn buffers at most 64 KiB. The drain stops at `drain_bytes` of
    body in all (a Content-Length above it is not drained at all) or after `drain_seconds`, and
    the connection closes. A request with `Expect: 100-continue` whose body has not started is not
    drained: its client waits for the answer before sending.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, metrics: Metrics, drain_bytes: int = 64 * 1024 * 1024,
                 drain_seconds: float = 30.0):
        self.app, self.max_bytes, self.metrics = app, max_bytes, metrics
        self.drain_bytes, self.drain_seconds = drain_bytes, drain_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length", b"")
        declared_bytes = int(declared) if declared.isdigit() else None
        expects_continue = headers.get(b"expect", b"").lower() == b"100-continue"
        received, body_done, refused, started = 0, False, False, False

        async def limited_receive() -> Message:
            nonlocal received, body_done, refused
            if declared_bytes is not None and declared_bytes > self.max_bytes:
                refused = True
                raise self._error(f"Content-Length {declared_bytes}")
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > self.max_bytes:
                    refused = True
                    raise self._error(f"more than {self.max_bytes} bytes streamed")
            return message

        async def send_then_drain(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            last = message["type"] == "http.response.body" and not message.get("more_body", False)
            if last and refused and self._worth_draining(declared_bytes, received, body_done, expects_continue):
                await send({**message, "more_body": True})  # the whole 413 is on the wire: readers see it now
                await self._drain(receive, received)
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        try:
            await self.app(scope, limited_receive, send_then_drain)
        except BodyTooLarge as e:  # only reaches here if raised outside a route's exception handling
            if started:
                raise
            self.metrics.errors.labels(reason=e.code).inc()
            await error_response(e.status, e.code, e.message, e.detail, e.headers)(scope, receive, send_then_drain)

    def _worth_draining(self, declared: int | None, received: int, body_done: bool, expects_continue: bool) -> bool:
        """Whether reading the rest of the body can let the client see the answer: some is still to come,
        the client is sending it, and all of it fits in `drain_bytes`."""
        if body_done or (expects_continue and received == 0) or self.drain_seconds <= 0:
            return False
        return received < self.drain_bytes and (declared is None or declared <= self.drain_bytes)

    async def _drain(self, receive: Receive, received: int) -> None:
        """Read and drop the rest of the body, up to `drain_bytes` in all and `drain_seconds`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.drain_seconds
        while received <= self.drain_bytes:
            try:
                message = await asyncio.wait_for(receive(), deadline - loop.time())
            except asyncio.TimeoutError:
                return
            if message["type"] != "http.request":  # http.disconnect: the client has gone
                return
            received += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    def _error(self, what: str) -> BodyTooLarge:
        return BodyTooLarge(f"request body too large ({what}); the limit is max_body_bytes = {self.max_bytes}",
                            detail={"max_bytes": self.max_bytes}, headers={"Connection": "close"})
