"""Stage 2: train the prompt generator (DiT) to denoise Mask-VAE latents of referred objects.

Conditions come from the frozen foundation run without prompts (pooled embeddings; with
`--conditioning tokens` also its image and text tokens). They are computed once, with each
batch's images decoded when it is needed, and kept on disk (data/row_cache.py, keyed by the
foundation's files and the data), so memory does not grow with the split; the DiT reads each
step's rows from there and the target latents from memory, and trains with an MSE loss on its prediction (x0 for our
checkpoints, `--prediction-type`), plus the pointer head's cross-entropy in tokens mode. EMA
weights sample; validation samples val masks with DDIM and reports the IoU of the final decoded
mask with the target, and --output keeps the EMA weights of the best validation with the one
noise schedule (`scheduler_config.json`). Options and the deviations from the paper:
training/train_prompt_dit.py.
"""

from __future__ import annotations

import argparse
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from diffprompt.core.errors import UserError
from diffprompt.core.image_spec import ImageSpec
from diffprompt.training.data.mdetr import load_split
from diffprompt.training.data.rec_arrays import RecArrays, data_digest, load_rec_arrays
from diffprompt.training.data.row_cache import RowArrays, cached_rows, file_digest
from diffprompt.training.models.diffprompt import SCHEDULER_FILE, TRUNK_STATES, foundation_conditions, load_foundation
from diffprompt.training.models.mask_vae import MaskVAE, decode_latents, encode_masks, mask_iou
from diffprompt.training.models.prompt_dit import PROMPT_DIT_PRESETS, PromptDiT, PromptDiTConfig, referred_patch
from diffprompt.training.models.prompt_sampler import make_scheduler, sample_prompt_latents
from diffprompt.training.stages.runner import StageRunner, cache_dir, resolve_precision, split_paths
from diffprompt.training.utils.ema import EMA, optimizer_step

# In a checkpoint-last, next to the training weights: the EMA averages, and the best EMA weights so far
# (what --output held), which a resumed run writes to its own --output before it goes on.
EMA_FILE, BEST_DIR = "ema.safetensors", "best"


@torch.no_grad()
def compute_conditions(foundation, tokenizer, data: RecArrays, tokens: bool, batch_size: int = 64,
                       progress: bool = True, workers: int = 0, layers: Sequence[int] | None = None
                       ) -> Iterator[dict[str, np.ndarray]]:
    """Each batch's DiT conditions in sample order ({name: (B, ...) float32 ndarray}), pixels decoded per batch;
    `layers` (vision, text): read there (single-pass mode; the trunk's hidden states are not kept)."""
    device = next(foundation.parameters()).device
    batches = data.sequential_batches(batch_size)
    pixels = data.pixel_batches(batches, workers)
    for idx, px in tqdm(zip(batches, pixels), total=len(batches), desc="conditions", disable=not progress,
                        leave=False):
        ids, mask = tokenizer([data.samples[i].expression for i in idx])
        cond = foundation_conditions(foundation, px.to(device), torch.from_numpy(ids).to(device),
                                     torch.from_numpy(mask).to(device), tokens, layers=layers)
        yield {k: v.float().cpu().numpy() for k, v in cond.items() if k not in TRUNK_STATES}


def cached_conditions(run: StageRunner, args: argparse.Namespace, foundation, tokenizer, data: RecArrays,
                      tokens: bool, layers: Sequence[int] | None = None) -> RowArrays:
    """The split's DiT conditions on disk (`cache_dir(args)/conditions-<key>/`), computed once by rank 0.

    The key hashes the foundation directory's files, the samples (image files, expressions) and the
    image spec, the conditioning, the layers they are read at (single-pass mode) and the stored dtype:
    another foundation or other data never reads it."""
    where = "" if layers is None else f"|layers {list(layers)}"  # the two-pass key stays what it was
    key = file_digest([args.foundation], f"{data_digest(data.samples, data.spec)}|{tokens}|{args.cache_dtype}{where}")
    directory = cache_dir(args) / f"conditions-{key}"
    progress = args.progress and run.is_main

    def compute() -> None:
        cached_rows(directory, len(data), lambda: compute_conditions(
            foundation, tokenizer, data, tokens, batch_size=args.frozen_batch_size, progress=progress,
            workers=args.workers, layers=layers), dtype=args.cache_dtype)

    run.main_first(compute)
    return RowArrays(directory)


