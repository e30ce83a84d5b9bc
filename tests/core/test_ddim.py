"""The numpy DDIM update of the serving path equals diffusers' DDIMScheduler.step, for every prediction type."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from diffprompt.core.ddim import ddim_update, steps_from_table
from diffprompt.model_export.artifact import schedule_table


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("clip_sample", [False, True])
@pytest.mark.parametrize("steps", [25, 5])
def test_numpy_update_equals_diffusers_step(prediction_type, clip_sample, steps):
    scheduler = DDIMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2",
                              prediction_type=prediction_type, clip_sample=clip_sample, clip_sample_range=1.5,
                              set_alpha_to_one=False)
    table = steps_from_table(schedule_table(scheduler, steps))
    scheduler.set_timesteps(steps)
    rng = np.random.default_rng(0)
    x_torch = torch.from_numpy(rng.standard_normal((2, 4, 8, 8)).astype(np.float32))
    x_numpy = x_torch.numpy().copy()
    assert [r.timestep for r in table] == scheduler.timesteps.tolist()
    for row, t in zip(table, scheduler.timesteps):
        out = torch.from_numpy(rng.standard_normal((2, 4, 8, 8)).astype(np.float32))  # any model output
        x_torch = scheduler.step(out, t, x_torch, eta=0.0).prev_sample
        x_numpy = ddim_update(x_numpy, out.numpy(), row, prediction_type, 1.5 if clip_sample else None)
        np.testing.assert_allclose(x_numpy, x_torch.numpy(), rtol=1e-5, atol=1e-5)
    assert x_numpy.dtype == np.float32


def test_an_unknown_prediction_type_is_refused():
    (row,) = steps_from_table([{"timestep": 9, "alpha_prod_t": 0.5, "alpha_prod_prev": 0.9}])
    x = np.zeros((1, 1, 2, 2), np.float32)
    with pytest.raises(ValueError, match="unknown prediction_type 'noise'"):
        ddim_update(x, x, row, "noise", None)
