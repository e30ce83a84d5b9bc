"""benchmarks/load_service.py runs end to end on the tiny artifact (few requests; speed is not asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from service_testkit import REPO


@pytest.mark.slow
def test_load_benchmark_runs_both_modes(tiny_artifact, tmp_path):
    out = tmp_path / "load.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "load_service.py"), "--artifact",
                           str(tiny_artifact), "--requests", "16", "--duration", "20", "--threads", "1",
                           "--out", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "batching speed-up at concurrency 32" in proc.stdout
    assert "| concurrency | off: req/s" in proc.stdout
    result = json.loads(out.read_text())
    for mode in ("batching_on", "batching_off"):
        assert [c["concurrency"] for c in result[mode]] == [1, 8, 32]
        for cell in result[mode]:
            assert cell["ok"] == 16 and cell["errors"] == {}
            assert cell["throughput_rps"] > 0 and 0 < cell["p50_ms"] <= cell["p99_ms"]
    assert result["speedup_at_max_concurrency"] > 0
    assert (tmp_path / "server-batching-on.log").exists() and (tmp_path / "server-batching-off.log").exists()
