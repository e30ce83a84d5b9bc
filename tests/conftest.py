"""Shared fixtures: small synthetic splits written once per session, the committed foundation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

REPO = Path(__file__).resolve().parents[1]
FOUNDATION_DIR = REPO / "checkpoints" / "foundation"


@pytest.fixture(scope="session")
def small_world(tmp_path_factory) -> Path:
    """A few images of each synthetic split in MDETR format."""
    from training.data.synthetic.splits import SPLITS
    from training.data.synthetic.writer import write_split

    out = tmp_path_factory.mktemp("world")
    for name, n in [("pretrain", 24), ("heldout", 12), ("val", 8), ("testA", 8), ("testB", 8)]:
        write_split(SPLITS[name], out, n_images=n, progress=False)
    return out


@pytest.fixture(scope="session")
def foundation_dir() -> Path:
    if not (FOUNDATION_DIR / "model.safetensors").exists():
        pytest.fail(f"{FOUNDATION_DIR} missing: the embedded-default foundation must be committed")
    return FOUNDATION_DIR
