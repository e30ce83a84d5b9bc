"""Stage 0: pretrain the embedded-default foundation on category queries (detection style).

The foundation is an OWL-ViT-style model trained from scratch on the synthetic `pretrain`
split, where every query ("star", "red star", "red shape") refers to all matching objects. It
never sees a referring expression: REC is left to the Diff-Prompt stages, as GLIP is adapted
to RefCOCO in the paper.

Single process (writes the synthetic splits first if they are missing; the best model goes to
runs/foundation unless --output says otherwise):

    diffprompt pretrain
    diffprompt pretrain --output checkpoints/foundation --overwrite    # replace the committed default

Two CPU processes (gloo) or GPUs (NCCL), one or several hosts:

    torchrun --nproc_per_node 2 -m diffprompt.training.pretrain_foundation --output runs/foundation_ddp

Resume an interrupted run from its last checkpoint (its --output holds the best model so far):

    diffprompt pretrain --resume runs/000-foundation/checkpoint-last --overwrite
"""

from __future__ import annotations

import argparse

from diffprompt.training.options import add_data_args, add_precision_arg, add_run_args

PRESETS = ("baby", "embedded", "vit-p16", "vit-p8")  # = models.grounding.GROUNDING_PRESETS (tests/training/test_cli)


def main(args: argparse.Namespace) -> dict:
    from diffprompt.training.stages import foundation

    return foundation.main(args)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(p, train="pretrain (category queries)", val="heldout", val_limit=400)
    p.add_argument("--n-images", type=int, default=None, help="pretrain images to write (default: the split's size)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the synthetic word tokenizer)")
    p.add_argument("--preset", default="embedded", choices=PRESETS)
    add_run_args(p, output="runs/foundation")
    p.add_argument("--resume", default=None, help="a checkpoint-last directory to continue from")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=32, help="images per process per step")
    p.add_argument("--max-queries", type=int, default=48, help="queries per batch, negatives included")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--rank-weight", type=float, default=1.0, help="weight of the per-query patch ranking loss")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--eval-every", type=int, default=1000)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--log-every", type=int, default=100)
    add_precision_arg(p)
    return p


if __name__ == "__main__":
    main(build_parser().parse_args())
