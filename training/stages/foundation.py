"""Stage 0: pretrain the embedded-default foundation on category queries (detection style).

The foundation is an OWL-ViT-style model trained from scratch on the synthetic `pretrain` split,
where every query ("star", "red star", "red shape") refers to all matching objects, with the
detection loss (training/losses.py) and negative queries; the best held-out R@1 is kept in
--output, and runs/NNN-foundation/checkpoint-last is resumable (--resume). Options:
training/pretrain_foundation.py.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from diffprompt.core.image_spec import ImageSpec
from diffprompt.core.tokenizer import QueryTokenizer
from diffprompt.training.data.grounding_dataset import ImageQueriesDataset, detection_collate
from diffprompt.training.data.mdetr import load_split
from diffprompt.training.data.synthetic.vocabulary import synthetic_tokenizer
from diffprompt.training.evaluation.rec import evaluate_samples
from diffprompt.training.losses import detection_loss, match
from diffprompt.training.models.grounding import GROUNDING_PRESETS, GroundingModel
from diffprompt.training.stages.runner import StageRunner, TrainStep, resolve_precision, split_paths
from diffprompt.training.utils.checkpoint import load_trainer_state


def lr_at(step: int, args) -> float:
    """Linear warm-up, then cosine decay to 5% of the peak."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def main(args: argparse.Namespace) -> dict:
    with StageRunner("foundation", args) as run:
        return train(run, args)


def train(run: StageRunner, args: argparse.Namespace) -> dict:
    log = run.log
    resolve_precision(args, run.device, log)
    train_json, val_json = split_paths(run, args, "pretrain", "heldout", n_train_images=args.n_images)
    tokenizer = synthetic_tokenizer() if args.tokenizer is None else QueryTokenizer.from_file(args.tokenizer)
    if args.resume:
        model = GroundingModel.from_pretrained(args.resume)
    else:
        model = GroundingModel(GROUNDING_PRESETS[args.preset](vocab_size=tokenizer.vocab_size))
    model.to(run.device)
    spec = ImageSpec.from_config(model.config)
    train_set = ImageQueriesDataset(load_split(train_json, args.image_root), spec)
    val_samples = load_split(val_json, args.image_root, args.val_limit)
    log.info(f"run {run.run_dir}: {len(train_set)} train images, {len(train_set.vocabulary)} distinct queries, "
             f"{len(val_samples)} val expressions, world size {run.world_size}")
    n_params = sum(p.numel() for p in model.parameters())
    log.info(f"model: {n_params / 1e6:.2f} M parameters, config {json.dumps(asdict(model.config))}")

    # The detection loss never reaches CLIP's pooled image projection and contrastive scale; freeze
    # them (the pooled embedding stays a fixed random projection of the trained CLS token) so DDP
    # sees no unused parameters.
    for p in (*model.visual_projection.parameters(), model.logit_scale):
        p.requires_grad_(False)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def detect(pixels, ids, mask):
        image = model.encode_image(pixels)
        text = model.encode_text(ids, mask)
        out = model.predict(image, text.query_embeds)  # logits (B, P, Q)
        return out.logits, out.pred_boxes

    step_module = run.wrap(TrainStep(detect, model=model))
    decay = [p for n, p in trainable if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in trainable if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.98),
    )
    start_step, best, history = 0, -1.0, []
    if args.resume:
        state = load_trainer_state(args.resume, optimizer)
        start_step, best, history = state["step"], state.get("best", -1.0), state.get("history", [])
        log.info(f"resumed from {args.resume} at step {start_step} (best held-out R@1 so far {best:.4f})")

    # Negative-query sampling; a resumed run draws a fresh stream for its remaining steps.
    rng = np.random.default_rng([args.seed, run.rank, start_step] if start_step else [args.seed, run.rank])
    batches = run.batches(len(train_set), args.batch_size)
    t0 = time.time()
    bar = run.progress(args.steps, "pretrain", initial=start_step)
    for step in range(start_step, args.steps):
        items = [train_set[int(i)] for i in batches.at_step(step)]
        pixels, queries, targets = detection_collate(items, train_set.vocabulary, args.max_queries, rng)
        ids, mask = tokenizer(queries)
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, args)
        model.train()
        with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            logits, boxes = step_module(pixels.to(run.device), torch.from_numpy(ids).to(run.device),
                                        torch.from_numpy(mask).to(run.device))
        logits, boxes = logits.float(), boxes.float()  # losses and matching in fp32
        matches = match(boxes.detach(), targets.boxes)
        num_objects = max(1.0, run.sum(float(sum(len(r) for r, _ in matches))) / run.world_size)
        losses = detection_loss(logits, boxes, targets, matches, num_objects, w_rank=args.rank_weight)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        bar.update()
        bar.set_postfix(loss=f"{losses['loss'].item():.3f}", lr=f"{lr_at(step, args):.1e}")

        last = step + 1 == args.steps
        if (step + 1) % args.log_every == 0 or last:
            loss_mean = run.mean(losses["loss"].item())
            log.info(f"step {step + 1}/{args.steps} loss {loss_mean:.4f} cls {losses['loss_cls']:.4f} "
                     f"l1 {losses['loss_l1']:.4f} giou {losses['loss_giou']:.4f} rank {losses['loss_rank']:.4f} "
                     f"({time.time() - t0:.0f}s)")
        if run.is_main and ((step + 1) % args.eval_every == 0 or last):
            acc = evaluate_samples(model, tokenizer, val_samples, batch_size=64, progress=False)
            r1 = acc.summary()[-1]["R@1"]
            history.append({"step": step + 1, "R@1": r1, "seconds": time.time() - t0})
            log.info(f"step {step + 1}: held-out single-target category R@1 {r1:.4f}")
            if r1 >= best:
                best = r1
                run.save(lambda d: save_foundation(model, tokenizer, d))
                log.info(f"saved best foundation to {run.output}")
        if run.is_main and ((step + 1) % args.save_every == 0 or last):
            run.save(model.save_pretrained, run.run_dir / "checkpoint-last", optimizer,
                     {"step": step + 1, "best": best, "args": vars(args), "history": history})
        run.barrier()
    bar.close()

    summary = run.finish({"best_heldout_R@1": best, "seconds": time.time() - t0, "history": history})
    log.info(f"done in {(time.time() - t0) / 60:.1f} min, best held-out R@1 {best:.4f}")
    return summary


def save_foundation(model: GroundingModel, tokenizer: QueryTokenizer, directory: Path) -> None:
    """The deployable foundation: config.json + model.safetensors + tokenizer.json."""
    model.save_pretrained(directory)
    tokenizer.save(directory)
