"""Stage 3 (and the baselines): train a prompt learner on top of the frozen foundation for REC.

`--method` picks the learner class (training/models/prompt_learners.py); everything else is
frozen, and the loss is the foundation's own grounding loss (training/losses.py). Diff-Prompt's
masks: the frozen DiT samples each training expression's prompt latents once, with the
expression's own noise seed, and the frozen VAE decodes them: exactly what sampling on the fly
with a per-expression seed gives, without repeating the DiT passes every epoch. --output is a
pipeline directory (the learner + pipeline.json). Options: training/train_prompts.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from diffprompt.core.image_spec import ImageSpec
from diffprompt.training.data.mdetr import load_mdetr
from diffprompt.training.data.rec_arrays import RecArrays, load_rec_arrays
from diffprompt.training.evaluation.rec import evaluate_samples, sample_seed
from diffprompt.training.losses import DetectionTargets, detection_loss, match
from diffprompt.training.models.diffprompt import DiffPromptPipeline, load_dit, load_foundation, write_pipeline_file
from diffprompt.training.models.mask_vae import MaskVAE
from diffprompt.training.models.pretrained import CONFIG_NAME, WEIGHTS_NAME
from diffprompt.training.models.prompt_learners import PromptLearner, prompted_forward
from diffprompt.training.stages.runner import StageRunner, TrainStep, split_paths


@torch.no_grad()
def generated_masks(pipeline: DiffPromptPipeline, data: RecArrays, ids, mask, seed: int, batch_size: int = 128,
                    progress: bool = True) -> torch.Tensor:
    """(N, n, 1, m, m) float16 decoded mask logits for every sample, seeded per sample id."""
    out = []
    for lo in tqdm(range(0, len(data), batch_size), desc="sampling masks", disable=not progress, leave=False):
        sl = slice(lo, lo + batch_size)
        seeds = [sample_seed(seed, s.sample_id) for s in data.samples[sl]]
        out.append(pipeline.generate_masks(data.pixels[sl].float(), ids[sl], mask[sl], seeds).half())
    return torch.cat(out)


def mask_cache_path(args: argparse.Namespace, data: RecArrays) -> Path:
    """Where the sampled training masks of (DiT weights, VAE weights, seed, steps, samples) are kept.

    Layer i's mask does not depend on how many layers are prompted (`kept_outputs` is
    prefix-consistent), so a cache with more layers serves a shallower run too."""
    h = hashlib.sha256()
    for f in (Path(args.prompt_dit) / WEIGHTS_NAME, Path(args.prompt_dit) / CONFIG_NAME,
              Path(args.prompt_dit) / "scheduler_config.json", Path(args.mask_vae) / CONFIG_NAME,
              Path(args.mask_vae) / WEIGHTS_NAME):
        h.update(f.read_bytes())
    h.update(f"{args.seed}|{args.ddim_steps}|".encode())
    h.update("|".join(str(s.sample_id) + s.expression for s in data.samples).encode())
    return Path(args.mask_cache) / f"masks-{h.hexdigest()[:16]}.npy"


def main(args: argparse.Namespace) -> dict:
    with StageRunner(args.method, args) as run:
        return train(run, args)


def train(run: StageRunner, args: argparse.Namespace) -> dict:
    log = run.log
    foundation, tokenizer = load_foundation(args.foundation)
    foundation.eval().requires_grad_(False)
    options = {}
    if args.method == "diffprompt":  # the adapters read masks of the Mask-VAE's size
        options = {"mask_size": MaskVAE.load_config(args.mask_vae).sample_size, "mask_input": args.mask_input}
    learner = PromptLearner.for_foundation(foundation, args.method, depth=args.depth, length=args.length, **options)
    pipeline = DiffPromptPipeline(foundation, tokenizer, learner, steps=args.ddim_steps)
    if learner.needs_masks:
        pipeline.vae = MaskVAE.from_pretrained(args.mask_vae).requires_grad_(False)
        pipeline.dit, pipeline.scheduler = load_dit(args.prompt_dit)
        pipeline.dit.requires_grad_(False)
    spec = ImageSpec.from_config(foundation.config)
    train_json, val_json = split_paths(run, args, "train", "val")
    train_data = load_rec_arrays(load_mdetr(train_json), spec, learner.config.mask_size, progress=args.progress,
                                 cache_dir=Path(args.data_dir) / ".cache")
    val_samples = list(load_mdetr(val_json))[: args.val_limit]
    ids, mask = (torch.from_numpy(a) for a in tokenizer([s.expression for s in train_data.samples]))
    masks = None
    if learner.needs_masks:
        t = time.time()
        cache = mask_cache_path(args, train_data) if args.mask_cache else None
        if cache is not None and cache.exists() and np.load(cache, mmap_mode="r").shape[1] >= learner.mask_layers:
            masks = torch.from_numpy(np.load(cache)[:, : learner.mask_layers])
            log.info(f"loaded {masks.shape[1]} prompt masks per expression from {cache}")
        else:
            masks = generated_masks(pipeline, train_data, ids, mask, args.seed,
                                    progress=args.progress and run.is_main)
            log.info(f"sampled {masks.shape[1]} prompt masks per expression with {args.ddim_steps} DDIM steps "
                     f"({time.time() - t:.0f}s)")
            if cache is not None and run.is_main:
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_name(f"{cache.stem}.{os.getpid()}.tmp.npy")
                np.save(tmp, masks.numpy())
                os.replace(tmp, cache)
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
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=total, pct_start=0.1)
    t0 = time.time()
    history = []
    bar = run.progress(total, args.method)
    for epoch in range(args.epochs):
        learner.train()
        for batch in batches.epoch(epoch):
            idx = torch.from_numpy(batch)
            batch_masks = masks[idx].float().to(run.device) if masks is not None else None
            with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
                logits, boxes = step_module(train_data.pixels[idx].float().to(run.device), ids[idx].to(run.device),
                                            mask[idx].to(run.device), batch_masks)
            logits, boxes = logits.float(), boxes.float()  # (B, P, 1), (B, P, 4)
            gt = [train_data.boxes[i] for i in idx.tolist()]
            targets = DetectionTargets(boxes=gt, query_targets=[torch.ones(len(b), 1, dtype=torch.bool) for b in gt])
            matches = match(boxes.detach(), targets.boxes)
            num_objects = max(1.0, run.sum(float(sum(len(b) for b in gt))) / run.world_size)
            losses = detection_loss(logits, boxes, targets, matches, num_objects, w_rank=args.rank_weight)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            torch.nn.utils.clip_grad_norm_(learner.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            bar.update()
            bar.set_postfix(loss=f"{losses['loss'].item():.3f}", epoch=epoch)
        loss_mean = run.mean(losses["loss"].item())
        if run.is_main:
            entry = {"epoch": epoch + 1, "loss": loss_mean, "seconds": time.time() - t0}
            if args.eval_every and ((epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs):
                learner.eval()
                acc = evaluate_samples(pipeline, tokenizer, val_samples, progress=False, seed=args.seed)
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
