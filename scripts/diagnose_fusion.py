"""Diagnostic: what each part of a Diff-Prompt pipeline knows, and how their scores combine (val by default).

For every expression of a split it computes, once, the frozen foundation's unprompted box logits and
boxes and the DiT pointer head's log-probability per patch (= per box: box p is predicted by patch p),
and for each sampling seed the prompted foundation's logits and boxes at `--steps` DDIM steps, under a
seed policy:

- `service`: every expression gets the raw seed (what `POST /v1/ground` does with its `seed` field);
- `expression`: seed `sample_seed(seed, sample id)` (what `diffprompt evaluate` did by default).

It prints R@1 per expression kind of: the foundation; the pointer ranking (the foundation's boxes ranked
by the pointer alone: no diffusion, no prompts); the foundation's boxes ranked by foundation logit +
w * pointer log-prob (no diffusion); the pipeline (prompted logits); the pipeline fused with the pointer
(prompted logit + w * pointer log-prob, `DiffPromptPipeline.pointer_weight`) for each w of `--weights`;
and, per row, the share of expressions whose top-1 box agrees across all the seeds (IoU >= 0.5 with
seed 0's top box).

    python scripts/diagnose_fusion.py --pipeline checkpoints/diffprompt --steps 5 --seeds 0 1 2 3 4 --split val

`--write DIR` then writes a pipeline directory with the weight of the highest R@1 (mean over the seeds;
choose on val only): the learner's files copied from `--pipeline`, and its pipeline.json with
`pointer_weight` (the no-match calibration is not copied: it no longer fits the fused scores, refit
it with `diffprompt calibrate`).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch

from diffprompt.cli import run
from diffprompt.training.data.mdetr import load_split
from diffprompt.training.evaluation.fusion import agreement, by_kind, choose_pointer_weight, collect, fused_r1, r1
from diffprompt.training.models.diffprompt import PIPELINE_FILE, DiffPromptPipeline, write_pipeline_file
from diffprompt.training.options import SEED_POLICIES, add_image_root_arg


def write_fused(source: Path, out: Path, weight: float) -> None:
    """A copy of the pipeline directory `source` (learner files only) whose pipeline.json has `pointer_weight`."""
    spec = json.loads((source / PIPELINE_FILE).read_text())
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors", "training_summary.json"):
        if (source / name).exists():
            shutil.copy2(source / name, out / name)
    component = lambda key: (source / spec[key]).resolve() if spec.get(key) else None
    write_pipeline_file(out, component("foundation"), component("mask_vae"), component("prompt_dit"),
                        pointer_weight=weight)


def _cell(values: list[float]) -> str:
    return f"{np.mean(values):.2f}" + (f" ± {np.std(values, ddof=1):.2f}" if len(values) > 1 else "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", default="checkpoints/diffprompt")
    p.add_argument("--data-dir", default="data/synthetic")
    p.add_argument("--split", default="val")
    add_image_root_arg(p)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--policy", choices=SEED_POLICIES, default="service")
    p.add_argument("--weights", type=float, nargs="+", default=[0.25, 0.5, 1, 2, 4])
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--save", default=None, help="also write the collected arrays (.npz)")
    p.add_argument("--load", default=None, help="score arrays saved by --save instead of running the pipeline "
                   "(the same --pipeline, --split, --steps, --seeds and --policy)")
    p.add_argument("--write", default=None, help="write the pipeline with the best weight of --weights here")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    pipeline = DiffPromptPipeline.from_pretrained(args.pipeline, steps=args.steps)
    samples = load_split(Path(args.data_dir) / f"{args.split}.json", args.image_root, args.limit)
    d = dict(np.load(args.load)) if args.load else collect(pipeline, samples, args.seeds, args.policy)
    if len(d["kind"]) != len(samples) or d["prompted_logits"].shape[1] != len(args.seeds):
        raise SystemExit(f"{args.load}: {d['prompted_logits'].shape[:2]} (expressions, seeds), expected "
                         f"({len(samples)}, {len(args.seeds)})")
    if args.save:
        np.savez_compressed(args.save, **d)
    kinds, S = d["kind"], len(args.seeds)
    rows = [("frozen foundation", [r1(d["base_correct"], d["base_logits"])], None),
            ("pointer ranking (no diffusion, no prompts)", [r1(d["base_correct"], d["pointer"])], None)]
    rows += [(f"foundation + {w:g} x pointer (no diffusion)",
              [r1(d["base_correct"], d["base_logits"] + w * d["pointer"])], None) for w in args.weights]
    for w in [0.0, *args.weights]:
        score = d["prompted_logits"] + w * d["pointer"][:, None]  # (N, S, P)
        label = "pipeline" if w == 0 else f"pipeline + {w:g} x pointer"
        rows.append((label, [r1(d["prompted_correct"][:, s], score[:, s]) for s in range(S)],
                     agreement(d["prompted_boxes"], score)))
    print(f"{args.pipeline} on {args.split} ({len(samples)} expressions), {args.steps} DDIM steps, "
          f"seeds {args.seeds}, policy {args.policy}: R@1 mean over seeds (± std where it varies)")
    names = sorted(set(kinds))
    print("| ranking | " + " | ".join(names) + " | all | top-1 agrees over seeds |")
    print("|---|" + "---|" * (len(names) + 2))
    for label, hits, agree in rows:
        per = [by_kind(h, kinds) for h in hits]
        print(f"| {label} | " + " | ".join(_cell([x[k] for x in per]) for k in [*names, "all"]) + " | "
              + ("-" if agree is None else f"{100 * agree.mean():.2f}") + " |")
    if args.write:
        best = choose_pointer_weight(d, args.weights)
        write_fused(Path(args.pipeline), Path(args.write), best)
        print(f"wrote {args.write} with pointer_weight {best:g} (R@1 {100 * fused_r1(d, best):.2f} on {args.split})")


if __name__ == "__main__":  # a user mistake (missing file, bad option) is one `error:` line, status 2
    raise SystemExit(run(lambda _: main(), None))
