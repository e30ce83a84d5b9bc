"""Stage 3 (and the baselines): train a prompt learner on top of the frozen foundation for REC.

`--method` picks the learner class (training/models/prompt_learners.py); everything else is
frozen, and the loss is the foundation's own grounding loss (training/losses.py). Every
--save-every steps the run folder gets a checkpoint-last that --resume continues, also inside an
epoch (training/utils/resume.py). Diff-Prompt's
masks: the frozen DiT samples each training expression's prompt latents once, with the
expression's own noise seed, and the frozen VAE decodes them: exactly what sampling on the fly
with a per-expression seed gives, without repeating the DiT passes every epoch. --output is a
pipeline directory (the learner + pipeline.json). Options: training/train_prompts.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from diffprompt.core.errors import UserError
from diffprompt.core.image_spec import ImageSpec
from diffprompt.training.data.mdetr import load_split
from diffprompt.training.data.rec_arrays import RecArrays, cache_pixels, data_digest, load_rec_arrays, pixel_bytes
from diffprompt.training.data.row_cache import RowArrays, RowFile, cached_rows, file_digest
from diffprompt.training.evaluation.rec import evaluate_samples, sample_seed
from diffprompt.training.losses import DetectionTargets, detection_loss, match
from diffprompt.training.models.diffprompt import DiffPromptPipeline, load_dit, load_foundation, write_pipeline_file
from diffprompt.training.models.mask_vae import MaskVAE
from diffprompt.training.models.pretrained import CONFIG_NAME, WEIGHTS_NAME
from diffprompt.training.models.prompt_dit import PromptDiT
from diffprompt.training.models.prompt_learners import PromptLearner, prompted_forward
from diffprompt.training.stages.runner import StageRunner, TrainStep, cache_dir, resolve_precision, split_paths


@torch.no_grad()
def generated_masks(pipeline: DiffPromptPipeline, data: RecArrays, ids, mask, seed: int, batch_size: int = 128,
                    progress: bool = True, workers: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """{"masks": (B, n, 1, m, m) float16 decoded mask logits} per batch in sample order, seeded per sample id."""
    device = next(pipeline.foundation.parameters()).device
    batches = data.sequential_batches(batch_size)
    for idx, pixels in tqdm(zip(batches, data.pixel_batches(batches, workers)), total=len(batches),
                            desc="sampling masks", disable=not progress, leave=False):
        seeds = [sample_seed(seed, data.samples[i].sample_id) for i in idx]
        masks = pipeline.generate_masks(pixels.to(device), ids[idx].to(device), mask[idx].to(device), seeds)
        yield {"masks": masks.half().cpu().numpy()}


def mask_cache_path(args: argparse.Namespace, data: RecArrays) -> Path:
    """Where the sampled training masks of (DiT weights, VAE weights, seed, steps, samples) are kept
    (--mask-cache, else the cache directory): a directory of rows (data/row_cache.py).

    Layer i's mask does not depend on how many layers are prompted (`kept_outputs` is
    prefix-consistent), so a cache with more layers serves a shallower run too."""
    extra = f"{args.seed}|{args.ddim_steps}|{data_digest(data.samples, data.spec)}|"
    extra += "|".join(str(s.sample_id) + s.expression for s in data.samples)
    key = file_digest([Path(args.prompt_dit) / WEIGHTS_NAME, Path(args.prompt_dit) / CONFIG_NAME,
                       Path(args.prompt_dit) / "scheduler_config.json", Path(args.mask_vae) / CONFIG_NAME,
                       Path(args.mask_vae) / WEIGHTS_NAME, Path(args.foundation)], extra)
    return (Path(args.mask_cache) if args.mask_cache else cache_dir(args)) / f"masks-{key}"


def sampled_masks(run: StageRunner, args: argparse.Namespace, pipeline: DiffPromptPipeline, data: RecArrays,
                  ids: torch.Tensor, mask: torch.Tensor) -> RowFile:
    """Every training expression's decoded prompt masks, (N, n, 1, m, m) float16 rows on disk: sampled
    once by rank 0 (or found in the cache), read per batch by every rank."""
    directory = mask_cache_path(args, data)
    n = pipeline.learner.mask_layers

    def ensure() -> None:
        if directory.is_dir() and RowArrays(directory).files["masks"].shape[1] >= n:
            run.log.info(f"reusing the prompt masks in {directory}")
            return
        shutil.rmtree(directory, ignore_errors=True)  # too few layers: sample again
        t = time.time()
        cached_rows(directory, len(data), lambda: generated_masks(
            pipeline, data, ids, mask, args.seed, batch_size=args.frozen_batch_size or 128, progress=args.progress,
            workers=args.workers))
        run.log.info(f"sampled {n} prompt masks per expression with {args.ddim_steps} DDIM steps "
                     f"({time.time() - t:.0f}s) into {directory}")

    run.main_first(ensure)
    return RowArrays(directory).files["masks"]


PIXEL_CACHE_AUTO_BYTES = 4 << 30  # --pixel-cache auto: splits whose float16 pixels take at most this on disk


def one_cycle(optimizer: torch.optim.Optimizer, max_lr: float, total_steps: int):
    """torch's OneCycleLR with 10% warm-up. At exactly 10 steps torch's warm-up phase would end on
    step 0 and it divides by its length (zero): there, 2 steps warm up instead. Every other length
    keeps the 10% schedule."""
    pct_start = 0.1
    if pct_start * total_steps - 1 == 0:
        pct_start = 2 / total_steps
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=total_steps,
                                               pct_start=pct_start)


def micro_batches(n: int, micro_batch_size: int | None) -> list[slice]:
    """A batch of n cut into slices of at most `micro_batch_size` (None: one slice)."""
    size = micro_batch_size or n
    return [slice(lo, min(lo + size, n)) for lo in range(0, n, size)]


def main(args: argparse.Namespace) -> dict:
    with StageRunner(args.method, args) as run:
        return train(run, args)


def train(run: StageRunner, args: argparse.Namespace) -> dict:
    log = run.log
    resolve_precision(args, run.device, log)
    if args.micro_batch_size is not None and args.micro_batch_size < 1:
        raise UserError(f"--micro-batch-size must be >= 1, got {args.micro_batch_size}")
    foundation, tokenizer = load_foundation(args.foundation)
    foundation.eval().requires_grad_(False).to(run.device)
    if args.gradient_checkpointing:
        foundation.set_gradient_checkpointing()
    options = {}
    if args.method == "diffprompt":  # the adapters read masks of the Mask-VAE's size
        options = {"mask_size": MaskVAE.load_config(args.mask_vae).sample_size, "mask_input": args.mask_input}
        # single-pass mode: the prompts enter where the DiT reads its conditions
        options["first_layers"] = PromptDiT.load_config(args.prompt_dit).condition_layers or [0, 0]
    learner = PromptLearner.for_foundation(foundation, args.method, depth=args.depth, length=args.length, **options)
    pipeline = DiffPromptPipeline(foundation, tokenizer, learner, steps=args.ddim_steps)
    if learner.needs_masks:
        pipeline.vae = MaskVAE.from_pretrained(args.mask_vae).requires_grad_(False).to(run.device)
        pipeline.dit, pipeline.scheduler = load_dit(args.prompt_dit)
        pipeline.dit.requires_grad_(False).to(run.device)
    spec = ImageSpec.from_config(foundation.config)
    train_json, val_json = split_paths(run, args, "train", "val")
    train_data = load_rec_arrays(load_split(train_json, args.image_root), spec, learner.config.mask_size,
                                 progress=args.progress)
    val_samples = load_split(val_json, args.image_root, args.val_limit)
    ids, mask = (torch.from_numpy(a) for a in tokenizer([s.expression for s in train_data.samples]))
    if args.pixel_cache == "on" or (args.pixel_cache == "auto" and pixel_bytes(train_data) <= PIXEL_CACHE_AUTO_BYTES):
        directory = cache_dir(args) / f"pixels-{data_digest(train_data.samples, spec)}"
        run.main_first(lambda: cache_pixels(train_data, directory, args.workers, args.progress))
        cache_pixels(train_data, directory)  # every rank reads what rank 0 wrote
    masks = sampled_masks(run, args, pipeline, train_data, ids, mask) if learner.needs_masks else None
    n_trainable = sum(p.numel() for p in learner.parameters())
    log.info(f"run {run.run_dir}: method {args.method}, {len(train_data)} train expressions, {len(val_samples)} val, "
             f"{n_trainable} trainable parameters, vision depth {learner.vision_depth}, text depth "
             f"{learner.text_depth}, world size {run.world_size}")

    def ground(pixels, ids, mask, masks=None):
        out = prompted_forward(foundation, learner, pixels, ids, mask, masks)
        return out.logits, out.pred_boxes

    step_module = run.wrap(TrainStep(ground, foundation=foundation, learner=learner.to(run.device)))
    optimizer = torch.optim.AdamW(learner.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    batches = run.batches(len(train_data), args.batch_size)
    total = args.epochs * len(batches)
    scheduler = one_cycle(optimizer, args.lr, total)
    grad_scaler = torch.amp.GradScaler("cuda", enabled=args.precision == "fp16")
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    state = run.resume(learner, optimizer, len(train_data))
    step, history = state.get("step", 0), state.get("history", [])  # optimizer steps (all epochs), val R@1 per epoch
    if state:
        scheduler.load_state_dict(state["scheduler"])
        grad_scaler.load_state_dict(state["grad_scaler"])
        step, history = state["step"], state["history"]
        log.info(f"resumed from {args.resume} at step {step} of {total} (epoch {step // len(batches) + 1}, "
                 f"batch {step % len(batches) + 1} of {len(batches)})")

    t0 = time.time()
    bar = run.progress(total, args.method, initial=step)
    for epoch in range(step // len(batches), args.epochs):
        learner.train()
        epoch_batches = list(batches.epoch(epoch))[step - epoch * len(batches):]  # all but those a resumed run took
        for batch, pixels in zip(epoch_batches, train_data.pixel_batches(epoch_batches, args.workers)):
            idx = torch.from_numpy(batch)
            gt = [train_data.boxes[i] for i in idx.tolist()]
            num_objects = max(1.0, run.sum(float(sum(len(b) for b in gt))) / run.world_size)  # of the whole batch
            batch_masks = torch.from_numpy(masks[batch][:, : learner.mask_layers]) if masks is not None else None
            optimizer.zero_grad(set_to_none=True)
            parts = micro_batches(len(idx), args.micro_batch_size)
            loss = 0.0
            for k, part in enumerate(parts):  # gradient accumulation: the parts' losses sum to the batch's
                sync = k + 1 == len(parts) or run.world_size == 1
                with contextlib.nullcontext() if sync else step_module.no_sync():
                    with torch.autocast(run.device.type, dtype=autocast_dtype or torch.bfloat16,
                                        enabled=autocast_dtype is not None):
                        logits, boxes = step_module(
                            pixels[part].to(run.device), ids[idx[part]].to(run.device), mask[idx[part]].to(run.device),
                            batch_masks[part].float().to(run.device) if batch_masks is not None else None)
                    logits, boxes = logits.float(), boxes.float()  # (b, P, 1), (b, P, 4)
                    part_gt = gt[part]
                    targets = DetectionTargets(boxes=part_gt, query_targets=[torch.ones(len(b), 1, dtype=torch.bool)
                                                                             for b in part_gt])
                    matches = match(boxes.detach(), targets.boxes)
                    losses = detection_loss(logits, boxes, targets, matches, num_objects, w_rank=args.rank_weight)
                    grad_scaler.scale(losses["loss"]).backward()
                loss += losses["loss"].item()
            grad_scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(learner.parameters(), 1.0)
            grad_scaler.step(optimizer)
            grad_scaler.update()
            scheduler.step()
            step += 1
            bar.update()
            bar.set_postfix(loss=f"{loss:.3f}", epoch=epoch)
            if run.checkpoint_due(step, total):  # the learner, optimizer, schedule and step, for --resume
                run.save_resumable(learner.save_pretrained, optimizer, len(train_data), {
                    "step": step, "history": history, "scheduler": scheduler.state_dict(),
                    "grad_scaler": grad_scaler.state_dict()})
        loss_mean = run.mean(loss)
        if run.is_main:
            entry = {"epoch": epoch + 1, "loss": loss_mean, "seconds": time.time() - t0}
            if args.eval_every and ((epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs):
                learner.eval()
                acc = evaluate_samples(pipeline, tokenizer, val_samples, batch_size=args.frozen_batch_size or 64,
                                       progress=False, seed=args.seed)
                entry["val_R@1"] = acc.summary()[-1]["R@1"]
            history.append(entry)
            log.info(f"epoch {epoch + 1}/{args.epochs} " + " ".join(
                f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in entry.items() if k != "epoch"))
        run.barrier()
    bar.close()

    if not run.is_main:
        return run.finish({})
    summary = {"method": args.method, "seconds": time.time() - t0, "trainable_parameters": n_trainable,
               "history": history, "run_dir": str(run.run_dir), "args": vars(args)}

    def write(d: Path) -> None:
        learner.save_pretrained(d)
        # paths are written relative to the final directory, not the staging one
        write_pipeline_file(d, Path(args.foundation), Path(args.mask_vae) if learner.needs_masks else None,
                            Path(args.prompt_dit) if learner.needs_masks else None, relative_to=run.output)
        (d / "training_summary.json").write_text(json.dumps(summary, indent=2))

    run.save(write)
    log.info(f"done in {summary['seconds'] / 60:.1f} min, saved to {run.output}")
    return run.finish(summary)
