"""One save/load convention for every model: a config dataclass next to safetensors weights.

    model.save_pretrained(directory)    # config.json = {"model_type": ..., every config field}
                                        # model.safetensors = the state dict
    Model.from_pretrained(directory)    # Model(Config(**config.json)), then every tensor, strictly

The foundation (`GroundingModel`), the Mask-VAE, the prompt DiT and the prompt learners are each an
`nn.Module` built from one config dataclass, as in DiT's models.py and nanoGPT, and subclass
`PretrainedModel`. Loading builds the model exactly as a fresh one is built (so it draws from
torch's global RNG as `Model(config)` does) and then overwrites every tensor. Nothing is pickled.

Why our own small base rather than diffusers' ModelMixin / ConfigMixin for all four: the
foundation's config is nested (two towers) and the same loader reads Hugging Face OWL-ViT
checkpoints, which ConfigMixin does not describe; ConfigMixin fills a key missing from config.json
with today's default, so a checkpoint saved before a field existed silently loads as another
model (catching that for the learner's `mask_input` took diffusers' private `_use_default_values`);
and its loader carries hub, device-map and offloading machinery we never use. Here config.json
must name every field of the dataclass, and a missing or unknown field is a `CheckpointError`
that names it.

Checkpoints written before this convention (diffusers' layout: `_class_name` in config.json,
`diffusion_pytorch_model.safetensors`) are refused with the command that converts them
(scripts/convert_checkpoints.py).

`save_pretrained` writes into a directory; the training stages make the write atomic by saving
into a staging directory that then replaces the target (training/utils/checkpoint.py).
"""

from __future__ import annotations

import copy
import json
import typing
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from diffprompt.core.errors import CheckpointError, read_json_object

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
OLD_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"  # diffusers' layout, before this module
CONVERT_COMMAND = "python scripts/convert_checkpoints.py"


# ----------------------------------------------------------------------------- config files


def read_config_file(directory: Path) -> dict[str, Any]:
    """config.json of a checkpoint directory, as a dict."""
    holds = f"a checkpoint directory holds {CONFIG_NAME} + {WEIGHTS_NAME}"
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such directory ({holds})")
    raw = read_json_object(directory / CONFIG_NAME, CheckpointError, holds)
    if "_class_name" in raw or (directory / OLD_WEIGHTS_NAME).exists():
        raise CheckpointError(f"{directory}: saved in diffusers' layout ({OLD_WEIGHTS_NAME}, config.json with "
                              f"_class_name {raw.get('_class_name')!r}); convert it once with: "
                              f"{CONVERT_COMMAND} {directory}")
    return raw


def config_from_dict(config_class: type, values: dict[str, Any], source: Path | str) -> Any:
    """`config_class(**values)`, with nested config dataclasses and tuples rebuilt from JSON.

    Every field must be given: a missing field is an error naming it (and the field's `missing`
    metadata, if it says why), never a silent default. The one exception is a field with `absent`
    metadata: the value that reproduces exactly what every checkpoint saved before the field existed
    computed (e.g. `first_layers` [0, 0]: prompts from the input layer), so older configs still load."""
    names = [f.name for f in fields(config_class)]
    unknown = sorted(set(values) - set(names))
    values = {**{f.name: copy.deepcopy(f.metadata["absent"]) for f in fields(config_class)
                 if f.name not in values and "absent" in f.metadata}, **values}
    missing = [f for f in fields(config_class) if f.name not in values]
    if unknown:
        raise CheckpointError(f"{source}: unknown {config_class.__name__} field(s) {unknown}")
    if missing:
        notes = "".join(f"; {f.metadata['missing']}" for f in missing if "missing" in f.metadata)
        raise CheckpointError(f"{source}: no {', '.join(repr(f.name) for f in missing)} "
                              f"({config_class.__name__} needs every field){notes}")
    hints = typing.get_type_hints(config_class)
    kwargs = {}
    for name in names:
        value, kind = values[name], hints[name]
        if is_dataclass(kind):
            value = config_from_dict(kind, value, source)
        elif typing.get_origin(kind) is tuple:
            value = tuple(value)
        kwargs[name] = value
    return config_class(**kwargs)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise CheckpointError(f"{path}: missing")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e


# ----------------------------------------------------------------------------- the base class


class PretrainedModel(nn.Module):
    """A model built from one config dataclass, saved as config.json + model.safetensors.

    Subclasses set `config_class` (the dataclass) and `model_type` (the name written to config.json)
    and take the config as their one constructor argument."""

    config_class: ClassVar[type]
    model_type: ClassVar[str]

    def __init__(self, config: Any):
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} takes a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config

    def save_pretrained(self, directory: str | Path) -> None:
        """Write config.json + model.safetensors into `directory` (created if needed)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps({"model_type": self.model_type, **asdict(self.config)},
                                                        indent=2))
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def load_config(cls, directory: str | Path) -> Any:
        """The config saved in `directory` (config.json only; no weights are read)."""
        directory = Path(directory)
        raw = read_config_file(directory)
        if raw.get("model_type") != cls.model_type:
            raise CheckpointError(f"{directory / CONFIG_NAME}: model_type {raw.get('model_type')!r}, "
                                  f"expected {cls.model_type!r} ({cls.__name__})")
        return config_from_dict(cls.config_class, {k: v for k, v in raw.items() if k != "model_type"},
                                directory / CONFIG_NAME)

    @classmethod
    def from_config(cls, config: Any) -> PretrainedModel:
        """A freshly initialised model (PromptLearner picks the registered class of config.method)."""
        return cls(config)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> PretrainedModel:
        """The model saved in `directory`, in eval mode."""
        directory = Path(directory)
        model = cls.from_config(cls.load_config(directory))
        model.load_weights(read_weights(directory / WEIGHTS_NAME), directory)
        return model.eval()

    def load_weights(self, state: dict[str, torch.Tensor], source: Path | str) -> None:
        """Copy every tensor of `state` into the model; any missing, extra or misshapen tensor is an error."""
        try:
            missing, unexpected = self.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shape mismatches
            raise CheckpointError(f"{source}: weights do not match config.json: {e}") from e
        if missing or unexpected:
            raise CheckpointError(f"{source}: weights do not match the architecture; missing {sorted(missing)[:5]}, "
                                  f"unexpected {sorted(unexpected)[:5]}")
