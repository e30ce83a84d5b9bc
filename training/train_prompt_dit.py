"""Stage 2: train the prompt generator (DiT) to denoise Mask-VAE latents of referred objects.

Conditions come from the frozen foundation run without prompts (pooled embeddings; with
`--conditioning tokens` also its image and text tokens); they and the target latents are
computed once, then the DiT trains from memory with an MSE loss (official: epsilon, T = 100,
AdamW lr 1e-4, EMA 0.9999; our short CPU schedule uses lr 1e-3 and EMA 0.999 with warm-up).
The checkpoint holds the EMA weights (used for sampling) and the one noise schedule
(`scheduler_config.json`). Validation samples val masks with DDIM and reports the IoU of the
final decoded mask with the target; the checkpoint keeps the EMA weights of the best validation.

Deviations from the paper, measured here: the DiT predicts x0 (`--prediction-type sample`)
instead of epsilon, and DDIM clips its x0 estimate to [-3, 3]. With T = 100 the first sampling
step starts at alpha_bar ~ 2e-7, where an epsilon model's x0 estimate is its error times ~2000
(x0 MSE 8400 at t = 99 after 1000 steps), and the epsilon loss barely weighs the high-noise
steps that decide *where* the mask goes; x0 prediction weighs them fully.

    diffprompt train-dit --conditioning tokens --output checkpoints/prompt_dit_tokens
    torchrun --nproc_per_node 2 -m diffprompt.training.train_prompt_dit --conditioning pooled --output ...
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from diffusers.training_utils import EMAModel
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from diffprompt.core.image_spec import ImageSpec
from diffprompt.training.data.mdetr import load_mdetr
from diffprompt.training.data.rec_arrays import RecArrays, load_rec_arrays
from diffprompt.training.evaluate import load_foundation
from diffprompt.training.models.diffprompt import SCHEDULER_FILE, foundation_conditions
from diffprompt.training.models.mask_vae import decode_latents, encode_masks, load_mask_vae, mask_iou
from diffprompt.training.models.prompt_dit import PROMPT_DIT_PRESETS, PromptDiT, referred_patch
from diffprompt.training.models.prompt_sampler import make_scheduler, sample_prompt_latents
from diffprompt.training.rec_data import add_rec_data_args, add_runtime_args, rec_split_paths
from diffprompt.training.utils.checkpoint import save_checkpoint
from diffprompt.training.utils.distributed import all_reduce_mean, barrier, cleanup, init_distributed
from diffprompt.training.utils.runs import get_logger, new_run_dir


@torch.no_grad()
def compute_conditions(foundation, tokenizer, data: RecArrays, tokens: bool, batch_size: int = 64,
                       progress: bool = True) -> dict[str, torch.Tensor]:
    """Every sample's DiT conditions, concatenated along the batch (float32, on CPU)."""
    parts: list[dict[str, torch.Tensor]] = []
    for lo in tqdm(range(0, len(data), batch_size), desc="conditions", disable=not progress, leave=False):
        ids, mask = tokenizer([s.expression for s in data.samples[lo: lo + batch_size]])
        parts.append(foundation_conditions(foundation, data.pixels[lo: lo + batch_size].float(),
                                           torch.from_numpy(ids), torch.from_numpy(mask), tokens))
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


@torch.no_grad()
def sampled_mask_iou(dit, scheduler, vae, cond: dict, targets: torch.Tensor, steps: int, seed: int = 0,
                     batch_size: int = 128) -> float:
    """Mean IoU of the final DDIM sample's decoded mask with the target masks."""
    dit.eval()
    ious = []
    for lo in range(0, len(targets), batch_size):
        c = {k: v[lo: lo + batch_size] for k, v in cond.items()}
        seeds = [seed * 1_000_003 + i for i in range(lo, lo + len(c["image_embed"]))]
        x0 = sample_prompt_latents(dit, scheduler, c, seeds, steps, depth=1)[:, 0]
        ious.append(mask_iou(decode_latents(vae, x0)[:, 0] > 0, targets[lo: lo + batch_size]))
    return float(torch.cat(ious).mean())


