"""Convert checkpoints saved in diffusers' layout to the one convention of training/models/pretrained.py.

Before, the Mask-VAE (a diffusers.AutoencoderKL), the prompt DiT and the prompt learners were saved
by diffusers' ModelMixin: config.json with `_class_name` / `_diffusers_version`, weights in
diffusion_pytorch_model.safetensors. Now every model writes config.json with its `model_type` and
every field of its config dataclass, and model.safetensors.

    python scripts/convert_checkpoints.py checkpoints/mask_vae checkpoints/prompt_dit_pooled \\
        checkpoints/prompt_dit_tokens checkpoints/diffprompt

Each directory is rewritten atomically (built in a staging directory, then swapped in); its other
files (scheduler_config.json, pipeline.json, ...) are copied as they are. The weight tensors are
copied unchanged, and checked bit for bit against the old file after the rewrite. A config key the
old file lacks gets the default diffusers gave it when loading, except a Diff-Prompt learner's
`mask_input`, whose default changed meaning: the conversion stops and says what to add.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import asdict, fields
from pathlib import Path

OLD_CONFIG_KEYS = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")


def mask_vae_config(old: dict):
    """MaskVAEConfig from an AutoencoderKL config, refusing any AutoencoderKL that MaskVAE does not build."""
    from diffprompt.training.models.mask_vae import MaskVAEConfig

    n = len(old["block_out_channels"])
    fixed = {"in_channels": 1, "out_channels": 1, "act_fn": "silu", "mid_block_add_attention": False,
             "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
             "use_quant_conv": True, "use_post_quant_conv": True, "shift_factor": None, "latents_mean": None,
             "latents_std": None}
    defaults = {"use_quant_conv": True, "use_post_quant_conv": True, "shift_factor": None, "latents_mean": None,
                "latents_std": None}
    for key, want in fixed.items():
        got = old.get(key, defaults.get(key))
        if (list(got) if isinstance(got, (list, tuple)) else got) != want:
            raise SystemExit(f"not a Mask-VAE this code builds: {key} = {got!r}, expected {want!r}")
    keep = {f.name for f in fields(MaskVAEConfig)}
    return MaskVAEConfig(**{**{k: v for k, v in old.items() if k in keep},
                            "block_out_channels": tuple(old["block_out_channels"])})


def filled_config(config_class, old: dict, source: Path):
    """config_class from an old diffusers config: its keys, and the class defaults for keys it lacks."""
    from diffprompt.training.models.pretrained import config_from_dict

    values = {k: v for k, v in old.items() if k not in OLD_CONFIG_KEYS}
    if config_class.__name__ == "LearnerConfig" and values.get("method", "diffprompt") == "diffprompt" \
            and "mask_input" not in values:
        raise SystemExit(f"{source}: a Diff-Prompt learner saved before 'mask_input' existed reads tanh of its "
                         'mask logits: add "mask_input": "tanh" to its config.json, then convert it')
    return config_from_dict(config_class, {**asdict(config_class()), **values}, source)


def convert(directory: Path) -> None:
    import torch

    from diffprompt.core.files import replace_directory, staging_dir
    from diffprompt.training.models.mask_vae import MaskVAE
    from diffprompt.training.models.pretrained import CONFIG_NAME, OLD_WEIGHTS_NAME, WEIGHTS_NAME, read_weights
    from diffprompt.training.models.prompt_dit import PromptDiT
    from diffprompt.training.models.prompt_learners import LearnerConfig, PromptLearner

    old = json.loads((directory / CONFIG_NAME).read_text())
    kind = old.get("_class_name")
    if kind is None:
        print(f"{directory}: not in diffusers' layout (no _class_name in config.json), left as it is")
        return
    if kind == "AutoencoderKL":
        model = MaskVAE(mask_vae_config(old))
    elif kind == "PromptDiT":
        model = PromptDiT(filled_config(PromptDiT.config_class, old, directory / CONFIG_NAME))
    elif kind == "PromptLearner":
        model = PromptLearner.from_config(filled_config(LearnerConfig, old, directory / CONFIG_NAME))
    else:
        raise SystemExit(f"{directory}: unknown _class_name {kind!r}")
    weights = read_weights(directory / OLD_WEIGHTS_NAME)
    model.load_weights(weights, directory / OLD_WEIGHTS_NAME)

    staging = staging_dir(directory)
    try:
        for f in directory.iterdir():
            if f.name not in (CONFIG_NAME, OLD_WEIGHTS_NAME):
                shutil.copy2(f, staging / f.name)
        model.save_pretrained(staging)
        again = read_weights(staging / WEIGHTS_NAME)
        same = set(again) == set(weights) and all(
            again[k].dtype == weights[k].dtype and torch.equal(again[k], weights[k]) for k in weights)
        if not same:
            raise SystemExit(f"{directory}: the rewritten weights differ from {OLD_WEIGHTS_NAME}; nothing changed")
        type(model).from_pretrained(staging)  # loads in the new layout
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_directory(staging, directory)
    print(f"{directory}: {kind} -> {type(model).__name__} ({model.model_type}), {len(weights)} tensors bit-identical")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("directories", nargs="+", type=Path)
    for directory in p.parse_args(argv).directories:
        convert(directory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
