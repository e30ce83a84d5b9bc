"""Resumable training checkpoints without pickle.

A checkpoint is a directory:

    config.json, model.safetensors     # the model, loadable on its own (from_pretrained)
    optimizer.safetensors              # optimizer tensors, flattened "state/{param}/{name}"
    trainer_state.json                 # step, optimizer hyper-parameters, scheduler, RNG seeds

Every directory a training stage writes (a resumable checkpoint or just a model) is written into a
staging sibling and then swapped in with `diffprompt.core.files.replace_directory`: a reader sees
the old directory or the new one, never neither, and a crash mid-save leaves the old one intact.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from diffprompt.core.errors import MissingFileError, read_json_object
from diffprompt.core.files import replace_directory, staging_dir
from diffprompt.training.utils.resume import check_resumable

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
    """Atomically (re)write a checkpoint directory. `save_model(dir)` writes the model files.

    With `optimizer` and `trainer_state` both None this is just an atomic `save_model`.
    """
    staging = staging_dir(directory)
    try:
        save_model(staging)
        meta: dict[str, Any] = {}
        if optimizer is not None:
            tensors, meta = _flatten_optimizer(optimizer.state_dict())
            save_file(tensors, str(staging / OPTIMIZER_FILE))
        if trainer_state is not None:
            (staging / STATE_FILE).write_text(json.dumps({**trainer_state, "optimizer": meta}, indent=2))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return replace_directory(staging, directory)


def load_trainer_state(directory: str | Path, optimizer: torch.optim.Optimizer | None,
                       trajectory: dict[str, Any] | None = None) -> dict[str, Any]:
    """Restore the optimizer (if given) and return trainer_state.json (without the optimizer part).

    With `trajectory` (training/utils/resume.py), the checkpoint's own must match it first: a
    ResumeMismatchError names what differs, and nothing is restored."""
    directory = Path(directory)
    state = read_json_object(directory / STATE_FILE, MissingFileError, f"{directory} is not a resumable checkpoint")
    if trajectory is not None:
        check_resumable(state.get("trajectory", {}), trajectory, directory)
    meta = state.pop("optimizer", {})
    if optimizer is not None and meta:
        tensors = load_file(str(directory / OPTIMIZER_FILE))
        optimizer.load_state_dict(_unflatten_optimizer(tensors, meta))
    return state


def load_weights(module: torch.nn.Module, directory: str | Path) -> None:
    """Every tensor of `directory`/model.safetensors into `module`, strictly (a checkpoint's trained weights)."""
    module.load_state_dict(load_file(str(Path(directory) / "model.safetensors")))
