"""Deploy fixtures: a tiny exported artifact and a real server on it (the service tests' testkit), and the
report of the image tests (size, start time) at the end of the run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))  # service_testkit

from service_testkit import ServerProcess  # noqa: E402


@pytest.fixture(scope="session")
def deploy_artifact(tiny_pipeline_dir, tmp_path_factory) -> Path:
    """A Diff-Prompt artifact with random weights and 3 DDIM steps, exported like `diffprompt export`."""
    from diffprompt.model_export.export import build_parser, main

    out = tmp_path_factory.mktemp("deploy_artifacts")
    args = ["--pipeline", str(tiny_pipeline_dir), "--out", str(out), "--name", "tiny", "--steps", "3",
            "--threads", "1", "--no-progress"]
    assert main(build_parser().parse_args(args)) == 0
    return out / "tiny-3steps"


@pytest.fixture(scope="session")
def live_server(deploy_artifact, tmp_path_factory):
    """`python -m diffprompt.service` on the tiny artifact (CPU), ready; stopped with SIGTERM at the end."""
    srv = ServerProcess(deploy_artifact, tmp_path_factory.mktemp("deploy_server"), max_batch_size=4,
                        max_wait_ms=5).start().wait_ready()
    yield srv
    assert srv.stop() == 0, srv.log()


def pytest_terminal_summary(terminalreporter):
    from image_testkit import REPORT

    if REPORT:
        terminalreporter.section("deploy images (tests marked `image`)")
        for key, value in REPORT.items():
            terminalreporter.write_line(f"{key}: {value}")
