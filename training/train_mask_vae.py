"""Stage 1: train the Mask-VAE on the masks of referred objects.

Official Diff-Prompt recipe: loss = MSE + 3.8e-4 * KL, Adam lr 5e-3, lr x 0.95 per epoch, one
mask per referred object. Masks are randomly flipped left-right and shifted inside the frame.
Reports the reconstruction IoU (decoded logits > 0 against the mask) on val.

    diffprompt train-vae --output checkpoints/mask_vae
    torchrun --nproc_per_node 2 -m diffprompt.training.train_mask_vae --output checkpoints/mask_vae
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from diffprompt.core.image_spec import ImageSpec
from diffprompt.training.data.mdetr import load_mdetr
from diffprompt.training.data.rec_arrays import load_rec_arrays
from diffprompt.training.models.mask_vae import (
    MASK_VAE_PRESETS,
    build_mask_vae,
    decode_latents,
    mask_iou,
    masks_to_vae_input,
)
from diffprompt.training.rec_data import add_rec_data_args, add_runtime_args, rec_split_paths
from diffprompt.training.utils.checkpoint import save_checkpoint
from diffprompt.training.utils.distributed import all_reduce_mean, barrier, cleanup, init_distributed
from diffprompt.training.utils.runs import get_logger, new_run_dir


def augment(masks: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Random left-right flip and a random shift that keeps every mask inside the frame."""
    out = torch.zeros_like(masks)
    m = masks.shape[-1]
    for i, mk in enumerate(masks):
        if rng.random() < 0.5:
            mk = mk.flip(-1)
        ys, xs = torch.nonzero(mk, as_tuple=True)
        if len(ys) == 0:
            continue
        dy = int(rng.integers(-int(ys.min()), m - int(ys.max())))
        dx = int(rng.integers(-int(xs.min()), m - int(xs.max())))
        out[i] = torch.roll(mk, shifts=(dy, dx), dims=(0, 1))
    return out


class VAEStep(torch.nn.Module):
    """Reconstruction forward as one module for DDP: (reconstruction logits, KL per sample)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, generator: torch.Generator):
        posterior = self.vae.encode(x).latent_dist
        z = posterior.sample(generator)
        return self.vae.decode(z).sample, posterior.kl()


@torch.no_grad()
def reconstruction_iou(vae, masks: torch.Tensor, batch_size: int = 256) -> float:
    """Mean IoU of decode(encode(mask)) > 0 against the mask, posterior mean latents."""
    vae.eval()
    ious = []
    for lo in range(0, len(masks), batch_size):
        mk = masks[lo: lo + batch_size]
        z = vae.encode(masks_to_vae_input(mk)).latent_dist.mean * vae.config.scaling_factor
        ious.append(mask_iou(decode_latents(vae, z)[:, 0] > 0, mk))
    return float(torch.cat(ious).mean())


@torch.no_grad()
def latent_std(vae, masks: torch.Tensor, batch_size: int = 256) -> float:
    zs = [vae.encode(masks_to_vae_input(masks[lo: lo + batch_size])).latent_dist.mean
          for lo in range(0, len(masks), batch_size)]
    return float(torch.cat(zs).std())


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    info = init_distributed(args.device)
    run_dir = new_run_dir(args.run_root, "mask_vae") if info.is_main else None
    log = get_logger("train_vae", run_dir, info.is_main)
    torch.manual_seed(args.seed)
    vae = build_mask_vae(args.preset).to(info.device)
    m = vae.config.sample_size
    spec = ImageSpec.from_config(argparse.Namespace(image_size=args.image_size, image_mean=(0, 0, 0),
                                                    image_std=(1, 1, 1), resize_mode=args.resize_mode))
    train_json, val_json = rec_split_paths(args, info, log)
    train = load_rec_arrays(load_mdetr(train_json), spec, m, with_pixels=False, progress=args.progress).masks
    val = load_rec_arrays(list(load_mdetr(val_json))[: args.val_limit], spec, m, with_pixels=False,
                          progress=args.progress).masks
    n_params = sum(p.numel() for p in vae.parameters())
    log.info(f"run {run_dir}: {len(train)} train masks, {len(val)} val masks, {m}x{m}, "
             f"{n_params / 1e3:.0f}k parameters, world size {info.world_size}")

    step_module = VAEStep(vae)
    if info.world_size > 1:
        step_module = DistributedDataParallel(step_module)
    optimizer = torch.optim.Adam(vae.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=args.lr_decay)
    per_epoch = max(1, len(train) // (args.batch_size * info.world_size))
    rng = np.random.default_rng([args.seed, info.rank])
    generator = torch.Generator(info.device).manual_seed(args.seed * 1000 + info.rank)
    t0 = time.time()
    bar = tqdm(total=args.epochs * per_epoch, desc="mask-vae", unit="step",
               disable=not info.is_main or not args.progress)
    for epoch in range(args.epochs):
        order = np.random.default_rng([args.seed, epoch]).permutation(len(train))
        vae.train()
        for within in range(per_epoch):
            lo = (within * info.world_size + info.rank) * args.batch_size
            x = masks_to_vae_input(augment(train[order[lo: lo + args.batch_size]], rng)).to(info.device)
            recon, kl = step_module(x, generator)
            mse = torch.nn.functional.mse_loss(recon, x)
            loss = mse + args.kl_weight * kl.mean() / x[0].numel()  # KL per pixel, as MSE is
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.update()
            if args.progress and info.is_main:
                bar.set_postfix(mse=f"{mse.item():.4f}", epoch=epoch)
        scheduler.step()
        mse_mean = all_reduce_mean(mse.item(), info)  # a collective: every rank calls it
        if info.is_main and ((epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs):
            log.info(f"epoch {epoch + 1}/{args.epochs} mse {mse_mean:.4f} "
                     f"val reconstruction IoU {reconstruction_iou(vae, val):.4f} ({time.time() - t0:.0f}s)")
        barrier(info)
    bar.close()

    summary = {}
    if info.is_main:
        vae.eval()
        vae.register_to_config(scaling_factor=1.0 / latent_std(vae, train))
        iou = reconstruction_iou(vae, val)
        save_checkpoint(Path(args.output), vae.save_pretrained, None, None)
        summary = {"val_reconstruction_iou": iou, "seconds": time.time() - t0, "parameters": n_params,
                   "scaling_factor": vae.config.scaling_factor, "run_dir": str(run_dir)}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        log.info(f"done in {summary['seconds'] / 60:.1f} min: val reconstruction IoU {iou:.4f}, "
                 f"latent scaling factor {vae.config.scaling_factor:.3f}, saved to {args.output}")
    del step_module  # the DDP wrapper holds the process group: drop it before leaving (see cleanup)
    cleanup(info)
    return summary


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_rec_data_args(p)
    p.add_argument("--preset", default="embedded", choices=sorted(MASK_VAE_PRESETS))
    p.add_argument("--image-size", type=int, default=128, help="the grounding model's input square, px")
    p.add_argument("--resize-mode", default="pad", choices=["pad", "stretch"])
    p.add_argument("--output", default="checkpoints/mask_vae")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--lr-decay", type=float, default=0.95, help="lr factor per epoch")
    p.add_argument("--kl-weight", type=float, default=3.8e-4)
    p.add_argument("--eval-every", type=int, default=2, help="epochs")
    p.add_argument("--seed", type=int, default=0)
    add_runtime_args(p)
    return p


if __name__ == "__main__":
    main(build_parser().parse_args())
