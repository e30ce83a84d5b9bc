"""`diffprompt serve`, the installed command: it serves without torch; a bad artifact or setting: one line, exit 2."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from service_testkit import free_port, sample_png

DIFFPROMPT = Path(sys.executable).with_name("diffprompt")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFPROMPT_")}
    env.update({"OMP_NUM_THREADS": "1", "DIFFPROMPT_INTRA_OP_THREADS": "1", "DIFFPROMPT_ACCESS_LOG": "false"})
    return env


def _user_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert all(n in lines[0] for n in needles), lines[0]


def test_serve_refuses_a_missing_or_altered_artifact_in_one_line(tiny_artifact, tmp_path):
    run = lambda *args: subprocess.run([str(DIFFPROMPT), "serve", *args], cwd=tmp_path, env=_env(),
                                       capture_output=True, text=True, timeout=120)
    _user_error(run("--artifact", str(tmp_path / "nope")), "invalid service settings", "artifact_dir",
                "manifest.json")
    _user_error(run("--artifact", str(tiny_artifact), "--providers", "cpu,quantum"), "providers")
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_artifact, damaged)
    (damaged / "tokenizer.json").write_text("{}")
    _user_error(run("--artifact", str(damaged), "--providers", "cpu"), "tokenizer.json")


def test_serve_serves_the_artifact_without_torch(tiny_artifact, tmp_path):
    port = free_port()
    proc = subprocess.Popen([str(DIFFPROMPT), "serve", "--artifact", str(tiny_artifact), "--port", str(port),
                             "--providers", "cpu", "--log-level", "warning"], cwd=tmp_path, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                assert proc.poll() is None, proc.stdout.read()
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
            r = client.post("/v1/ground", files={"image": ("image", sample_png())}, data={"expression": "the star"})
            assert r.status_code == 200, r.text
            assert 0.0 <= r.json()["no_match"] <= 1.0
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        assert "libtorch" not in maps and "onnxruntime" in maps  # what the process has loaded
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    assert code == 0, proc.stdout.read()
