"""Serve a random full-size OWLv2 B/16 (960 px) artifact with DEFAULT settings and fire concurrent requests.

    python -m benchmarks.owl_serving --work /tmp/owl_serving            # builds + exports if missing
    python -m benchmarks.owl_serving --artifact /tmp/owlv2art/diffprompt-5steps

What a user on a CPU machine gets out of the box: `python -m diffprompt.service` (one process, on a
free loopback port) with no DIFFPROMPT_* setting but the artifact, host and port (and the log
level, to keep the start-up lines that say the batch cap and timeout). Prints:

- warm-up: seconds from process start to /readyz 200, and the batch cap / request timeout the
  server chose (service/engine.py sizes both from what it measured);
- peak RSS of the server (VmHWM from /proc, MB) after warm-up and after the requests;
- `--requests` concurrent POST /v1/ground (a 640 x 480 PNG, non-square) sent at once: status
  codes, client-side latency p50 / max (s), and whether every box lies inside 640 x 480;
- whether the server was still alive at the end (exit code after SIGTERM; -9 = killed).

Without --artifact, a random OWLv2 pipeline is built under --work (benchmarks/owl_scale.py,
nothing downloaded) and exported with 5 DDIM steps. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from benchmarks.load_service import REPO, Server

WIDTH, HEIGHT = 640, 480


def peak_rss_mb(pid: int) -> float:
    """VmHWM (peak resident set) of a live process, MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def sample_png() -> bytes:
    """A 640 x 480 RGB image: gradients plus a few coloured rectangles."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    img = np.stack([x * 255 // WIDTH, y * 255 // HEIGHT, np.full_like(x, 96)], axis=-1).astype(np.uint8)
    for _ in range(5):
        x0, y0 = rng.integers(0, WIDTH - 100), rng.integers(0, HEIGHT - 100)
        img[y0:y0 + 80, x0:x0 + 90] = rng.integers(0, 256, 3)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def build_artifact(work: Path) -> Path:
    """Random OWLv2 B/16 pipeline under `work` (if missing), exported with 5 DDIM steps."""
    artifact = work / "artifacts" / "diffprompt-5steps"
    if (artifact / "manifest.json").is_file():
        return artifact
    if not (work / "diffprompt" / "pipeline.json").is_file():
        subprocess.run([sys.executable, "-m", "benchmarks.owl_scale", "--family", "owlv2", "--out", str(work)],
                       cwd=REPO, check=True)
    subprocess.run([sys.executable, "-m", "diffprompt.cli", "export", "--pipeline", str(work / "diffprompt"),
                    "--steps", "5", "--out", str(work / "artifacts"), "--no-progress"], cwd=REPO, check=True)
    return artifact


async def fire(url: str, image: bytes, n: int, timeout_s: float) -> list[tuple[int, float, list]]:
    """`n` requests sent at once -> (status, seconds, boxes) each."""
    async def one(client: httpx.AsyncClient, i: int) -> tuple[int, float, list]:
        start = time.perf_counter()
        r = await client.post("/v1/ground", files={"image": ("owl.png", image, "image/png")},
                              data={"expression": f"the object number {i}", "seed": str(i)})
        seconds = time.perf_counter() - start
        boxes = [b["xyxy"] for b in r.json()["boxes"]] if r.status_code == 200 else []
        return r.status_code, seconds, boxes

    async with httpx.AsyncClient(base_url=url, timeout=timeout_s) as client:
        return await asyncio.gather(*(one(client, i) for i in range(n)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", type=Path, default=None, help="an exported artifact (default: build one)")
    p.add_argument("--work", type=Path, default=Path("/tmp/owl_serving"), help="where to build it")
    p.add_argument("--requests", type=int, default=8, help="concurrent requests, sent at once")
    p.add_argument("--ready-timeout", type=float, default=3600.0, help="seconds to wait for /readyz")
    args = p.parse_args(argv)

    artifact = args.artifact or build_artifact(args.work)
    log_path = (args.work if args.artifact is None else Path("/tmp")) / "owl_serving_server.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    server = Server(artifact, log_path, log_level="info")  # every other setting: the default
    try:
        server.wait_ready(args.ready_timeout)
        warmup_s = time.perf_counter() - start
        model = httpx.get(server.url + "/readyz", timeout=30).json()["model"]
        rss_ready = peak_rss_mb(server.proc.pid)
        print(f"artifact {artifact}")
        print(f"ready after {warmup_s:.1f} s; max_batch_size {model['max_batch_size']}, "
              f"request_timeout_s {model['request_timeout_s']}; peak RSS {rss_ready:.0f} MB")
        start = time.perf_counter()
        results = asyncio.run(fire(server.url, sample_png(), args.requests, args.ready_timeout))
        wall = time.perf_counter() - start
        rss_end = peak_rss_mb(server.proc.pid)
    finally:
        code = server.stop()
    statuses = [s for s, _, _ in results]
    seconds = np.array([t for _, t, _ in results])
    boxes = np.array([b for _, _, bs in results for b in bs], dtype=np.float64).reshape(-1, 4)
    inside = bool(len(boxes)) and bool(np.all((boxes >= 0) & (boxes <= [WIDTH, HEIGHT, WIDTH, HEIGHT])))
    print(f"{args.requests} concurrent requests ({WIDTH}x{HEIGHT} PNG): statuses {sorted(statuses)}; "
          f"latency p50 {np.median(seconds):.1f} s, max {seconds.max():.1f} s; all answered in {wall:.1f} s")
    print(f"{len(boxes)} boxes, all inside {WIDTH}x{HEIGHT}: {inside}")
    print(f"server peak RSS {rss_end:.0f} MB; exit code after SIGTERM {code} (-9 = killed)")
    print(f"server log: {log_path}")
    return 0 if all(s == 200 for s in statuses) and code == 0 and inside else 1


if __name__ == "__main__":
    raise SystemExit(main())
