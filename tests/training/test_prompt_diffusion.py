"""Prompt Diffusion on a tiny CoOp pipeline: per-sample prompts reach the towers, the stage writes a
pipeline that evaluate reads, and the overfitted targets are cached."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffprompt.training import evaluate, train_prompt_diffusion, train_prompts
from diffprompt.training.models.diffprompt import PIPELINE_FILE, DiffPromptPipeline
from diffprompt.training.models.grounding import GROUNDING_PRESETS, GroundingModel
from diffprompt.training.models.prompt_diffusion import PromptDiffusion, PromptDiffusionConfig
from diffprompt.training.models.prompt_learners import PromptLearner
from tests.foundation_testkit import save_baby_foundation


@pytest.fixture(scope="module")
def coop(small_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("pd")
    save_baby_foundation(root / "foundation")
    train_prompts.main(train_prompts.build_parser().parse_args(
        ["--method", "coop", "--epochs", "1", "--batch-size", "8", "--eval-every", "0", "--foundation",
         str(root / "foundation"), "--output", str(root / "coop"), "--data-dir", str(small_world),
         "--run-root", str(root / "runs"), "--threads", "1", "--no-progress"]))
    return root


@pytest.mark.parametrize("method", ["coop", "vpt", "maple"])
def test_per_sample_values_replace_the_learned_prompts_sample_by_sample(method):
    foundation = GroundingModel(GROUNDING_PRESETS["baby"](vocab_size=50))
    learner = PromptLearner.for_foundation(foundation, method, depth=2, length=4)
    (name,) = learner.prompt_names
    learned = learner.prompts(3)
    values = {name: getattr(learner, name).detach().expand(3, *getattr(learner, name).shape).clone()}
    values[name][1] += 1.0  # only sample 1 differs
    given = learner.prompts(3, values=values)
    for a, b in zip(learned, given):
        if a is not None:
            assert torch.allclose(a[0], b[0]) and torch.allclose(a[2], b[2]) and not torch.allclose(a[1], b[1])


def test_image_features_given_once_equal_the_tower_run_for_a_learner_without_vision_prompts():
    """The overfitting runs CoOp's unprompted image tower once per batch, not once per Adam step: the same
    logits; a learner that prompts the image tower refuses given image features."""
    from diffprompt.training.models.prompt_learners import prompted_forward

    foundation = GroundingModel(GROUNDING_PRESETS["baby"](vocab_size=50)).eval()
    pixels, ids, mask = torch.randn(2, 3, 128, 128), torch.randint(1, 49, (2, 5)), torch.ones(2, 5, dtype=torch.long)
    coop = PromptLearner.for_foundation(foundation, "coop", depth=1, length=4)
    with torch.no_grad():
        image = foundation.encode_image(pixels)
        assert torch.equal(prompted_forward(foundation, coop, pixels, ids, mask, image=image).logits,
                           prompted_forward(foundation, coop, pixels, ids, mask).logits)
    vpt = PromptLearner.for_foundation(foundation, "vpt", depth=1, length=4)
    with pytest.raises(ValueError, match="vpt prompts the image tower"):
        prompted_forward(foundation, vpt, pixels, ids, mask, image=image)


def test_the_model_packs_offsets_and_starts_at_the_base_prompts():
    shapes = {"text_prompts": [2, 4, 16]}
    model = PromptDiffusion(PromptDiffusionConfig(prompt_shapes=shapes, image_embed_dim=8, text_embed_dim=8,
                                                  image_token_dim=12, text_token_dim=16, hidden_size=32, depth=1,
                                                  num_heads=2, offset_scale=4.0))
    prompts = {"text_prompts": torch.randn(5, 2, 4, 16)}
    x0 = model.offsets(prompts)
    assert x0.shape == (5, model.num_features) == (5, 128)
    assert torch.allclose(model.prompts(x0)["text_prompts"], prompts["text_prompts"], atol=1e-6)
    out = model(x0, torch.zeros(5, dtype=torch.long), torch.randn(5, 8), torch.randn(5, 8), torch.randn(5, 7, 12),
                torch.randn(5, 3, 16), torch.ones(5, 3))
    assert out.shape == x0.shape and torch.count_nonzero(out) == 0  # adaLN-Zero: the offset 0, i.e. the base


@pytest.fixture(scope="module")
def coop_pd(coop, small_world, tmp_path_factory):
    """(a Prompt Diffusion pipeline on the tiny CoOp learner, 3 DiT steps; the stage's arguments)."""
    out = tmp_path_factory.mktemp("pd_pipeline") / "coop_pd"
    argv = ["--base", str(coop / "coop"), "--train-steps", "3", "--batch-size", "8", "--overfit-steps", "2",
            "--hidden-size", "32", "--depth", "1", "--num-heads", "2", "--steps", "2", "--frozen-batch-size", "8",
            "--data-dir", str(small_world), "--cache-dir", str(out.parent / "cache"), "--run-root",
            str(out.parent / "runs"), "--threads", "1", "--no-progress"]
    train_prompt_diffusion.main(train_prompt_diffusion.build_parser().parse_args([*argv, "--output", str(out)]))
    _make_offsets_matter(out / "prompt_diffusion")
    return out, argv


def _make_offsets_matter(pd_dir: Path, std: float = 0.05) -> None:
    """A DiT trained 3 steps predicts offsets near 0: move its output layers so the parity checks see them."""
    with torch.no_grad():
        model = PromptDiffusion.from_pretrained(pd_dir)
        for linear in model.out.values():
            linear.weight.normal_(0, std)
        model.final_modulation[-1].weight.normal_(0, std)
        model.save_pretrained(pd_dir)


@pytest.fixture(scope="module")
def diffprompt_pd(tiny_pipeline_dir, small_world, tmp_path_factory):
    """Prompt Diffusion on the tiny Diff-Prompt pipeline's global prompts (token DiT with a pointer head)."""
    out = tmp_path_factory.mktemp("dp_pd") / "diffprompt_pd"
    train_prompt_diffusion.main(train_prompt_diffusion.build_parser().parse_args(
        ["--base", str(tiny_pipeline_dir), "--train-steps", "3", "--batch-size", "8", "--overfit-steps", "2",
         "--hidden-size", "32", "--depth", "1", "--num-heads", "2", "--steps", "2", "--frozen-batch-size", "8",
         "--data-dir", str(small_world), "--cache-dir", str(out.parent / "cache"), "--run-root",
         str(out.parent / "runs"), "--threads", "1", "--no-progress", "--output", str(out)]))
    _make_offsets_matter(out / "prompt_diffusion", std=0.3)  # half of each layer's prompts: larger offsets
    return out


def test_diffprompt_global_prompts_are_diffused_beside_its_masks(diffprompt_pd, tiny_pipeline_dir):
    """The Diff-Prompt pipeline keeps its VAE and DiT; Prompt Diffusion generates only the global
    prompts (the mask-made half of every layer's prompts stays the adapters')."""
    import numpy as np

    pipe = DiffPromptPipeline.from_pretrained(diffprompt_pd, steps=2)
    assert pipe.dit is not None and pipe.vae is not None and pipe.prompt_diffusion is not None
    assert set(pipe.prompt_diffusion.names) == {"vision_global", "text_global"}
    assert torch.equal(pipe.prompt_diffusion.base_prompts()["text_global"], pipe.learner.text_global)
    rng = np.random.default_rng(0)
    S = pipe.image_spec.image_size
    pixels = rng.standard_normal((2, 3, S, S)).astype(np.float32)
    ids, mask = pipe.tokenizer(["the red circle", "the blue square left of the star"])
    ids, mask = ids.astype(np.int64), mask.astype(np.int64)
    with_pd = pipe.score(pixels, ids, mask, [0, 1])[0]
    assert np.array_equal(with_pd, pipe.score(pixels, ids, mask, [0, 1])[0])  # seeded
    base = DiffPromptPipeline.from_pretrained(diffprompt_pd, steps=2, prompt_diffusion=False)
    assert base.prompt_diffusion is None
    assert np.abs(base.score(pixels, ids, mask, [0, 1])[0] - with_pd).max() > 1e-4


def test_the_stage_writes_a_pipeline_that_evaluate_reads_and_reuses_its_targets(coop_pd, small_world, tmp_path):
    pipeline_dir, argv = coop_pd
    summary = json.loads((pipeline_dir / "training_summary.json").read_text())
    assert 0.0 <= summary["history"][-1]["val_R@1"] <= 1.0 and summary["method"] == "coop"
    spec = json.loads((pipeline_dir / PIPELINE_FILE).read_text())
    assert spec["prompt_diffusion"] == "prompt_diffusion" and spec["prompt_diffusion_solver"] == "dpm"
    pipe = DiffPromptPipeline.from_pretrained(pipeline_dir, steps=2)
    assert pipe.prompt_diffusion.config.offset_scale > 0
    assert torch.equal(pipe.prompt_diffusion.base_prompts()["text_prompts"], pipe.learner.text_prompts)
    targets = list((pipeline_dir.parent / "cache").glob("prompt-targets-*"))
    assert len(targets) == 1
    mtime = max(p.stat().st_mtime_ns for p in targets[0].iterdir())
    train_prompt_diffusion.main(train_prompt_diffusion.build_parser().parse_args(
        [*argv, "--output", str(tmp_path / "again")]))
    assert max(p.stat().st_mtime_ns for p in targets[0].iterdir()) == mtime  # reused, not recomputed
    out = tmp_path / "eval.json"
    assert evaluate.main(evaluate.build_parser().parse_args(
        ["--checkpoint", str(pipeline_dir), "--split", "val", "--data-dir", str(small_world),
         "--ddim-steps", "2", "--out", str(out), "--no-progress", "--threads", "1"])) == 0
    assert json.loads(out.read_text())["results"]["val"][-1]["group"] == "all"


def test_a_learner_without_prompts_is_refused_in_one_line(coop, small_world, tmp_path):
    from diffprompt.core.errors import UserError

    root = coop
    train_prompts.main(train_prompts.build_parser().parse_args(
        ["--method", "linear_probe", "--epochs", "1", "--batch-size", "8", "--eval-every", "0", "--foundation",
         str(root / "foundation"), "--output", str(tmp_path / "probe"), "--data-dir", str(small_world),
         "--run-root", str(tmp_path / "runs"), "--threads", "1", "--no-progress"]))
    with pytest.raises(UserError, match="no prompt tensors to diffuse"):
        train_prompt_diffusion.main(train_prompt_diffusion.build_parser().parse_args(
            ["--base", str(tmp_path / "probe"), "--output", str(tmp_path / "never"), "--data-dir", str(small_world),
             "--run-root", str(tmp_path / "runs"), "--threads", "1", "--no-progress"]))
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("solver", ["dpm", "ddim"])
def test_the_exported_artifact_answers_as_pytorch_does(coop_pd, small_world, tmp_path, solver):
    """`diffprompt export` of a Prompt Diffusion pipeline at 5 and 3 steps (graphs shared), then the
    torch-free runtime on val images against the PyTorch pipeline, same seeds."""
    import shutil

    import numpy as np

    from diffprompt import cli
    from diffprompt.training.data.mdetr import load_split

    coop_pd = Path(shutil.copytree(coop_pd[0], tmp_path / "coop_pd"))  # with this test's solver
    spec = json.loads((coop_pd / PIPELINE_FILE).read_text())
    spec["prompt_diffusion_solver"] = solver
    (coop_pd / PIPELINE_FILE).write_text(json.dumps(spec))
    assert cli.main(["export", "--pipeline", str(coop_pd), "--steps", "5", "3", "--out", str(tmp_path / "art"),
                     "--threads", "1", "--no-progress"]) == 0
    art5, art3 = tmp_path / "art" / "coop_pd-5steps", tmp_path / "art" / "coop_pd-3steps"
    manifest = json.loads((art5 / "manifest.json").read_text())
    assert set(manifest["graphs"]) == {"prompt_conditions", "prompt_denoiser", "grounding"}
    assert manifest["prompt_sampler"]["solver"] == solver and len(manifest["prompt_sampler"]["timesteps"]) == 5
    assert (art5 / "grounding.onnx").stat().st_ino == (art3 / "grounding.onnx").stat().st_ino  # shared
    samples = load_split(small_world / "val.json")[:4]
    for art, steps in ((art5, 5), (art3, 3)):
        (got_scores, got_boxes), (want_scores, want_boxes), base_scores = _runtime_and_pytorch(
            art, coop_pd, steps, samples, seeds=[0, 1, 2, 12345])
        assert np.abs(got_scores - want_scores).max() < 1e-3 and np.abs(got_boxes - want_boxes).max() < 1e-3
        assert np.abs(base_scores - want_scores).max() > 1e-4  # the base learner alone: the generated prompts matter


def _runtime_and_pytorch(art: Path, pipeline_dir: Path, steps: int, samples, seeds: list[int]):
    """On `samples`: the artifact's (scores, boxes) through the torch-free runtime, the PyTorch pipeline's
    (scores, boxes), and the PyTorch scores without Prompt Diffusion (the base learner's prompts)."""
    import numpy as np
    from PIL import Image

    from diffprompt.core.runtime import GroundingRuntime

    runtime = GroundingRuntime.load(art)
    pipe = DiffPromptPipeline.from_pretrained(pipeline_dir, steps=steps)
    pixels = np.stack([runtime.image_spec.preprocess(Image.open(s.image_path).convert("RGB")) for s in samples])
    ids, mask = runtime.tokenizer([s.expression for s in samples])
    got = runtime.score(pixels, ids, mask, seeds)
    want = pipe.score(pixels, ids.astype(np.int64), mask.astype(np.int64), seeds)
    pipe.prompt_diffusion = None
    return got, want, pipe.score(pixels, ids.astype(np.int64), mask.astype(np.int64), seeds)[0]


def test_diffprompt_with_prompt_diffusion_exports_one_unprompted_pass_and_answers_as_pytorch(
        diffprompt_pd, small_world, tmp_path):
    """Diff-Prompt's four graphs + the prompt denoiser: the condition encoder also outputs the prompt
    conditions (no second unprompted pass), the builder takes the offsets; runtime == PyTorch at 5 and 3 steps."""
    import numpy as np

    from diffprompt import cli
    from diffprompt.model_export.graphs import PROMPT_CONDITIONS
    from diffprompt.training.data.mdetr import load_split

    assert cli.main(["export", "--pipeline", str(diffprompt_pd), "--steps", "5", "3", "--out", str(tmp_path / "art"),
                     "--threads", "1", "--no-progress"]) == 0
    art5, art3 = tmp_path / "art" / "diffprompt_pd-5steps", tmp_path / "art" / "diffprompt_pd-3steps"
    manifest = json.loads((art5 / "manifest.json").read_text())
    graphs = manifest["graphs"]
    assert set(graphs) == {"condition_encoder", "denoiser", "prompt_denoiser", "prompt_builder", "grounding"}
    assert set(PROMPT_CONDITIONS) <= {o["name"] for o in graphs["condition_encoder"]["outputs"]}
    assert [i["name"] for i in graphs["prompt_builder"]["inputs"]] == ["kept_latents", "prompt_offsets"]
    assert len(manifest["schedule"]) == 5 and len(manifest["prompt_sampler"]["timesteps"]) == 5
    assert max(manifest["export_max_abs_diff"].values()) < 1e-4
    samples = load_split(small_world / "val.json")[:3]
    logit = lambda p: np.log(p) - np.log1p(-p)  # the tiny model's scores sit near 0: compare logits
    for art, steps in ((art5, 5), (art3, 3)):
        (got_scores, got_boxes), (want_scores, want_boxes), base_scores = _runtime_and_pytorch(
            art, diffprompt_pd, steps, samples, seeds=[0, 7, 12345])
        assert np.abs(logit(got_scores) - logit(want_scores)).max() < 1e-3
        assert np.abs(got_boxes - want_boxes).max() < 1e-4
        # the learned global prompts answer otherwise: the generated ones matter
        assert np.abs(logit(base_scores) - logit(want_scores)).max() > 1e-2


def test_triton_refuses_a_prompt_diffusion_artifact_in_one_line(coop_pd, tmp_path):
    from diffprompt import cli
    from diffprompt.core.manifest import ArtifactError
    from diffprompt.model_export.triton import write_triton_repository

    assert cli.main(["export", "--pipeline", str(coop_pd[0]), "--steps", "2", "--out", str(tmp_path / "art"),
                     "--threads", "1", "--no-progress"]) == 0
    with pytest.raises(ArtifactError, match="Prompt Diffusion artifact"):
        write_triton_repository(tmp_path / "art" / "coop_pd-2steps", tmp_path / "triton")
    assert not (tmp_path / "triton").exists()


@pytest.mark.parametrize("base", ["coop", "diffprompt"])
def test_the_real_server_serves_a_prompt_diffusion_artifact(base, request, tmp_path):
    """`python -m diffprompt.service` on the exported artifact: a 200 with boxes, the same answer for the
    same seed, the request's seed deciding the generated prompts (and, on Diff-Prompt, its masks)."""
    from diffprompt import cli
    from tests.service.service_testkit import ServerProcess, encode, rgb_image

    pipeline = request.getfixturevalue("coop_pd")[0] if base == "coop" else request.getfixturevalue("diffprompt_pd")
    assert cli.main(["export", "--pipeline", str(pipeline), "--steps", "5", "--out", str(tmp_path / "art"),
                     "--threads", "1", "--no-progress"]) == 0
    server = ServerProcess(tmp_path / "art" / f"{pipeline.name}-5steps", tmp_path / "server").start()
    makes_masks = base == "diffprompt"
    try:
        server.wait_ready()
        model = server.client.get("/readyz").json()["model"]
        assert model["makes_masks"] is makes_masks and model["ddim_steps"] == 5
        image = encode(rgb_image(160, 120, seed=2), "PNG")
        first = server.ground(image, "the red circle", top_k=3, seed=4, return_mask=makes_masks)
        assert first.status_code == 200, first.text
        body = first.json()
        assert len(body["boxes"]) == 3 and (body["mask_png_base64"] is not None) is makes_masks
        assert body["ddim_steps"] == 5
        again = server.ground(image, "the red circle", top_k=3, seed=4, return_mask=makes_masks).json()
        assert again["boxes"] == body["boxes"]
        other = server.ground(image, "the red circle", top_k=3, seed=5).json()
        assert [b["score"] for b in other["boxes"]] != [b["score"] for b in body["boxes"]]
    finally:
        server.stop()


@pytest.mark.parametrize("steps", [1, 2, 5, 25])
@pytest.mark.parametrize("solver", ["dpm", "ddim"])
def test_the_numpy_solvers_walk_diffusers_trajectories(steps, solver):
    """diffprompt.core.prompt_solver (what the torch-free runtime runs, from the table the exporter
    writes) against diffusers' own DPMSolverMultistepScheduler / DDIMScheduler, on a fixed nonlinear
    x0 predictor."""
    import numpy as np

    from diffprompt.core.prompt_solver import sample_offsets
    from diffprompt.model_export.artifact import prompt_sampler_info
    from diffprompt.training.models.prompt_diffusion import SCHEDULE_DEFAULTS, make_sampler

    class Stub:  # what prompt_sampler_info reads of a pipeline
        prompt_sampler = make_sampler(SCHEDULE_DEFAULTS, solver)
        prompt_diffusion = type("M", (), {"num_features": 6})()

    table = prompt_sampler_info(Stub, steps)
    weights = np.random.default_rng(0).standard_normal((6, 6)).astype(np.float32) * 0.3

    def x0_of(x: np.ndarray, t: np.ndarray) -> np.ndarray:
        return np.tanh(x @ weights + t[:, None] / 100.0).astype(np.float32)

    noise = np.random.default_rng(1).standard_normal((3, 6)).astype(np.float32)
    got = sample_offsets(x0_of, table, noise)
    scheduler = make_sampler(SCHEDULE_DEFAULTS, solver)
    scheduler.set_timesteps(steps)
    x = torch.from_numpy(noise)
    for t in scheduler.timesteps:
        x = scheduler.step(torch.from_numpy(x0_of(x.numpy(), np.full((3,), int(t)))), t, x).prev_sample
    assert table.steps == steps and np.abs(got - x.numpy()).max() < 1e-5


def test_train_prompts_flag_adds_prompt_diffusion_and_evaluate_can_leave_it_out(coop, small_world, tmp_path):
    """`train-prompts --prompt-diffusion`: one --output holding the base learner and its Prompt Diffusion;
    `evaluate --no-prompt-diffusion` scores the base learner alone, from the same directory."""
    root = coop
    summary = train_prompts.main(train_prompts.build_parser().parse_args(
        ["--method", "vpt", "--epochs", "1", "--batch-size", "8", "--eval-every", "0", "--prompt-diffusion",
         "--prompt-diffusion-steps", "2", "--foundation", str(root / "foundation"), "--output",
         str(tmp_path / "vpt"), "--data-dir", str(small_world), "--cache-dir", str(tmp_path / "cache"),
         "--run-root", str(tmp_path / "runs"), "--threads", "1", "--no-progress"]))
    assert summary["prompt_diffusion"]["method"] == "vpt"
    spec = json.loads((tmp_path / "vpt" / PIPELINE_FILE).read_text())
    assert spec["prompt_diffusion"] == "prompt_diffusion"
    reports = {}
    for flag in ([], ["--no-prompt-diffusion"], ["--solver", "ddim"]):
        out = tmp_path / f"eval{len(reports)}.json"
        assert evaluate.main(evaluate.build_parser().parse_args(
            ["--checkpoint", str(tmp_path / "vpt"), "--split", "val", "--data-dir", str(small_world),
             "--ddim-steps", "3", "--out", str(out), "--no-progress", "--threads", "1", *flag])) == 0
        reports[" ".join(flag)] = json.loads(out.read_text())["results"]["val"][-1]
    assert all(r["n"] == reports[""]["n"] for r in reports.values())


@pytest.mark.slow
def test_the_stage_under_torchrun_two_gloo_processes(coop, small_world, tmp_path):
    from tests.torchrun_util import run_torchrun

    proc = run_torchrun(["-m", "diffprompt.training.train_prompt_diffusion", "--base", str(coop / "coop"),
                         "--train-steps", "2", "--batch-size", "4", "--overfit-steps", "1", "--hidden-size", "32",
                         "--depth", "1", "--num-heads", "2", "--steps", "2", "--frozen-batch-size", "8",
                         "--output", str(tmp_path / "pd"), "--data-dir", str(small_world),
                         "--cache-dir", str(tmp_path / "cache"), "--run-root", str(tmp_path / "runs"),
                         "--threads", "1", "--no-progress"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world size 2" in proc.stdout + proc.stderr
    DiffPromptPipeline.from_pretrained(tmp_path / "pd", steps=2)
    assert len(list((tmp_path / "runs").iterdir())) == 1  # rank 0 only
