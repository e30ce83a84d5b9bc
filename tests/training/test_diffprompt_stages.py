"""Stages 1-3 run end to end on a tiny world with baby presets, single process and under torchrun."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffprompt.training import evaluate, train_mask_vae, train_prompt_dit, train_prompts
from diffprompt.training.models.diffprompt import PIPELINE_FILE, SCHEDULER_FILE, DiffPromptPipeline
from diffprompt.training.models.grounding import GroundingModel
from tests.foundation_testkit import save_baby_foundation
from tests.torchrun_util import run_torchrun


@pytest.fixture(scope="module")
def stages(small_world, tmp_path_factory):
    """Foundation (random baby) -> stage 1 -> stage 2 (tokens) -> stage 3 (Diff-Prompt)."""
    root = tmp_path_factory.mktemp("stages")
    save_baby_foundation(root / "foundation")
    common = ["--data-dir", str(small_world), "--run-root", str(root / "runs"), "--threads", "1", "--no-progress"]
    vae = train_mask_vae.main(train_mask_vae.build_parser().parse_args(
        ["--preset", "baby", "--epochs", "2", "--batch-size", "8", "--eval-every", "1", "--output",
         str(root / "vae"), *common]))
    dit = train_prompt_dit.main(train_prompt_dit.build_parser().parse_args(
        ["--preset", "baby", "--steps", "3", "--batch-size", "8", "--eval-every", "3", "--eval-steps", "5",
         "--foundation", str(root / "foundation"), "--mask-vae", str(root / "vae"), "--output", str(root / "dit"),
         *common]))
    dp = train_prompts.main(train_prompts.build_parser().parse_args(
        ["--method", "diffprompt", "--epochs", "2", "--batch-size", "8", "--ddim-steps", "5", "--eval-every", "1",
         "--foundation", str(root / "foundation"), "--mask-vae", str(root / "vae"), "--prompt-dit",
         str(root / "dit"), "--output", str(root / "dp"), *common]))
    return root, {"vae": vae, "dit": dit, "dp": dp}


def test_stage1_reports_val_iou_and_saves_safetensors(stages):
    root, s = stages
    assert 0.0 <= s["vae"]["val_reconstruction_iou"] <= 1.0
    cfg = json.loads((root / "vae" / "config.json").read_text())
    assert cfg["model_type"] == "diffprompt-mask-vae" and cfg["scaling_factor"] > 0
    assert {p.name for p in (root / "vae").iterdir()} == {"config.json", "model.safetensors"}


def test_stage2_saves_ema_weights_with_the_one_schedule(stages):
    root, s = stages
    sched = json.loads((root / "dit" / SCHEDULER_FILE).read_text())
    assert sched["num_train_timesteps"] == 100 and sched["prediction_type"] == "sample"
    assert s["dit"]["history"][-1]["step"] == 3 and "val_mask_iou@5" in s["dit"]["history"][-1]
    assert 0.0 <= s["dit"]["history"][-1]["val_pointer_accuracy"] <= 1.0  # tokens default: pointer head on
    assert json.loads((root / "dit" / "config.json").read_text())["context_layers"] == 3


def test_stage3_writes_a_loadable_pipeline_with_relative_paths(stages):
    root, s = stages
    spec = json.loads((root / "dp" / PIPELINE_FILE).read_text())
    assert all(not Path(v).is_absolute() for v in spec.values() if v)
    assert s["dp"]["trainable_parameters"] > 0 and len(s["dp"]["history"]) == 2
    pipe = DiffPromptPipeline.from_pretrained(root / "dp", steps=5)
    assert pipe.learner.config.method == "diffprompt" and pipe.dit is not None


def test_evaluate_command_accepts_a_pipeline_directory(stages, small_world, tmp_path):
    root, _ = stages
    out = tmp_path / "eval.json"
    args = evaluate.build_parser().parse_args(
        ["--checkpoint", str(root / "dp"), "--split", "val", "--data-dir", str(small_world), "--ddim-steps", "5",
         "--out", str(out), "--no-progress", "--threads", "1"])
    assert evaluate.main(args) == 0
    report = json.loads(out.read_text())
    assert report["ddim_steps"] == 5 and report["results"]["val"][-1]["group"] == "all"


@pytest.mark.parametrize("method", ["vpt", "coop", "maple", "clip_adapter", "linear_probe"])
def test_each_baseline_trains_and_only_its_parameters_change(method, stages, small_world, tmp_path):
    root, _ = stages
    summary = train_prompts.main(train_prompts.build_parser().parse_args(
        ["--method", method, "--epochs", "1", "--batch-size", "8", "--eval-every", "0", "--foundation",
         str(root / "foundation"), "--output", str(tmp_path / method), "--data-dir", str(small_world),
         "--run-root", str(tmp_path / "runs"), "--threads", "1", "--no-progress"]))
    assert summary["trainable_parameters"] > 0
    pipe = DiffPromptPipeline.from_pretrained(tmp_path / method)
    assert pipe.dit is None and pipe.learner.config.method == method
    # the foundation file was not touched
    before = GroundingModel.from_pretrained(root / "foundation").state_dict()
    for k, v in pipe.foundation.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.slow
def test_stage3_under_torchrun_two_gloo_processes(stages, small_world, tmp_path):
    """Two ranks, each accumulating its batch of 4 over micro-batches of 2 (DDP syncs on the last)."""
    root, _ = stages
    proc = run_torchrun(["-m", "diffprompt.training.train_prompts", "--method", "diffprompt", "--epochs", "1",
                         "--batch-size", "4", "--micro-batch-size", "2", "--ddim-steps", "5", "--eval-every", "0",
                         "--foundation", str(root / "foundation"),
                         "--mask-vae", str(root / "vae"), "--prompt-dit", str(root / "dit"), "--output",
                         str(tmp_path / "dp"), "--data-dir", str(small_world), "--run-root", str(tmp_path / "runs"),
                         "--threads", "1", "--no-progress"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world size 2" in proc.stdout
    DiffPromptPipeline.from_pretrained(tmp_path / "dp", steps=5)
    assert len(list((tmp_path / "runs").iterdir())) == 1  # rank 0 only


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["train_mask_vae", "train_prompt_dit"])
def test_stages_1_and_2_under_torchrun_two_gloo_processes(stage, stages, small_world, tmp_path):
    root, _ = stages
    args = {"train_mask_vae": ["--preset", "baby", "--epochs", "1", "--batch-size", "8", "--eval-every", "1"],
            "train_prompt_dit": ["--preset", "baby", "--steps", "3", "--batch-size", "8", "--eval-every", "3",
                                 "--eval-steps", "5", "--foundation", str(root / "foundation"),
                                 "--mask-vae", str(root / "vae")]}[stage]
    proc = run_torchrun(["-m", f"training.{stage}", *args, "--output", str(tmp_path / "out"), "--data-dir",
                         str(small_world), "--run-root", str(tmp_path / "runs"), "--threads", "1", "--no-progress"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world size 2" in proc.stdout + proc.stderr
    assert any(p.suffix == ".safetensors" for p in (tmp_path / "out").iterdir())
    assert len(list((tmp_path / "runs").iterdir())) == 1  # rank 0 only


def test_cached_training_masks_give_the_same_run(stages, small_world, tmp_path):
    root, _ = stages
    argv = ["--method", "diffprompt", "--epochs", "1", "--batch-size", "8", "--ddim-steps", "5", "--eval-every", "1",
            "--foundation", str(root / "foundation"), "--mask-vae", str(root / "vae"), "--prompt-dit",
            str(root / "dit"), "--data-dir", str(small_world), "--run-root", str(tmp_path / "runs"), "--threads", "1",
            "--no-progress", "--mask-cache", str(tmp_path / "cache")]
    first = train_prompts.main(train_prompts.build_parser().parse_args([*argv, "--output", str(tmp_path / "a")]))
    assert len(list((tmp_path / "cache").glob("masks-*"))) == 1  # one directory of rows
    second = train_prompts.main(train_prompts.build_parser().parse_args([*argv, "--output", str(tmp_path / "b")]))
    log = (Path(second["run_dir"]) / "log.txt").read_text()
    assert "reusing the prompt masks in" in log
    assert [h["loss"] for h in second["history"]] == [h["loss"] for h in first["history"]]
    assert second["history"][-1]["val_R@1"] == first["history"][-1]["val_R@1"]


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


def test_stage3_resumed_inside_an_epoch_ends_with_the_uninterrupted_weights(stages, small_world, tmp_path):
    """A checkpoint-last written mid-epoch, resumed by a new process: the same final learner, bit for bit."""
    from diffprompt.training.data.mdetr import load_split
    from diffprompt.training.utils.resume import ResumeMismatchError

    root, _ = stages
    per_epoch = len(load_split(small_world / "train.json")) // 4
    assert per_epoch >= 2
    common = ["--method", "diffprompt", "--epochs", "2", "--batch-size", "4", "--ddim-steps", "5", "--eval-every", "1",
              "--save-every", str(per_epoch + 1), "--foundation", str(root / "foundation"), "--mask-vae",
              str(root / "vae"), "--prompt-dit", str(root / "dit"), "--data-dir", str(small_world),
              "--run-root", str(tmp_path / "runs"), "--threads", "1", "--no-progress"]
    whole = train_prompts.main(train_prompts.build_parser().parse_args([*common, "--output", str(tmp_path / "a")]))
    checkpoint = Path(whole["run_dir"]) / "checkpoint-last"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["step"] == per_epoch + 1 and len(state["history"]) == 1  # the second epoch's second batch
    with pytest.raises(ResumeMismatchError, match=r"--lr 0\.002 \(now 0\.001\)"):
        train_prompts.main(train_prompts.build_parser().parse_args(
            [*common, "--lr", "1e-3", "--resume", str(checkpoint), "--output", str(tmp_path / "never")]))
    assert not (tmp_path / "never").exists()
    resumed = train_prompts.main(train_prompts.build_parser().parse_args(
        [*common, "--resume", str(checkpoint), "--output", str(tmp_path / "b")]))
    a, b = _tensors(tmp_path / "a"), _tensors(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["history"] == whole["history"][:1] + resumed["history"][1:]
    assert resumed["history"][-1]["val_R@1"] == whole["history"][-1]["val_R@1"]


def test_stage2_resumed_mid_run_ends_with_the_uninterrupted_ema_weights(stages, small_world, tmp_path):
    root, _ = stages
    common = ["--preset", "baby", "--steps", "5", "--batch-size", "8", "--eval-every", "2", "--eval-steps", "5",
              "--save-every", "3", "--foundation", str(root / "foundation"), "--mask-vae", str(root / "vae"),
              "--data-dir", str(small_world), "--run-root", str(tmp_path / "runs"), "--threads", "1", "--no-progress"]
    whole = train_prompt_dit.main(train_prompt_dit.build_parser().parse_args(
        [*common, "--output", str(tmp_path / "a")]))
    checkpoint = Path(whole["run_dir"]) / "checkpoint-last"
    kept = {"ema.safetensors", "optimizer.safetensors", "trainer_state.json", "best"}
    assert kept <= {p.name for p in checkpoint.iterdir()}
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == 3
    resumed = train_prompt_dit.main(train_prompt_dit.build_parser().parse_args(
        [*common, "--resume", str(checkpoint), "--output", str(tmp_path / "b")]))
    a, b = _tensors(tmp_path / "a"), _tensors(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["history"] == whole["history"] and resumed["best_val_mask_iou"] == whole["best_val_mask_iou"]


def test_stage1_resumed_inside_an_epoch_ends_with_the_uninterrupted_weights(small_world, tmp_path):
    common = ["--preset", "baby", "--epochs", "2", "--batch-size", "8", "--eval-every", "2", "--save-every", "3",
              "--data-dir", str(small_world), "--run-root", str(tmp_path / "runs"), "--threads", "1", "--no-progress"]
    whole = train_mask_vae.main(train_mask_vae.build_parser().parse_args([*common, "--output", str(tmp_path / "a")]))
    checkpoint = Path(whole["run_dir"]) / "checkpoint-last"
    step = json.loads((checkpoint / "trainer_state.json").read_text())["step"]
    per_epoch = len(list(json.loads((small_world / "train.json").read_text())["annotations"])) // 8
    assert step % per_epoch != 0  # inside an epoch
    train_mask_vae.main(train_mask_vae.build_parser().parse_args(
        [*common, "--resume", str(checkpoint), "--output", str(tmp_path / "b")]))
    a, b = _tensors(tmp_path / "a"), _tensors(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def single_pass(small_world, tmp_path_factory):
    """Stage 2 with --condition-layers 1 1 on a two-layer baby foundation, then stage 3 on that DiT."""
    root = tmp_path_factory.mktemp("single_pass")
    save_baby_foundation(root / "foundation", layers=2)
    common = ["--data-dir", str(small_world), "--run-root", str(root / "runs"), "--threads", "1", "--no-progress"]
    train_mask_vae.main(train_mask_vae.build_parser().parse_args(
        ["--preset", "baby", "--epochs", "1", "--batch-size", "8", "--eval-every", "1", "--output",
         str(root / "vae"), *common]))
    train_prompt_dit.main(train_prompt_dit.build_parser().parse_args(
        ["--preset", "baby", "--steps", "2", "--batch-size", "8", "--eval-every", "2", "--eval-steps", "3",
         "--condition-layers", "1", "1", "--foundation", str(root / "foundation"), "--mask-vae", str(root / "vae"),
         "--output", str(root / "dit"), "--cache-dir", str(root / "cache"), *common]))
    train_prompts.main(train_prompts.build_parser().parse_args(
        ["--method", "diffprompt", "--epochs", "1", "--batch-size", "8", "--ddim-steps", "3", "--eval-every", "1",
         "--foundation", str(root / "foundation"), "--mask-vae", str(root / "vae"), "--prompt-dit",
         str(root / "dit"), "--output", str(root / "dp"), "--cache-dir", str(root / "cache"), *common]))
    return root


def test_single_pass_stages_put_the_prompts_where_the_dit_reads_its_conditions(single_pass):
    """The DiT reads layer 1 of each tower, stage 3's learner prompts layers 1.. (depth 1 of 2), and
    the pipeline shares the trunk: its answer equals a second, separate pass over layers 0..1."""
    from diffprompt.training.models.diffprompt import dit_conditions
    from diffprompt.training.models.prompt_learners import prompted_forward

    assert json.loads((single_pass / "dit" / "config.json").read_text())["condition_layers"] == [1, 1]
    pipe = DiffPromptPipeline.from_pretrained(single_pass / "dp", steps=3)
    assert pipe.learner.config.first_layers == [1, 1] and pipe.single_pass
    assert pipe.learner.vision_depth == pipe.learner.text_depth == 1
    g = torch.Generator().manual_seed(0)
    S = pipe.image_spec.image_size
    pixels = torch.randn(2, 3, S, S, generator=g)
    ids, mask = (torch.from_numpy(a.astype("int64")) for a in pipe.tokenizer(["the red circle", "the blue square"]))
    out, masks = pipe(pixels, ids, mask, [0, 1])
    with torch.no_grad():
        cond = dit_conditions(pipe.foundation, pipe.dit, pixels, ids, mask)
        assert cond["image_hidden"].shape[1:] == (1 + pipe.foundation.config.num_patches, 32)
        separate = prompted_forward(pipe.foundation, pipe.learner, pixels, ids, mask, masks)  # trunk recomputed
    assert torch.allclose(out.logits, separate.logits, atol=1e-6) and torch.allclose(out.pred_boxes,
                                                                                     separate.pred_boxes, atol=1e-6)


def test_condition_layers_that_leave_no_layer_for_the_prompts_are_refused(small_world, tmp_path):
    from diffprompt.core.errors import UserError

    save_baby_foundation(tmp_path / "foundation", layers=2)
    with pytest.raises(UserError, match="--condition-layers 2 1: each must leave at least one layer"):
        train_prompt_dit.main(train_prompt_dit.build_parser().parse_args(
            ["--preset", "baby", "--steps", "1", "--condition-layers", "2", "1", "--foundation",
             str(tmp_path / "foundation"), "--mask-vae", "checkpoints/mask_vae", "--output", str(tmp_path / "dit"),
             "--data-dir", str(small_world), "--run-root", str(tmp_path / "runs"), "--threads", "1",
             "--no-progress"]))
    assert not (tmp_path / "dit").exists()


def test_a_single_pass_artifact_runs_the_foundation_once_and_answers_as_pytorch(single_pass, small_world, tmp_path):
    """Export: the condition encoder outputs the trunk's hidden states, grounding continues from them
    (no pixel_values input); the torch-free runtime answers as the PyTorch pipeline."""
    import numpy as np
    from PIL import Image

    from diffprompt import cli
    from diffprompt.core.runtime import GroundingRuntime
    from diffprompt.training.data.mdetr import load_split

    assert cli.main(["export", "--pipeline", str(single_pass / "dp"), "--steps", "3", "--out", str(tmp_path / "art"),
                     "--threads", "1", "--no-progress"]) == 0
    art = tmp_path / "art" / "dp-3steps"
    graphs = json.loads((art / "manifest.json").read_text())["graphs"]
    assert {"image_hidden", "text_hidden"} <= {o["name"] for o in graphs["condition_encoder"]["outputs"]}
    assert [i["name"] for i in graphs["grounding"]["inputs"]] == [
        "image_hidden", "text_hidden", "input_ids", "attention_mask", "vision_prompts", "text_prompts"]
    runtime = GroundingRuntime.load(art)
    pipe = DiffPromptPipeline.from_pretrained(single_pass / "dp", steps=3)
    samples = load_split(small_world / "val.json")[:3]
    pixels = np.stack([runtime.image_spec.preprocess(Image.open(s.image_path).convert("RGB")) for s in samples])
    ids, mask = runtime.tokenizer([s.expression for s in samples])
    got = runtime.score(pixels, ids, mask, [0, 5, 9])
    want = pipe.score(pixels, ids.astype(np.int64), mask.astype(np.int64), [0, 5, 9])
    logit = lambda p: np.log(p) - np.log1p(-p)
    assert np.abs(logit(got[0]) - logit(want[0])).max() < 1e-3 and np.abs(got[1] - want[1]).max() < 1e-4


def test_prompt_diffusion_on_a_single_pass_diffprompt_reads_its_conditions_at_the_same_layers(
        single_pass, small_world, tmp_path):
    """Prompt Diffusion on the single-pass pipeline's global prompts trains on the conditions read at the
    DiT's layers (where the pipeline reads them when it serves); the exported artifact answers as PyTorch."""
    import numpy as np
    from PIL import Image

    from diffprompt import cli
    from diffprompt.core.runtime import GroundingRuntime
    from diffprompt.training import train_prompt_diffusion
    from diffprompt.training.data.mdetr import load_split

    train_prompt_diffusion.main(train_prompt_diffusion.build_parser().parse_args(
        ["--base", str(single_pass / "dp"), "--train-steps", "2", "--batch-size", "8", "--overfit-steps", "1",
         "--hidden-size", "32", "--depth", "1", "--num-heads", "2", "--steps", "2", "--frozen-batch-size", "8",
         "--data-dir", str(small_world), "--cache-dir", str(tmp_path / "cache"), "--run-root", str(tmp_path / "runs"),
         "--threads", "1", "--no-progress", "--output", str(tmp_path / "pd")]))
    from diffprompt.training.data.grounding_dataset import load_pixels
    from diffprompt.training.data.row_cache import RowArrays
    from diffprompt.training.models.diffprompt import foundation_conditions

    pipe = DiffPromptPipeline.from_pretrained(tmp_path / "pd", steps=2)
    (conditions,) = (tmp_path / "cache").glob("conditions-*")
    cached = RowArrays(conditions).files["image_embed"][0]  # train expression 0
    first = load_split(small_world / "train.json")[0]
    pixels = torch.from_numpy(load_pixels(first, pipe.image_spec)[None])
    ids, mask = (torch.from_numpy(a.astype("int64")) for a in pipe.tokenizer([first.expression]))
    at_layers = foundation_conditions(pipe.foundation, pixels, ids, mask, layers=[1, 1])["image_embed"][0].numpy()
    at_the_end = foundation_conditions(pipe.foundation, pixels, ids, mask)["image_embed"][0].numpy()
    assert np.allclose(cached, at_layers, atol=1e-3) and not np.allclose(cached, at_the_end, atol=1e-3)
    assert pipe.single_pass and pipe.prompt_diffusion is not None
    assert cli.main(["export", "--pipeline", str(tmp_path / "pd"), "--steps", "2", "--out", str(tmp_path / "art"),
                     "--threads", "1", "--no-progress"]) == 0
    runtime = GroundingRuntime.load(tmp_path / "art" / "pd-2steps")
    samples = load_split(small_world / "val.json")[:2]
    pixels = np.stack([runtime.image_spec.preprocess(Image.open(s.image_path).convert("RGB")) for s in samples])
    ids, mask = runtime.tokenizer([s.expression for s in samples])
    got = runtime.score(pixels, ids, mask, [3, 4])
    want = pipe.score(pixels, ids.astype(np.int64), mask.astype(np.int64), [3, 4])
    logit = lambda p: np.log(p) - np.log1p(-p)
    assert np.abs(logit(got[0]) - logit(want[0])).max() < 1e-3 and np.abs(got[1] - want[1]).max() < 1e-4
