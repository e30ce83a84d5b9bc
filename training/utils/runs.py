"""Run folders `runs/{index:03d}-{name}` with a log to stdout and to `log.txt` (rank 0 only)."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path


def new_run_dir(root: str | Path, name: str) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    indices = [int(m.group(1)) for p in root.iterdir() if (m := re.match(r"(\d{3})-", p.name))]
    run = root / f"{max(indices, default=-1) + 1:03d}-{name}"
    run.mkdir()
    return run


def get_logger(name: str, run_dir: Path | None, is_main: bool = True) -> logging.Logger:
    """A logger that writes on rank 0 only (to stdout and run_dir/log.txt)."""
    logger = logging.getLogger(name)
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
