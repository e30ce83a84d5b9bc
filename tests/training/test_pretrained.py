"""One save/load convention for every model (training/models/pretrained.py), and the conversion of
checkpoints saved in diffusers' layout (scripts/convert_checkpoints.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffprompt.training.models.diffprompt import DiffPromptPipeline
from diffprompt.training.models.grounding import GROUNDING_PRESETS, GroundingModel
from diffprompt.training.models.mask_vae import MaskVAE, build_mask_vae, decode_latents
from diffprompt.training.models.pretrained import CheckpointError
from diffprompt.training.models.prompt_dit import PROMPT_DIT_PRESETS, PromptDiT, PromptDiTConfig
from diffprompt.training.models.prompt_learners import LearnerConfig, PromptLearner

REPO = Path(__file__).resolve().parents[2]
CONVERT = REPO / "scripts" / "convert_checkpoints.py"

MODELS = {
    "foundation": lambda: GroundingModel(GROUNDING_PRESETS["baby"](vocab_size=40)),
    "mask_vae": lambda: build_mask_vae("baby"),
    "prompt_dit": lambda: PromptDiT(PromptDiTConfig(conditioning="tokens", context_layers=1, image_embed_dim=32,
                                                    text_embed_dim=32, image_token_dim=32, text_token_dim=32,
                                                    **PROMPT_DIT_PRESETS["baby"])),
    "learner": lambda: PromptLearner.from_config(LearnerConfig(method="maple", vision_width=32, text_width=32,
                                                               vision_layers=1, text_layers=1)),
}


@pytest.mark.parametrize("name", MODELS)
def test_every_model_saves_config_and_safetensors_and_loads_back_exactly(name, tmp_path):
    torch.manual_seed(0)
    model = MODELS[name]()
    for p in model.parameters():
        p.data.add_(torch.randn_like(p))  # not what a fresh model would have
    model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "model.safetensors"}
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == model.model_type
    again = type(model).from_pretrained(tmp_path)
    assert type(again) is type(model) and again.config == model.config and not again.training
    want, got = model.state_dict(), again.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_loading_draws_from_the_rng_like_building_a_fresh_model(tmp_path):
    """from_pretrained builds, then overwrites: a seeded run draws the same numbers after either."""
    build_mask_vae("baby").save_pretrained(tmp_path)
    torch.manual_seed(0)
    build_mask_vae("baby")
    after_build = torch.rand(3)
    torch.manual_seed(0)
    MaskVAE.from_pretrained(tmp_path)
    assert torch.equal(torch.rand(3), after_build)


def _saved(tmp_path: Path) -> Path:
    build_mask_vae("baby").save_pretrained(tmp_path)
    return tmp_path


def _edit_config(directory: Path, **changes) -> None:
    cfg = json.loads((directory / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            del cfg[key]
        else:
            cfg[key] = value
    (directory / "config.json").write_text(json.dumps(cfg))


def test_a_missing_config_field_is_an_error_naming_it_never_a_default(tmp_path):
    _edit_config(_saved(tmp_path), scaling_factor=None)
    with pytest.raises(CheckpointError, match="'scaling_factor'"):
        MaskVAE.from_pretrained(tmp_path)


def test_an_unknown_config_field_or_model_type_is_an_error(tmp_path):
    _edit_config(_saved(tmp_path), use_quant_conv=False)
    with pytest.raises(CheckpointError, match="unknown MaskVAEConfig field.*use_quant_conv"):
        MaskVAE.from_pretrained(tmp_path)
    _edit_config(tmp_path, use_quant_conv=None)
    with pytest.raises(CheckpointError, match="model_type 'diffprompt-mask-vae', expected 'diffprompt-prompt-dit'"):
        PromptDiT.from_pretrained(tmp_path)


def test_weights_that_do_not_match_the_config_are_an_error(tmp_path):
    _edit_config(_saved(tmp_path), norm_num_groups=2, block_out_channels=[8, 8, 8])
    with pytest.raises(CheckpointError, match="weights do not match"):
        MaskVAE.from_pretrained(tmp_path)


def test_the_learner_missing_mask_input_says_how_to_load_it(tmp_path):
    learner = PromptLearner.from_config(LearnerConfig(method="diffprompt", mask_size=16))
    learner.save_pretrained(tmp_path)
    _edit_config(tmp_path, mask_input=None)
    with pytest.raises(CheckpointError, match='mask_input.*reads tanh.*"mask_input": "tanh"'):
        PromptLearner.from_pretrained(tmp_path)


def test_configs_saved_before_the_single_pass_fields_load_as_the_two_passes_they_were(tmp_path):
    """`first_layers` / `condition_layers` absent: [0, 0] and None (prompts from the input, conditions
    after the last layers), what every earlier checkpoint computed; given, they are read as saved."""
    learner = PromptLearner.from_config(LearnerConfig(method="diffprompt", mask_size=16))
    learner.save_pretrained(tmp_path / "learner")
    _edit_config(tmp_path / "learner", first_layers=None)
    assert PromptLearner.from_pretrained(tmp_path / "learner").config.first_layers == [0, 0]
    dit = PromptDiT(PromptDiTConfig(hidden_size=32, depth=1, num_heads=2, condition_layers=[1, 1]))
    dit.save_pretrained(tmp_path / "dit")
    assert PromptDiT.from_pretrained(tmp_path / "dit").config.condition_layers == [1, 1]
    _edit_config(tmp_path / "dit", condition_layers=None)
    assert PromptDiT.from_pretrained(tmp_path / "dit").config.condition_layers is None


# ----------------------------------------------------------------------------- diffusers' layout


def _old_layout(model, directory: Path, class_name: str, drop: tuple[str, ...] = ()) -> Path:
    """`model` saved as diffusers' ModelMixin did: config.json with _class_name, diffusion_pytorch_model.safetensors."""
    directory.mkdir(parents=True)
    config = {k: v for k, v in json.loads(json.dumps(model.config.__dict__)).items() if k not in drop}
    (directory / "config.json").write_text(json.dumps({"_class_name": class_name, "_diffusers_version": "0.42.1",
                                                       **config}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(directory / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    return directory


def _convert(*directories: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CONVERT), *map(str, directories)], capture_output=True, text=True,
                          cwd=REPO)


def test_the_old_layout_is_refused_with_the_command_that_converts_it(tmp_path):
    _old_layout(build_mask_vae("baby"), tmp_path / "vae", "AutoencoderKL")
    with pytest.raises(CheckpointError, match="diffusers' layout.*convert_checkpoints.py"):
        MaskVAE.from_pretrained(tmp_path / "vae")


def test_a_diffusers_autoencoder_converts_to_a_mask_vae_with_the_same_tensors_and_outputs(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    old = AutoencoderKL(in_channels=1, out_channels=1, latent_channels=4, layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        mid_block_add_attention=False, scaling_factor=0.7, block_out_channels=(8, 8),
                        norm_num_groups=4, sample_size=16).eval()
    old.save_pretrained(tmp_path / "vae")
    before = load_file(str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))
    proc = _convert(tmp_path / "vae")
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in (tmp_path / "vae").iterdir()} == {"config.json", "model.safetensors"}
    after = load_file(str(tmp_path / "vae" / "model.safetensors"))
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    vae = MaskVAE.from_pretrained(tmp_path / "vae")
    assert vae.config.scaling_factor == 0.7 and vae.config.block_out_channels == (8, 8)
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(decode_latents(vae, z), old.decode(z / 0.7).sample)
    assert "not in diffusers' layout" in _convert(tmp_path / "vae").stdout  # a second run leaves it alone


