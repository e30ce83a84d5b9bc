"""Helpers for the tests marked `image`: the real Docker engine, images and containers that
`bash deploy/local-engine.sh run` (make test IMAGE_TESTS=1) built and named in DEPLOY_* variables.

Every container, network and compose project a test creates carries a random name and is removed by it.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
import uuid
from pathlib import Path

import httpx

DOCKER = os.environ.get("DEPLOY_DOCKER", "docker")
# Image IDs (sha256:...) of what this run built, so a concurrent run retagging diffprompt:cpu changes nothing here.
SERVING_IMAGE = os.environ.get("DEPLOY_SERVING_IMAGE", "")
SERVING_TAG = os.environ.get("DEPLOY_SERVING_TAG", SERVING_IMAGE)
PROMETHEUS_IMAGE = os.environ.get("DEPLOY_PROMETHEUS_IMAGE", "")

# What the image tests measured, printed at the end of the run (tests/deploy/conftest.py).
REPORT: dict[str, str] = {}


def docker(*args: str, check: bool = True, timeout: float = 180, env: dict | None = None
           ) -> subprocess.CompletedProcess:
    proc = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} -> {proc.returncode}\n"
                             f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return proc


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class Network:
    """A user-defined bridge network (the engine runs without a default bridge: deploy/local-engine.sh)."""

    def __init__(self) -> None:
        self.name = unique("diffprompt-test")

    def __enter__(self) -> Network:
        docker("network", "create", self.name)
        return self

    def __exit__(self, *exc) -> None:
        docker("network", "rm", self.name, check=False)


class Container:
    """`docker run -d` of an image on a network, its port 8000 published on a random loopback port."""

    def __init__(self, image: str, network: str, *env: str):
        self.image, self.network, self.env = image, network, env
        self.name = unique("diffprompt-test")
        self.started_at = 0.0
        self.ready_seconds = math.nan
        self.client: httpx.Client | None = None

    def __enter__(self) -> Container:
        return self

    def __exit__(self, *exc) -> None:
        if self.client is not None:
            self.client.close()
        docker("rm", "--force", "--volumes", self.name, check=False)

    def start(self) -> Container:
        args = ["run", "--detach", "--name", self.name, "--network", self.network, "--publish", "127.0.0.1::8000"]
        for item in self.env:
            args += ["--env", item]
        self.started_at = time.monotonic()
        docker(*args, self.image)
        host_port = docker("port", self.name, "8000/tcp").stdout.split()[0]
        self.client = httpx.Client(base_url=f"http://{host_port}", timeout=120)
        return self

    def state(self) -> dict:
        return json.loads(docker("inspect", "--format", "{{json .State}}", self.name).stdout)

    def logs(self) -> str:
        proc = docker("logs", self.name, check=False)
        return (proc.stdout + proc.stderr)[-6000:]

    def wait_ready(self, timeout: float = 300) -> Container:
        """Poll /readyz until 200; the time since `docker run` is the start time."""
        assert self.client is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.state()["Running"]:
                raise AssertionError(f"container exited ({self.state()}):\n{self.logs()}")
            try:
                if self.client.get("/readyz", timeout=5).status_code == 200:
                    self.ready_seconds = time.monotonic() - self.started_at
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"not ready after {timeout} s:\n{self.logs()}")

    def exec(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        return docker("exec", self.name, *argv, check=check)


def image_size_bytes(image: str) -> int:
    return int(docker("image", "inspect", "--format", "{{.Size}}", image).stdout.strip())


def compose(project: str, compose_file: Path, *args: str, env: dict[str, str], timeout: float = 600
            ) -> subprocess.CompletedProcess:
    """docker-compose (Debian's v1) on one file as project `project`; fails with its output."""
    from deploy_testkit import REPO, tool

    exe = tool("docker-compose")
    assert exe, "docker-compose is not installed (scripts/ensure_system_tools.sh installs it)"
    full_env = {**{k: v for k, v in os.environ.items() if not k.startswith(("DIFFPROMPT_", "COMPOSE_"))}, **env}
    if os.path.isabs(DOCKER):  # the client deploy/local-engine.sh picked, for compose's own calls of `docker`
        full_env["PATH"] = f"{os.path.dirname(DOCKER)}:{full_env['PATH']}"
    proc = subprocess.run([exe, "--project-name", project, "--file", str(compose_file), *args], cwd=REPO,
                          env=full_env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"docker-compose {' '.join(args)} -> {proc.returncode}\n{proc.stdout[-4000:]}"
                             f"{proc.stderr[-4000:]}")
    return proc
