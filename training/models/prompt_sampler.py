"""DDIM sampling of prompt latents, with the step outputs kept as per-layer prompts.

One noise schedule (a `diffusers.DDIMScheduler` config) is stored with the DiT checkpoint and
used for training (`add_noise`) and sampling (`step`): the official code trains with one
schedule and samples with another, we don't.

Diff-Prompt keeps several outputs of the 25-step DDIM trajectory, every 2nd step counting
back from the final x0, and gives each to one encoder layer: the shallowest layer gets the
cleanest latent. With another step count the trajectory has other outputs; layer i then takes
the output whose noise level (sqrt(1 - alpha_bar)) is closest to the level layer i gets in the
reference 25-step trajectory. At 25 steps this is exactly the paper's rule.

Noise comes from numpy's PCG64 seeded per sample (`initial_noise`), so the same seed gives the
same prompts on every backend (PyTorch, onnxruntime) and a batch gives what its items give
one by one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from diffusers import DDIMScheduler

from diffprompt.core.pipeline import initial_noise

SCHEDULER_DEFAULTS = dict(
    num_train_timesteps=100,  # the paper's T
    beta_schedule="squaredcos_cap_v2",  # cosine (Nichol & Dhariwal): sensible at T = 100
    prediction_type="epsilon",
    clip_sample=False,
    set_alpha_to_one=True,  # the last step lands on x0
    timestep_spacing="trailing",  # first step at t = T-1 (pure noise), right for 5-step sampling too
)
REFERENCE_STEPS = 25  # the paper's sampling steps, which define each layer's noise level
KEEP_EVERY = 2  # the paper keeps every 2nd step output, counting back from x0


def make_scheduler(config: dict | None = None) -> DDIMScheduler:
    return DDIMScheduler.from_config({**SCHEDULER_DEFAULTS, **(config or {})})


def output_noise_levels(scheduler: DDIMScheduler, steps: int) -> np.ndarray:
    """(steps,) noise std sqrt(1 - alpha_bar) of the latent after each DDIM step (last = x0 = 0)."""
    scheduler.set_timesteps(steps)
    alphas = scheduler.alphas_cumprod.numpy()
    levels = []
    for t in scheduler.timesteps.tolist():
        prev = t - scheduler.config.num_train_timesteps // steps  # as DDIMScheduler.step computes it
        alpha_prev = alphas[prev] if prev >= 0 else float(scheduler.final_alpha_cumprod)
        levels.append(np.sqrt(1.0 - alpha_prev))
    return np.asarray(levels, dtype=np.float64)


def kept_outputs(scheduler: DDIMScheduler, steps: int, depth: int) -> list[int]:
    """For each of `depth` layers (shallowest first), the index of the DDIM step output it gets."""
    if steps < 1 or depth < 1:
        raise ValueError(f"steps and depth must be >= 1, got {steps} and {depth}")
    reference = output_noise_levels(scheduler, REFERENCE_STEPS)
    ref_index = [max(0, REFERENCE_STEPS - 1 - KEEP_EVERY * i) for i in range(depth)]
    levels = output_noise_levels(scheduler, steps)
    # nearest level; on a tie the later (cleaner) output
    return [int(len(levels) - 1 - np.argmin(np.abs(levels[::-1] - reference[j]))) for j in ref_index]


@torch.no_grad()
def sample_prompt_latents(
    dit,
    scheduler: DDIMScheduler,
    conditions: dict[str, torch.Tensor],
    seeds: Sequence[int],
    steps: int,
    depth: int,
) -> torch.Tensor:
    """DDIM (eta = 0) from seeded noise; -> kept latents (B, depth, C, h, w), shallowest layer first.

    conditions: the keyword inputs of the DiT besides latents/timesteps (image_embed, text_embed,
    and for tokens conditioning image_tokens, text_tokens, text_mask, patch_scores).
    """
    cfg = dit.config
    shape = (cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    device = next(dit.parameters()).device
    x = torch.from_numpy(initial_noise(seeds, shape)).to(device)  # (B, C, h, w)
    keep = kept_outputs(scheduler, steps, depth)
    scheduler.set_timesteps(steps)
    prepared = dit.prepare_conditions(**conditions)  # the condition-only part, once for all steps
    outputs = []
    for t in scheduler.timesteps:
        eps = dit.denoise(x, t.expand(x.shape[0]).to(device), prepared)
        x = scheduler.step(eps, t, x, eta=0.0).prev_sample  # (B, C, h, w)
        outputs.append(x)
    return torch.stack([outputs[i] for i in keep], dim=1)  # (B, depth, C, h, w)
