"""Run the app under uvicorn, one process, with a graceful SIGTERM (used by `python -m diffprompt.service`).

One worker on purpose: the micro-batcher can only batch requests that reach the same process, so
scale out with replicas (service/README.md). On SIGTERM (or Ctrl-C):
1. /readyz turns 503 at once; for `shutdown_drain_s` the server keeps accepting, so a load
   balancer has time to notice;
2. uvicorn stops accepting, waits (up to `shutdown_timeout_s`) for in-flight requests, queued
   ones included, to be answered;
3. the lifespan stops the engine, and the process exits 0.
A second signal during 1 skips the rest of the drain delay.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType

import uvicorn

from diffprompt.service.main import create_app
from diffprompt.service.settings import Settings

log = logging.getLogger(__name__)


class GracefulServer(uvicorn.Server):
    """uvicorn.Server that flips readiness before it stops, optionally after a drain delay."""

    def __init__(self, config: uvicorn.Config, on_signal: Callable[[], None], drain_s: float = 0.0):
        super().__init__(config)
        self.on_signal, self.drain_s = on_signal, drain_s
        self._drain_timer: threading.Timer | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.on_signal()
        if self.drain_s > 0 and self._drain_timer is None and not self.should_exit:
            log.info("signal %d: not ready; serving %.1f s more before shutting down", sig, self.drain_s)
            self._drain_timer = threading.Timer(self.drain_s, super().handle_exit, (sig, frame))
            self._drain_timer.daemon = True
            self._drain_timer.start()
            return
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        super().handle_exit(sig, frame)


def serve(settings: Settings) -> int:
    """Serve until SIGTERM / SIGINT; 0 after a clean shutdown, 3 if start-up failed."""
    app = create_app(settings)

    def begin_shutdown() -> None:
        if app.state.engine is not None:
            app.state.engine.begin_shutdown()

    config = uvicorn.Config(app, host=settings.host, port=settings.port, workers=1, lifespan="on",
                            log_level=settings.log_level, access_log=settings.access_log,
                            timeout_graceful_shutdown=settings.shutdown_timeout_s)
    server = GracefulServer(config, begin_shutdown, settings.shutdown_drain_s)
    # uvicorn re-raises the signal it caught once it has shut down, with the previous handlers back in
    # place; with these no-op handlers that re-raise does nothing, so a graceful stop exits 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server.run()
    return 0 if server.started else 3
