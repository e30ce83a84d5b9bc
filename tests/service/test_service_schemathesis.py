"""Property-based API test: schemathesis generates requests from the live OpenAPI schema (bounded).

Runs the schemathesis CLI (examples, coverage and fuzzing phases, positive and negative data,
fixed seed, 25 examples per operation) against the real server. Checks: no 5xx for any generated
input, and every documented response matches its schema. (The CLI rather than the pytest plugin:
schemathesis' `from_fixture` does not run under pytest 9.)
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("schemathesis", reason="schemathesis is part of the dev extra")
from service_testkit import metric  # noqa: E402


@pytest.mark.slow
def test_api_never_5xx_and_matches_its_schema(server, tmp_path):
    before = server.metrics()
    report_path = tmp_path / "schemathesis.json"
    command = [sys.executable, "-m", "schemathesis.cli", "run", f"{server.url}/openapi.json",
               "--checks", "not_a_server_error,response_schema_conformance",
               "--phases", "examples,coverage,fuzzing", "--mode", "all", "--max-examples", "25", "--seed", "0",
               "--workers", "1", "--generation-database", "none", "--request-timeout", "60",
               "--suppress-health-check", "all", "--no-color",
               "--report", "json", "--report-json-path", str(report_path)]
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    output = proc.stdout[-8000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, output
    report = json.loads(report_path.read_text())
    assert report["complete"] and report["failures"] == [] and report["errors"] == [], output
    assert report["operations"]["tested"] == 4  # /v1/ground, /livez, /readyz, /metrics
    assert report["test_cases"]["generated"] >= 50
    after = server.metrics()
    ground_200 = metric(after, "diffprompt_request_duration_seconds_count", route="/v1/ground", status="200")
    assert ground_200 > metric(before, "diffprompt_request_duration_seconds_count", route="/v1/ground", status="200")
    statuses = {dict(labels)["status"] for (name, labels) in after
                if name == "diffprompt_request_duration_seconds_count"}
    assert not any(s.startswith("5") for s in statuses), statuses
