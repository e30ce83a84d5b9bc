"""The whole life cycle on a full-resolution OWL-ViT (768 px, patch 32; random weights, 2 layers per
tower), with the annotations in a folder apart from the images, through the real CLI: stages 2 and
3, evaluation, export, and the real server answering a non-square upload."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from diffprompt import cli
from tests.owl_testkit import annotations_apart, build_owl_foundation
from tests.service.service_testkit import ServerProcess, encode, rgb_image

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def owl(tmp_path_factory, small_world):
    root = tmp_path_factory.mktemp("owl")
    foundation = build_owl_foundation(root / "foundation")
    annotations, image_root = annotations_apart(small_world, root / "annotations", limit=8)
    return root, foundation, annotations, image_root


def common(root: Path, annotations: Path, image_root: Path) -> list[str]:
    return ["--train-json", str(annotations / "train.json"), "--val-json", str(annotations / "val.json"),
            "--image-root", str(image_root), "--val-limit", "8", "--data-dir", str(root / "unused"),
            "--cache-dir", str(root / "cache"), "--run-root", str(root / "runs"), "--threads", "2", "--no-progress",
            "--precision", "fp32"]  # CPU bf16 is emulated on most CPUs: slower


def test_stages_2_and_3_train_a_768px_owl_vit_from_annotations_apart_from_their_images(owl):
    root, foundation, annotations, image_root = owl
    assert json.loads((foundation / "config.json").read_text())["vision_config"]["image_size"] == 768
    args = common(root, annotations, image_root)
    assert cli.main(["train-dit", "--foundation", str(foundation), "--mask-vae", str(REPO / "checkpoints/mask_vae"),
                     "--preset", "baby", "--steps", "2", "--batch-size", "8", "--eval-every", "2",
                     "--eval-steps", "2", "--output", str(root / "dit"), *args]) == 0
    assert {"config.json", "model.safetensors", "scheduler_config.json"} <= {p.name for p in (root / "dit").iterdir()}
    conditions = list((root / "cache").glob("conditions-*"))
    assert len(conditions) == 2  # train and val, on disk
    assert cli.main(["train-prompts", "--method", "diffprompt", "--foundation", str(foundation),
                     "--mask-vae", str(REPO / "checkpoints/mask_vae"), "--prompt-dit", str(root / "dit"),
                     "--depth", "2", "--epochs", "1", "--batch-size", "8", "--micro-batch-size", "4",
                     "--gradient-checkpointing", "--pixel-cache", "off", "--ddim-steps", "2", "--eval-every", "0",
                     "--output", str(root / "dp"), *args]) == 0
    summary = json.loads((root / "dp" / "training_summary.json").read_text())
    assert summary["history"][-1]["epoch"] == 1 and summary["args"]["micro_batch_size"] == 4
    assert len(list((root / "cache").glob("masks-*"))) == 1
    out = root / "eval.json"
    assert cli.main(["evaluate", "--checkpoint", str(root / "dp"), "--json", str(annotations / "val.json"),
                     "--image-root", str(image_root), "--limit", "4", "--batch-size", "2", "--ddim-steps", "2",
                     "--out", str(out), "--no-progress"]) == 0
    assert json.loads(out.read_text())["results"]["val"][-1]["n"] == 4


def test_without_image_root_the_missing_image_is_named_before_any_work(owl, capsys):
    """One `error:` line naming the file and the flag, exit status 2, and nothing written."""
    root, foundation, annotations, image_root = owl
    first = json.loads((annotations / "val.json").read_text())["images"][0]["file_name"]
    assert cli.main(["evaluate", "--checkpoint", str(foundation), "--json", str(annotations / "val.json"),
                     "--no-progress"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.match(f"error: image file not found: {re.escape(str(annotations / first))}.*--image-root", line), line
    args = common(root, annotations, image_root)
    i = args.index("--image-root")
    del args[i: i + 2]
    assert cli.main(["train-dit", "--foundation", str(foundation), "--mask-vae", str(REPO / "checkpoints/mask_vae"),
                     "--preset", "baby", "--steps", "1", "--output", str(root / "never"), *args]) == 2
    assert "error: image file not found" in capsys.readouterr().err
    assert not (root / "never").exists()


def test_the_768px_pipeline_exports_and_the_real_server_answers_a_320x240_upload_inside_it(owl):
    """Export of the pipeline the test above trained (2 DDIM steps), then `python -m diffprompt.service`
    on it: a 320x240 PNG (the model's square input stretches it) gets boxes in the upload's own pixels."""
    root, _, _, _ = owl
    assert (root / "dp" / "pipeline.json").exists(), "needs the pipeline trained by the test above"
    assert cli.main(["export", "--pipeline", str(root / "dp"), "--steps", "2", "--out", str(root / "artifacts"),
                     "--threads", "2", "--no-progress"]) == 0
    artifact = root / "artifacts" / "dp-2steps"
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["image"]["size"] == 768 and manifest["ddim_steps"] == 2
    server = ServerProcess(artifact, root / "server").start()
    try:
        server.wait_ready(timeout=300)
        response = server.ground(encode(rgb_image(320, 240, seed=3), "PNG"), "the red circle", top_k=5)
        assert response.status_code == 200, response.text
        body = response.json()
        assert len(body["boxes"]) == 5
        for box in body["boxes"]:
            x0, y0, x1, y1 = box["xyxy"]
            assert 0 <= x0 <= x1 <= 320 and 0 <= y0 <= y1 <= 240, box
    finally:
        server.stop()
