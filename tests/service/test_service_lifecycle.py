"""Start-up, readiness and graceful shutdown of the real server process; it never imports torch."""

from __future__ import annotations

import shutil
import signal
import threading

import httpx
import pytest
from service_testkit import ServerProcess, assert_error, ground_slowly, metric, sample_png, wait_until

pytestmark = pytest.mark.slow  # every test starts its own server


def _fire(srv: ServerProcess, n: int, hold_s: float) -> tuple[list[threading.Thread], list]:
    """n concurrent ground requests in threads, each on its own connection and uploading its body
    `hold_s` slowly (`ground_slowly`), so all n are in flight together; results land in the list."""
    results: list = [None] * n

    def run(i: int) -> None:
        with httpx.Client(base_url=srv.url, timeout=60) as client:
            try:
                results[i] = ground_slowly(client, hold_s, seed=i)
            except httpx.HTTPError as e:
                results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return threads, results


def test_not_ready_until_loaded_and_warmed_up(start_server):
    """/readyz is 503 `not_ready` while the (large) warm-up runs, /livez 200 throughout, then ready.
    The probe's 503s are answers, not errors: only the refused ground request is in errors_total."""
    srv = start_server(wait=False, warmup_batch_sizes=[1, 512], max_batch_size=8)
    wait_until(lambda: _status(srv, "/livez") is not None, what="the server to listen")
    first = srv.client.get("/readyz")
    early_ground = srv.ground(sample_png())
    srv.wait_ready()
    assert_error(first, 503, "not_ready")
    assert_error(early_ground, 503, "not_ready")
    assert early_ground.headers["retry-after"] == "1"
    assert srv.client.get("/livez").status_code == 200
    assert srv.ground(sample_png()).status_code == 200
    assert metric(srv.metrics(), "diffprompt_errors_total", reason="not_ready") == 1  # early_ground, not `first`


def _status(srv: ServerProcess, path: str) -> int | None:
    try:
        return srv.client.get(path, timeout=5).status_code
    except httpx.TransportError:
        return None


def test_sigterm_lets_in_flight_requests_finish_then_exits_0(start_server):
    """SIGTERM while 6 requests are in flight (their uploads still arriving): all 6 answer 200, the
    process exits 0, no torch."""
    srv = start_server(max_batch_size=16, max_wait_ms=1500)
    threads, results = _fire(srv, 6, hold_s=3)
    wait_until(lambda: metric(srv.metrics(), "diffprompt_requests_in_flight") == 6, what="6 requests in flight")
    srv.signal(signal.SIGTERM)
    for t in threads:
        t.join(60)
    assert [getattr(r, "status_code", r) for r in results] == [200] * 6
    assert srv.wait_exit() == 0, srv.log()
    report = srv.report()
    assert report["exit_code"] == 0
    assert report["torch_imported"] is False, report["torch_modules"]
    assert "Waiting for connections to close" in srv.log() or "Shutting down" in srv.log()


def test_sigterm_drain_flips_readiness_but_keeps_serving(start_server):
    """With shutdown_drain_s, readiness is 503 `shutting_down` at once while requests are still answered."""
    srv = start_server(max_batch_size=16, max_wait_ms=1000, shutdown_drain_s=3)
    threads, results = _fire(srv, 3, hold_s=2)
    wait_until(lambda: metric(srv.metrics(), "diffprompt_requests_in_flight") == 3, what="3 requests in flight")
    srv.signal(signal.SIGTERM)
    wait_until(lambda: _status(srv, "/readyz") == 503, what="readiness to flip")
    assert_error(srv.client.get("/readyz"), 503, "shutting_down")
    assert metric(srv.metrics(), "diffprompt_errors_total", reason="shutting_down") == 0  # a probe answer
    assert srv.client.get("/livez").status_code == 200
    during = srv.ground(sample_png())  # load balancers may still send a few: they are served
    assert during.status_code == 200, during.text
    for t in threads:
        t.join(60)
    assert [getattr(r, "status_code", r) for r in results] == [200] * 3
    assert srv.wait_exit() == 0, srv.log()
    assert srv.report()["torch_imported"] is False


@pytest.mark.parametrize("settings, message", [
    ({"max_batch_size": 0}, "max_batch_size"),
    ({"providers": "cpu,quantum"}, "providers"),
    ({"artifact_dir": "/nonexistent/artifact"}, "manifest.json"),
])
def test_invalid_settings_fail_before_listening(start_server, settings, message):
    srv = start_server(wait=False, **settings)
    assert srv.wait_exit() == 2
    lines = srv.log().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: invalid service settings") and message in lines[0]


def test_altered_artifact_fails_start_up(start_server, tiny_artifact, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_artifact, damaged)
    data = bytearray((damaged / "denoiser.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (damaged / "denoiser.onnx").write_bytes(bytes(data))
    srv = start_server(artifact=damaged, wait=False)
    assert srv.wait_exit() == 2  # the user's to fix: one line, before anything listens
    assert "error: " in srv.log() and "denoiser.onnx: sha256 differs" in srv.log()
    assert "Traceback" not in srv.log()



def test_a_failed_engine_is_counted_from_the_probes(start_server, tiny_artifact, tmp_path):
    """Loading fails (a graph of the right size but garbage, hashes not checked): both probes answer 503
    engine_failed, and unlike not_ready it counts in errors_total, as the DiffPromptEngineFailed alert needs."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_artifact, broken)
    graph = broken / "grounding.onnx"
    graph.write_bytes(bytes(graph.stat().st_size))
    srv = start_server(artifact=broken, wait=False, check_hashes=False)
    wait_until(lambda: _status(srv, "/livez") == 503, what="the engine to fail")
    assert_error(srv.client.get("/readyz"), 503, "engine_failed")
    assert metric(srv.metrics(), "diffprompt_errors_total", reason="engine_failed") == 2
    assert metric(srv.metrics(), "diffprompt_errors_total", reason="not_ready") == 0
