"""Batches sized to the machine's memory: the arithmetic, the readings, and the real server's cap."""

from __future__ import annotations

import threading

import pytest
from service_testkit import metric, sample_png

from diffprompt.service.memory import available_bytes, batch_cap, rss_bytes

MB = 2**20


def test_batch_cap_fits_the_extra_items_in_the_budget():
    # 1000 MB free, 60% usable, 100 MB per item: 6 more items beyond the 2 warmed
    assert batch_cap(100 * MB, 1000 * MB, 0.6, warmed=2, upper=16) == 8
    assert batch_cap(100 * MB, 1000 * MB, 0.6, warmed=2, upper=4) == 4  # never above max_batch_size
    assert batch_cap(10_000 * MB, 1000 * MB, 0.6, warmed=2, upper=16) == 2  # never below what already ran
    assert batch_cap(10_000 * MB, 1000 * MB, 0.6, warmed=1, upper=16) == 1
    assert batch_cap(100 * MB, None, 0.6, warmed=2, upper=16) == 16  # nothing known: the configured maximum


def test_this_machine_reports_its_memory():
    rss, free = rss_bytes(), available_bytes()
    assert rss is not None and 10 * MB < rss < 64 * 1024 * MB
    assert free is not None and free > 0


@pytest.mark.slow
def test_a_tight_memory_budget_caps_the_batch(start_server):
    """With almost no memory granted per batch, the server caps batches at the 2 it warmed up, and says so."""
    srv = start_server(memory_fraction=1e-9, max_batch_size=16, max_wait_ms=200)
    ready = srv.client.get("/readyz").json()
    assert ready["model"]["max_batch_size"] == 2

    results = []
    threads = [threading.Thread(target=lambda i=i: results.append(srv.ground(sample_png(), "the blue star", seed=i)))
               for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 6 and all(r.status_code == 200 for r in results)
    samples = srv.metrics()
    batches = metric(samples, "diffprompt_batch_size_count")
    assert batches >= 3 and metric(samples, "diffprompt_batch_size_bucket", le="2.0") == batches


@pytest.mark.slow
def test_a_roomy_budget_keeps_max_batch_size(start_server):
    srv = start_server(max_batch_size=8)
    assert srv.client.get("/readyz").json()["model"]["max_batch_size"] == 8
