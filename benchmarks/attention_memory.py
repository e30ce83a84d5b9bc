"""Peak memory and latency of the OWLv2 B/16 960 px vision tower in onnxruntime: plain vs fused attention.

    python -m benchmarks.attention_memory --work /tmp/attention_memory      # 2 layers, batch 1 and 2

Builds a random OWLv2 B/16 foundation (benchmarks/owl_scale.py: base width 768, 12 heads, 960 px,
60 x 60 patches + CLS = 3601 tokens; nothing downloaded) with `--layers` layers per tower (default
2: the attention peak is per layer, so more layers add latency, not peak), and exports its vision
tower (pixel_values -> last hidden state) twice: `--attention plain` (MatMul + Softmax) and
`--attention fused` (com.microsoft::MultiHeadAttention, model_export/fused_attention.py).

Each (attention, batch) cell then runs in a fresh subprocess with the service's session options
(diffprompt.core.providers.session_options: all graph optimisations, the shared CPU arena,
`--threads` intra-op threads): VmHWM (peak resident set, /proc) after the session is created and
after a first run; their difference divided by the batch is the memory a batch item costs. Then
`--runs` timed runs give the median latency. Prints one markdown table. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = ("plain", "fused")


def peak_rss_mb() -> float:
    """VmHWM (peak resident set) of this process, MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def export_vision_towers(work: Path, layers: int) -> dict[str, Path]:
    """A random OWLv2 B/16 foundation under `work`, its vision tower exported once per attention mode."""
    import torch

    from benchmarks.owl_scale import build_random_owl_foundation
    from diffprompt.model_export.graphs import export_onnx
    from diffprompt.training.models.grounding import load_grounding_model

    paths = {mode: work / f"vision-{layers}layers-{mode}.onnx" for mode in MODES}
    if all(p.is_file() for p in paths.values()):
        return paths
    foundation_dir = work / f"owlv2-{layers}layers"
    if not (foundation_dir / "config.json").is_file():
        build_random_owl_foundation(foundation_dir, "owlv2", layers=layers)
    foundation = load_grounding_model(foundation_dir).eval()
    size = foundation.config.image_size
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    for mode, path in paths.items():
        export_onnx(foundation.vision_model, (pixels,), path, ["pixel_values"], ["hidden"], attention=mode)
    return paths


def measure(path: Path, batch: int, threads: int, runs: int) -> dict:
    """One cell, in this process: peak RSS after loading and after one run (MB), median latency (s)."""
    import numpy as np
    import onnxruntime as ort

    from diffprompt.core.providers import CPU_PROVIDER, ProviderConfig, session_options

    options = session_options(ProviderConfig(preferred=("cpu",), intra_op_threads=threads))
    session = ort.InferenceSession(str(path), options, providers=[CPU_PROVIDER])
    size = session.get_inputs()[0].shape[-1]
    pixels = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
    loaded = peak_rss_mb()
    out = session.run(None, {"pixel_values": pixels})[0]
    first = peak_rss_mb()
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {"pixel_values": pixels})
        seconds.append(time.perf_counter() - start)
    return {"loaded_mb": loaded, "peak_mb": first, "latency_s": statistics.median(seconds),
            "checksum": float(np.abs(out).mean())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/attention_memory"))
    p.add_argument("--layers", type=int, default=2, help="vision layers (the peak is per layer)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2])
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    p.add_argument("--runs", type=int, default=3, help="timed runs per cell (after the measured first run)")
    p.add_argument("--cell", nargs=2, metavar=("GRAPH", "BATCH"), help=argparse.SUPPRESS)  # internal: one cell
    args = p.parse_args(argv)

    if args.cell:
        print(json.dumps(measure(Path(args.cell[0]), int(args.cell[1]), args.threads, args.runs)))
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    paths = export_vision_towers(args.work, args.layers)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    rows = {}
    for batch in args.batches:
        for mode in MODES:
            done = subprocess.run([sys.executable, "-m", "benchmarks.attention_memory", "--cell", str(paths[mode]),
                                   str(batch), "--threads", str(args.threads), "--runs", str(args.runs)],
                                  cwd=REPO, env=env, check=True, capture_output=True, text=True)
            rows[mode, batch] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{mode} batch {batch}: {rows[mode, batch]}", file=sys.stderr)
    print(f"OWLv2 B/16 vision tower, 960 px (3601 tokens, 12 heads), {args.layers} layers, onnxruntime CPU, "
          f"{args.threads} threads, median of {args.runs} runs")
    print("| attention | batch | peak RSS MB | RSS growth per item MB | latency s | latency per item s |")
    print("|---|---|---|---|---|---|")
    for batch in args.batches:
        for mode in MODES:
            r = rows[mode, batch]
            print(f"| {mode} | {batch} | {r['peak_mb']:.0f} | {(r['peak_mb'] - r['loaded_mb']) / batch:.0f} | "
                  f"{r['latency_s']:.2f} | {r['latency_s'] / batch:.2f} |")
    for batch in args.batches:
        a, b = rows["plain", batch], rows["fused", batch]
        same = abs(a["checksum"] - b["checksum"]) <= 1e-4 * max(1.0, abs(a["checksum"]))
        growth = (b["peak_mb"] - b["loaded_mb"]) / (a["peak_mb"] - a["loaded_mb"])
        print(f"batch {batch}: fused / plain peak growth {growth:.2f}x, "
              f"latency {b['latency_s'] / a['latency_s']:.2f}x; outputs agree (mean |hidden|): {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