@torch.no_grad()
def pointer_accuracy(dit: PromptDiT, cond: dict, targets: torch.Tensor, batch_size: int = 256) -> float:
    """Fraction of samples whose pointer head picks the patch holding the referred object."""
    dit.eval()
    hits = []
    for lo in range(0, len(targets), batch_size):
        c = {k: v[lo: lo + batch_size] for k, v in cond.items()}
        logits = dit.prepare_conditions(**c)["pointer_logits"]  # (B, P): the condition-only part, no DiT blocks
        hits.append(logits.argmax(1) == targets[lo: lo + batch_size])
    return float(torch.cat(hits).float().mean())


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    info = init_distributed(args.device)
    run_dir = new_run_dir(args.run_root, f"prompt_dit_{args.conditioning}") if info.is_main else None
    log = get_logger("train_dit", run_dir, info.is_main)
    torch.manual_seed(args.seed)

    foundation, tokenizer = load_foundation(args.foundation)
    foundation.eval().requires_grad_(False)
    vae = load_mask_vae(args.mask_vae).requires_grad_(False)
    m = vae.config.sample_size
    spec = ImageSpec.from_config(foundation.config)
    train_json, val_json = rec_split_paths(args, info, log)
    train = load_rec_arrays(load_mdetr(train_json), spec, m, progress=args.progress,
                            cache_dir=Path(args.data_dir) / ".cache")
    val = load_rec_arrays(list(load_mdetr(val_json))[: args.val_limit], spec, m, progress=args.progress)
    tokens = args.conditioning == "tokens"
    cond = compute_conditions(foundation, tokenizer, train, tokens, progress=args.progress and info.is_main)
    val_cond = compute_conditions(foundation, tokenizer, val, tokens, progress=args.progress and info.is_main)
    latents = torch.cat([encode_masks(vae, train.masks[lo: lo + 256]) for lo in range(0, len(train), 256)])
    fcfg = foundation.config
    pointer_targets = referred_patch(train.masks, fcfg.grid_size)  # (N,) the patch holding each referred object
    val_pointer_targets = referred_patch(val.masks, fcfg.grid_size)
    train.pixels = val.pixels = None  # conditions are all the DiT needs

    dit = PromptDiT(
        latent_channels=latents.shape[1], latent_size=latents.shape[-1], conditioning=args.conditioning,
        image_embed_dim=fcfg.projection_dim, text_embed_dim=fcfg.projection_dim,
        image_token_dim=fcfg.vision.hidden_size, text_token_dim=fcfg.text.hidden_size, image_grid=fcfg.grid_size,
        context_layers=args.context_layers if tokens else 0, **PROMPT_DIT_PRESETS[args.preset],
    ).to(info.device)
    scheduler = make_scheduler({"num_train_timesteps": args.train_timesteps, "prediction_type": args.prediction_type,
                                "clip_sample": args.clip_sample > 0, "clip_sample_range": args.clip_sample or 1.0})
    n_params = sum(p.numel() for p in dit.parameters())
    log.info(f"run {run_dir}: {len(train)} train latents {tuple(latents.shape[1:])}, {len(val)} val, "
             f"conditioning {args.conditioning}, {n_params / 1e6:.2f} M parameters, world size {info.world_size}")

    ema = EMAModel(dit.parameters(), decay=args.ema_decay, use_ema_warmup=True, power=2 / 3)
    model = DistributedDataParallel(dit) if info.world_size > 1 else dit
    optimizer = torch.optim.AdamW(dit.parameters(), lr=args.lr, weight_decay=0.0)
    per_epoch = max(1, len(train) // (args.batch_size * info.world_size))
    generator = torch.Generator().manual_seed(args.seed * 1000 + info.rank)
    t0 = time.time()
    history, best = [], -1.0
    bar = tqdm(range(args.steps), desc=f"dit-{args.conditioning}", unit="step",
               disable=not info.is_main or not args.progress)
    order = None
    for step in bar:
        epoch, within = divmod(step, per_epoch)
        if within == 0:
            order = np.random.default_rng([args.seed, epoch]).permutation(len(train))
        lo = (within * info.world_size + info.rank) * args.batch_size
        idx = torch.from_numpy(order[lo: lo + args.batch_size])
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, args.train_timesteps, (len(idx),), generator=generator)
        xt = scheduler.add_noise(x0, noise, t)
        c = {k: v[idx].to(info.device) for k, v in cond.items()}
        with torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            out = model(xt.to(info.device), t.to(info.device), **c, return_pointer=dit.pointer)
        eps, pointer_logits = out if dit.pointer else (out, None)
        target = {"epsilon": noise, "sample": x0}.get(args.prediction_type) if args.prediction_type != "v_prediction" \
            else scheduler.get_velocity(x0, noise, t)
        loss = torch.nn.functional.mse_loss(eps.float(), target.to(info.device))
        if dit.pointer:  # the pointer head's direct "which patch is referred" signal
            loss = loss + args.pointer_loss_weight * torch.nn.functional.cross_entropy(
                pointer_logits.float(), pointer_targets[idx].to(info.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
        optimizer.step()
        ema.step(dit.parameters())
        if info.is_main and args.progress:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % args.log_every == 0:
            log.info(f"step {step + 1}/{args.steps} loss {all_reduce_mean(loss.item(), info):.4f} "
                     f"({time.time() - t0:.0f}s)")
        last = step + 1 == args.steps
        if info.is_main and ((step + 1) % args.eval_every == 0 or last):
            with ema_weights(ema, dit):
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
                    save_checkpoint(Path(args.output), lambda d: write(dit, scheduler, d), None, None)
                    log.info(f"saved EMA weights (best val mask IoU {best:.4f}) to {args.output}")
            dit.train()
        barrier(info)

    summary = {}
    if info.is_main:
        summary = {"seconds": time.time() - t0, "parameters": n_params, "history": history, "run_dir": str(run_dir),
                   "conditioning": args.conditioning, "best_val_mask_iou": best}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        log.info(f"done in {summary['seconds'] / 60:.1f} min; {args.output} holds the EMA weights with the best "
                 f"val mask IoU ({best:.4f})")
    del model  # the DDP wrapper holds the process group: drop it before leaving (see cleanup)
    cleanup(info)
    return summary


def write(dit: PromptDiT, scheduler, directory: Path) -> None:
    """The stage-2 checkpoint: config.json + safetensors (EMA weights) + scheduler_config.json (the one schedule)."""
    dit.save_pretrained(directory)
    scheduler.save_config(directory)
    assert (directory / SCHEDULER_FILE).exists()


class ema_weights:
    """Context manager: the EMA weights in the model for the block, the training weights after."""

    def __init__(self, ema: EMAModel, model: torch.nn.Module):
        self.ema, self.model = ema, model

    def __enter__(self):
        self.ema.store(self.model.parameters())
        self.ema.copy_to(self.model.parameters())

    def __exit__(self, *exc):
        self.ema.restore(self.model.parameters())


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_rec_data_args(p)
    p.add_argument("--foundation", default="checkpoints/foundation")
    p.add_argument("--mask-vae", default="checkpoints/mask_vae")
    p.add_argument("--conditioning", default="tokens", choices=["pooled", "tokens"],
                   help="pooled: the paper's adaLN-Zero on pooled embeddings; tokens: + cross-attention")
    p.add_argument("--preset", default="embedded", choices=sorted(PROMPT_DIT_PRESETS))
    p.add_argument("--context-layers", type=int, default=3,
                   help="tokens conditioning: transformer layers over the joint condition tokens, with a "
                        "pointer head trained to find the referred patch (0 = off, the cross-attention-only DiT)")
    p.add_argument("--pointer-loss-weight", type=float, default=1.0,
                   help="weight of the pointer head's cross-entropy next to the denoising MSE")
    p.add_argument("--output", default="checkpoints/prompt_dit")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--train-timesteps", type=int, default=100, help="T of the noise schedule")
    p.add_argument("--prediction-type", default="sample", choices=["epsilon", "v_prediction", "sample"],
                   help="what the DiT predicts (the paper: epsilon)")
    p.add_argument("--clip-sample", type=float, default=3.0,
                   help="DDIM clips its x0 estimate to [-r, r] (latents have unit std); 0 = off")
    p.add_argument("--eval-every", type=int, default=1000, help="steps between val mask IoU checks (best kept)")
    p.add_argument("--eval-steps", type=int, nargs="+", default=[25, 5], help="DDIM step counts to validate")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    add_runtime_args(p)
    return p


if __name__ == "__main__":
    main(build_parser().parse_args())
