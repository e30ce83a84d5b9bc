"""Export -> manifest -> onnxruntime runtime: parity with PyTorch, validation, fixed step count, no torch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from diffprompt.core.manifest import MANIFEST_FILE, ArtifactError, validate_artifact
from diffprompt.core.providers import ProviderConfig
from diffprompt.core.runtime import GroundingRuntime
from diffprompt.model_export.export import build_parser, main
from diffprompt.training.models.diffprompt import DiffPromptPipeline

REPO = Path(__file__).resolve().parents[2]
CPU = ProviderConfig(preferred=("cpu",))


@pytest.fixture(scope="module")
def artifacts(tiny_pipeline_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("artifacts")
    assert main(build_parser().parse_args(["--pipeline", str(tiny_pipeline_dir), "--steps", "5", "3", "--out",
                                           str(out), "--name", "tiny", "--threads", "1", "--no-progress"])) == 0
    return out


def _batch(pipeline: DiffPromptPipeline, n: int = 4):
    ids, mask = pipeline.tokenizer(["the red circle", "the second star from the left", "the small blue square",
                                    "the square left of the blue circle"][:n])
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 3, 128, 128, generator=g), ids.astype(np.int64), mask.astype(np.int64)


def test_artifact_layout_and_manifest(artifacts):
    for steps in (5, 3):
        d = artifacts / f"tiny-{steps}steps"
        manifest = json.loads((d / MANIFEST_FILE).read_text())
        assert manifest["ddim_steps"] == steps and len(manifest["schedule"]) == steps
        assert set(manifest["graphs"]) == {"condition_encoder", "denoiser", "prompt_builder", "grounding"}
        assert set(manifest["files"]) == {f"{g}.onnx" for g in manifest["graphs"]} | {"tokenizer.json", "weights.bin"}
        for graph in manifest["graphs"].values():
            assert all(i["shape"][0] == "batch" for i in graph["inputs"] + graph["outputs"])
        assert manifest["prompt_depth"] == {"vision": 1, "text": 1} and manifest["prompt_length"] == 8
        assert max(manifest["export_max_abs_diff"].values()) < 1e-3
        assert {"torch", "onnx", "onnxruntime", "diffusers", "diffprompt"} <= set(manifest["versions"])
    assert not list(artifacts.glob("*.tmp")) and not list(artifacts.glob(".*staging*"))


def test_the_foundation_is_stored_once(artifacts, tiny_pipeline_dir):
    """condition_encoder and grounding both run the foundation: its tensors are in weights.bin once."""
    d = artifacts / "tiny-5steps"
    spans = {}
    for graph in ("condition_encoder", "denoiser", "prompt_builder", "grounding"):
        model = onnx.load(str(d / f"{graph}.onnx"), load_external_data=False)
        entries = [{e.key: e.value for e in t.external_data} for t in model.graph.initializer if t.external_data]
        assert {e["location"] for e in entries} == {"weights.bin"}
        spans[f"{graph}.onnx"] = {(int(e["offset"]), int(e["length"])) for e in entries}
    shared = spans["condition_encoder.onnx"] & spans["grounding.onnx"]
    foundation_bytes = (tiny_pipeline_dir.parent / "foundation" / "model.safetensors").stat().st_size
    assert sum(length for _, length in shared) > 0.8 * foundation_bytes
    ends = [offset + length for entries in spans.values() for offset, length in entries]
    assert (d / "weights.bin").stat().st_size == max(ends)  # every stored tensor is used, nothing twice
    stored = sorted({span for entries in spans.values() for span in entries})
    assert all(a[0] + a[1] <= b[0] for a, b in zip(stored, stored[1:]))  # no overlapping spans
    graph_bytes = sum((d / f"{g}.onnx").stat().st_size for g in ("condition_encoder", "grounding"))
    assert graph_bytes < foundation_bytes  # before sharing, each of the two held more than the foundation


def test_step_counts_of_one_export_share_their_files(artifacts):
    """--steps 5 3: one set of graph files (hard links), two manifests, both hashes valid."""
    five, three = artifacts / "tiny-5steps", artifacts / "tiny-3steps"
    shared = sorted(p.name for p in five.iterdir() if p.name != MANIFEST_FILE)
    assert shared == sorted(p.name for p in three.iterdir() if p.name != MANIFEST_FILE)
    for name in shared:
        assert (five / name).stat().st_ino == (three / name).stat().st_ino, name  # the same bytes on disk, once
    m5, m3 = validate_artifact(five, True), validate_artifact(three, True)
    assert (m5.ddim_steps, m3.ddim_steps) == (5, 3)
    assert len(m5.sampler.schedule) == 5 and len(m3.sampler.schedule) == 3
    assert m5.files == m3.files and m5.graphs == m3.graphs


@pytest.mark.parametrize("steps", [5, 3])
def test_onnxruntime_matches_pytorch(artifacts, tiny_pipeline_dir, steps):
    runtime = GroundingRuntime.load(artifacts / f"tiny-{steps}steps", CPU)
    pipeline = DiffPromptPipeline.from_pretrained(tiny_pipeline_dir, steps=steps)
    pixels, ids, mask = _batch(pipeline)
    seeds = [5, 6, 7, 8]
    got = runtime.ground(pixels.numpy(), ids, mask, seeds)
    out, masks = pipeline(pixels, torch.from_numpy(ids), torch.from_numpy(mask), seeds)
    scores = torch.sigmoid(out.logits[..., 0]).numpy()
    np.testing.assert_array_equal(np.argsort(-got.scores, axis=1)[:, :5], np.argsort(-scores, axis=1)[:, :5])
    np.testing.assert_allclose(got.boxes, out.pred_boxes.numpy(), rtol=1e-3, atol=1e-5)
    agree = ((got.mask_logits > 0) == (masks[:, 0, 0].numpy() > 0)).mean()
    assert agree >= 0.995
    assert set(got.seconds) == {"condition", "sampler", "prompt_builder", "grounding"}


def test_runtime_batch_equals_one_by_one_and_seed_matters(artifacts):
    runtime = GroundingRuntime.load(artifacts / "tiny-3steps", CPU)
    pipeline_tok = runtime.tokenizer
    ids, mask = pipeline_tok(["the red circle", "the small blue square"])
    pixels = np.random.default_rng(0).standard_normal((2, 3, 128, 128)).astype(np.float32)
    full = runtime.ground(pixels, ids, mask, [1, 2])
    for i in range(2):
        one = runtime.ground(pixels[i: i + 1], ids[i: i + 1], mask[i: i + 1], [1 + i])
        np.testing.assert_allclose(one.scores[0], full.scores[i], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(one.mask_logits[0], full.mask_logits[i], rtol=1e-4, atol=1e-5)
    again = runtime.ground(pixels, ids, mask, [1, 2])
    np.testing.assert_array_equal(again.scores, full.scores)
    other = runtime.ground(pixels, ids, mask, [9, 2])
    assert not np.array_equal(other.mask_logits[0], full.mask_logits[0])


def test_an_artifact_refuses_another_step_count(artifacts):
    with pytest.raises(ArtifactError, match="exported for 5 DDIM steps, not 25"):
        GroundingRuntime.load(artifacts / "tiny-5steps", CPU, steps=25, warmup=False)
    GroundingRuntime.load(artifacts / "tiny-5steps", CPU, steps=5, warmup=False)


@pytest.mark.parametrize("damage", ["missing", "truncated", "altered", "no-manifest", "bad-json"])
def test_damaged_artifacts_give_a_clear_error_naming_the_file(artifacts, tmp_path, damage):
    d = tmp_path / "a"
    shutil.copytree(artifacts / "tiny-3steps", d)
    target = d / "denoiser.onnx"
    if damage == "missing":
        target.unlink()
        match = "denoiser.onnx: missing"
    elif damage == "truncated":
        target.write_bytes(target.read_bytes()[:100])
        match = "denoiser.onnx: 100 bytes"
    elif damage == "altered":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
        match = "denoiser.onnx: sha256 differs"
    elif damage == "no-manifest":
        (d / MANIFEST_FILE).unlink()
        match = "manifest.json: missing"
    else:
        (d / MANIFEST_FILE).write_text("{not json")
        match = "not valid JSON"
    with pytest.raises(ArtifactError, match=match):
        GroundingRuntime.load(d, CPU)


def test_condition_encoder_feeds_the_denoiser_the_dits_prepared_conditions(artifacts):
    """The DiT's condition-only part (context layers, pointer, every block's cross-attention keys and
    values) runs once per query in the condition encoder; the denoiser, run at every DDIM step, takes
    its outputs and never the context itself (no key/value projection per step)."""
    manifest = json.loads((artifacts / "tiny-5steps" / MANIFEST_FILE).read_text())
    produced = [o["name"] for o in manifest["graphs"]["condition_encoder"]["outputs"]]
    taken = [i["name"] for i in manifest["graphs"]["denoiser"]["inputs"]]
    assert produced == ["image_embed", "text_embed", "context", "key_bias", "maps", "cross_kv"]
    assert manifest["denoiser_conditions"] == ["image_embed", "text_embed", "cross_kv", "key_bias", "maps"]
    assert taken == ["latents", "timesteps", *manifest["denoiser_conditions"]]  # no "context"


def test_pooled_conditioning_pipeline_exports_and_matches_pytorch(tiny_pooled_pipeline_dir, tmp_path):
    pipeline_dir = tiny_pooled_pipeline_dir
    assert main(build_parser().parse_args(["--pipeline", str(pipeline_dir), "--steps", "3", "--out",
                                           str(tmp_path / "art"), "--name", "p", "--threads", "1",
                                           "--no-progress"])) == 0
    runtime = GroundingRuntime.load(tmp_path / "art" / "p-3steps", CPU)
    assert runtime.manifest.sampler.denoiser_conditions == ("image_embed", "text_embed")
    pipeline = DiffPromptPipeline.from_pretrained(pipeline_dir, steps=3)
    pixels, ids, mask = _batch(pipeline, 2)
    got = runtime.ground(pixels.numpy(), ids, mask, [1, 2])
    out, _ = pipeline(pixels, torch.from_numpy(ids), torch.from_numpy(mask), [1, 2])
    np.testing.assert_allclose(got.boxes, out.pred_boxes.numpy(), rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(got.scores, torch.sigmoid(out.logits[..., 0]).numpy(), rtol=1e-3, atol=1e-5)


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        validate_artifact(tmp_path / "nowhere")


def test_foundation_only_artifact(tiny_pipeline_dir, tmp_path):
    foundation = (tiny_pipeline_dir / ".." / "foundation").resolve()
    assert main(build_parser().parse_args(["--pipeline", str(foundation), "--out", str(tmp_path), "--name", "f",
                                           "--threads", "1", "--no-progress"])) == 0
    runtime = GroundingRuntime.load(tmp_path / "f", CPU)
    assert set(runtime.manifest.graphs) == {"grounding"} and runtime.manifest.ddim_steps == 0
    ids, mask = runtime.tokenizer(["star"])
    res = runtime.ground(np.zeros((1, 3, 128, 128), np.float32), ids, mask, [0])
    assert res.scores.shape == (1, 64) and res.mask_logits is None


def test_the_runtime_path_never_imports_torch(artifacts):
    code = (
        "import sys, numpy as np\n"
        "from diffprompt.core.runtime import GroundingRuntime\n"
        "from diffprompt.core.providers import ProviderConfig\n"
        f"rt = GroundingRuntime.load({str(artifacts / 'tiny-3steps')!r}, ProviderConfig(preferred=('cpu',)))\n"
        "ids, mask = rt.tokenizer(['the red circle'])\n"
        "rt.ground(np.zeros((1, 3, 128, 128), np.float32), ids, mask, [0])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('NO TORCH')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "NO TORCH" in proc.stdout


def test_evaluate_command_scores_an_artifact_like_pytorch(artifacts, tiny_pipeline_dir, small_world, tmp_path):
    from diffprompt.training import evaluate

    results = {}
    for flag, value in [("--artifact", artifacts / "tiny-5steps"), ("--checkpoint", tiny_pipeline_dir)]:
        out = tmp_path / f"{flag.strip('-')}.json"
        args = evaluate.build_parser().parse_args(
            [flag, str(value), "--split", "val", "testB", "--data-dir", str(small_world), "--ddim-steps", "5",
             "--out", str(out), "--no-progress", "--threads", "1"])
        assert evaluate.main(args) == 0
        results[flag] = json.loads(out.read_text())
    assert results["--artifact"]["ddim_steps"] == 5
    for split in ("val", "testB"):
        a = results["--artifact"]["results"][split][-1]
        b = results["--checkpoint"]["results"][split][-1]
        assert a["n"] == b["n"] > 0
        for k in ("R@1", "R@5", "UB"):
            assert abs(a[k] - b[k]) <= 0.002, (split, k, a[k], b[k])


def test_export_can_also_write_a_triton_repository(tiny_pipeline_dir, tmp_path):
    assert main(build_parser().parse_args(["--pipeline", str(tiny_pipeline_dir), "--steps", "3", "--out",
                                           str(tmp_path / "a"), "--name", "t", "--triton", str(tmp_path / "repo"),
                                           "--triton-cpu", "--threads", "1", "--no-progress"])) == 0
    repo = tmp_path / "repo" / "t-3steps"
    assert {p.name for p in repo.iterdir() if p.is_dir()} == {
        "condition_encoder", "denoiser", "prompt_builder", "grounding", "diffprompt"}
    assert 'kind: KIND_CPU' in (repo / "grounding" / "config.pbtxt").read_text()


def test_the_no_match_calibration_goes_into_the_manifest_and_both_runtimes_agree(calibrated_pipeline_dir, tmp_path):
    from diffprompt.core.no_match import read_calibration
    from diffprompt.training.calibrate import pipeline_outputs

    out = tmp_path / "art"
    assert main(build_parser().parse_args(["--pipeline", str(calibrated_pipeline_dir), "--steps", "3", "5", "--out",
                                           str(out), "--name", "cal", "--threads", "1", "--no-progress"])) == 0
    calibration = read_calibration(calibrated_pipeline_dir, 3)
    assert validate_artifact(out / "cal-3steps").no_match == calibration
    assert validate_artifact(out / "cal-5steps").no_match is None  # fitted for 3 steps only
    pipeline = DiffPromptPipeline.from_pretrained(calibrated_pipeline_dir, steps=3)
    pixels, ids, mask = _batch(pipeline)
    seeds = [5, 6, 7, 8]
    got = GroundingRuntime.load(out / "cal-3steps", CPU).ground(pixels.numpy(), ids, mask, seeds).no_match
    want = calibration.probability(pipeline_outputs(pipeline, pixels, ids, mask, seeds))
    np.testing.assert_allclose(got, want, atol=2e-3)
    assert np.ptp(want) > 0.05  # the rows differ: the check compares something
    assert GroundingRuntime.load(out / "cal-5steps", CPU).ground(pixels.numpy(), ids, mask, seeds).no_match is None


def test_export_refuses_a_calibration_fitted_on_other_weights(calibrated_pipeline_dir, tmp_path):
    """Retrained weights with the old no_match file beside them: the calibration no longer fits them."""
    import dataclasses

    from diffprompt.core.no_match import read_calibration, write_calibration
    from diffprompt.training.models.grounding import CheckpointError

    stale = calibrated_pipeline_dir.with_name("stale_calibration")  # a sibling: pipeline.json's paths hold
    shutil.copytree(calibrated_pipeline_dir, stale, dirs_exist_ok=True)
    write_calibration(stale, dataclasses.replace(read_calibration(stale, 3), fingerprint="0123456789abcdef"))
    with pytest.raises(CheckpointError, match="no_match-3steps.json: fitted on other weights.*--overwrite"):
        main(build_parser().parse_args(["--pipeline", str(stale), "--steps", "3", "--out", str(tmp_path),
                                        "--threads", "1", "--no-progress"]))


def test_the_pointer_fusion_is_exported_and_both_runtimes_agree(fused_pipeline_dir, tiny_pipeline_dir, tmp_path):
    """pointer_weight goes into the manifest; the numpy pipeline fuses like DiffPromptPipeline does."""
    out = tmp_path / "art"
    assert main(build_parser().parse_args(["--pipeline", str(fused_pipeline_dir), "--steps", "3", "--out", str(out),
                                           "--name", "fused", "--threads", "1", "--no-progress"])) == 0
    manifest = validate_artifact(out / "fused-3steps")
    assert manifest.pointer_weight == 1.5
    runtime = GroundingRuntime.load(out / "fused-3steps", CPU)
    pipeline = DiffPromptPipeline.from_pretrained(fused_pipeline_dir, steps=3)
    plain = DiffPromptPipeline.from_pretrained(tiny_pipeline_dir, steps=3)
    pixels, ids, mask = _batch(pipeline)
    seeds = [5, 6, 7, 8]
    got = runtime.ground(pixels.numpy(), ids, mask, seeds)
    out_t, _ = pipeline(pixels, torch.from_numpy(ids), torch.from_numpy(mask), seeds)
    want = torch.sigmoid(out_t.logits[..., 0]).numpy()
    np.testing.assert_allclose(got.scores, want, atol=1e-4)
    np.testing.assert_array_equal(np.argsort(-got.scores, axis=1)[:, :5], np.argsort(-want, axis=1)[:, :5])
    unfused = torch.sigmoid(plain(pixels, torch.from_numpy(ids), torch.from_numpy(mask), seeds)[0].logits[..., 0])
    assert np.abs(want - unfused.numpy()).max() > 0.01  # the fusion changed the scores: the check compares something
    bad = json.loads((out / "fused-3steps" / MANIFEST_FILE).read_text())
    with pytest.raises(ArtifactError, match="pointer_weight"):
        from diffprompt.core.manifest import Manifest

        Manifest.from_dict({**bad, "pointer_weight": -2.0})
