"""Command-line options shared by the training commands. No torch here: `--help` stays instant.

    add_data_args   where the data comes from (synthetic splits under --data-dir, or json files)
    add_run_args    where the result goes and how the run runs: --output (default under runs/),
                    --overwrite, --run-root, --seed, --threads, --device, --no-progress
"""

from __future__ import annotations

import argparse

from diffprompt.cli import non_negative_int, positive_int

# How a Diff-Prompt evaluation seeds each expression's noise (training/evaluation/rec.py, expression_seeds):
# "service" = the raw seed for every expression, as POST /v1/ground does (the product's policy);
# "expression" = (seed, sample id) per expression.
SEED_POLICIES = ("service", "expression")


def add_data_args(p: argparse.ArgumentParser, train: str = "train", val: str = "val",
                  val_limit: int | None = None) -> None:
    """--data-dir, --train-json, --val-json, --image-root, --val-limit, --workers, --cache-dir; `train` /
    `val` name the default synthetic splits."""
    p.add_argument("--data-dir", default="data/synthetic", help="synthetic splits (written here if missing)")
    p.add_argument("--train-json", default=None, help=f"MDETR-style train json (default: synthetic {train})")
    p.add_argument("--val-json", default=None, help=f"MDETR-style val json (default: synthetic {val})")
    add_image_root_arg(p)
    p.add_argument("--val-limit", type=positive_int, default=val_limit, help="validate on the first N expressions only")
    p.add_argument("--workers", type=non_negative_int, default=1,
                   help="DataLoader processes decoding and resizing images batch by batch (0 = in the main process)")
    p.add_argument("--cache-dir", default=None,
                   help="what the frozen models compute (conditions, sampled masks), on disk and keyed by the "
                        "weights' and the data's hashes (default: <data-dir>/.cache)")


def add_image_root_arg(p: argparse.ArgumentParser) -> None:
    """--image-root: where the image files of the json files live (RefCOCO: COCO's train2014/)."""
    p.add_argument("--image-root", default=None,
                   help="directory of the images the json files name (default: each json's own folder)")


def add_run_args(p: argparse.ArgumentParser, output: str) -> None:
    """--output (default `output`; a name in <angle brackets> is filled in by the command's main from
    that option), --overwrite, and the runner's options (training/stages/runner.py)."""
    p.add_argument("--output", default=None if "<" in output else output,
                   help=f"the directory the stage writes (default: {output}); "
                        "it must be missing or empty unless --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --output (atomically, when the stage saves)")
    p.add_argument("--run-root", default="runs", help="run folders NNN-<stage> (log, summary, resumable state)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads per process")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def add_precision_arg(p: argparse.ArgumentParser, fp16: bool = False) -> None:
    """--precision: the autocast dtype of the training forward pass (weights and optimizer stay fp32)."""
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", *(["fp16"] if fp16 else []), "fp32"],
                   help="autocast dtype of the forward pass (weights and optimizer stay fp32); auto: bf16 where "
                        "the device computes it natively (CUDA, CPUs with AVX512-BF16 / AMX), else fp32"
                        + ("; fp16: CUDA only, with a gradient scaler" if fp16 else ""))
