"""What the HTTP service adds to the runtime at concurrency 1, side by side, in one command.

    python -m benchmarks.service_overhead --artifact artifacts/diffprompt-5steps --requests 200

Starts the real server (`python -m diffprompt.service`, default settings: batching on) on a free
loopback port and loads the same artifact in this process as a `GroundingRuntime` with the same
onnxruntime settings. Then, alternating one request each so that both see the same machine state:

- runtime: `runtime.ground` on the already decoded and preprocessed sample (inference only);
- service: `POST /v1/ground` of the same PNG, expression and seed (multipart, one keep-alive
  connection), timed at the client: upload, multipart parsing, decoding, batching, inference,
  postprocessing, JSON, download.

Prints p50 / p90 of both and their ratio, and the server's own mean seconds per stage (from
`diffprompt_stage_duration_seconds` on /metrics), so what the ratio is made of can be read off.
Both run on the same CPU; `--threads` sets onnxruntime's intra-op threads for both (default 1),
`--spin-wait` their idle-thread spinning (default off, as the service).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.load_service import SAMPLE, Server
from diffprompt.core.providers import ProviderConfig
from diffprompt.core.runtime import GroundingRuntime

EXPRESSION = "the second square from the left"
SEED = 0


def stage_totals(metrics_text: str) -> dict[str, tuple[float, float]]:
    """{stage: (seconds summed, requests counted)} of `diffprompt_stage_duration_seconds`."""
    totals: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.name in ("diffprompt_stage_duration_seconds_sum", "diffprompt_stage_duration_seconds_count"):
                totals.setdefault(s.labels["stage"], [0.0, 0.0])[s.name.endswith("_count")] = s.value
    return {k: (v[0], v[1]) for k, v in totals.items()}


def stage_means_between(before: str, after: str) -> dict[str, float]:
    """Mean seconds per request of each stage over the requests between two /metrics scrapes."""
    b, a = stage_totals(before), stage_totals(after)
    return {k: (a[k][0] - b.get(k, (0.0, 0.0))[0]) / (a[k][1] - b.get(k, (0.0, 0.0))[1])
            for k in a if a[k][1] > b.get(k, (0.0, 0.0))[1]}


def main(args: argparse.Namespace) -> int:
    artifact = Path(args.artifact).resolve()
    image = SAMPLE.read_bytes()
    spin = args.spin_wait == "on"
    runtime = GroundingRuntime.load(artifact, ProviderConfig(preferred=("cpu",), intra_op_threads=args.threads,
                                                             spin_wait=spin))
    pixels = runtime.manifest.image.preprocess(Image.open(SAMPLE).convert("RGB"))[None]
    ids, mask = runtime.tokenizer([EXPRESSION])
    log_dir = Path(args.log_dir).resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    server = Server(artifact, log_dir / "service_overhead-server.log", intra_op_threads=args.threads, spin_wait=spin)
    runtime_ms: list[float] = []
    service_ms: list[float] = []
    try:
        server.wait_ready()
        data = {"expression": EXPRESSION, "seed": str(SEED), "top_k": "5"}
        with httpx.Client(base_url=server.url, timeout=60) as client:
            def request() -> httpx.Response:
                return client.post("/v1/ground", files={"image": ("sample.png", image, "image/png")}, data=data)

            for _ in range(args.warmup):
                request().raise_for_status()
                runtime.ground(pixels, ids, mask, [SEED])
            before = client.get("/metrics").text
            for _ in range(args.requests):
                start = time.perf_counter()
                runtime.ground(pixels, ids, mask, [SEED])
                runtime_ms.append((time.perf_counter() - start) * 1e3)
                start = time.perf_counter()
                request().raise_for_status()
                service_ms.append((time.perf_counter() - start) * 1e3)
            after = client.get("/metrics").text
    finally:
        server.stop()
    stages = stage_means_between(before, after)  # the measured requests only, not the warm-up
    rt, sv = np.asarray(runtime_ms), np.asarray(service_ms)
    p50_rt, p50_sv = float(np.percentile(rt, 50)), float(np.percentile(sv, 50))
    print(f"{runtime.manifest.model_version} ({runtime.steps} DDIM steps), {args.requests} requests each, "
          f"alternating, onnxruntime intra-op threads {args.threads}, spin-wait {args.spin_wait}")
    print("| path | p50 ms | p90 ms |")
    print("|---|---:|---:|")
    print(f"| runtime.ground (inference only) | {p50_rt:.1f} | {np.percentile(rt, 90):.1f} |")
    print(f"| service, POST /v1/ground | {p50_sv:.1f} | {np.percentile(sv, 90):.1f} |")
    print(f"service p50 / runtime p50: {p50_sv / p50_rt:.2f}x")
    print("server stages, mean ms per request: "
          + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in sorted(stages.items())))
    if args.out:
        Path(args.out).write_text(json.dumps({"runtime_ms": runtime_ms, "service_ms": service_ms,
                                              "ratio_p50": p50_sv / p50_rt, "stages_s": stages}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", default="artifacts/diffprompt-5steps")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads, server and runtime")
    p.add_argument("--spin-wait", choices=["off", "on"], default="off",
                   help="onnxruntime's idle-thread spinning, server and runtime (the service's default: off)")
    p.add_argument("--log-dir", default="runs")
    p.add_argument("--out", default=None, help="also write every latency as JSON here")
    return p


if __name__ == "__main__":
    raise SystemExit(main(build_parser().parse_args()))
