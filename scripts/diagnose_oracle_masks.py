"""Diagnostic: Diff-Prompt's stage 3 with ground-truth masks instead of generated ones.

An upper bound for a perfect prompt generator: every prompted layer gets the referred object's
true mask (as +-4 logits). Trains exactly like `diffprompt train-prompts --method diffprompt`,
then scores val (first 300 expressions; `DIAGNOSE_SPLITS="val testA testB"` for the test splits
too, to report, never to choose) with the true masks.

    python scripts/diagnose_oracle_masks.py --method diffprompt --output /tmp/dp_oracle --eval-every 0
"""

import os
import sys
import tempfile

import torch

import diffprompt.training.stages.prompts as stage3
import diffprompt.training.train_prompts as tp
from diffprompt.cli import run
from diffprompt.core.boxes import boxes_to_pixels
from diffprompt.training.data.mdetr import load_split
from diffprompt.training.data.rec_arrays import load_rec_arrays
from diffprompt.training.evaluation.metrics import RecallAccumulator, ranked_by_score
from diffprompt.training.models.diffprompt import DiffPromptPipeline
from diffprompt.training.models.mask_vae import masks_to_vae_input
from diffprompt.training.models.prompt_learners import prompted_forward


def oracle_masks(data, n):
    return (masks_to_vae_input(data.masks) * 4.0)[:, None].expand(-1, n, -1, -1, -1).half()


def main() -> None:
    stage3.generated_masks = lambda pipeline, data, *_, **__: iter(
        [{"masks": oracle_masks(data, pipeline.learner.mask_layers).numpy()}])
    args = tp.build_parser().parse_args(sys.argv[1:])
    with tempfile.TemporaryDirectory() as cache:  # the oracle's masks must not land in the sampled masks' cache
        args.mask_cache = cache
        tp.main(args)
    p = DiffPromptPipeline.from_pretrained(args.output)
    for split in os.environ.get("DIAGNOSE_SPLITS", "val").split():
        samples = load_split(f"{args.data_dir}/{split}.json", args.image_root, 300)
        data = load_rec_arrays(samples, p.image_spec, p.learner.config.mask_size, progress=False)
        ids, mask = (torch.from_numpy(a) for a in p.tokenizer([s.expression for s in samples]))
        masks = oracle_masks(data, p.learner.mask_layers).float()
        acc = RecallAccumulator(ks=(1, 5))
        with torch.no_grad():
            for lo, pixels in zip(range(0, len(samples), 64), data.pixel_batches(data.sequential_batches(64))):
                sl = slice(lo, lo + 64)
                out = prompted_forward(p.foundation, p.learner, pixels, ids[sl], mask[sl], masks[sl])
                scores, boxes = torch.sigmoid(out.logits[..., 0]).numpy(), out.pred_boxes.numpy()
                for j, s in enumerate(samples[sl]):
                    px = boxes_to_pixels(boxes[j], s.width, s.height, p.image_spec.resize_mode)
                    acc.add(ranked_by_score(px, scores[j])[0], s.boxes, group=s.kind)
        print(f"{split}: oracle-mask R@1 {acc.summary()[-1]['R@1']:.4f}", flush=True)


if __name__ == "__main__":  # a user mistake (missing file, bad option) is one `error:` line, status 2
    raise SystemExit(run(lambda _: main(), None))
