"""Load-test the grounding service with and without micro-batching, on loopback, in one command.

    python benchmarks/load_service.py --artifact artifacts/diffprompt-5steps --out runs/load_service.json

Starts the real server (`python -m diffprompt.service`, one process) twice on a free 127.0.0.1 port: once with
batching on (max_batch_size 16, max_wait_ms 5) and once with it off (max_batch_size 1). For each,
it drives POST /v1/ground (multipart, a 128 x 128 sample PNG, varying expressions and seeds) from
`concurrency` closed-loop clients (1, 8 and 32 by default) until `--requests` have been answered or
`--duration` seconds have passed, whichever comes first, and reports throughput (answered requests
per second of wall time) and p50 / p99 latency (ms, client side). Prints one side-by-side table and
the batching speed-up at the highest concurrency; `--out` writes everything as JSON, including the
top box of every answer (`answers`) and, per mode, the requests sent next to the number the
server's own `diffprompt_request_duration_seconds_count` counted (`requests`). The exit status is 1
if any request failed or the two counts differ.

The load generator runs on the same machine: on a small CPU it competes with the server, so read
the numbers as relative (batching on vs off), not as the server's capacity.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "service" / "static" / "samples" / "squares.png"
EXPRESSIONS = ["the blue star", "the second square from the left", "the orange circle", "the small purple square",
               "the star left of the blue square", "the rightmost shape"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m diffprompt.service` on a free loopback port with the given DIFFPROMPT_* settings."""

    def __init__(self, artifact: Path, log_path: Path, **settings: object):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFPROMPT_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        settings = {"artifact_dir": artifact, "host": "127.0.0.1", "port": self.port, "access_log": False,
                    "log_level": "warning", **settings}
        env.update({f"DIFFPROMPT_{k.upper()}": json.dumps(v) if isinstance(v, bool | list) else str(v)
                    for k, v in settings.items()})
        self.log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "diffprompt.service"], cwd=REPO, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=5) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise SystemExit(f"the server exited with {self.proc.returncode}; see {self.log.name}")
                try:
                    if client.get("/readyz").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        self.stop()
        raise SystemExit(f"the server was not ready within {timeout} s; see {self.log.name}")

    def ground_requests_counted(self, timeout: float = 30.0) -> int:
        """POST /v1/ground requests the server counted, every status (its request histogram's _count),
        read once nothing is in flight (a request is counted just after its answer is written)."""
        deadline = time.monotonic() + timeout
        while True:
            text = httpx.get(self.url + "/metrics", timeout=30).text
            samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
            in_flight = sum(s.value for s in samples if s.name == "diffprompt_requests_in_flight")
            if in_flight == 0 or time.monotonic() > deadline:
                return int(sum(s.value for s in samples if s.name == "diffprompt_request_duration_seconds_count"
                               and s.labels.get("route") == "/v1/ground"))
            time.sleep(0.05)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.log.close()
        return code


