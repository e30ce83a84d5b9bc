"""Stage 0: pretrain the embedded-default foundation on category queries (detection style).

The foundation is an OWL-ViT-style model trained from scratch on the synthetic `pretrain`
split, where every query ("star", "red star", "red shape") refers to all matching objects. It
never sees a referring expression: REC is left to the Diff-Prompt stages, as GLIP is adapted
to RefCOCO in the paper.

Single process (writes the synthetic splits first if they are missing):

    diffprompt pretrain --output checkpoints/foundation

Two CPU processes (gloo) or GPUs (NCCL), one or several hosts:

    torchrun --nproc_per_node 2 -m diffprompt.training.pretrain_foundation --output checkpoints/foundation

Resume an interrupted run from its last checkpoint:

    diffprompt pretrain --resume runs/000-foundation/checkpoint-last --output checkpoints/foundation
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from diffprompt.cli import positive_int
from diffprompt.core.image_spec import ImageSpec
from diffprompt.core.tokenizer import QueryTokenizer
from diffprompt.training.data.grounding_dataset import ImageQueriesDataset, detection_collate
from diffprompt.training.data.mdetr import load_mdetr
from diffprompt.training.data.synthetic.vocabulary import synthetic_tokenizer
from diffprompt.training.evaluation.rec import evaluate_samples
from diffprompt.training.losses import detection_loss, match
from diffprompt.training.models.grounding import GROUNDING_PRESETS, GroundingModel, load_grounding_model
from diffprompt.training.utils.checkpoint import load_trainer_state, save_checkpoint
from diffprompt.training.utils.distributed import all_reduce_mean, all_reduce_sum, barrier, cleanup, init_distributed
from diffprompt.training.utils.runs import get_logger, new_run_dir


class DetectionStep(nn.Module):
    """The model's training forward as one module, so DistributedDataParallel can wrap it."""

    def __init__(self, model: GroundingModel):
        super().__init__()
        self.model = model

    def forward(self, pixels, ids, mask):
        image = self.model.encode_image(pixels)
        text = self.model.encode_text(ids, mask)
        out = self.model.predict(image, text.query_embeds)  # logits (B, P, Q)
        return out.logits, out.pred_boxes


def ensure_synthetic_split(data_dir: Path, split: str, n_images: int | None, log, progress: bool = True) -> Path:
    """The split's json, written first if it is not on disk yet."""
    from diffprompt.training.data.synthetic.splits import SPLITS
    from diffprompt.training.data.synthetic.writer import write_split

    path = data_dir / f"{split}.json"
    if not path.exists():
        log.info(f"writing synthetic split {split} to {data_dir}")
        write_split(SPLITS[split], data_dir, n_images, progress=progress)
    return path


