"""Service fixtures: tiny exported artifacts and real servers (uvicorn subprocesses on free loopback ports)."""

from __future__ import annotations

from pathlib import Path

import pytest
from service_testkit import ServerProcess


def _export(pipeline: Path, out: Path, *extra: str) -> None:
    from diffprompt.model_export.export import build_parser, main

    args = ["--pipeline", str(pipeline), "--out", str(out), "--name", "tiny", "--threads", "1", "--no-progress"]
    assert main(build_parser().parse_args(args + list(extra))) == 0


@pytest.fixture(scope="session")
def tiny_artifact(calibrated_pipeline_dir, tmp_path_factory) -> Path:
    """A Diff-Prompt artifact with random weights, 3 DDIM steps, and a no-match calibration with random
    weights (shapes and plumbing are real)."""
    out = tmp_path_factory.mktemp("service_artifacts")
    _export(calibrated_pipeline_dir, out, "--steps", "3")
    return out / "tiny-3steps"


@pytest.fixture(scope="session")
def foundation_artifact(tiny_pipeline_dir, tmp_path_factory) -> Path:
    """A foundation-only artifact (no diffusion, no mask)."""
    out = tmp_path_factory.mktemp("service_foundation")
    _export((tiny_pipeline_dir / ".." / "foundation").resolve(), out)
    return out / "tiny"


# The settings most tests share: small limits, so limit tests need small payloads only.
TEST_LIMITS = {"max_body_bytes": 1_000_000, "max_image_pixels": 1_000_000, "max_expression_chars": 64,
               "max_batch_size": 8, "max_wait_ms": 10}


@pytest.fixture(scope="session")
def server(tiny_artifact, tmp_path_factory):
    """The default server (batching on, no API key), shared by the tests that do not change settings."""
    srv = ServerProcess(tiny_artifact, tmp_path_factory.mktemp("server"), **TEST_LIMITS).start().wait_ready()
    yield srv
    assert srv.stop() == 0, srv.log()
    assert srv.report()["torch_imported"] is False, srv.report()


@pytest.fixture
def start_server(tiny_artifact, tmp_path):
    """Factory: start a server with extra settings; stopped (SIGTERM) after the test."""
    servers: list[ServerProcess] = []

    def start(artifact: Path | None = None, wait: bool = True, **settings: object) -> ServerProcess:
        srv = ServerProcess(artifact or tiny_artifact, tmp_path / f"server{len(servers)}", **settings).start()
        servers.append(srv)
        return srv.wait_ready() if wait else srv

    yield start
    for srv in servers:
        srv.stop()
