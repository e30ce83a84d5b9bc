"""Diagnostic: how well a stage-2 DiT localises the referred object, per expression kind.

For each expression of a split it samples the final DDIM output (seeded as in training's val check),
decodes it with the Mask-VAE and reports, per expression kind:

- `mask IoU`: IoU of the thresholded generated mask with the true mask;
- `hit`: the generated mask's highest-logit pixel lies inside the true mask (is the prompt on the target?);
- `foundation R@1`: the frozen foundation's own top box at IoU >= 0.5, for comparison;
- `mask-ranked R@1`: the foundation's boxes ranked by the generated mask's logit at each box
  centre instead of by the foundation's score (does the mask know which box is referred?);
- `pointer R@1` (DiTs with a pointer head): the boxes ranked by the pointer's logit of the patch
  that predicted them.

    python scripts/diagnose_dit.py --prompt-dit checkpoints/prompt_dit_tokens --split val --steps 25
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch

from diffprompt.cli import run
from diffprompt.core.boxes import boxes_to_pixels
from diffprompt.core.image_spec import ImageSpec
from diffprompt.training.data.mdetr import load_split
from diffprompt.training.data.rec_arrays import load_rec_arrays
from diffprompt.training.evaluation.metrics import RecallAccumulator, ranked_by_score
from diffprompt.training.models.diffprompt import load_dit, load_foundation
from diffprompt.training.models.mask_vae import MaskVAE, decode_latents, mask_iou
from diffprompt.training.models.prompt_sampler import sample_prompt_latents
from diffprompt.training.options import add_image_root_arg
from diffprompt.training.stages.prompt_dit import compute_conditions


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt-dit", default="checkpoints/prompt_dit_tokens")
    p.add_argument("--foundation", default="checkpoints/foundation")
    p.add_argument("--mask-vae", default="checkpoints/mask_vae")
    p.add_argument("--data-dir", default="data/synthetic")
    p.add_argument("--split", default="val")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    add_image_root_arg(p)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    foundation, tokenizer = load_foundation(args.foundation)
    foundation.eval()
    vae = MaskVAE.from_pretrained(args.mask_vae)
    dit, scheduler = load_dit(args.prompt_dit)
    spec = ImageSpec.from_config(foundation.config)
    samples = load_split(f"{args.data_dir}/{args.split}.json", args.image_root, args.limit)
    data = load_rec_arrays(samples, spec, vae.config.sample_size, progress=False)
    with torch.no_grad():
        batches = data.sequential_batches(128)
        conds = compute_conditions(foundation, tokenizer, data, dit.config.conditioning == "tokens", batch_size=128,
                                   progress=False, layers=dit.config.condition_layers)
        stats: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
        recall = RecallAccumulator(ks=(1,))  # the evaluator's own R@1 (IoU >= 0.5)
        for idx, c, pixels in zip(batches, conds, data.pixel_batches(batches)):
            lo = int(idx[0])
            c = {k: torch.from_numpy(v) for k, v in c.items()}
            seeds = [lo + i for i in range(len(c["image_embed"]))]
            logits = decode_latents(vae, sample_prompt_latents(dit, scheduler, c, seeds, args.steps, depth=1)[:, 0])
            truth = data.masks[lo: lo + 128]
            ious = mask_iou(logits[:, 0] > 0, truth)
            peak = logits[:, 0].flatten(1).argmax(1)
            hits = truth.flatten(1)[torch.arange(len(peak)), peak].float()
            ids, mask = (torch.from_numpy(a) for a in tokenizer([s.expression for s in samples[lo: lo + 128]]))
            out = foundation(pixels, ids, mask)
            scores, boxes = out.logits[..., 0].numpy(), out.pred_boxes.numpy()  # (B, P), (B, P, 4)
            m = logits.shape[-1]  # the mask logit under each box centre (cxcywh in [0, 1])
            col = (out.pred_boxes[..., 0] * m).long().clamp(0, m - 1)
            row = (out.pred_boxes[..., 1] * m).long().clamp(0, m - 1)
            at_centre = torch.gather(logits[:, 0].flatten(1), 1, row * m + col).numpy()  # (B, P)
            pointer = dit.prepare_conditions(**c)["pointer_logits"] if dit.pointer else None
            for j, s in enumerate(samples[lo: lo + 128]):
                px = boxes_to_pixels(boxes[j], s.width, s.height, spec.resize_mode)
                r1 = [recall.add(ranked_by_score(px, ranking)[0], s.boxes, group=s.kind)["R@1"]
                      for ranking in (scores[j], at_centre[j], None if pointer is None else pointer[j].numpy())
                      if ranking is not None]
                stats[s.kind].append((float(ious[j]), float(hits[j]), *map(float, r1)))
    stats["all"] = [v for vs in list(stats.values()) for v in vs]
    print(f"{args.prompt_dit} on {args.split} ({len(samples)} expressions, {args.steps} DDIM steps)")
    columns = ["mask IoU", "hit", "foundation R@1", "mask-ranked R@1"] + (["pointer R@1"] if dit.pointer else [])
    print("| kind | n | " + " | ".join(columns) + " |")
    print("|" + "---|" * (len(columns) + 2))
    for kind, vs in sorted(stats.items(), key=lambda kv: kv[0] == "all"):
        t = torch.tensor(vs).mean(0)
        cells = [f"{t[0]:.4f}"] + [f"{100 * v:.2f}" for v in t[1:]]
        print(f"| {kind} | {len(vs)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":  # a user mistake (missing file, bad option) is one `error:` line, status 2
    raise SystemExit(run(lambda _: main(), None))
