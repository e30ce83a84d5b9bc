"""Diagnostic: how well a stage-2 DiT localises the referred object, per expression kind.

For each expression of a split it samples the final DDIM output (seeded as in training's val check),
decodes it with the Mask-VAE and reports, per expression kind:

- `mask IoU`: IoU of the thresholded generated mask with the true mask;
- `hit`: the generated mask's highest-logit pixel lies inside the true mask (is the prompt on the target?);
- `foundation R@1`: the frozen foundation's own top box at IoU >= 0.5, for comparison.

    python scripts/diagnose_dit.py --prompt-dit checkpoints/prompt_dit_tokens --split val --steps 25
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch

from training.data.grounding_dataset import ImageSpec
from training.data.mdetr import load_mdetr
from training.data.rec_arrays import load_rec_arrays
from training.evaluate import load_foundation
from training.evaluation.metrics import RecallAccumulator, ranked_by_score
from training.models.diffprompt import load_dit
from training.models.mask_vae import decode_latents, load_mask_vae, mask_iou
from training.models.preprocess import boxes_to_pixels
from training.models.prompt_sampler import sample_prompt_latents
from training.train_prompt_dit import compute_conditions


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
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    foundation, tokenizer = load_foundation(args.foundation)
    foundation.eval()
    vae = load_mask_vae(args.mask_vae)
    dit, scheduler = load_dit(args.prompt_dit)
    spec = ImageSpec.from_config(foundation.config)
    samples = list(load_mdetr(f"{args.data_dir}/{args.split}.json"))[: args.limit]
    data = load_rec_arrays(samples, spec, vae.config.sample_size, progress=False)
    with torch.no_grad():
        cond = compute_conditions(foundation, tokenizer, data, dit.config.conditioning == "tokens", progress=False)
        stats: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
        foundation_recall = RecallAccumulator(ks=(1,))  # the evaluator's own R@1 (IoU >= 0.5)
        for lo in range(0, len(samples), 128):
            c = {k: v[lo: lo + 128] for k, v in cond.items()}
            seeds = [lo + i for i in range(len(c["image_embed"]))]
            logits = decode_latents(vae, sample_prompt_latents(dit, scheduler, c, seeds, args.steps, depth=1)[:, 0])
            truth = data.masks[lo: lo + 128]
            ious = mask_iou(logits[:, 0] > 0, truth)
            peak = logits[:, 0].flatten(1).argmax(1)
            hits = truth.flatten(1)[torch.arange(len(peak)), peak].float()
            ids, mask = (torch.from_numpy(a) for a in tokenizer([s.expression for s in samples[lo: lo + 128]]))
            out = foundation(data.pixels[lo: lo + 128].float(), ids, mask)
            scores, boxes = out.logits[..., 0].numpy(), out.pred_boxes.numpy()  # (B, P), (B, P, 4)
            for j, s in enumerate(samples[lo: lo + 128]):
                px = boxes_to_pixels(boxes[j], s.width, s.height, spec.resize_mode)
                r1 = foundation_recall.add(ranked_by_score(px, scores[j])[0], s.boxes, group=s.kind)["R@1"]
                stats[s.kind].append((float(ious[j]), float(hits[j]), float(r1)))
    stats["all"] = [v for vs in list(stats.values()) for v in vs]
    print(f"{args.prompt_dit} on {args.split} ({len(samples)} expressions, {args.steps} DDIM steps)")
    print("| kind | n | mask IoU | hit | foundation R@1 |\n|---|---|---|---|---|")
    for kind, vs in sorted(stats.items(), key=lambda kv: kv[0] == "all"):
        t = torch.tensor(vs).mean(0)
        print(f"| {kind} | {len(vs)} | {t[0]:.4f} | {100 * t[1]:.2f} | {100 * t[2]:.2f} |")


if __name__ == "__main__":
    main()
