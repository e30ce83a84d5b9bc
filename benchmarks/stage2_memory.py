"""Peak resident memory of the training stages' data path: it must not grow with the data.

    python -m benchmarks.stage2_memory --work /tmp/s2mem                     # stage 2: 1k vs 8k expressions
    python -m benchmarks.stage2_memory --work /tmp/s2mem --owlvit            # + stage 2, OWL-ViT 768 px, 1024 expr.
    python -m benchmarks.stage2_memory --work /tmp/s2mem --owlv2-stage3      # + stage 3, OWLv2 B/16 960 px

Every measurement runs `diffprompt train-dit` / `train-prompts` in its own subprocess, with the
annotations in a folder apart from the images (`--image-root`) and a fresh cache directory, so
each run computes the frozen foundation's outputs itself. Reported per run: the command's own peak
RSS (`wait4`'s ru_maxrss) and the peak of its whole process tree (DataLoader workers included,
sampled from /proc every 0.2 s; shared pages count once per process, so this over-counts).

1. Stage 2 with the embedded default (128 px) on the first 1000 and on 8000 synthetic train
   expressions: conditions for the split, then `--steps` DiT steps. The ratio of the two peaks
   should be ~1 (it was ~8x the pixels' bytes when every image was decoded up front).
2. `--owlvit`: stage 2 with a random `transformers` OWL-ViT B/32 (768 px, 2 layers per tower,
   base widths) on 1024 expressions; the target is < 4 GB.
3. `--owlv2-stage3`: stage 3 (Diff-Prompt) with a random full-size OWLv2 B/16 (960 px, 12 + 12
   layers) at the default effective batch of 32 through 16 micro-batches of 2 with gradient
   checkpointing, one optimizer step; the target is < 8 GB. This one takes minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def tree_rss_mb(root: int) -> float:
    """Sum of VmRSS over `root` and its descendants, MB."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            pass
    return total


def measure(argv: list[str], log: Path) -> dict:
    """Run `python -m diffprompt.cli ARGV`; its peak RSS (MB), its tree's sampled peak (MB), seconds."""
    t0 = time.time()
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "diffprompt.cli", *argv], stdout=out, stderr=subprocess.STDOUT,
                                cwd=REPO)
        peak_tree = [0.0]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak_tree[0] = max(peak_tree[0], tree_rss_mb(proc.pid))
                done.wait(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        done.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:1])} failed ({proc.returncode}); see {log}")
    return {"peak_rss_mb": usage.ru_maxrss / 1024, "peak_tree_rss_mb": peak_tree[0], "seconds": time.time() - t0}


def ensure_data(work: Path) -> Path:
    """The synthetic train and val splits under work/data (written if missing)."""
    data = work / "data"
    for split in ("train", "val"):
        if not (data / f"{split}.json").exists():
            subprocess.run([sys.executable, "-m", "diffprompt.cli", "data", "write", "--split", split, "--out",
                            str(data), "--no-progress"], check=True, cwd=REPO)
    return data


def subset(data: Path, split: str, n: int, out: Path) -> Path:
    """The first n expressions of `split` as a json of its own under `out` (apart from the images)."""
    d = json.loads((data / f"{split}.json").read_text())
    if len(d["images"]) < n:
        raise SystemExit(f"{data / split}.json has {len(d['images'])} expressions, fewer than {n}")
    d["images"] = d["images"][:n]
    kept = {e["id"] for e in d["images"]}
    d["annotations"] = [a for a in d["annotations"] if a["image_id"] in kept]
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{split}_{n}.json"
    path.write_text(json.dumps(d))
    return path


def stage2(work: Path, name: str, foundation: str, train: Path, val: Path, image_root: Path, steps: int,
           extra: list[str]) -> dict:
    return measure(["train-dit", "--foundation", foundation, "--mask-vae", str(REPO / "checkpoints/mask_vae"),
                    "--train-json", str(train), "--val-json", str(val), "--image-root", str(image_root),
                    "--steps", str(steps), "--eval-every", str(steps), "--eval-steps", "5",
                    "--cache-dir", str(work / "cache" / name), "--run-root", str(work / "runs"),
                    "--output", str(work / "out" / name), "--overwrite", "--no-progress", *extra],
                   work / f"{name}.log")


