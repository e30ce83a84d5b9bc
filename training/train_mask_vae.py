"""Stage 1: train the Mask-VAE on the masks of referred objects.

Official Diff-Prompt recipe: loss = MSE + 3.8e-4 * KL, Adam lr 5e-3, lr x 0.95 per epoch, one
mask per referred object. Masks are randomly flipped left-right and shifted inside the frame.
Reports the reconstruction IoU (decoded logits > 0 against the mask) on val.

    diffprompt train-vae                                   # -> runs/mask_vae (~3 min on 2 cores)
    diffprompt train-vae --epochs 1 --val-limit 100        # a quicker look
    torchrun --nproc_per_node 2 -m diffprompt.training.train_mask_vae --output runs/mask_vae_ddp
"""

from __future__ import annotations

import argparse

from diffprompt.training.options import add_data_args, add_run_args
from diffprompt.training.utils.resume import add_resume_args

PRESETS = ("baby", "embedded")  # = models.mask_vae.MASK_VAE_PRESETS (tests/training/test_cli)


def main(args: argparse.Namespace) -> dict:
    from diffprompt.training.stages import mask_vae

    return mask_vae.main(args)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(p)
    p.add_argument("--preset", default="embedded", choices=PRESETS)
    p.add_argument("--image-size", type=int, default=128, help="the grounding model's input square, px")
    p.add_argument("--resize-mode", default="pad", choices=["pad", "stretch"])
    add_run_args(p, output="runs/mask_vae")
    add_resume_args(p, save_every=500)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--lr-decay", type=float, default=0.95, help="lr factor per epoch")
    p.add_argument("--kl-weight", type=float, default=3.8e-4)
    p.add_argument("--eval-every", type=int, default=2, help="epochs")
    return p


if __name__ == "__main__":
    main(build_parser().parse_args())
