"""Helpers for the service tests: a real server in a subprocess, metric scraping, test images.

`ServerProcess` runs `python -m diffprompt.service` (through run_server.py, which reports at exit whether
torch was imported) on a free loopback port with DIFFPROMPT_* settings, and talks to it with httpx.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
RUN_SERVER = Path(__file__).with_name("run_server.py")
SAMPLES = REPO / "service" / "static" / "samples"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m diffprompt.service` in a subprocess; `start()`, `wait_ready()`, `client`, `stop()`, `report()`."""

    def __init__(self, artifact: Path, workdir: Path, **settings: object):
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "server.log"
        self.report_path = workdir / "report.json"
        env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFPROMPT_")}
        env.update({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
        defaults = {"artifact_dir": artifact, "providers": "cpu", "intra_op_threads": 1, "preprocess_threads": 1,
                    "host": "127.0.0.1", "port": self.port, "access_log": False}
        for key, value in {**defaults, **settings}.items():
            env[f"DIFFPROMPT_{key.upper()}"] = json.dumps(value) if isinstance(value, list | bool) else str(value)
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.client = httpx.Client(base_url=self.url, timeout=60)
        self.readiness_seen: list[int] = []

    # -- life cycle -------------------------------------------------------------------------------

    def start(self) -> ServerProcess:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        # cwd = workdir, so no stray .env of the repository is read
        self.proc = subprocess.Popen([sys.executable, str(RUN_SERVER), str(self.report_path)], cwd=self.workdir,
                                     env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        return self

    def wait_ready(self, timeout: float = 120.0) -> ServerProcess:
        """Poll /readyz until 200, recording every status seen; fail with the log if the process dies."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                status = self.client.get("/readyz", timeout=5).status_code
            except httpx.TransportError:
                time.sleep(0.01)
                continue
            self.readiness_seen.append(status)
            if status == 200:
                return self
            time.sleep(0.01)
        raise AssertionError(f"server not ready after {timeout} s:\n{self.log()}")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"server did not exit within {timeout} s:\n{self.log()}") from None

    def stop(self) -> int | None:
        """SIGTERM and wait; the exit code (None if it was never started)."""
        self.client.close()
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
        code = self.wait_exit()
        self._log.close()
        return code

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path.exists() else ""

    def report(self) -> dict:
        """What run_server.py wrote at exit: exit_code, torch_imported."""
        return json.loads(self.report_path.read_text())

    # -- requests ---------------------------------------------------------------------------------

    def ground(self, image: bytes, expression: str = "the red circle", client: httpx.Client | None = None,
               headers: dict | None = None, **params: object) -> httpx.Response:
        """POST /v1/ground as multipart."""
        data = {"expression": expression, **{k: json.dumps(v) if isinstance(v, bool) else str(v)
                                              for k, v in params.items()}}
        return (client or self.client).post("/v1/ground", files={"image": ("image", image)}, data=data,
                                            headers=headers)

    def ground_json(self, image: bytes, expression: str = "the red circle", **params: object) -> httpx.Response:
        body = {"image_base64": base64.b64encode(image).decode(), "expression": expression, **params}
        return self.client.post("/v1/ground", json=body)

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """Every sample of /metrics as {(name, sorted label items): value}."""
        response = self.client.get("/metrics")
        assert response.status_code == 200, response.text
        return parse_metrics(response.text)


def parse_metrics(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(samples: dict[tuple[str, tuple], float], name: str, **labels: str) -> float:
    """Sum of the samples named `name` whose labels include `labels` (0 if none)."""
    want = set(labels.items())
    return sum(v for (n, items), v in samples.items() if n == name and want <= set(items))


def wait_until(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    """The response is the one error shape with this status and code; returns the error object."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "detail"}, body
    assert body["error"]["code"] == code, body
    assert body["error"]["message"], body
    return body["error"]


# -- images ---------------------------------------------------------------------------------------

def ground_slowly(client: httpx.Client, hold_s: float, expression: str = "the blue star", seed: int = 0,
                  image: bytes | None = None) -> httpx.Response:
    """POST /v1/ground whose multipart body arrives in two parts `hold_s` apart. The server counts a
    request as in flight from its headers on, so requests sent this way are in flight together
    however the client threads are scheduled (the batcher no longer holds a lone request back, so
    fast requests would otherwise be answered one by one)."""
    boundary = "diffprompt-test-boundary"
    fields = [("expression", expression.encode()), ("seed", str(seed).encode())]
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n'.encode() + v + b"\r\n"
             for k, v in fields]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="image"\r\n'
                 "Content-Type: image/png\r\n\r\n".encode() + (image or sample_png()) + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()

    def slowly():
        yield body[:64]
        time.sleep(hold_s)
        yield body[64:]

    return client.post("/v1/ground", content=slowly(),
                       headers={"content-type": f"multipart/form-data; boundary={boundary}"})


def sample_png(name: str = "squares.png") -> bytes:
    return (SAMPLES / name).read_bytes()


def encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def rgb_image(width: int = 96, height: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def exif_rotated_jpeg(width: int = 96, height: int = 48, orientation: int = 6) -> bytes:
    """A width x height JPEG whose EXIF says 'rotate' (6 = 90 degrees clockwise): upright it is height x width."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(rgb_image(width, height), "JPEG", exif=exif.tobytes(), quality=90)


def png_16bit(width: int = 64, height: int = 48) -> bytes:
    ramp = np.linspace(0, 65535, width * height, dtype=np.float64).reshape(height, width).astype(np.uint16)
    image = Image.fromarray(ramp)  # mode I;16
    data = encode(image, "PNG")
    assert data[24] == 16, "not a 16-bit PNG"  # IHDR bit depth
    return data


def cmyk_jpeg(width: int = 80, height: int = 60) -> bytes:
    return encode(rgb_image(width, height).convert("CMYK"), "JPEG", quality=90)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(side: int = 30_000) -> bytes:
    """A real decompression bomb: a valid 1-bit side x side PNG (side**2 pixels) of ~100 KB, streamed, never in RAM."""
    row = b"\x00" + bytes((side + 7) // 8)  # filter byte + packed zero bits
    compressor, parts = zlib.compressobj(9), []
    for _ in range(side):
        parts.append(compressor.compress(row))
    parts.append(compressor.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")


@contextlib.contextmanager
def prometheus_scraping(prometheus: str, config: Path, server: ServerProcess, workdir: Path) -> Iterator[httpx.Client]:
    """A real Prometheus server on a free loopback port with `config`, while a background thread keeps
    posting /v1/ground to `server` (so the request histograms move between scrapes). Yields an httpx
    client on Prometheus' HTTP API; everything is stopped on exit."""
    port = free_port()
    log = open(workdir / "prometheus.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([prometheus, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            while not stop.is_set():
                server.ground(sample_png(), client=client)
                time.sleep(0.1)

    feeder = threading.Thread(target=traffic)
    feeder.start()
    api = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
    try:
        yield api
    finally:
        stop.set()
        feeder.join(30)
        api.close()
        proc.terminate()
        proc.wait(30)
        log.close()
