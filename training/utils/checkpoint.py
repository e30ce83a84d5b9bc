"""Resumable training checkpoints without pickle.

A checkpoint is a directory:

    config.json, model.safetensors     # the model, loadable on its own (from_pretrained)
    optimizer.safetensors              # optimizer tensors, flattened "state/{param}/{name}"
    trainer_state.json                 # step, optimizer hyper-parameters, scheduler, RNG seeds

It is written to a temporary sibling and renamed into place, so a crash mid-save leaves the
previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from diffprompt.core.errors import MissingFileError

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for pid, pstate in state["state"].items():
        for name, value in pstate.items():
            key = f"state/{pid}/{name}"
            if torch.is_tensor(value):
                tensors[key] = value.detach().contiguous().cpu()
            else:
                scalars[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        _, pid, name = key.split("/", 2)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    directory: str | Path,
    save_model: Callable[[Path], None],
    optimizer: torch.optim.Optimizer | None,
    trainer_state: dict[str, Any] | None,
) -> Path:
    """Atomically write a checkpoint directory. `save_model(dir)` writes the model files.

    With `optimizer` and `trainer_state` both None this is just an atomic `save_model`.
    """
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_model(tmp)
    meta: dict[str, Any] = {}
    if optimizer is not None:
        tensors, meta = _flatten_optimizer(optimizer.state_dict())
        save_file(tensors, str(tmp / OPTIMIZER_FILE))
    if trainer_state is not None:
        (tmp / STATE_FILE).write_text(json.dumps({**trainer_state, "optimizer": meta}, indent=2))
    old = directory.with_name(directory.name + ".old")
    if directory.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(directory, old)
    os.replace(tmp, directory)
    if old.exists():
        shutil.rmtree(old)
    return directory


def load_trainer_state(directory: str | Path, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Restore the optimizer (if given) and return trainer_state.json (without the optimizer part)."""
    directory = Path(directory)
    state_path = directory / STATE_FILE
    if not state_path.exists():
        raise MissingFileError(f"{state_path}: missing; {directory} is not a resumable checkpoint")
    state = json.loads(state_path.read_text())
    meta = state.pop("optimizer", {})
    if optimizer is not None and meta:
        tensors = load_file(str(directory / OPTIMIZER_FILE))
        optimizer.load_state_dict(_unflatten_optimizer(tensors, meta))
    return state