async def drive(url: str, image: bytes, concurrency: int, requests: int, duration: float) -> dict:
    """`concurrency` closed-loop clients until `requests` answers or `duration` s; latency stats in ms,
    and the top box of each answer (`answers`: expression, seed, score, xyxy)."""
    latencies: list[float] = []
    answers: list[dict] = []
    errors: dict[str, int] = {}
    issued = 0
    stop_at = time.perf_counter() + duration
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def client_loop(client: httpx.AsyncClient, worker: int) -> None:
        nonlocal issued
        while issued < requests and time.perf_counter() < stop_at:
            i = issued
            issued += 1
            expression = EXPRESSIONS[i % len(EXPRESSIONS)]
            data = {"expression": expression, "seed": str(i), "top_k": "5"}
            start = time.perf_counter()
            try:
                r = await client.post("/v1/ground", files={"image": ("sample.png", image, "image/png")}, data=data)
                key = None if r.status_code == 200 else f"{r.status_code} {r.json()['error']['code']}"
            except httpx.HTTPError as e:
                key = type(e).__name__
            if key is None:
                latencies.append((time.perf_counter() - start) * 1000.0)
                top = r.json()["boxes"][0]
                answers.append({"expression": expression, "seed": i, "score": top["score"], "xyxy": top["xyxy"]})
            else:
                errors[key] = errors.get(key, 0) + 1

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client, w) for w in range(concurrency)))
        wall = time.perf_counter() - started
    lat = np.asarray(latencies)
    return {"concurrency": concurrency, "ok": len(latencies), "errors": errors, "sent": issued, "seconds": wall,
            "throughput_rps": len(latencies) / wall if wall > 0 else 0.0,
            "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
            "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None, "answers": answers}


def run_mode(name: str, args: argparse.Namespace, image: bytes, log_dir: Path,
             **settings: object) -> tuple[list[dict], dict]:
    """The cells of one mode, and {"sent", "server_counted"}: POST /v1/ground requests sent (warm-up
    included) and the number the server's request histogram counted, scraped before it stops."""
    extra = {"intra_op_threads": args.threads} if args.threads is not None else {}
    server = Server(args.artifact, log_dir / f"server-{name.replace(' ', '-')}.log",
                    max_queue=max(256, 2 * max(args.concurrency)),
                    request_timeout_s=300, **extra, **settings)
    try:
        server.wait_ready()
        warm = asyncio.run(drive(server.url, image, 2, 4, 60.0))  # warm the connection pool and caches
        cells = []
        for c in args.concurrency:
            cell = asyncio.run(drive(server.url, image, c, args.requests, args.duration))
            cells.append(cell)
            print(f"  {name:>12}  concurrency {c:>3}: {cell['ok']} ok in {cell['seconds']:.1f} s", flush=True)
        requests = {"sent": warm["sent"] + sum(c["sent"] for c in cells),
                    "server_counted": server.ground_requests_counted()}
        print(f"  {name:>12}  requests sent {requests['sent']}, counted by the server {requests['server_counted']}",
              flush=True)
        return cells, requests
    finally:
        server.stop()


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(off: list[dict], on: list[dict]) -> str:
    head = ("| concurrency | off: req/s | off: p50 ms | off: p99 ms | on: req/s | on: p50 ms | on: p99 ms "
            "| speed-up |")
    lines = [head, "|" + "---|" * 8]
    for a, b in zip(off, on):
        speedup = b["throughput_rps"] / a["throughput_rps"] if a["throughput_rps"] else None
        lines.append(f"| {a['concurrency']} | {_fmt(a['throughput_rps'])} | {_fmt(a['p50_ms'])} | "
                     f"{_fmt(a['p99_ms'])} | {_fmt(b['throughput_rps'])} | {_fmt(b['p50_ms'])} | "
                     f"{_fmt(b['p99_ms'])} | {_fmt(speedup, 2)}x |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    args.artifact = Path(args.artifact).resolve()
    if not (args.artifact / "manifest.json").is_file():
        raise SystemExit(f"{args.artifact}: not an exported artifact (no manifest.json)")
    image = SAMPLE.read_bytes()
    log_dir = Path(args.out).resolve().parent if args.out else REPO / "runs"
    log_dir.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((args.artifact / "manifest.json").read_text())
    print(f"{manifest.get('model_version')} ({manifest.get('ddim_steps')} DDIM steps), "
          f"{args.requests} requests or {args.duration} s per cell, concurrency {args.concurrency}", flush=True)
    on, on_requests = run_mode("batching on", args, image, log_dir, max_batch_size=args.max_batch_size,
                               max_wait_ms=args.max_wait_ms)
    off, off_requests = run_mode("batching off", args, image, log_dir, max_batch_size=1, max_wait_ms=0)
    top = max(args.concurrency)
    a, b = off[args.concurrency.index(top)], on[args.concurrency.index(top)]
    speedup = b["throughput_rps"] / a["throughput_rps"] if a["throughput_rps"] else None
    print()
    print(table(off, on))
    print(f"\nbatching speed-up at concurrency {top}: {_fmt(speedup, 2)}x "
          f"(max_batch_size {args.max_batch_size}, max_wait_ms {args.max_wait_ms} vs max_batch_size 1)")
    result = {"artifact": str(args.artifact), "model_version": manifest.get("model_version"),
              "ddim_steps": manifest.get("ddim_steps"), "requests_per_cell": args.requests,
              "duration_s_per_cell": args.duration, "batching": {"max_batch_size": args.max_batch_size,
                                                                 "max_wait_ms": args.max_wait_ms},
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version()},
              "batching_on": on, "batching_off": off, "speedup_at_max_concurrency": speedup,
              "max_concurrency": top, "requests": {"batching_on": on_requests, "batching_off": off_requests}}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    errors = sum(sum(c["errors"].values()) for c in on + off)
    miscounted = [r for r in (on_requests, off_requests) if r["sent"] != r["server_counted"]]
    return 0 if errors == 0 and not miscounted else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", default="artifacts/diffprompt-5steps", help="exported artifact directory")
    p.add_argument("--requests", type=int, default=200, help="requests per (mode, concurrency) cell")
    p.add_argument("--duration", type=float, default=30.0, help="longest run per cell, seconds")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="closed-loop clients per cell")
    p.add_argument("--max-batch-size", type=int, default=16, help="batching on: max_batch_size")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="batching on: max_wait_ms")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all cores)")
    p.add_argument("--out", default=None, help="write the results as JSON here (server logs go beside it)")
    return p


if __name__ == "__main__":
    raise SystemExit(main(build_parser().parse_args()))
