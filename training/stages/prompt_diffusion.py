"""Prompt Diffusion on a trained prompt learner: overfitted targets, then the prompt-space DiT.

    1. conditions   the frozen, unprompted foundation's outputs for every train / val expression
                    (the stage-2 cache: `prompt_dit.cached_conditions`)
    2. targets      each train expression's prompts overfitted to it alone: `--overfit-steps` Adam
                    steps from the base learner's prompts, all expressions of a batch at once (each
                    has its own copy of the prompts and its own loss, so their gradients never mix);
                    on Diff-Prompt the prompts are its global ones, overfitted with the masks its DiT
                    generates for the expression as the service would (`--steps` DDIM steps, the
                    run's `--seed` for every expression) held fixed;
                    stored as packed offsets under the cache directory, keyed by the base learner,
                    the foundation, the data and the overfitting options: a rerun reuses them
    3. diffusion    `PromptDiffusion` learns x0 = scaled offset from noisy versions (one schedule,
                    saved with the weights), EMA weights kept
    4. output       a pipeline directory: the base learner, its parts, and `prompt_diffusion/`
                    (pipeline.json names it and the solver): `evaluate` and `export` read it as any
                    other pipeline

The base learner and the foundation stay frozen throughout. Options: training/train_prompt_diffusion.py.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from diffprompt.core.errors import UserError
from diffprompt.training.data.mdetr import load_split
from diffprompt.training.data.rec_arrays import RecArrays, data_digest, load_rec_arrays
from diffprompt.training.data.row_cache import RowArrays, cached_rows, file_digest
from diffprompt.training.evaluation.rec import evaluate_samples
from diffprompt.training.losses import DetectionTargets, detection_loss, match
from diffprompt.training.models.diffprompt import (
    PIPELINE_FILE,
    SCHEDULER_FILE,
    DiffPromptPipeline,
    make_sampler,
    write_pipeline_file,
)
from diffprompt.training.models.pretrained import CONFIG_NAME, WEIGHTS_NAME
from diffprompt.training.models.prompt_diffusion import SCHEDULE_DEFAULTS, PromptDiffusion, PromptDiffusionConfig
from diffprompt.training.models.prompt_learners import prompted_forward
from diffprompt.training.stages.prompt_dit import cached_conditions, take
from diffprompt.training.stages.runner import StageRunner, cache_dir, split_paths
from diffprompt.training.utils.ema import EMA, optimizer_step


def grounding_loss(out, boxes: list[torch.Tensor]) -> torch.Tensor:
    """The stage-3 loss of a batch (summed over its expressions' matched objects)."""
    logits, pred = out.logits.float(), out.pred_boxes.float()
    targets = DetectionTargets(boxes=boxes, query_targets=[torch.ones(len(b), 1, dtype=torch.bool) for b in boxes])
    return detection_loss(logits, pred, targets, match(pred.detach(), targets.boxes), 1.0)["loss"]


def overfitted_offsets(pipeline: DiffPromptPipeline, model: PromptDiffusion, data: RecArrays, ids, mask,
                       args: argparse.Namespace, device, log=None) -> Iterator[dict[str, np.ndarray]]:
    """{"offset": (B, F) float32} per batch in sample order: each expression's prompts after
    `args.overfit_steps` Adam steps on its own loss, minus the base prompts (unscaled). A Diff-Prompt
    learner's masks are sampled once per batch (`pipeline.steps` DDIM steps, seed `args.seed` for every
    expression: the service's policy) and held fixed. `log(str)` hears about every quarter of the
    batches (the progress bar may be off)."""
    foundation, learner = pipeline.foundation, pipeline.learner
    batches = data.sequential_batches(args.frozen_batch_size)
    base = {n: v.detach() for n, v in model.base_prompts().items()}
    started, quarter = time.time(), max(1, len(batches) // 4)
    for k, (idx, pixels) in enumerate(tqdm(zip(batches, data.pixel_batches(batches, args.workers)),
                                           total=len(batches), desc="overfitting prompts",
                                           disable=not args.progress, leave=False)):
        if log is not None and k and k % quarter == 0:
            log(f"overfitting prompts: {k}/{len(batches)} batches ({time.time() - started:.0f}s)")
        values = {n: v.expand(len(idx), *v.shape).clone().requires_grad_(True) for n, v in base.items()}
        optimizer = torch.optim.Adam(values.values(), lr=args.overfit_lr)
        boxes = [data.boxes[i] for i in idx]
        pixels, batch_ids, batch_mask = pixels.to(device), ids[idx].to(device), mask[idx].to(device)
        masks = (pipeline.generate_masks(pixels, batch_ids, batch_mask, [args.seed] * len(idx))
                 if learner.needs_masks else None)  # (B, n, 1, m, m), no gradient
        image = None
        if learner.vision_depth == 0 and not any(learner.config.first_layers):  # CoOp: the image tower, once
            with torch.no_grad():
                image = foundation.encode_image(pixels)
        for _ in range(args.overfit_steps):
            out = prompted_forward(foundation, learner, pixels, batch_ids, batch_mask, masks, values, image=image)
            optimizer.zero_grad(set_to_none=True)
            grounding_loss(out, boxes).backward()  # a sum over expressions: each gets only its own gradient
            optimizer.step()
        yield {"offset": model.pack({n: values[n].detach() - base[n] for n in model.names}).cpu().numpy()}


def main(args: argparse.Namespace) -> dict:
    with StageRunner("prompt_diffusion", args) as run:
        return train(run, args)


def train(run: StageRunner, args: argparse.Namespace) -> dict:
    log, started = run.log, time.time()
    base_dir = Path(args.base)
    # the base learner alone, also when --base already holds a Prompt Diffusion part (it is replaced)
    pipeline = DiffPromptPipeline.from_pretrained(base_dir, steps=args.steps, prompt_diffusion=False)
    learner, foundation, tokenizer = pipeline.learner, pipeline.foundation, pipeline.tokenizer
    if learner is None or not learner.prompt_names:
        raise UserError(f"{base_dir}: its learner ({getattr(learner, 'method', 'none')}) has no prompt tensors to "
                        "diffuse; Prompt Diffusion plugs into coop, vpt and maple")
    for part in (foundation, learner, pipeline.vae, pipeline.dit):  # the VAE and DiT: Diff-Prompt only
        if part is None:
            continue
        part.eval().requires_grad_(False).to(run.device)
    fcfg = foundation.config
    base_spec = json.loads((base_dir / PIPELINE_FILE).read_text())  # read and checked by from_pretrained above
    parts = {k: (base_dir / base_spec[k]).resolve() if base_spec.get(k) else None
             for k in ("foundation", "mask_vae", "prompt_dit")}  # the base pipeline's parts, for the output
    args.foundation = str(parts["foundation"])
    model = PromptDiffusion(PromptDiffusionConfig(
        prompt_shapes={n: list(getattr(learner, n).shape) for n in learner.prompt_names}, base_method=learner.method,
        image_embed_dim=fcfg.projection_dim, text_embed_dim=fcfg.projection_dim,
        image_token_dim=fcfg.vision.hidden_size, text_token_dim=fcfg.text.hidden_size,
        hidden_size=args.hidden_size, depth=args.depth, num_heads=args.num_heads)).to(run.device)
    model.set_base_prompts(learner)

    spec = pipeline.image_spec
    train_json, val_json = split_paths(run, args, "train", "val")
    # boxes are what the overfitting reads; the masks (at 32 px, as everywhere) go unused here
    train_data = load_rec_arrays(load_split(train_json, args.image_root), spec, 32, progress=args.progress)
    val_samples = load_split(val_json, args.image_root, args.val_limit)
    ids, mask = (torch.from_numpy(a) for a in tokenizer([s.expression for s in train_data.samples]))
    args.cache_dtype = "float32"
    seconds = {"load": time.time() - started}  # wall clock per part of the stage
    t0 = time.time()
    # read where the pipeline reads them at serving time: a single-pass Diff-Prompt base reads its DiT's layers
    layers = pipeline.dit.config.condition_layers if learner.needs_masks else None
    cond = cached_conditions(run, args, foundation, tokenizer, train_data, True, layers)
    seconds["conditions"] = time.time() - t0

    # 2. the overfitted targets, on disk
    generator_parts = [parts["mask_vae"], parts["prompt_dit"]] if learner.needs_masks else []  # they make the masks
    key = file_digest([base_dir / WEIGHTS_NAME, base_dir / CONFIG_NAME, Path(args.foundation), *generator_parts],
                      f"{data_digest(train_data.samples, spec)}|{args.overfit_steps}|{args.overfit_lr}|"
                      f"{args.frozen_batch_size}" + (f"|masks:{args.steps}:{args.seed}" if learner.needs_masks else ""))
    directory = cache_dir(args) / f"prompt-targets-{key}"
    t0 = time.time()
    run.main_first(lambda: cached_rows(directory, len(train_data), lambda: overfitted_offsets(
        pipeline, model, train_data, ids, mask, args, run.device, log.info)))  # rank 0 computes, the others read
    targets = RowArrays(directory).files["offset"]
    seconds["targets"] = time.time() - t0
    log.info(f"overfitted prompts of {len(train_data)} expressions in {directory} ({seconds['targets']:.0f}s)")
    chunks = [np.arange(lo, min(lo + 1024, len(train_data))) for lo in range(0, len(train_data), 1024)]
    std = float(np.sqrt(sum(np.square(targets[c].astype(np.float64)).sum() for c in chunks)
                        / (len(train_data) * model.num_features)))
    model.config.offset_scale = 1.0 / max(std, 1e-8)
    log.info(f"run {run.run_dir}: base {learner.method} from {base_dir}, {model.num_features} prompt features, "
             f"offset rms {std:.4g}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")

    # 3. the diffusion model
    schedule = make_sampler(SCHEDULE_DEFAULTS, "ddim")  # training only needs the forward process
    generator = torch.Generator().manual_seed(args.seed * 1000 + 7 + run.rank)
    ema = EMA(model.parameters(), decay=args.ema_decay)
    denoiser = run.wrap(model)  # DistributedDataParallel under torchrun
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    batches = run.batches(len(train_data), args.batch_size)
    history = []
    t0 = time.time()
    bar = run.progress(args.train_steps, "prompt-diffusion")
    for step in range(args.train_steps):
        idx = np.sort(batches.at_step(step))
        x0 = torch.from_numpy(np.asarray(targets[idx], dtype=np.float32)) * model.config.offset_scale  # (B, F)
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, schedule.config.num_train_timesteps, (len(idx),), generator=generator)
        c = take(cond, idx, run.device)
        pred = denoiser(schedule.add_noise(x0, noise, t).to(run.device), t.to(run.device), c["image_embed"],
                        c["text_embed"], c["image_tokens"], c["text_tokens"], c["text_mask"])
        loss = torch.nn.functional.mse_loss(pred, x0.to(run.device))
        optimizer_step(loss, optimizer, model, ema)
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % args.log_every == 0:
            log.info(f"step {step + 1}/{args.train_steps} loss {run.mean(loss.item()):.4f}")
    bar.close()
    seconds["diffusion"] = time.time() - t0
    log.info(f"world size {run.world_size}: {args.train_steps} steps of {args.batch_size} per process "
             f"({seconds['diffusion']:.0f}s)")
    if not run.is_main:
        return run.finish({})

    # 4. val R@1 of the base prompts and of the generated ones (EMA weights), then the pipeline directory
    t0 = time.time()
    with ema.applied(model.parameters()):
        model.eval()
        base_r1 = evaluate_samples(pipeline, tokenizer, val_samples, batch_size=args.frozen_batch_size,
                                   progress=False, seed=args.seed).summary()[-1]["R@1"]
        pipeline.prompt_diffusion, pipeline.prompt_sampler = model, make_sampler(SCHEDULE_DEFAULTS, args.solver)
        pd_r1 = evaluate_samples(pipeline, tokenizer, val_samples, batch_size=args.frozen_batch_size,
                                 progress=False, seed=args.seed).summary()[-1]["R@1"]
        log.info(f"val R@1: base {learner.method} {base_r1:.4f}, with prompt diffusion ({args.solver}, "
                 f"{args.steps} steps) {pd_r1:.4f}")
        history.append({"step": args.train_steps, "val_R@1_base": base_r1, "val_R@1": pd_r1})
        seconds["validation"] = time.time() - t0
        summary = {"base": str(base_dir), "method": learner.method, "seconds": time.time() - started,
                   "seconds_by_part": seconds,  # load, conditions, targets (0 when cached), diffusion, validation
                   "parameters": sum(p.numel() for p in model.parameters()), "history": history,
                   "run_dir": str(run.run_dir), "args": {k: str(v) for k, v in vars(args).items()}}

        def write(d: Path) -> None:
            pd_dir = d / "prompt_diffusion"
            model.save_pretrained(pd_dir)
            (pd_dir / SCHEDULER_FILE).write_text(json.dumps(SCHEDULE_DEFAULTS, indent=2))
            learner.save_pretrained(d)
            write_pipeline_file(d, parts["foundation"], parts["mask_vae"], parts["prompt_dit"],
                                pointer_weight=pipeline.pointer_weight, prompt_diffusion=pd_dir, solver=args.solver)
            (d / "training_summary.json").write_text(json.dumps(summary, indent=2))

        run.save(write)
    log.info(f"saved to {run.output}")
    return run.finish(summary)
