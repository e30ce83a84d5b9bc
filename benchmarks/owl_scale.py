"""Randomly initialised Diff-Prompt pipelines at real OWL sizes, for cost and memory measurements.

    python -m benchmarks.owl_scale --family owlvit --out /tmp/owl          # OWL-ViT B/32, 768 px
    python -m benchmarks.owl_scale --family owlv2 --layers 2 --out /tmp/v2 # OWLv2 B/16, 960 px, 2 layers/tower

Writes, under --out, what a user brings and what stages 1-3 would produce, with random weights
(these are about shapes, memory and cost, not accuracy; nothing is downloaded):

    foundation/   a `transformers` OwlViTForObjectDetection / Owlv2ForObjectDetection `save_pretrained`
                  directory (config.json + model.safetensors) + a tokenizer.json
    vae/          the embedded Mask-VAE preset
    dit/          the prompt DiT ("embedded" preset) sized for the foundation's towers + its scheduler
    diffprompt/   the Diff-Prompt learner and pipeline.json -> `diffprompt export --pipeline .../diffprompt`
"""

from __future__ import annotations

import argparse
from pathlib import Path

FAMILIES = {
    # family -> (vision image size, patch size): the base checkpoints' input resolution
    "owlvit": (768, 32),  # google/owlvit-base-patch32: 24 x 24 patches
    "owlv2": (960, 16),  # google/owlv2-base-patch16: 60 x 60 patches
}


def build_random_owl_foundation(out: Path, family: str = "owlvit", layers: int | None = None, seed: int = 0,
                                width: int | None = None) -> Path:
    """A random HF OWL detector (base size; `layers` per tower and `width` for both towers and the
    projection if given: the input resolution and patch stay the family's) saved with a tokenizer.json."""
    import torch
    import transformers

    from diffprompt.training.data.synthetic.vocabulary import synthetic_tokenizer

    image_size, patch = FAMILIES[family]
    vision = {"image_size": image_size, "patch_size": patch}
    text = {}
    extra = {}
    if layers is not None:
        vision["num_hidden_layers"] = text["num_hidden_layers"] = layers
    if width is not None:  # OWL's class head needs text width == projection_dim
        for tower in (vision, text):
            tower.update(hidden_size=width, intermediate_size=4 * width, num_attention_heads=max(1, width // 64))
        extra["projection_dim"] = width
    torch.manual_seed(seed)
    Config, Model = ((transformers.OwlViTConfig, transformers.OwlViTForObjectDetection) if family == "owlvit"
                     else (transformers.Owlv2Config, transformers.Owlv2ForObjectDetection))
    model = Model(Config(text_config=text, vision_config=vision, **extra))
    model.save_pretrained(out, safe_serialization=True)
    synthetic_tokenizer(max_length=16).save(out)  # a word-level tokenizer; OWL's own is CLIP BPE
    return out


def build_random_owl_pipeline(root: Path, family: str = "owlvit", layers: int | None = None, seed: int = 0) -> Path:
    """foundation/, vae/, dit/ and diffprompt/ under `root`; returns the pipeline directory."""
    import torch

    from diffprompt.training.models.diffprompt import write_pipeline_file
    from diffprompt.training.models.grounding import load_grounding_model
    from diffprompt.training.models.mask_vae import build_mask_vae
    from diffprompt.training.models.prompt_dit import PROMPT_DIT_PRESETS, PromptDiT, PromptDiTConfig
    from diffprompt.training.models.prompt_learners import PromptLearner
    from diffprompt.training.models.prompt_sampler import make_scheduler

    foundation_dir = build_random_owl_foundation(root / "foundation", family, layers, seed)
    foundation = load_grounding_model(foundation_dir)
    cfg = foundation.config
    torch.manual_seed(seed)
    vae = build_mask_vae("embedded")
    vae.save_pretrained(root / "vae")
    dit = PromptDiT(PromptDiTConfig(
        conditioning="tokens", latent_size=vae.config.latent_size, image_embed_dim=cfg.projection_dim,
        text_embed_dim=cfg.projection_dim, image_token_dim=cfg.vision.hidden_size,
        text_token_dim=cfg.text.hidden_size, image_grid=cfg.grid_size, context_layers=3,
        **PROMPT_DIT_PRESETS["embedded"]))
    dit.save_pretrained(root / "dit")
    make_scheduler({}).save_config(root / "dit")
    learner = PromptLearner.for_foundation(foundation, "diffprompt", mask_size=vae.config.sample_size)
    out = root / "diffprompt"
    learner.save_pretrained(out)
    write_pipeline_file(out, foundation_dir, root / "vae", root / "dit")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=sorted(FAMILIES), default="owlvit")
    p.add_argument("--layers", type=int, default=None, help="layers per tower (default: the base model's 12)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    pipeline = build_random_owl_pipeline(args.out, args.family, args.layers)
    print(f"wrote {pipeline} (foundation {args.out / 'foundation'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
