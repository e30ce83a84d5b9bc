"""Stage 3 (and the baselines): train prompts on top of the frozen foundation for REC.

`--method diffprompt` trains Diff-Prompt's adapters and global prompts; the other methods are
the baselines at equal budget (same data, epochs, optimizer, loss): vpt, coop, maple,
clip_adapter, linear_probe (see training/models/prompt_learners.py). Everything else is
frozen; the loss is the foundation's own grounding loss (training/losses.py).

Diff-Prompt's masks: the frozen DiT samples each training expression's prompt latents once,
with the expression's own noise seed, and the frozen VAE decodes them. That is exactly what
sampling on the fly with a per-expression seed gives, without repeating 25 DiT passes per
epoch.

    diffprompt train-prompts --method diffprompt --prompt-dit checkpoints/prompt_dit_tokens \
        --output checkpoints/diffprompt
    diffprompt train-prompts --method vpt --output runs/vpt
    torchrun --nproc_per_node 2 -m diffprompt.training.train_prompts --method coop --output runs/coop
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
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from diffprompt.core.image_spec import ImageSpec
from diffprompt.training.data.mdetr import load_mdetr
from diffprompt.training.data.rec_arrays import RecArrays, load_rec_arrays
from diffprompt.training.evaluate import load_foundation
from diffprompt.training.evaluation.rec import evaluate_samples, sample_seed
from diffprompt.training.losses import DetectionTargets, detection_loss, match
from diffprompt.training.models.diffprompt import DiffPromptPipeline, load_dit, write_pipeline_file
from diffprompt.training.models.mask_vae import load_mask_vae
from diffprompt.training.models.prompt_learners import MASK_INPUTS, METHODS, PromptLearner, prompted_forward
from diffprompt.training.rec_data import add_rec_data_args, add_runtime_args, rec_split_paths
from diffprompt.training.utils.checkpoint import save_checkpoint
from diffprompt.training.utils.distributed import all_reduce_mean, all_reduce_sum, barrier, cleanup, init_distributed
from diffprompt.training.utils.runs import get_logger, new_run_dir


class PromptedStep(torch.nn.Module):
    """Frozen foundation + trainable learner as one module, so DDP can wrap it."""

    def __init__(self, foundation, learner):
        super().__init__()
        self.foundation, self.learner = foundation, learner

    def forward(self, pixels, ids, mask, masks=None):
        out = prompted_forward(self.foundation, self.learner, pixels, ids, mask, masks)
        return out.logits, out.pred_boxes


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
    for f in (Path(args.prompt_dit) / "diffusion_pytorch_model.safetensors", Path(args.prompt_dit) / "config.json",
              Path(args.prompt_dit) / "scheduler_config.json", Path(args.mask_vae) / "config.json",
              Path(args.mask_vae) / "diffusion_pytorch_model.safetensors"):
        h.update(f.read_bytes())
    h.update(f"{args.seed}|{args.ddim_steps}|".encode())
    h.update("|".join(str(s.sample_id) + s.expression for s in data.samples).encode())
    return Path(args.mask_cache) / f"masks-{h.hexdigest()[:16]}.npy"


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    info = init_distributed(args.device)
    run_dir = new_run_dir(args.run_root, args.method) if info.is_main else None
    log = get_logger("train_prompts", run_dir, info.is_main)
    torch.manual_seed(args.seed)

    foundation, tokenizer = load_foundation(args.foundation)
    foundation.eval().requires_grad_(False)
    extra = {}
    if args.method == "diffprompt":  # the adapters read masks of the Mask-VAE's size
        extra["mask_size"] = json.loads((Path(args.mask_vae) / "config.json").read_text())["sample_size"]
        extra["mask_input"] = args.mask_input
    learner = PromptLearner.for_foundation(foundation, args.method, depth=args.depth, length=args.length, **extra)
    pipeline = DiffPromptPipeline(foundation, tokenizer, learner, steps=args.ddim_steps)
    if learner.needs_masks:
        pipeline.vae = load_mask_vae(args.mask_vae).requires_grad_(False)
        pipeline.dit, pipeline.scheduler = load_dit(args.prompt_dit)
        pipeline.dit.requires_grad_(False)
    spec = ImageSpec.from_config(foundation.config)
    train_json, val_json = rec_split_paths(args, info, log)
    train = load_rec_arrays(load_mdetr(train_json), spec, learner.config.mask_size, progress=args.progress,
                            cache_dir=Path(args.data_dir) / ".cache")
    val_samples = list(load_mdetr(val_json))[: args.val_limit]
    ids, mask = (torch.from_numpy(a) for a in tokenizer([s.expression for s in train.samples]))
    masks = None
    if learner.needs_masks:
        t = time.time()
        cache = mask_cache_path(args, train) if args.mask_cache else None
        if cache is not None and cache.exists() and np.load(cache, mmap_mode="r").shape[1] >= learner.mask_layers:
            masks = torch.from_numpy(np.load(cache)[:, : learner.mask_layers])
            log.info(f"loaded {masks.shape[1]} prompt masks per expression from {cache}")
        else:
            masks = generated_masks(pipeline, train, ids, mask, args.seed, progress=args.progress and info.is_main)
            log.info(f"sampled {masks.shape[1]} prompt masks per expression with {args.ddim_steps} DDIM steps "
                     f"({time.time() - t:.0f}s)")
            if cache is not None and info.is_main:
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_name(f"{cache.stem}.{os.getpid()}.tmp.npy")
                np.save(tmp, masks.numpy())
                os.replace(tmp, cache)
    n_trainable = sum(p.numel() for p in learner.parameters())
    log.info(f"run {run_dir}: method {args.method}, {len(train)} train expressions, {len(val_samples)} val, "
             f"{n_trainable} trainable parameters, vision depth {learner.vision_depth}, text depth "
             f"{learner.text_depth}, world size {info.world_size}")

    step_module = PromptedStep(foundation, learner.to(info.device))
    if info.world_size > 1:
        step_module = DistributedDataParallel(step_module)
    optimizer = torch.optim.AdamW(learner.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    per_epoch = max(1, len(train) // (args.batch_size * info.world_size))
    total = args.epochs * per_epoch
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=total, pct_start=0.1)
    t0 = time.time()
    history = []
    bar = tqdm(total=total, desc=args.method, unit="step", disable=not info.is_main or not args.progress)
    for epoch in range(args.epochs):
        order = np.random.default_rng([args.seed, epoch]).permutation(len(train))
        learner.train()
        for within in range(per_epoch):
            lo = (within * info.world_size + info.rank) * args.batch_size
            idx = torch.from_numpy(order[lo: lo + args.batch_size])
            batch_masks = masks[idx].float().to(info.device) if masks is not None else None
            with torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
                logits, boxes = step_module(train.pixels[idx].float().to(info.device), ids[idx].to(info.device),
                                            mask[idx].to(info.device), batch_masks)
            logits, boxes = logits.float(), boxes.float()  # (B, P, 1), (B, P, 4)
            gt = [train.boxes[i] for i in idx.tolist()]
            targets = DetectionTargets(boxes=gt, query_targets=[torch.ones(len(b), 1, dtype=torch.bool) for b in gt])
            matches = match(boxes.detach(), targets.boxes)
            num_objects = max(1.0, all_reduce_sum(float(sum(len(b) for b in gt)), info) / info.world_size)
            losses = detection_loss(logits, boxes, targets, matches, num_objects, w_rank=args.rank_weight)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            torch.nn.utils.clip_grad_norm_(learner.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            bar.update()
            if info.is_main and args.progress:
                bar.set_postfix(loss=f"{losses['loss'].item():.3f}", epoch=epoch)
        loss_mean = all_reduce_mean(losses["loss"].item(), info)
        if info.is_main:
            entry = {"epoch": epoch + 1, "loss": loss_mean, "seconds": time.time() - t0}
            if args.eval_every and ((epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs):
                learner.eval()
                acc = evaluate_samples(pipeline, tokenizer, val_samples, progress=False, seed=args.seed)
                entry["val_R@1"] = acc.summary()[-1]["R@1"]
            history.append(entry)
            log.info(f"epoch {epoch + 1}/{args.epochs} " + " ".join(
                f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in entry.items() if k != "epoch"))
        barrier(info)
    bar.close()

    summary = {}
    if info.is_main:
        out = Path(args.output)

        def write(d: Path) -> None:
            learner.save_pretrained(d)
            # paths are written relative to the final directory, not the temporary one
            write_pipeline_file(d, Path(args.foundation), Path(args.mask_vae) if learner.needs_masks else None,
                                Path(args.prompt_dit) if learner.needs_masks else None, relative_to=out)
        save_checkpoint(out, write, None, None)
        summary = {"method": args.method, "seconds": time.time() - t0, "trainable_parameters": n_trainable,
                   "history": history, "run_dir": str(run_dir), "args": vars(args)}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        (out / "training_summary.json").write_text(json.dumps(summary, indent=2))
        log.info(f"done in {summary['seconds'] / 60:.1f} min, saved to {out}")
    del step_module  # the DDP wrapper holds the process group: drop it before leaving (see cleanup)
    cleanup(info)
    return summary


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_rec_data_args(p)
    p.add_argument("--method", default="diffprompt", choices=METHODS)
    p.add_argument("--foundation", default="checkpoints/foundation")
    p.add_argument("--mask-vae", default="checkpoints/mask_vae", help="Diff-Prompt only")
    p.add_argument("--prompt-dit", default="checkpoints/prompt_dit_tokens", help="Diff-Prompt only")
    p.add_argument("--ddim-steps", type=int, default=25, help="DDIM steps of the training masks (Diff-Prompt)")
    p.add_argument("--mask-cache", default=None,
                   help="keep the sampled training masks here and reuse them (same DiT, VAE, seed, steps, data)")
    p.add_argument("--mask-input", default="standardize", choices=MASK_INPUTS,
                   help="how Diff-Prompt's adapters read a decoded mask: standardised per mask, or tanh of its logits")
    p.add_argument("--depth", type=int, default=9, help="prompted layers from the input (capped per tower)")
    p.add_argument("--length", type=int, default=8, help="prompt tokens per layer")
    p.add_argument("--output", required=True)
    p.add_argument("--epochs", type=int, default=2,
                   help="passes over the train split (paper: 5 over RefCOCO; ours: 2 over 8000 synthetic expressions)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--rank-weight", type=float, default=1.0, help="weight of the patch ranking term of the loss")
    p.add_argument("--eval-every", type=int, default=1, help="epochs between val R@1 checks (0 = never)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    add_runtime_args(p)
    return p


if __name__ == "__main__":
    main(build_parser().parse_args())
