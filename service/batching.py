"""Dynamic micro-batching: many concurrent requests -> one `run_batch` call in a worker thread.

    batcher = MicroBatcher(run_batch, executor, max_batch_size=16, max_wait_s=0.005, max_queue=64, ...)
    batcher.start()
    result = await batcher.submit(item, timeout_s=30)   # from any request handler
    await batcher.stop()                               # finishes everything already admitted

A single asyncio worker takes the oldest waiting request, then keeps collecting until the batch
holds `max_batch_size` requests or `max_wait_s` has passed since the first one, and runs
`run_batch(items) -> results` (same order) in `executor`, so the event loop never blocks on
inference. Each result goes back to its request's future. Back-pressure: at most `max_queue`
requests may wait (queued or in the batch being formed); one more is `QueueFull` (503 with
Retry-After) at once. A request not answered within its timeout is `RequestTimeout` (504); if it
has not started yet it is dropped from its batch. With `max_batch_size=1` this is a plain
one-at-a-time queue (batching off).

A batch waits only for company that exists. The caller wraps what a request does before
`submit` (decoding its image) in `with batcher.on_the_way():`; a batch being formed waits for
such requests (up to `max_wait_s`), and runs at once when the queue is empty and none is on its
way, so a lone request pays no batching delay. A request that leaves `on_the_way` without
submitting (a bad image) wakes the batch instead of letting it wait out `max_wait_s`.

    with batcher.on_the_way():
        pixels = await decode(image)
    result = await batcher.submit(pixels, timeout_s=30)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from diffprompt.service.errors import NotReady, QueueFull, RequestTimeout
from diffprompt.service.metrics import Metrics

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Waiting(Generic[T]):
    item: T
    future: asyncio.Future = field(repr=False)


class MicroBatcher(Generic[T, R]):
    """Collects submitted items into batches for `run_batch`; see the module docstring."""

    def __init__(self, run_batch: Callable[[list[T]], Sequence[R]], executor: Executor, *, max_batch_size: int,
                 max_wait_s: float, max_queue: int, retry_after_s: int, metrics: Metrics):
        if max_batch_size < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError("need max_batch_size >= 1, max_queue >= 1 and max_wait_s >= 0")
        self.run_batch, self.executor, self.metrics = run_batch, executor, metrics
        self.max_batch_size, self.max_wait_s, self.max_queue = max_batch_size, max_wait_s, max_queue
        self.retry_after_s = retry_after_s
        self.coming = 0  # requests on their way to submit(): company worth waiting for
        self._left_the_way = asyncio.Event()  # set when one of them arrives or gives up
        self._queue: asyncio.Queue[_Waiting[T] | None] = asyncio.Queue()  # bounded by `waiting` at admission
        self.waiting = 0  # admitted, not yet handed to run_batch
        self._task: asyncio.Task | None = None
        self._closed = False

    # -- life cycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker task on the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self._worker(), name="micro-batcher")
        self._task.add_done_callback(self._worker_done)

    @property
    def alive(self) -> bool:
        """The worker task is running."""
        return self._task is not None and not self._task.done()

    @property
    def closed(self) -> bool:
        """stop() was called: no new items."""
        return self._closed

    async def stop(self) -> None:
        """Refuse new items, run every item already admitted, then end the worker."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None and not self._task.done():
            self._queue.put_nowait(None)  # FIFO: everything admitted before it still runs
            await self._task

    @staticmethod
    def _worker_done(task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("micro-batcher worker died", exc_info=task.exception())

    # -- requests ---------------------------------------------------------------------------------

    async def submit(self, item: T, timeout_s: float) -> R:
        """Queue `item`, wait for its result; QueueFull (503) at once when full, RequestTimeout (504) late."""
        if self._closed or not self.alive:
            raise NotReady("the batcher is not running (starting up or shutting down)",
                           headers={"Retry-After": str(self.retry_after_s)})
        if self.waiting >= self.max_queue:
            raise QueueFull(f"{self.waiting} requests are already waiting (max_queue={self.max_queue}); retry later",
                            detail={"waiting": self.waiting, "max_queue": self.max_queue},
                            headers={"Retry-After": str(self.retry_after_s)})
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._admit(1)
        self._queue.put_nowait(_Waiting(item, future))
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout=max(timeout_s, 0.0))
        except asyncio.TimeoutError:
            future.cancel()  # the worker skips it if its batch has not started yet
            raise RequestTimeout(f"no result within the request timeout ({timeout_s:.3g} s left when queued): "
                                 "the server is overloaded or request_timeout_s is too small",
                                 detail={"timeout_s": timeout_s}) from None
        except asyncio.CancelledError:  # the handler was cancelled (client gone, forced shutdown)
            future.cancel()
            raise

    @contextlib.contextmanager
    def on_the_way(self) -> Iterator[None]:
        """Mark a request as coming to `submit` (see the module docstring) while the block runs."""
        self.coming += 1
        try:
            yield
        finally:
            self.coming -= 1
            self._left_the_way.set()

    def _admit(self, n: int) -> None:
        self.waiting += n
        self.metrics.queue_depth.set(self.waiting)

    # -- the worker -------------------------------------------------------------------------------

    async def _worker(self) -> None:
        while True:
            first = await self._queue.get()
            if first is None:
                return
            batch, stop = await self._collect(first)
            await self._execute(batch)
            if stop:
                return

    async def _collect(self, first: _Waiting[T]) -> tuple[list[_Waiting[T]], bool]:
        """The first item plus whatever arrives within max_wait_s while requests are on their way, up to
        max_batch_size; (batch, stop seen)."""
        loop = asyncio.get_running_loop()
        batch, deadline = [first], loop.time() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            try:
                nxt = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if remaining <= 0 or self.coming == 0:  # out of time, or nobody else on the way
                    break
                self._left_the_way.clear()
                getter = asyncio.ensure_future(self._queue.get())
                woken = asyncio.ensure_future(self._left_the_way.wait())
                done, _ = await asyncio.wait({getter, woken}, timeout=remaining,
                                             return_when=asyncio.FIRST_COMPLETED)
                woken.cancel()
                if getter not in done:
                    getter.cancel()
                    try:  # it may have completed between the wait and cancel()
                        nxt = await getter
                    except asyncio.CancelledError:
                        continue  # a request arrived or gave up: look again (queue, time, who is coming)
                else:
                    nxt = getter.result()
            if nxt is None:
                return batch, True
            batch.append(nxt)
        return batch, False

    async def _execute(self, batch: list[_Waiting[T]]) -> None:
        self._admit(-len(batch))
        live = [w for w in batch if not w.future.done()]  # timed-out requests are dropped here
        if not live:
            return
        self.metrics.batch_size.observe(len(live))
        loop = asyncio.get_running_loop()
        try:
            results: Sequence[Any] = await loop.run_in_executor(self.executor, self.run_batch, [w.item for w in live])
            if len(results) != len(live):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(live)} items")
        except Exception as e:  # a failed batch fails each of its requests, not the worker
            log.exception("batch of %d failed", len(live))
            for w in live:
                if not w.future.done():
                    w.future.set_exception(e)
            return
        for w, result in zip(live, results):
            if not w.future.done():
                w.future.set_result(result)
