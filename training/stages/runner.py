"""The stage runner: everything a training stage does besides training, in one place.

    with StageRunner("mask_vae", args) as run:        # refuses a non-empty --output without --overwrite,
                                                      # joins torchrun's process group (or runs alone),
                                                      # seeds torch, opens runs/NNN-mask_vae/ and its log
        step = run.wrap(TrainStep(forward, vae=vae))  # DistributedDataParallel when there are several ranks
        batches = run.batches(len(train), args.batch_size)
        for epoch in range(args.epochs):
            for idx in batches.epoch(epoch): ...      # this rank's share of the epoch
        if run.is_main:
            run.save(vae.save_pretrained)               # --output, written atomically
        return run.finish(summary)                    # runs/NNN-mask_vae/summary.json
    # leaving the block drops the DDP wrappers, then the process group

Single process: `diffprompt train-vae ...`. Several (gloo on CPU, NCCL on GPUs, one or more
hosts): `torchrun --nproc_per_node 2 -m diffprompt.training.train_mask_vae ...`; the rank, world
size and rendezvous come from torchrun's environment. Only rank 0 writes the run folder, the log,
the output and the summary.

Each stage module has `main(args)`: `with StageRunner(...) as run: return train(run, args)`. The
training function returns before the runner leaves the process group, so no DDP wrapper outlives it
(see `StageRunner.close`).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from diffprompt.core.errors import OutputExistsError, UserError
from diffprompt.training.utils.checkpoint import load_trainer_state, load_weights, save_checkpoint
from diffprompt.training.utils.resume import CHECKPOINT_NAME, trajectory


def check_output(output: str | Path, overwrite: bool) -> Path:
    """`output` if it is missing or empty, or if `overwrite`; else OutputExistsError naming the flag."""
    output = Path(output)
    if output.exists() and not overwrite and (not output.is_dir() or any(output.iterdir())):
        raise OutputExistsError(f"{output} exists and is not empty: pass --overwrite to replace it "
                                "(atomically, when the stage saves), or choose another --output")
    return output


class StageRunner:
    """One training stage's process group, seed, run folder, log, data shards and atomic saves."""

    def __init__(self, name: str, args: argparse.Namespace):
        self.output = check_output(args.output, args.overwrite)  # every rank, before any work
        torch.set_num_threads(args.threads)
        self.rank, self.world_size, self.device = join_process_group(args.device)
        self.is_main = self.rank == 0
        self.run_dir = new_run_dir(args.run_root, name) if self.is_main else None
        self.log = get_logger(name, self.run_dir, self.is_main)
        self.seed, self.show_progress = args.seed, args.progress
        self.args = args
        torch.manual_seed(args.seed)
        self._wrapped: list[nn.Module] = []

    def __enter__(self) -> StageRunner:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(in_step=exc_type is None)

    # -- training ---------------------------------------------------------------------------------

    def wrap(self, module: nn.Module) -> nn.Module:
        """`module` itself in one process; a DistributedDataParallel of it (averaging gradients) under torchrun."""
        if self.world_size == 1:
            return module
        ddp = DistributedDataParallel(module)
        self._wrapped.append(ddp)
        return ddp

    def batches(self, n: int, batch_size: int) -> ShardedBatches:
        """This rank's batches of indices into `n` samples (see ShardedBatches)."""
        return ShardedBatches(n, batch_size, self.seed, self.rank, self.world_size)

    def progress(self, total: int, desc: str, initial: int = 0) -> tqdm:
        """A progress bar on rank 0 (with progress on); update it as usual."""
        return tqdm(total=total, initial=initial, desc=desc, unit="step",
                    disable=not (self.is_main and self.show_progress))

    def mean(self, value: float) -> float:
        """The mean of `value` over the ranks (a collective: every rank calls it)."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def sum(self, value: float) -> float:
        """The sum of `value` over the ranks (a collective)."""
        return self.mean(value) * self.world_size

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def main_first(self, fn: Callable[[], Any]) -> None:
        """Run `fn` on rank 0 while the other ranks wait (writing shared files, such as missing data)."""
        if self.is_main:
            fn()
        self.barrier()

    # -- outputs (rank 0) -------------------------------------------------------------------------

    def save(self, write: Callable[[Path], None], directory: str | Path | None = None,
             optimizer: torch.optim.Optimizer | None = None, state: dict | None = None) -> Path:
        """Atomically (re)write `directory` (default: --output): `write(d)` fills a staging directory,
        which then replaces the old one (training/utils/checkpoint.py; with `optimizer` and `state`,
        a resumable checkpoint)."""
        return save_checkpoint(self.output if directory is None else directory, write, optimizer, state)

    # -- resumable checkpoints (training/utils/resume.py) -------------------------------------------

    def resume(self, model: nn.Module, optimizer: torch.optim.Optimizer, n_train: int) -> dict:
        """With --resume: check that checkpoint against this run (a ResumeMismatchError names what
        differs), restore `model`'s weights and the optimizer, and return its trainer state (`step` and
        what the stage saved with it). Without --resume: {}."""
        if not self.args.resume:
            return {}
        state = load_trainer_state(self.args.resume, optimizer, trajectory(self.args, n_train, self.world_size))
        load_weights(model, self.args.resume)
        return state

    def checkpoint_due(self, step: int, total: int) -> bool:
        """Whether rank 0 writes checkpoint-last after optimizer step `step` (1-based) of `total`: every
        --save-every steps, not after the last (the stage's output follows it)."""
        every = self.args.save_every
        return self.is_main and bool(every) and step % every == 0 and step < total

    def save_resumable(self, write: Callable[[Path], None], optimizer: torch.optim.Optimizer, n_train: int,
                       state: dict) -> Path:
        """runs/NNN-<stage>/checkpoint-last: `write(d)` puts the model files, then the optimizer, and
        trainer_state.json with `state` (at least `step`) and this run's trajectory, which `resume` checks."""
        return self.save(write, self.run_dir / CHECKPOINT_NAME, optimizer,
                         {**state, "trajectory": trajectory(self.args, n_train, self.world_size)})

    def finish(self, summary: dict) -> dict:
        """Write runs/NNN-name/summary.json (rank 0) and return the summary ({} on other ranks)."""
        if not self.is_main:
            return {}
        summary = {**summary, "run_dir": str(self.run_dir)}
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def close(self, in_step: bool = True) -> None:
        """Drop the DDP wrappers, then leave the process group.

        A DDP wrapper's C++ reducer holds the process group. If the group's last reference goes with
        the wrapper at interpreter exit, gloo's destructor joins its worker threads while holding the
        GIL, and a worker still releasing a finished collective's Python tensor waits for that GIL:
        both ranks hang forever (pytorch/pytorch#56297). With the wrappers gone (the training function
        has returned, and this list is cleared), `destroy_process_group` drops the last reference, and
        that path releases the GIL. After an error (`in_step` False) the ranks may no longer be in
        step, so there is no final barrier."""
        self._wrapped.clear()
        if self.world_size > 1 and dist.is_initialized():
            gc.collect()  # DDP wrappers sit in reference cycles; free them (and their reducers) now
            if in_step:
                dist.barrier()
            dist.destroy_process_group()


class TrainStep(nn.Module):
    """A training forward over `modules` as one module, so DistributedDataParallel can wrap it.

    TrainStep(fn, model=model)(*inputs) is fn(*inputs); `fn` uses the modules (by closure)."""

    def __init__(self, fn: Callable, **modules: nn.Module):
        super().__init__()
        self.fn = fn
        for name, module in modules.items():
            self.add_module(name, module)

    def forward(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


class ShardedBatches:
    """This rank's batches of sample indices, epoch by epoch.

    Every rank draws the same permutation of the n samples for an epoch (numpy, seeded by
    (seed, epoch)) and cuts it into batches of `batch_size`; rank r of W takes batches r, r + W,
    r + 2W, ... Every rank gets `len(self)` = max(1, n // (batch_size * W)) batches per epoch, so
    the ranks stay in step; the tail is dropped. (torch's DistributedSampler interleaves single
    samples and shuffles with torch's generator: another order than the one the committed
    checkpoints were trained with, which this keeps.)"""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.seed, self.rank, self.world_size = n, batch_size, seed, rank, world_size
        self._order: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return max(1, self.n // (self.batch_size * self.world_size))

    def order(self, epoch: int) -> np.ndarray:
        """(n,) the epoch's permutation, the same on every rank."""
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        return self._order[1]

    def batch(self, epoch: int, i: int) -> np.ndarray:
        """(<= batch_size,) the indices of this rank's i-th batch of `epoch`."""
        lo = (i * self.world_size + self.rank) * self.batch_size
        return self.order(epoch)[lo: lo + self.batch_size]

    def epoch(self, epoch: int) -> Iterator[np.ndarray]:
        """This rank's batches of `epoch`, in order (epoch-based stages)."""
        for i in range(len(self)):
            yield self.batch(epoch, i)

    def at_step(self, step: int) -> np.ndarray:
        """This rank's batch at global `step`, counting through the epochs (step-based stages)."""
        return self.batch(*divmod(step, len(self)))


# ----------------------------------------------------------------------------- process group, run folder


def join_process_group(device: str = "auto") -> tuple[int, int, torch.device]:
    """(rank, world size, device): the process group torchrun describes in the environment
    (gloo on CPU, NCCL on GPUs), or rank 0 of 1 without torchrun."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, torch.device("cuda" if use_cuda else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")


def new_run_dir(root: str | Path, name: str) -> Path:
    """A fresh `root/{index:03d}-{name}`, the index one above the highest there."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    indices = [int(m.group(1)) for p in root.iterdir() if (m := re.match(r"(\d{3})-", p.name))]
    run = root / f"{max(indices, default=-1) + 1:03d}-{name}"
    run.mkdir()
    return run


def get_logger(name: str, run_dir: Path | None, is_main: bool = True) -> logging.Logger:
    """A logger that writes on rank 0 only (to stdout and run_dir/log.txt)."""
    logger = logging.getLogger(f"diffprompt.{name}")
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if is_main and run_dir is not None:
        handlers.append(logging.FileHandler(run_dir / "log.txt"))
    for h in handlers:
        h.setFormatter(fmt)
        logger.addHandler(h)
    return logger


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 natively: a CUDA GPU that supports it, or a CPU with bf16
    instructions (AVX512-BF16 / AMX, what oneDNN reports). Elsewhere bf16 autocast is emulated, and
    on an AVX2-only CPU it made stage 3 about 8x slower than fp32 (docs/results.md)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(args: argparse.Namespace, device: torch.device, log: logging.Logger | None = None) -> str:
    """args.precision with "auto" resolved (bf16 where the device computes it natively, else fp32) and
    checked: fp16 autocast (with a gradient scaler) is for CUDA devices only, a UserError elsewhere.
    The resolved value is written back to args (summaries and resumable checkpoints record it)."""
    if args.precision == "auto":
        args.precision = "bf16" if native_bf16(device) else "fp32"
        if log is not None:
            log.info(f"--precision auto: {args.precision} on {device}")
    if args.precision == "fp16" and device.type != "cuda":
        raise UserError(f"--precision fp16 needs a CUDA device (this run is on {device}); use bf16 or fp32")
    return args.precision


def cache_dir(args: argparse.Namespace) -> Path:
    """--cache-dir, or <--data-dir>/.cache: where the stages keep what the frozen models computed."""
    return Path(args.cache_dir) if getattr(args, "cache_dir", None) else Path(args.data_dir) / ".cache"


def split_paths(run: StageRunner, args: argparse.Namespace, train: str, val: str,
                n_train_images: int | None = None) -> tuple[Path, Path]:
    """(train json, val json): --train-json / --val-json, else the synthetic splits `train` / `val`
    under --data-dir, which rank 0 writes first if they are missing while the other ranks wait."""
    from diffprompt.training.data.synthetic.writer import ensure_split

    data_dir = Path(args.data_dir)

    def write_missing() -> None:
        if not args.train_json:
            ensure_split(data_dir, train, n_train_images, run.log, args.progress)
        if not args.val_json:
            ensure_split(data_dir, val, None, run.log, args.progress)

    run.main_first(write_missing)
    return (Path(args.train_json) if args.train_json else data_dir / f"{train}.json",
            Path(args.val_json) if args.val_json else data_dir / f"{val}.json")
