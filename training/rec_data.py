"""Command-line plumbing shared by the REC stages (1-3): which split files, threads, device."""

from __future__ import annotations

import argparse
from pathlib import Path

from diffprompt.cli import positive_int
from diffprompt.training.utils.distributed import DistInfo, barrier


def add_rec_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default="data/synthetic", help="synthetic splits (written here if missing)")
    p.add_argument("--train-json", default=None, help="MDETR-style REC train json (default: synthetic train)")
    p.add_argument("--val-json", default=None, help="MDETR-style REC val json (default: synthetic val)")
    p.add_argument("--val-limit", type=int, default=None, help="validate on the first N expressions only")
    p.add_argument("--run-root", default="runs")


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads per process")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def rec_split_paths(args: argparse.Namespace, info: DistInfo, log) -> tuple[Path, Path]:
    """(train json, val json); rank 0 writes missing synthetic splits while the others wait."""
    from diffprompt.training.pretrain_foundation import ensure_synthetic_split

    data_dir = Path(args.data_dir)
    if info.is_main:
        if not args.train_json:
            ensure_synthetic_split(data_dir, "train", None, log, args.progress)
        if not args.val_json:
            ensure_synthetic_split(data_dir, "val", None, log, args.progress)
    barrier(info)
    train = Path(args.train_json) if args.train_json else data_dir / "train.json"
    val = Path(args.val_json) if args.val_json else data_dir / "val.json"
    return train, val
