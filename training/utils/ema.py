"""Exponential moving average of a model's parameters, with warm-up (stage 2 samples with these weights).

    ema = EMA(model.parameters(), decay=0.999)
    ... optimizer.step(); ema.update(model.parameters())
    with ema.applied(model.parameters()):   # the EMA weights in the model for the block
        evaluate(model); save(model)        # the training weights are back after it

Update k (k = 1, 2, ...) moves each average towards its parameter by 1 - decay_k, with
decay_k = min(decay, 1 - k' ** -power), k' = k (0 for the first update, which copies the weights):
the warm-up schedule of diffusers' EMAModel(use_ema_warmup=True, inv_gamma=1), which trained the
committed DiTs. Early averages then forget their random start quickly; decay 0.999 is reached
after ~31k updates at power 2/3.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


class EMA:
    def __init__(self, parameters: Iterable[torch.nn.Parameter], decay: float, power: float = 2 / 3):
        self.averages = [p.detach().clone() for p in parameters]
        self.decay, self.power, self.updates = decay, power, 0

    def decay_at(self, update: int) -> float:
        """The decay of update number `update` (1-based)."""
        k = update - 1
        return 0.0 if k <= 0 else min(self.decay, 1 - (1 + k) ** -self.power)

    @torch.no_grad()
    def update(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        self.updates += 1
        rate = 1 - self.decay_at(self.updates)
        for avg, p in zip(self.averages, parameters):
            if p.requires_grad:
                avg.sub_(rate * (avg - p))
            else:
                avg.copy_(p)

    @contextmanager
    def applied(self, parameters: Iterable[torch.nn.Parameter]) -> Iterator[None]:
        """The averages in `parameters` inside the block, the original values after it."""
        parameters = list(parameters)
        kept = [p.detach().clone() for p in parameters]
        with torch.no_grad():
            for p, avg in zip(parameters, self.averages):
                p.copy_(avg)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, value in zip(parameters, kept):
                    p.copy_(value)

    def save(self, path: Path) -> None:
        """The averages as safetensors ("average/{i}", in parameter order)."""
        save_file({f"average/{i}": a.detach().contiguous().cpu() for i, a in enumerate(self.averages)}, str(path))

    def load(self, path: Path, updates: int) -> None:
        """Averages written by `save`, and the number of updates they had seen (for the warm-up)."""
        tensors = load_file(str(path))
        if len(tensors) != len(self.averages):
            raise ValueError(f"{path}: {len(tensors)} averages for {len(self.averages)} parameters")
        with torch.no_grad():
            for i, a in enumerate(self.averages):
                a.copy_(tensors[f"average/{i}"])
        self.updates = updates


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, model: torch.nn.Module, ema: EMA,
                   max_grad_norm: float = 1.0) -> None:
    """One training step of a model kept with an EMA: backward, clip the gradient norm, step, update the EMA."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    ema.update(model.parameters())