class Results(dict):
    """{run: numbers}, rewritten to `path` (merged with what is there) after every run: a long benchmark
    stopped half way keeps what it measured."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    def __setitem__(self, key: str, value: dict) -> None:
        super().__setitem__(key, value)
        old = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.path.write_text(json.dumps({**old, **self}, indent=2))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="data, caches, outputs and logs go here")
    p.add_argument("--sizes", type=int, nargs=2, default=[1000, 8000], help="the two train split sizes")
    p.add_argument("--steps", type=int, default=20, help="stage-2 DiT steps after the conditions")
    p.add_argument("--threads", type=int, default=2, help="torch threads of each run")
    p.add_argument("--owlvit", action="store_true", help="also stage 2 on a 768 px OWL-ViT, 1024 expressions")
    p.add_argument("--owlv2-stage3", action="store_true", help="also stage 3 on a full-size OWLv2 B/16 (minutes)")
    p.add_argument("--stage3-batch", type=int, default=32,
                   help="stage 3's batch (= train expressions: one optimizer step), in micro-batches of 2")
    p.add_argument("--skip-stage2", action="store_true", help="only the --owlvit / --owlv2-stage3 runs")
    args = p.parse_args(argv)
    work = args.work.absolute()
    data = ensure_data(work)
    annotations = work / "annotations"
    val = subset(data, "val", 64, annotations)
    rows = Results(work / "stage2_memory.json")
    for n in [] if args.skip_stage2 else args.sizes:
        rows[f"stage 2, embedded default, {n} expressions"] = stage2(
            work, f"embedded_{n}", str(REPO / "checkpoints/foundation"), subset(data, "train", n, annotations), val,
            data, args.steps, ["--threads", str(args.threads)])
    if args.owlvit:
        from benchmarks.owl_scale import build_random_owl_foundation

        owl = work / "owlvit_2layers"
        if not (owl / "config.json").exists():
            build_random_owl_foundation(owl, "owlvit", layers=2)
        rows["stage 2, OWL-ViT B/32 768 px 2 layers, 1024 expressions"] = stage2(
            work, "owlvit_1024", str(owl), subset(data, "train", 1024, annotations),
            subset(data, "val", 32, annotations), data, 5,
            ["--cache-dtype", "float16", "--frozen-batch-size", "16", "--threads", str(args.threads)])
    if args.owlv2_stage3:
        from benchmarks.owl_scale import build_random_owl_pipeline

        root = work / "owlv2"
        if not (root / "diffprompt" / "pipeline.json").exists():
            build_random_owl_pipeline(root, "owlv2")
        name = f"stage 3, OWLv2 B/16 960 px, batch {args.stage3_batch} = {args.stage3_batch // 2} x 2, checkpointing"
        rows[name] = measure(
            ["train-prompts", "--method", "diffprompt", "--foundation", str(root / "foundation"),
             "--mask-vae", str(root / "vae"), "--prompt-dit", str(root / "dit"),
             "--train-json", str(subset(data, "train", args.stage3_batch, annotations)),
             "--val-json", str(subset(data, "val", 32, annotations)), "--image-root", str(data),
             "--epochs", "1", "--batch-size", str(args.stage3_batch), "--micro-batch-size", "2",
             "--gradient-checkpointing",
             "--frozen-batch-size", "2", "--ddim-steps", "5", "--eval-every", "0", "--precision", "fp32",
             "--cache-dir", str(work / "cache" / "owlv2_stage3"), "--run-root", str(work / "runs"),
             "--output", str(work / "out" / "owlv2_stage3"), "--overwrite", "--no-progress",
             "--threads", str(args.threads)],
            work / "owlv2_stage3.log")
    print("| run | peak RSS (MB) | peak RSS with workers (MB) | seconds |\n|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['peak_rss_mb']:.0f} | {r['peak_tree_rss_mb']:.0f} | {r['seconds']:.0f} |")
    if not args.skip_stage2:
        small, large = (rows[f"stage 2, embedded default, {n} expressions"] for n in args.sizes)
        ratio = large["peak_rss_mb"] / small["peak_rss_mb"]
        print(f"\nstage 2, {args.sizes[1]} vs {args.sizes[0]} expressions: peak RSS x{ratio:.2f} "
              f"(data x{args.sizes[1] / args.sizes[0]:.0f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
