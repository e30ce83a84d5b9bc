"""The baby foundation the training tests build on: random weights, saved as a user's checkpoint is."""

from __future__ import annotations

from pathlib import Path


def save_baby_foundation(directory: Path, layers: int = 1):
    """A randomly initialised baby foundation (torch seed 0) with the synthetic tokenizer, saved in
    `directory`; returns the model. `layers` per tower (2: room for a single-pass split)."""
    import torch

    from diffprompt.training.data.synthetic.vocabulary import synthetic_tokenizer
    from diffprompt.training.models.grounding import GROUNDING_PRESETS, GroundingModel

    torch.manual_seed(0)
    tok = synthetic_tokenizer()
    config = GROUNDING_PRESETS["baby"](vocab_size=tok.vocab_size)
    config.vision.num_hidden_layers = config.text.num_hidden_layers = layers
    model = GroundingModel(config)
    model.save_pretrained(directory)
    tok.save(directory)
    return model