def lr_at(step: int, args) -> float:
    """Linear warm-up, then cosine decay to 5% of the peak."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    info = init_distributed(args.device)
    run_dir = new_run_dir(args.run_root, "foundation") if info.is_main else None
    log = get_logger("pretrain", run_dir, info.is_main)
    torch.manual_seed(args.seed)

    data_dir = Path(args.data_dir)
    if info.is_main:  # rank 0 writes missing synthetic splits; the others wait for it
        if not args.train_json:
            ensure_synthetic_split(data_dir, "pretrain", args.n_images, log, args.progress)
        if not args.val_json:
            ensure_synthetic_split(data_dir, "heldout", None, log, args.progress)
    barrier(info)
    train_json = Path(args.train_json) if args.train_json else data_dir / "pretrain.json"
    val_json = Path(args.val_json) if args.val_json else data_dir / "heldout.json"

    tokenizer = synthetic_tokenizer() if args.tokenizer is None else QueryTokenizer.from_file(args.tokenizer)
    if args.resume:
        model = load_grounding_model(args.resume)
    else:
        model = GroundingModel(GROUNDING_PRESETS[args.preset](vocab_size=tokenizer.vocab_size))
    model.to(info.device)
    spec = ImageSpec.from_config(model.config)
    train_set = ImageQueriesDataset(load_mdetr(train_json), spec)
    val_samples = list(load_mdetr(val_json))[: args.val_limit]
    log.info(f"run {run_dir}: {len(train_set)} train images, {len(train_set.vocabulary)} distinct queries, "
             f"{len(val_samples)} val expressions, world size {info.world_size}")
    n_params = sum(p.numel() for p in model.parameters())
    log.info(f"model: {n_params / 1e6:.2f} M parameters, config {json.dumps(model.config.to_dict())}")

    # The detection loss never reaches CLIP's pooled image projection and contrastive scale; freeze
    # them (the pooled embedding stays a fixed random projection of the trained CLS token) so DDP
    # sees no unused parameters.
    for p in (*model.visual_projection.parameters(), model.logit_scale):
        p.requires_grad_(False)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    step_module = DetectionStep(model)
    if info.world_size > 1:
        step_module = DistributedDataParallel(step_module)
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
    rng = np.random.default_rng([args.seed, info.rank, start_step] if start_step else [args.seed, info.rank])
    per_epoch = max(1, len(train_set) // (args.batch_size * info.world_size))
    t0 = time.time()
    bar = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps, desc="pretrain",
               disable=not info.is_main or not args.progress, unit="step")
    order_epoch, order = -1, None
    for step in bar:
        epoch, within = divmod(step, per_epoch)
        if epoch != order_epoch:  # same shuffle on every rank; each takes its own slice
            order_epoch, order = epoch, np.random.default_rng([args.seed, epoch]).permutation(len(train_set))
        lo = (within * info.world_size + info.rank) * args.batch_size
        items = [train_set[int(i)] for i in order[lo: lo + args.batch_size]]
        pixels, queries, targets = detection_collate(items, train_set.vocabulary, args.max_queries, rng)
        ids, mask = tokenizer(queries)
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, args)
        model.train()
        with torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            logits, boxes = step_module(pixels.to(info.device), torch.from_numpy(ids).to(info.device),
                                        torch.from_numpy(mask).to(info.device))
        logits, boxes = logits.float(), boxes.float()  # losses and matching in fp32
        matches = match(boxes.detach(), targets.boxes)
        num_objects = max(1.0, all_reduce_sum(float(sum(len(r) for r, _ in matches)), info) / info.world_size)
        losses = detection_loss(logits, boxes, targets, matches, num_objects, w_rank=args.rank_weight)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if info.is_main and args.progress:
            bar.set_postfix(loss=f"{losses['loss'].item():.3f}", lr=f"{lr_at(step, args):.1e}")

        last = step + 1 == args.steps
        if (step + 1) % args.log_every == 0 or last:
            loss_mean = all_reduce_mean(losses["loss"].item(), info)
            log.info(f"step {step + 1}/{args.steps} loss {loss_mean:.4f} cls {losses['loss_cls']:.4f} "
                     f"l1 {losses['loss_l1']:.4f} giou {losses['loss_giou']:.4f} rank {losses['loss_rank']:.4f} "
                     f"({time.time() - t0:.0f}s)")
        if info.is_main and ((step + 1) % args.eval_every == 0 or last):
            acc = evaluate_samples(model, tokenizer, val_samples, batch_size=64, progress=False)
            r1 = acc.summary()[-1]["R@1"]
            history.append({"step": step + 1, "R@1": r1, "seconds": time.time() - t0})
            log.info(f"step {step + 1}: held-out single-target category R@1 {r1:.4f}")
            if r1 >= best:
                best = r1
                save_final(model, tokenizer, Path(args.output))
                log.info(f"saved best foundation to {args.output}")
        if info.is_main and ((step + 1) % args.save_every == 0 or last):
            save_checkpoint(run_dir / "checkpoint-last", model.save_pretrained, optimizer,
                            {"step": step + 1, "best": best, "args": vars(args), "history": history})
        barrier(info)

    summary = {"best_heldout_R@1": best, "seconds": time.time() - t0, "history": history, "run_dir": str(run_dir)}
    if info.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        log.info(f"done in {summary['seconds'] / 60:.1f} min, best held-out R@1 {best:.4f}")
    del step_module  # the DDP wrapper holds the process group: drop it before leaving (see cleanup)
    cleanup(info)
    return summary


def save_final(model: GroundingModel, tokenizer: QueryTokenizer, out: Path) -> None:
    """The deployable foundation: config.json + model.safetensors + tokenizer.json."""
    def write(d: Path) -> None:
        model.save_pretrained(d)
        tokenizer.save(d)
    save_checkpoint(out, write, None, None)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="data/synthetic", help="synthetic splits (written here if missing)")
    p.add_argument("--train-json", default=None,
                   help="MDETR-style json of category queries (default: synthetic pretrain)")
    p.add_argument("--val-json", default=None, help="MDETR-style json for validation (default: synthetic heldout)")
    p.add_argument("--n-images", type=int, default=None, help="pretrain images to write (default: the split's size)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the synthetic word tokenizer)")
    p.add_argument("--preset", default="embedded", choices=sorted(GROUNDING_PRESETS))
    p.add_argument("--output", default="checkpoints/foundation", help="where the best model is written")
    p.add_argument("--run-root", default="runs")
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
    p.add_argument("--val-limit", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads per process")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"],
                   help="autocast dtype of the forward pass (weights and optimizer stay fp32)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


if __name__ == "__main__":
    main(build_parser().parse_args())
