"""Shared fixtures: small synthetic splits written once per session, the committed foundation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.foundation_testkit import save_baby_foundation

os.environ.setdefault("OMP_NUM_THREADS", "2")

REPO = Path(__file__).resolve().parents[1]
FOUNDATION_DIR = REPO / "checkpoints" / "foundation"


def pytest_addoption(parser):
    parser.addoption("--image-tests", action="store_true",
                     help="the tests marked `image` must run: fail instead of skipping when no images are named "
                          "(bash deploy/local-engine.sh run provides them; make test IMAGE_TESTS=1)")


def pytest_collection_modifyitems(config, items):
    """Tests marked `image` need the images deploy/local-engine.sh built (DEPLOY_SERVING_IMAGE names them)."""
    image_tests = [item for item in items if "image" in item.keywords]
    if not image_tests or os.environ.get("DEPLOY_SERVING_IMAGE"):
        return
    if config.getoption("--image-tests"):
        raise pytest.UsageError("--image-tests: DEPLOY_SERVING_IMAGE is not set; run the tests through "
                                "`bash deploy/local-engine.sh run ...` (make test IMAGE_TESTS=1 does)")
    skip = pytest.mark.skip(reason="builds and runs the Docker images: make test IMAGE_TESTS=1")
    for item in image_tests:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def small_world(tmp_path_factory) -> Path:
    """A few images of each synthetic split in MDETR format."""
    from diffprompt.training.data.synthetic.splits import SPLITS
    from diffprompt.training.data.synthetic.writer import write_split

    out = tmp_path_factory.mktemp("world")
    for name, n in [("pretrain", 24), ("heldout", 12), ("train", 16), ("val", 8), ("testA", 8), ("testB", 8),
                    ("train_absent", 16), ("val_absent", 8), ("test_absent", 8),
                    ("shift_background", 4), ("shift_size", 4), ("shift_crowded", 4)]:
        write_split(SPLITS[name], out, n_images=n, progress=False)
    return out


@pytest.fixture(scope="session")
def foundation_dir() -> Path:
    if not (FOUNDATION_DIR / "model.safetensors").exists():
        pytest.fail(f"{FOUNDATION_DIR} missing: the embedded-default foundation must be committed")
    return FOUNDATION_DIR


def build_tiny_pipeline(root: Path, conditioning: str = "tokens") -> Path:
    """A randomly initialised Diff-Prompt pipeline (baby presets) saved under `root`; returns its directory."""
    import torch

    from diffprompt.training.models.diffprompt import write_pipeline_file
    from diffprompt.training.models.mask_vae import build_mask_vae
    from diffprompt.training.models.prompt_dit import PROMPT_DIT_PRESETS, PromptDiT, PromptDiTConfig
    from diffprompt.training.models.prompt_learners import PromptLearner
    from diffprompt.training.models.prompt_sampler import make_scheduler

    f = save_baby_foundation(root / "foundation")
    build_mask_vae("baby").save_pretrained(root / "vae")
    cfg = f.config
    dit = PromptDiT(PromptDiTConfig(
        conditioning=conditioning, latent_size=8, image_embed_dim=cfg.projection_dim,
        text_embed_dim=cfg.projection_dim, image_token_dim=cfg.vision.hidden_size,
        text_token_dim=cfg.text.hidden_size, image_grid=cfg.grid_size,
        context_layers=1 if conditioning == "tokens" else 0,  # the shipped tokens DiT has a pointer head
        **PROMPT_DIT_PRESETS["baby"]))
    for p in dit.parameters():  # move off the zero init so every input matters
        p.data.add_(torch.randn_like(p) * 0.05)
    dit.save_pretrained(root / "dit")
    schedule = {"prediction_type": "sample", "clip_sample": True, "clip_sample_range": 3.0}
    make_scheduler(schedule).save_config(root / "dit")
    learner = PromptLearner.for_foundation(f, "diffprompt", mask_size=16)
    for p in learner.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    out = root / "diffprompt"
    learner.save_pretrained(out)
    write_pipeline_file(out, root / "foundation", root / "vae", root / "dit")
    return out


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory) -> Path:
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny_pipeline"))


@pytest.fixture(scope="session")
def tiny_pooled_pipeline_dir(tmp_path_factory) -> Path:
    """The same with the paper's pooled conditioning (no condition tokens, no pointer head)."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny_pooled_pipeline"), conditioning="pooled")


@pytest.fixture(scope="session")
def project_wheel(tmp_path_factory) -> Path:
    """The project's wheel, built once per session (no network: --no-build-isolation).

    Built from a copy of the checkout's files (tracked and new, not ignored ones): setuptools keeps a
    build/ directory in the source tree, whose stale files would otherwise end up in the wheel.
    """
    import shutil
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("wheel")
    src = out / "src"
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                            check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(out)], capture_output=True, text=True, cwd=out)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = out.glob("diffprompt-*.whl")
    return wheel


# Every no-match feature the tiny token pipeline computes (the context ones have the DiT's width each).
TINY_NO_MATCH_FEATURES = ("top_logit", "margin", "mean_logit", "mask_peak", "mask_area", "mask_at_top",
                          "pointer_peak", "context_summary", "context_pointed", "context_text")


def tiny_calibration(pipeline_dir: Path, steps: int, threshold: float = 0.5):
    """A no-match calibration for the tiny pipeline with fixed random weights over every feature."""
    import json

    import numpy as np

    from diffprompt.core.no_match import NoMatchCalibration

    width = json.loads((pipeline_dir.parent / "dit" / "config.json").read_text())["hidden_size"]
    columns = 7 + 3 * width
    rng = np.random.default_rng(steps)
    return NoMatchCalibration(TINY_NO_MATCH_FEATURES, tuple(rng.normal(0, 0.5, columns)),
                              tuple(rng.uniform(0.5, 2.0, columns)), tuple(rng.normal(0, 0.2, columns)), 0.1,
                              threshold, steps, {"note": "random weights (tests)"})


@pytest.fixture(scope="session")
def calibrated_pipeline_dir(tiny_pipeline_dir) -> Path:
    """The tiny pipeline with a no-match calibration for 3 DDIM steps (none for other step counts)."""
    import dataclasses
    import shutil

    from diffprompt.core.no_match import write_calibration
    from diffprompt.training.models.diffprompt import weights_fingerprint

    out = tiny_pipeline_dir.with_name("diffprompt_calibrated")  # a sibling: pipeline.json's paths still hold
    if not out.exists():
        shutil.copytree(tiny_pipeline_dir, out)
        write_calibration(out, dataclasses.replace(tiny_calibration(out, 3), fingerprint=weights_fingerprint(out)))
    return out


@pytest.fixture(scope="session")
def fused_pipeline_dir(tiny_pipeline_dir) -> Path:
    """The tiny pipeline with the pointer fusion on (pointer_weight 1.5 in pipeline.json)."""
    import json
    import shutil

    out = tiny_pipeline_dir.with_name("diffprompt_fused")  # a sibling: pipeline.json's paths still hold
    if not out.exists():
        shutil.copytree(tiny_pipeline_dir, out)
        spec = json.loads((out / "pipeline.json").read_text())
        (out / "pipeline.json").write_text(json.dumps({**spec, "pointer_weight": 1.5}))
    return out
