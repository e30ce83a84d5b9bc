"""The micro-batcher on its own (in-process, a real event loop and thread pool): who waits for whom.

A batch waits for requests announced with `on_the_way()`, and for nobody else: a lone request runs at
once even with a long max_wait, and an announced request that gives up wakes the batch it held.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest

from diffprompt.service.batching import MicroBatcher
from diffprompt.service.errors import RequestTimeout
from diffprompt.service.metrics import Metrics

LONG_WAIT_S = 120.0  # no test below may wait this out: each bounds its wait far below it


def batcher(calls: list[list[int]], max_batch_size: int = 8) -> MicroBatcher[int, int]:
    def run_batch(items: list[int]) -> list[int]:
        calls.append(list(items))
        return [10 * i for i in items]

    return MicroBatcher(run_batch, ThreadPoolExecutor(1), max_batch_size=max_batch_size, max_wait_s=LONG_WAIT_S,
                        max_queue=16, retry_after_s=1, metrics=Metrics())


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=20))  # a batch that waited out LONG_WAIT_S fails here


def test_a_lone_request_does_not_wait_for_company():
    calls: list[list[int]] = []

    async def main():
        b = batcher(calls)
        b.start()
        result = await b.submit(1, timeout_s=LONG_WAIT_S)
        await b.stop()
        return result

    assert run(main()) == 10
    assert calls == [[1]]


def test_a_batch_waits_for_a_request_on_its_way():
    calls: list[list[int]] = []

    async def main():
        b = batcher(calls)
        b.start()
        with b.on_the_way():  # request 2 is decoding its image
            first = asyncio.create_task(b.submit(1, timeout_s=LONG_WAIT_S))
            for _ in range(20):  # let the worker take request 1 and start collecting
                await asyncio.sleep(0)
            assert calls == [] and b.waiting == 1
            second = b.submit(2, timeout_s=LONG_WAIT_S)
        results = await asyncio.gather(first, second)
        await b.stop()
        return results

    assert run(main()) == [10, 20]
    assert calls == [[1, 2]]  # one batch


def test_a_request_that_gives_up_on_its_way_releases_the_batch():
    calls: list[list[int]] = []

    async def main():
        b = batcher(calls)
        b.start()
        with b.on_the_way():  # request 2 will fail to decode and never arrive
            first = asyncio.create_task(b.submit(1, timeout_s=LONG_WAIT_S))
            for _ in range(20):
                await asyncio.sleep(0)
            assert calls == []  # held for request 2
        result = await first
        await b.stop()
        return result

    assert run(main()) == 10
    assert calls == [[1]]


def test_a_full_batch_does_not_wait_for_more():
    calls: list[list[int]] = []

    async def main():
        b = batcher(calls, max_batch_size=2)
        b.start()
        with b.on_the_way():  # somebody is coming, but the batch is full without them
            results = await asyncio.gather(b.submit(1, LONG_WAIT_S), b.submit(2, LONG_WAIT_S))
        await b.stop()
        return results

    assert run(main()) == [10, 20]
    assert calls == [[1, 2]]


def test_a_request_times_out_while_its_batch_waits():
    """Its batch waits for a request on its way that takes too long: RequestTimeout (504), and the batch
    drops it instead of running it."""
    calls: list[list[int]] = []

    async def main():
        b = batcher(calls)
        b.start()
        with b.on_the_way():
            with pytest.raises(RequestTimeout, match="request_timeout_s"):
                await b.submit(1, timeout_s=0.2)
        assert await b.submit(2, timeout_s=LONG_WAIT_S) == 20
        await b.stop()

    run(main())
    assert calls == [[2]]
