"""Micro-batching on a real server: concurrent requests share a batch, a full queue is 503, a late request 504."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image
from service_testkit import assert_error, encode, metric, sample_png, wait_until

pytestmark = pytest.mark.slow  # every test starts its own server


def test_concurrent_requests_are_batched(start_server):
    srv = start_server(max_batch_size=4, max_wait_ms=500)
    before = srv.metrics()
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda seed: srv.ground(sample_png(), "the blue star", seed=seed), range(8)))
    assert [r.status_code for r in responses] == [200] * 8
    assert [r.json()["seed"] for r in responses] == list(range(8))
    after = srv.metrics()
    batches = metric(after, "diffprompt_batch_size_count") - metric(before, "diffprompt_batch_size_count")
    requests = metric(after, "diffprompt_batch_size_sum") - metric(before, "diffprompt_batch_size_sum")
    assert requests == 8
    assert 2 <= batches < 8  # at most 4 per batch, and some requests did share one
    assert metric(after, "diffprompt_batch_size_bucket", le="4.0") == metric(after, "diffprompt_batch_size_count")


def test_batching_off_runs_one_at_a_time(start_server):
    srv = start_server(max_batch_size=1, max_wait_ms=0)
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda seed: srv.ground(sample_png(), seed=seed), range(4)))
    assert all(r.status_code == 200 for r in responses)
    after = srv.metrics()
    assert metric(after, "diffprompt_batch_size_count") == metric(after, "diffprompt_batch_size_sum") == 4


def slow_png(side: int = 8000) -> bytes:
    """A smooth side x side PNG: small to send (~0.2 MB) but seconds to decode and resize."""
    ramp = np.linspace(0, 255, side, dtype=np.uint8)
    pixels = np.stack([np.tile(ramp, (side, 1)), np.tile(ramp[:, None], (1, side)),
                       np.full((side, side), 128, np.uint8)], axis=-1)
    return encode(Image.fromarray(pixels), "PNG")


SLOW_SETTINGS = {"max_image_pixels": 70_000_000, "max_wait_ms": 60_000}  # a batch may wait a minute for company


def test_full_queue_is_503_with_retry_after(start_server):
    """max_queue=1, one decoding thread. A large image is decoding; a small request arrives and waits for the
    thread. The large one is queued, and its batch waits for the small one (on its way); the small one then
    finds the queue full: 503 with Retry-After, and the large one's batch runs without it."""
    srv = start_server(max_queue=1, max_batch_size=16, retry_after_s=2, preprocess_threads=1, **SLOW_SETTINGS)
    slow: dict = {}
    thread = threading.Thread(target=lambda: slow.update(r=srv.ground(slow_png(), seed=2)))
    thread.start()
    wait_until(lambda: metric(srv.metrics(), "diffprompt_requests_in_flight") >= 1,
               what="the large request to be handled")
    fast = srv.ground(sample_png(), seed=1)
    thread.join(120)
    err = assert_error(fast, 503, "queue_full")
    assert fast.headers["retry-after"] == "2"
    assert err["detail"] == {"waiting": 1, "max_queue": 1}
    assert slow["r"].status_code == 200, slow["r"].text  # the admitted one still completes
    after = srv.metrics()
    assert metric(after, "diffprompt_errors_total", reason="queue_full") == 1
    assert metric(after, "diffprompt_queue_depth") == 0
    assert metric(after, "diffprompt_batch_size_count") == 1  # the large request's batch ran alone
    assert metric(after, "diffprompt_request_duration_seconds_count", route="/v1/ground", status="503") == 1


def test_request_timeout_is_504(start_server):
    """A request that cannot finish within request_timeout_s (decoding its large image alone takes longer)
    gets a clear 504. (Timing out while queued: tests/service/test_service_batcher.py.)"""
    srv = start_server(request_timeout_s=0.3, max_batch_size=16, **SLOW_SETTINGS)
    err = assert_error(srv.ground(slow_png()), 504, "timeout")
    assert "request_timeout_s" in err["message"]
    assert metric(srv.metrics(), "diffprompt_errors_total", reason="timeout") == 1