def take(cond: RowArrays | dict[str, torch.Tensor], idx, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Rows `idx` (indices or a slice) of every condition, as float32 tensors on `device`."""
    if isinstance(cond, RowArrays):
        return {k: torch.from_numpy(v).float().to(device) for k, v in cond.take(idx).items()}
    return {k: v[idx].to(device) for k, v in cond.items()}


@torch.no_grad()
def sampled_mask_iou(dit, scheduler, vae, cond: RowArrays | dict, targets: torch.Tensor, steps: int, seed: int = 0,
                     batch_size: int = 128) -> float:
    """Mean IoU of the final DDIM sample's decoded mask with the target masks."""
    dit.eval()
    ious = []
    for lo in range(0, len(targets), batch_size):
        c = take(cond, slice(lo, lo + batch_size), next(dit.parameters()).device)
        seeds = [seed * 1_000_003 + i for i in range(lo, lo + len(c["image_embed"]))]
        x0 = sample_prompt_latents(dit, scheduler, c, seeds, steps, depth=1)[:, 0].cpu()
        ious.append(mask_iou(decode_latents(vae, x0)[:, 0] > 0, targets[lo: lo + batch_size]))
    return float(torch.cat(ious).mean())


@torch.no_grad()
def pointer_accuracy(dit: PromptDiT, cond: RowArrays | dict, targets: torch.Tensor, batch_size: int = 256) -> float:
    """Fraction of samples whose pointer head picks the patch holding the referred object."""
    dit.eval()
    hits = []
    for lo in range(0, len(targets), batch_size):
        c = take(cond, slice(lo, lo + batch_size), next(dit.parameters()).device)
        logits = dit.prepare_conditions(**c)["pointer_logits"]  # (B, P): the condition-only part, no DiT blocks
        hits.append(logits.argmax(1).cpu() == targets[lo: lo + batch_size])
    return float(torch.cat(hits).float().mean())


def main(args: argparse.Namespace) -> dict:
    with StageRunner(f"prompt_dit_{args.conditioning}", args) as run:
        return train(run, args)


def condition_layers(args: argparse.Namespace, fcfg) -> list[int] | None:
    """--condition-layers KV KT checked against the towers (single-pass mode), or None (two passes)."""
    if not args.condition_layers:
        return None
    kv, kt = args.condition_layers
    if not (0 <= kv < fcfg.vision.num_hidden_layers and 0 <= kt < fcfg.text.num_hidden_layers):
        raise UserError(f"--condition-layers {kv} {kt}: each must leave at least one layer of its tower for the "
                        f"prompts (the towers have {fcfg.vision.num_hidden_layers} and {fcfg.text.num_hidden_layers})")
    return [kv, kt]


def train(run: StageRunner, args: argparse.Namespace) -> dict:
    log = run.log
    resolve_precision(args, run.device, log)
    foundation, tokenizer = load_foundation(args.foundation)
    foundation.eval().requires_grad_(False).to(run.device)
    fcfg, vae_cfg = foundation.config, MaskVAE.load_config(args.mask_vae)
    tokens = args.conditioning == "tokens"
    # Built before the Mask-VAE is loaded: loading a model builds it first (models/pretrained.py) and so
    # draws from the same RNG, and the DiT's initial weights have always followed the foundation's draws.
    dit = PromptDiT(PromptDiTConfig(
        latent_channels=vae_cfg.latent_channels, latent_size=vae_cfg.latent_size, conditioning=args.conditioning,
        image_embed_dim=fcfg.projection_dim, text_embed_dim=fcfg.projection_dim,
        image_token_dim=fcfg.vision.hidden_size, text_token_dim=fcfg.text.hidden_size, image_grid=fcfg.grid_size,
        context_layers=args.context_layers if tokens else 0, condition_layers=condition_layers(args, fcfg),
        **PROMPT_DIT_PRESETS[args.preset],
    )).to(run.device)
    vae = MaskVAE.from_pretrained(args.mask_vae).requires_grad_(False)
    m = vae.config.sample_size
    spec = ImageSpec.from_config(fcfg)
    train_json, val_json = split_paths(run, args, "train", "val")
    train_data = load_rec_arrays(load_split(train_json, args.image_root), spec, m, progress=args.progress)
    val = load_rec_arrays(load_split(val_json, args.image_root, args.val_limit), spec, m, progress=args.progress)
    layers = dit.config.condition_layers
    cond = cached_conditions(run, args, foundation, tokenizer, train_data, tokens, layers)  # on disk, read per batch
    val_cond = cached_conditions(run, args, foundation, tokenizer, val, tokens, layers)
    del foundation  # the conditions are all the DiT needs
    latents = torch.cat([encode_masks(vae, train_data.masks[lo: lo + 256]) for lo in range(0, len(train_data), 256)])
    pointer_targets = referred_patch(train_data.masks, fcfg.grid_size)  # (N,) the patch holding each referred object
    val_pointer_targets = referred_patch(val.masks, fcfg.grid_size)

    scheduler = make_scheduler({"num_train_timesteps": args.train_timesteps, "prediction_type": args.prediction_type,
                                "clip_sample": args.clip_sample > 0, "clip_sample_range": args.clip_sample or 1.0})
    n_params = sum(p.numel() for p in dit.parameters())
    log.info(f"run {run.run_dir}: {len(train_data)} train latents {tuple(latents.shape[1:])}, {len(val)} val, "
             f"conditioning {args.conditioning}, {n_params / 1e6:.2f} M parameters, world size {run.world_size}")

    ema = EMA(dit.parameters(), decay=args.ema_decay)
    model = run.wrap(dit)
    optimizer = torch.optim.AdamW(dit.parameters(), lr=args.lr, weight_decay=0.0)
    batches = run.batches(len(train_data), args.batch_size)
    generator = torch.Generator().manual_seed(args.seed * 1000 + run.rank)

    def draw(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A step's random draws for k latents: noise (k, C, h, w) and timesteps (k,)."""
        noise = torch.randn((k, *latents.shape[1:]), generator=generator)
        return noise, torch.randint(0, args.train_timesteps, (k,), generator=generator)

    state = run.resume(dit, optimizer, len(train_data))
    start, history, best = state.get("step", 0), state.get("history", []), state.get("best", -1.0)
    if state:
        ema.load(Path(args.resume) / EMA_FILE, state["ema_updates"])
        if (Path(args.resume) / BEST_DIR).is_dir():  # the best EMA weights so far: --output holds them from now on
            run.save(lambda d: shutil.copytree(Path(args.resume) / BEST_DIR, d, dirs_exist_ok=True))
        for s in range(start):  # the generator as the uninterrupted run has it at step `start`
            draw(len(batches.at_step(s)))
        log.info(f"resumed from {args.resume} at step {start} (best val mask IoU so far {best:.4f})")

    def save_resumable(step: int) -> None:  # rank 0: training weights, EMA, optimizer and step, for --resume
        def write(d: Path) -> None:
            dit.save_pretrained(d)
            ema.save(d / EMA_FILE)
            if best >= 0:  # a copy of --output as it stands: a resumed run starts its --output from it
                shutil.copytree(run.output, d / BEST_DIR)

        run.save_resumable(write, optimizer, len(train_data),
                           {"step": step, "history": history, "best": best, "ema_updates": ema.updates})

    t0 = time.time()
    bar = run.progress(args.steps, f"dit-{args.conditioning}", initial=start)
    for step in range(start, args.steps):
        idx = torch.from_numpy(batches.at_step(step))
        x0 = latents[idx]
        noise, t = draw(len(idx))
        xt = scheduler.add_noise(x0, noise, t)
        c = take(cond, idx.numpy(), run.device)
        with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            out = model(xt.to(run.device), t.to(run.device), **c, return_pointer=dit.pointer)
        prediction, pointer_logits = out if dit.pointer else (out, None)
        target = {"epsilon": noise, "sample": x0}.get(args.prediction_type) if args.prediction_type != "v_prediction" \
            else scheduler.get_velocity(x0, noise, t)
        loss = torch.nn.functional.mse_loss(prediction.float(), target.to(run.device))
        if dit.pointer:  # the pointer head's direct "which patch is referred" signal
            loss = loss + args.pointer_loss_weight * torch.nn.functional.cross_entropy(
                pointer_logits.float(), pointer_targets[idx].to(run.device))
        optimizer_step(loss, optimizer, dit, ema)
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % args.log_every == 0:
            log.info(f"step {step + 1}/{args.steps} loss {run.mean(loss.item()):.4f} ({time.time() - t0:.0f}s)")
        last = step + 1 == args.steps
        if run.is_main and ((step + 1) % args.eval_every == 0 or last):
            with ema.applied(dit.parameters()):
                iou = {s: sampled_mask_iou(dit, scheduler, vae, val_cond, val.masks, s) for s in args.eval_steps}
                history.append({"step": step + 1, **{f"val_mask_iou@{s}": v for s, v in iou.items()}})
                pointer_note = ""
                if dit.pointer:
                    acc = pointer_accuracy(dit, val_cond, val_pointer_targets)
                    history[-1]["val_pointer_accuracy"] = acc
                    pointer_note = f"; pointer on the referred patch {100 * acc:.1f}%"
                log.info(f"step {step + 1}: val mask IoU (EMA) "
                         + ", ".join(f"{s} steps {v:.4f}" for s, v in iou.items()) + pointer_note)
                score = iou[args.eval_steps[0]]
                if score > best:  # keep the EMA weights with the best val mask IoU
                    best = score
                    run.save(lambda d: save_dit(dit, scheduler, d))
                    log.info(f"saved EMA weights (best val mask IoU {best:.4f}) to {run.output}")
            dit.train()
        if run.checkpoint_due(step + 1, args.steps):
            save_resumable(step + 1)
        run.barrier()
    bar.close()

    summary = run.finish({"seconds": time.time() - t0, "parameters": n_params, "history": history,
                          "conditioning": args.conditioning, "best_val_mask_iou": best})
    log.info(f"done in {(time.time() - t0) / 60:.1f} min; {run.output} holds the EMA weights with the best "
             f"val mask IoU ({best:.4f})")
    return summary


def save_dit(dit: PromptDiT, scheduler, directory: Path) -> None:
    """The stage-2 checkpoint: config.json + model.safetensors (EMA weights) + scheduler_config.json."""
    dit.save_pretrained(directory)
    scheduler.save_config(directory)
    assert (directory / SCHEDULER_FILE).exists()
