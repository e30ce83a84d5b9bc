"""Diagnostic: does a trained Diff-Prompt pipeline use its generated masks?

Splits the expressions of a split by whether the generated mask is on the referred object
(the shallowest layer's mask, the final DDIM output, has its highest logit inside the true
mask: `hit`), and reports R@1 of the prompted pipeline and of the frozen foundation on each
part. A pipeline that reads its masks gains most where they hit; one that ignores them gains
the same (or nothing) on both parts. Masks are sampled with per-expression seeds (`--seed`, as
`diffprompt evaluate --seed-policy expression`).

    python scripts/diagnose_stage3.py --pipeline checkpoints/diffprompt --split val
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from diffprompt.cli import run
from diffprompt.core.boxes import boxes_to_pixels
from diffprompt.training.data.mdetr import load_split
from diffprompt.training.data.rec_arrays import load_rec_arrays
from diffprompt.training.evaluation.metrics import RecallAccumulator, ranked_by_score
from diffprompt.training.evaluation.rec import sample_seed
from diffprompt.training.models.diffprompt import DiffPromptPipeline
from diffprompt.training.models.prompt_learners import prompted_forward
from diffprompt.training.options import add_image_root_arg


def top1_hits(output, samples, spec) -> list[bool]:
    """R@1 (IoU >= 0.5) of each sample's top-scored box."""
    scores, boxes = output.logits[..., 0].numpy(), output.pred_boxes.numpy()
    acc = RecallAccumulator(ks=(1,))
    return [acc.add(ranked_by_score(boxes_to_pixels(boxes[j], s.width, s.height, spec.resize_mode), scores[j])[0],
                    s.boxes, group=s.kind)["R@1"] for j, s in enumerate(samples)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", default="checkpoints/diffprompt")
    p.add_argument("--data-dir", default="data/synthetic")
    p.add_argument("--split", nargs="+", default=["val"], help="choices are read off val; test splits only to report")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--seed", type=int, default=0, help="evaluation seed (as `diffprompt evaluate --seed`)")
    p.add_argument("--threads", type=int, default=2)
    add_image_root_arg(p)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pipeline = DiffPromptPipeline.from_pretrained(args.pipeline, steps=args.steps)
    if pipeline.learner is None or not pipeline.learner.needs_masks:
        raise SystemExit(f"{args.pipeline} is not a Diff-Prompt pipeline (it generates no masks)")
    spec, m = pipeline.image_spec, pipeline.learner.config.mask_size
    print(f"{args.pipeline}: mask input {pipeline.learner.config.mask_input}, {args.steps} DDIM steps")
    print("| split | part | n | share | prompted R@1 | foundation R@1 |\n|---|---|---|---|---|---|")
    for split in args.split:
        samples = load_split(f"{args.data_dir}/{split}.json", args.image_root)
        data = load_rec_arrays(samples, spec, m, progress=False)
        on_target, prompted, frozen = [], [], []
        with torch.no_grad():
            for lo, pixels in zip(range(0, len(samples), 128), data.pixel_batches(data.sequential_batches(128))):
                part = samples[lo: lo + 128]
                ids, mask = (torch.from_numpy(a) for a in pipeline.tokenizer([s.expression for s in part]))
                masks = pipeline.generate_masks(pixels, ids, mask, [sample_seed(args.seed, s.sample_id) for s in part])
                peak = masks[:, 0, 0].flatten(1).argmax(1)  # (B,) the final DDIM output's highest logit
                on_target += data.masks[lo: lo + 128].flatten(1)[torch.arange(len(part)), peak].tolist()
                prompted += top1_hits(prompted_forward(pipeline.foundation, pipeline.learner, pixels, ids, mask, masks),
                                      part, spec)
                frozen += top1_hits(pipeline.foundation(pixels, ids, mask), part, spec)
        hit, prompted, frozen = np.array(on_target), np.array(prompted, float), np.array(frozen, float)
        for name, sel in (("mask on target", hit), ("mask elsewhere", ~hit), ("all", np.ones_like(hit))):
            print(f"| {split} | {name} | {sel.sum()} | {100 * sel.mean():.1f}% | {100 * prompted[sel].mean():.2f} | "
                  f"{100 * frozen[sel].mean():.2f} |")


if __name__ == "__main__":  # a user mistake (missing file, bad option) is one `error:` line, status 2
    raise SystemExit(run(lambda _: main(), None))