def test_old_dit_and_learner_configs_convert_with_diffusers_defaults_except_mask_input(tmp_path):
    dit = MODELS["prompt_dit"]()
    dit_config = PromptDiTConfig(**{**dit.config.__dict__, "context_layers": 0, "conditioning": "pooled"})
    pooled = PromptDiT(dit_config)
    _old_layout(pooled, tmp_path / "dit", "PromptDiT", drop=("context_layers",))  # saved before the field existed
    (tmp_path / "dit" / "scheduler_config.json").write_text("{}")
    learner = PromptLearner.from_config(LearnerConfig(method="diffprompt", mask_size=16, vision_width=32,
                                                      text_width=32, vision_layers=1, text_layers=1))
    _old_layout(learner, tmp_path / "old_learner", "PromptLearner", drop=("mask_input",))
    proc = _convert(tmp_path / "dit", tmp_path / "old_learner")
    assert proc.returncode != 0 and '"mask_input": "tanh"' in proc.stderr
    assert PromptDiT.from_pretrained(tmp_path / "dit").config == dit_config  # context_layers: diffusers' default 0
    assert (tmp_path / "dit" / "scheduler_config.json").exists()  # other files are kept
    assert (tmp_path / "old_learner" / "diffusion_pytorch_model.safetensors").exists()  # refused: left as it was
    _edit_config(tmp_path / "old_learner", mask_input="tanh")
    assert _convert(tmp_path / "old_learner").returncode == 0
    assert PromptLearner.from_pretrained(tmp_path / "old_learner").config.mask_input == "tanh"


def test_the_committed_checkpoints_are_in_the_one_layout():
    checkpoints = REPO / "checkpoints"
    for name in ("foundation", "mask_vae", "prompt_dit_pooled", "prompt_dit_tokens", "diffprompt"):
        assert (checkpoints / name / "model.safetensors").exists(), name
        assert not (checkpoints / name / "diffusion_pytorch_model.safetensors").exists(), name
    pipeline = DiffPromptPipeline.from_pretrained(checkpoints / "diffprompt")
    assert pipeline.learner.method == "diffprompt" and pipeline.dit.config.conditioning == "tokens"
    assert PromptDiT.from_pretrained(checkpoints / "prompt_dit_pooled").config.context_layers == 0
