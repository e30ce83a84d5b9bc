"""Resuming stages 1-3 at any optimizer step, also inside an epoch.

    --save-every N     every N optimizer steps, rank 0 rewrites runs/NNN-<stage>/checkpoint-last
                       (atomically): the trained weights, the optimizer, the learning-rate schedule,
                       the step and what the stage tracks (history, best score, EMA averages)
    --resume DIR       a checkpoint-last: the run continues at its step and ends where the
                       uninterrupted run would have ended, with the same weights

What makes "the same weights" hold: the batches of every step are a pure function of (seed, epoch,
rank) (`ShardedBatches`), and every random draw a stage makes per step is replayed on resume, not
stored, so a resumed rank continues exactly where it stopped, on every rank of a torchrun.

A checkpoint records the options that decide the trajectory; resuming with a different value of
one of them (batch size, learning rate, seed, ...) or a different number of train expressions or
processes is a `ResumeMismatchError` naming them. Options that only say where things are or how
fast they run (paths, threads, workers, caches, progress, micro-batch size, gradient
checkpointing) may change.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from diffprompt.core.errors import UserError

CHECKPOINT_NAME = "checkpoint-last"

# Options that do not change what a run computes (or only by float rounding): a resumed run may differ in them.
FREE_OPTIONS = frozenset({
    "resume", "save_every", "output", "overwrite", "run_root", "threads", "device", "progress", "workers",
    "data_dir", "train_json", "val_json", "image_root", "cache_dir", "mask_cache", "pixel_cache", "cache_dtype",
    "foundation", "mask_vae", "prompt_dit", "frozen_batch_size", "micro_batch_size", "gradient_checkpointing",
    "log_every", "val_limit", "prompt_diffusion", "prompt_diffusion_steps",  # the last two: after stage 3
})


class ResumeMismatchError(UserError):
    """--resume names a checkpoint of a run with other options, data size or process count."""


def add_resume_args(p: argparse.ArgumentParser, save_every: int) -> None:
    """--save-every and --resume (stages 1-3)."""
    from diffprompt.cli import non_negative_int

    p.add_argument("--save-every", type=non_negative_int, default=save_every,
                   help=f"optimizer steps between resumable checkpoints (runs/NNN-<stage>/{CHECKPOINT_NAME}; "
                        "0 = none)")
    p.add_argument("--resume", default=None,
                   help=f"a {CHECKPOINT_NAME} directory: continue that run at its step (same options), "
                        "also inside an epoch")


def trajectory(args: argparse.Namespace, n_train: int, world_size: int) -> dict[str, Any]:
    """What a checkpoint must agree on with the run resuming it."""
    options = {k: v for k, v in sorted(vars(args).items()) if k not in FREE_OPTIONS}
    options = json.loads(json.dumps(options, default=str))  # as trainer_state.json will hold them
    return {"options": options, "train_expressions": n_train, "world_size": world_size}


def check_resumable(saved: dict[str, Any], current: dict[str, Any], directory: Path) -> None:
    """ResumeMismatchError listing every difference between `saved` and `current` (`trajectory` dicts)."""
    diffs = []
    for key in ("train_expressions", "world_size"):
        if saved.get(key) != current[key]:
            diffs.append(f"{key.replace('_', ' ')} {saved.get(key)} (now {current[key]})")
    old, new = saved.get("options", {}), current["options"]
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            diffs.append(f"--{key.replace('_', '-')} {old.get(key)!r} (now {new.get(key)!r})")
    if diffs:
        raise ResumeMismatchError(f"--resume {directory}: that run had " + "; ".join(diffs)
                                  + ". Resume with its options, or start a new run")
