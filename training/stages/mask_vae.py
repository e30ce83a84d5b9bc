"""Stage 1: train the Mask-VAE on the masks of referred objects.

Official Diff-Prompt recipe: loss = MSE + 3.8e-4 * KL, Adam lr 5e-3, lr x 0.95 per epoch, one
mask per referred object. Masks are randomly flipped left-right and shifted inside the frame.
Reports the reconstruction IoU (decoded logits > 0 against the mask) on val, and sets the latent
scaling factor (1 / std of the training latents) before saving. Every --save-every steps a
checkpoint-last that --resume continues, also inside an epoch (training/utils/resume.py).
Options: training/train_mask_vae.py.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from diffprompt.core.image_spec import ImageSpec
from diffprompt.training.data.mdetr import load_mdetr
from diffprompt.training.data.rec_arrays import load_rec_arrays
from diffprompt.training.models.mask_vae import build_mask_vae, decode_latents, mask_iou, masks_to_vae_input
from diffprompt.training.stages.runner import StageRunner, TrainStep, split_paths


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


@torch.no_grad()
def reconstruction_iou(vae, masks: torch.Tensor, batch_size: int = 256) -> float:
    """Mean IoU of decode(encode(mask)) > 0 against the mask, posterior mean latents."""
    vae.eval()
    ious = []
    for lo in range(0, len(masks), batch_size):
        mk = masks[lo: lo + batch_size]
        z = vae.encode(masks_to_vae_input(mk)).mean * vae.config.scaling_factor
        ious.append(mask_iou(decode_latents(vae, z)[:, 0] > 0, mk))
    return float(torch.cat(ious).mean())


@torch.no_grad()
def latent_std(vae, masks: torch.Tensor, batch_size: int = 256) -> float:
    zs = [vae.encode(masks_to_vae_input(masks[lo: lo + batch_size])).mean for lo in range(0, len(masks), batch_size)]
    return float(torch.cat(zs).std())


def main(args: argparse.Namespace) -> dict:
    with StageRunner("mask_vae", args) as run:
        return train(run, args)


def train(run: StageRunner, args: argparse.Namespace) -> dict:
    log = run.log
    vae = build_mask_vae(args.preset).to(run.device)
    m = vae.config.sample_size
    spec = ImageSpec.from_config(argparse.Namespace(image_size=args.image_size, image_mean=(0, 0, 0),
                                                    image_std=(1, 1, 1), resize_mode=args.resize_mode))
    train_json, val_json = split_paths(run, args, "train", "val")
    # masks only: stage 1 never decodes an image, so the images are not checked here either
    train_masks = load_rec_arrays(load_mdetr(train_json, args.image_root), spec, m, progress=args.progress).masks
    val_masks = load_rec_arrays(list(load_mdetr(val_json, args.image_root))[: args.val_limit], spec, m,
                                progress=args.progress).masks
    n_params = sum(p.numel() for p in vae.parameters())
    log.info(f"run {run.run_dir}: {len(train_masks)} train masks, {len(val_masks)} val masks, {m}x{m}, "
             f"{n_params / 1e3:.0f}k parameters, world size {run.world_size}")

    def reconstruct(x: torch.Tensor, generator: torch.Generator):
        """(reconstruction logits, KL per sample) of a sampled latent."""
        posterior = vae.encode(x)
        return vae.decode(posterior.sample(generator)), posterior.kl()

    step_module = run.wrap(TrainStep(reconstruct, vae=vae))
    optimizer = torch.optim.Adam(vae.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=args.lr_decay)
    batches = run.batches(len(train_masks), args.batch_size)
    total = args.epochs * len(batches)
    rng = np.random.default_rng([args.seed, run.rank])
    generator = torch.Generator(run.device).manual_seed(args.seed * 1000 + run.rank)
    latent_shape = (vae.config.latent_channels, vae.config.latent_size, vae.config.latent_size)
    state = run.resume(vae, optimizer, len(train_masks))
    step = state.get("step", 0)  # optimizer steps taken, over all epochs
    if state:
        scheduler.load_state_dict(state["scheduler"])
        step = state["step"]
        for s in range(step):  # replay the skipped steps' draws: augmentation, then the posterior's sample
            idx = batches.batch(*divmod(s, len(batches)))
            augment(train_masks[idx], rng)
            torch.randn((len(idx), *latent_shape), generator=generator, device=run.device)
        log.info(f"resumed from {args.resume} at step {step} of {total}")
    t0 = time.time()
    bar = run.progress(total, "mask-vae", initial=step)
    for epoch in range(step // len(batches), args.epochs):
        vae.train()
        for idx in list(batches.epoch(epoch))[step - epoch * len(batches):]:  # all but those a resumed run took
            x = masks_to_vae_input(augment(train_masks[idx], rng)).to(run.device)
            recon, kl = step_module(x, generator)
            mse = torch.nn.functional.mse_loss(recon, x)
            loss = mse + args.kl_weight * kl.mean() / x[0].numel()  # KL per pixel, as MSE is
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            bar.update()
            bar.set_postfix(mse=f"{mse.item():.4f}", epoch=epoch)
            if run.checkpoint_due(step, total):
                run.save_resumable(vae.save_pretrained, optimizer, len(train_masks),
                                   {"step": step, "scheduler": scheduler.state_dict()})
        scheduler.step()
        mse_mean = run.mean(mse.item())  # a collective: every rank calls it
        if run.is_main and ((epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs):
            log.info(f"epoch {epoch + 1}/{args.epochs} mse {mse_mean:.4f} "
                     f"val reconstruction IoU {reconstruction_iou(vae, val_masks):.4f} ({time.time() - t0:.0f}s)")
        run.barrier()
    bar.close()

    if not run.is_main:
        return run.finish({})
    vae.eval()
    vae.config.scaling_factor = 1.0 / latent_std(vae, train_masks)
    iou = reconstruction_iou(vae, val_masks)
    run.save(vae.save_pretrained)
    log.info(f"done in {(time.time() - t0) / 60:.1f} min: val reconstruction IoU {iou:.4f}, "
             f"latent scaling factor {vae.config.scaling_factor:.3f}, saved to {run.output}")
    return run.finish({"val_reconstruction_iou": iou, "seconds": time.time() - t0, "parameters": n_params,
                       "scaling_factor": vae.config.scaling_factor})
