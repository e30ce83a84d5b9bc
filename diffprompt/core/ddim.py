"""DDIM (eta = 0) update in numpy: the few-FMA loop that runs outside the exported denoiser graph.

The exporter bakes the schedule of one fixed step count into the artifact's manifest
(`schedule_table`); the runtime walks that table, calling the denoiser graph once per row. The
formulas are diffusers' `DDIMScheduler.step` with eta = 0 (`use_clipped_model_output=False`):

    a_t, a_prev         alpha_bar of this step's timestep and of the previous one (1 after the last)
    x0  = model output  ("sample")
        | (x - sqrt(1 - a_t) eps) / sqrt(a_t)                      ("epsilon", eps = model output)
        | sqrt(a_t) x - sqrt(1 - a_t) v                            ("v_prediction", v = model output)
    eps = (x - sqrt(a_t) x0) / sqrt(1 - a_t), or the model's own for "epsilon"
    x0 clipped to [-r, r] if clip_sample
    x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps

No torch here: the serving runtime imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DDIMStep:
    timestep: int
    alpha_prod_t: float
    alpha_prod_prev: float


def ddim_update(x: np.ndarray, model_output: np.ndarray, step: DDIMStep, prediction_type: str,
                clip_sample_range: float | None) -> np.ndarray:
    """One DDIM step: x_t (B, C, h, w) -> x_prev (B, C, h, w), float32."""
    a_t, a_prev = step.alpha_prod_t, step.alpha_prod_prev
    b_t = 1.0 - a_t
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (x - np.sqrt(b_t) * eps) / np.sqrt(a_t)
    elif prediction_type == "sample":
        x0 = model_output
        eps = (x - np.sqrt(a_t) * x0) / np.sqrt(b_t)
    elif prediction_type == "v_prediction":
        x0 = np.sqrt(a_t) * x - np.sqrt(b_t) * model_output
        eps = np.sqrt(a_t) * model_output + np.sqrt(b_t) * x
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r}")
    if clip_sample_range:
        x0 = np.clip(x0, -clip_sample_range, clip_sample_range)
    return (np.sqrt(a_prev) * x0 + np.sqrt(1.0 - a_prev) * eps).astype(np.float32)


def steps_from_table(table: list[dict]) -> list[DDIMStep]:
    return [DDIMStep(int(r["timestep"]), float(r["alpha_prod_t"]), float(r["alpha_prod_prev"])) for r in table]
