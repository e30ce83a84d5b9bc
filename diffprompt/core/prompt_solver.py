"""Prompt Diffusion's samplers in numpy: the loop that runs outside the exported prompt denoiser graph.

The model predicts the clean sample x0 (diffusers' prediction type "sample"). Two solvers, each
from the schedule table the exporter writes into the manifest for one fixed step count:

- "dpm": DPM-Solver++ (multistep, 2nd order, midpoint), as diffusers' `DPMSolverMultistepScheduler`
  with algorithm_type "dpmsolver++", solver_order 2, lower_order_final, final sigma 0. The table
  holds its timesteps and sigmas (sigma = sqrt((1 - alpha_bar) / alpha_bar), one more than steps).
  With alpha = 1 / sqrt(1 + sigma^2), s = sigma * alpha and lambda = log(alpha / s), a step from
  sigma_i to sigma_{i+1} with h = lambda_{i+1} - lambda_i is

      1st order  x <- (s_{i+1} / s_i) x - alpha_{i+1} (e^-h - 1) D0                       D0 = x0_i
      2nd order  ... - 0.5 alpha_{i+1} (e^-h - 1) D1,  D1 = (x0_i - x0_{i-1}) / r,  r = h_{i-1} / h

  The first step is 1st order (no history yet), and so is the last (lower_order_final below 15
  steps), which lands on sigma 0: x = x0 of the last call.
- "ddim": DDIM with eta 0 (`diffprompt.core.ddim`), the 1st-order solver, from its own rows.

No torch here: the serving runtime imports this module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from diffprompt.core.ddim import DDIMStep, ddim_update

SOLVERS = ("dpm", "ddim")


@dataclass(frozen=True)
class PromptSampler:
    """What the prompt sampling loop needs: the solver, the packed prompt size and the schedule."""

    solver: str  # "dpm" | "ddim"
    num_features: int  # F: the length of a packed prompt offset
    timesteps: tuple[int, ...]  # one per denoiser call
    sigmas: tuple[float, ...] = ()  # "dpm": len(timesteps) + 1, the last 0
    ddim: tuple[DDIMStep, ...] = ()  # "ddim": one row per call

    def __post_init__(self):
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        if self.solver == "dpm" and len(self.sigmas) != len(self.timesteps) + 1:
            raise ValueError(f"dpm needs {len(self.timesteps) + 1} sigmas, got {len(self.sigmas)}")
        if self.solver == "ddim" and len(self.ddim) != len(self.timesteps):
            raise ValueError(f"ddim needs {len(self.timesteps)} schedule rows, got {len(self.ddim)}")

    @property
    def steps(self) -> int:
        return len(self.timesteps)


def _alpha_sigma(sigma: float) -> tuple[float, float]:
    alpha = 1.0 / np.sqrt(sigma * sigma + 1.0)
    return alpha, sigma * alpha


def dpm_update(x: np.ndarray, x0s: list[np.ndarray], sigmas: Sequence[float], i: int, order: int) -> np.ndarray:
    """One DPM-Solver++ step from sigmas[i] to sigmas[i + 1]; x0s: the model's x0 so far, newest last."""
    alpha_t, s_t = _alpha_sigma(sigmas[i + 1])
    alpha_0, s_0 = _alpha_sigma(sigmas[i])
    d0 = x0s[-1]
    if s_t == 0.0:  # the final step to sigma 0 (lambda = inf): the clean sample itself
        return d0.astype(np.float32)
    h = (np.log(alpha_t) - np.log(s_t)) - (np.log(alpha_0) - np.log(s_0))
    out = (s_t / s_0) * x - (alpha_t * (np.exp(-h) - 1.0)) * d0
    if order == 2:
        alpha_1, s_1 = _alpha_sigma(sigmas[i - 1])
        h_0 = (np.log(alpha_0) - np.log(s_0)) - (np.log(alpha_1) - np.log(s_1))
        d1 = (d0 - x0s[-2]) * (h / h_0)
        out = out - 0.5 * (alpha_t * (np.exp(-h) - 1.0)) * d1
    return out.astype(np.float32)


def sample_offsets(denoise: Callable[[np.ndarray, np.ndarray], np.ndarray], sampler: PromptSampler,
                   noise: np.ndarray) -> np.ndarray:
    """noise (B, F) -> packed scaled prompt offsets x0 (B, F); denoise(x, timesteps (B,)) -> x0 (B, F)."""
    x = noise.astype(np.float32)
    x0s: list[np.ndarray] = []
    n = sampler.steps
    for i, t in enumerate(sampler.timesteps):
        x0 = denoise(x, np.full((len(x),), t, dtype=np.int64))
        if sampler.solver == "ddim":
            x = ddim_update(x, x0, sampler.ddim[i], "sample", None)
            continue
        x0s = [*x0s[-1:], x0]
        lower_final = i == n - 1 and n < 15
        order = 1 if i == 0 or lower_final else 2
        x = dpm_update(x, x0s, sampler.sigmas, i, order)
    return x
