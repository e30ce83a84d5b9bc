"""Stage 1 model: the Mask-VAE, a one-channel `diffusers.AutoencoderKL`.

A binary mask of the referred object, in the grounding model's input square and resized to
`sample_size` (32 px for the embedded default), is mapped to {-1, +1} and compressed to a
latent (4, sample_size / 4, sample_size / 4). The decoder turns a latent (a clean one, or one
the DiT sampler is still denoising) back into a mask: logits whose sign is the mask.

Official Diff-Prompt: 224 px masks -> 4 x 28 x 28 latents, ~86k parameters. The embedded
default uses 32 px masks (the 128 px input at 4 px per mask pixel) -> 4 x 8 x 8, because each
query decodes `depth` latents and decoding is the sampler's second cost after the DiT.

`scaling_factor` is set after training to 1 / std of the training latents (as Stable
Diffusion does), so the DiT sees unit-variance latents; it is saved in config.json.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL

from diffprompt.training.models.grounding import load_component

MASK_VAE_PRESETS = {
    "baby": dict(block_out_channels=(8, 8), norm_num_groups=4, sample_size=16),  # tests
    "embedded": dict(block_out_channels=(16, 32, 32), norm_num_groups=8, sample_size=32),
}


def build_mask_vae(preset: str = "embedded") -> AutoencoderKL:
    """A fresh one-channel AutoencoderKL: each block but the last halves the resolution."""
    kw = MASK_VAE_PRESETS[preset]
    n = len(kw["block_out_channels"])
    return AutoencoderKL(
        in_channels=1, out_channels=1, latent_channels=4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        mid_block_add_attention=False, scaling_factor=1.0, **kw,
    )


def masks_to_vae_input(masks: torch.Tensor) -> torch.Tensor:
    """(B, m, m) bool -> (B, 1, m, m) float in {-1, +1}."""
    return masks[:, None].float() * 2 - 1


@torch.no_grad()
def encode_masks(vae: AutoencoderKL, masks: torch.Tensor) -> torch.Tensor:
    """(B, m, m) bool -> scaled latent means (B, 4, m/4, m/4): the DiT's training targets."""
    return vae.encode(masks_to_vae_input(masks)).latent_dist.mean * vae.config.scaling_factor


def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents (B, 4, h, w) -> mask logits (B, 1, m, m); > 0 is the mask."""
    return vae.decode(latents / vae.config.scaling_factor).sample


def mask_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample IoU of two (B, ...) bool masks; two empty masks count as 1."""
    pred, target = pred.flatten(1), target.flatten(1)
    inter = (pred & target).sum(1).float()
    union = (pred | target).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def load_mask_vae(directory) -> AutoencoderKL:
    """A trained Mask-VAE (config.json + safetensors), in eval mode; CheckpointError if missing or broken."""
    return load_component(AutoencoderKL, directory, "Mask-VAE").eval()
