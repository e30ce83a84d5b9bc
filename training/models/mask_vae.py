"""Stage 1 model: the Mask-VAE, a one-channel KL autoencoder (Stable Diffusion's, from diffusers' blocks).

A binary mask of the referred object, in the grounding model's input square and resized to
`sample_size` (32 px for the embedded default), is mapped to {-1, +1} and compressed to a
latent (4, sample_size / 4, sample_size / 4). The decoder turns a latent (a clean one, or one
the DiT sampler is still denoising) back into a mask: logits whose sign is the mask.

    encode   masks (B, 1, m, m) in {-1, +1} -> posterior over latents (B, 4, h, w), h = m / 2**(blocks - 1)
    decode   latents (B, 4, h, w) -> mask logits (B, 1, m, m)

The layers are diffusers' `Encoder` / `Decoder` with the same names and parameters as
`diffusers.AutoencoderKL` (no mid-block attention, one resnet per block); the model itself is a
`PretrainedModel` like every model here (config.json + model.safetensors).

Official Diff-Prompt: 224 px masks -> 4 x 28 x 28 latents, ~86k parameters. The embedded
default uses 32 px masks (the 128 px input at 4 px per mask pixel) -> 4 x 8 x 8, because each
query decodes `depth` latents and decoding is the sampler's second cost after the DiT.

`scaling_factor` is set after training to 1 / std of the training latents (as Stable
Diffusion does), so the DiT sees unit-variance latents; it is saved in config.json.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.autoencoders.vae import Decoder, DiagonalGaussianDistribution, Encoder
from torch import nn

from diffprompt.training.models.pretrained import PretrainedModel


@dataclass
class MaskVAEConfig:
    sample_size: int = 32  # mask side, px
    block_out_channels: tuple[int, ...] = (16, 32, 32)  # each block but the last halves the resolution
    norm_num_groups: int = 8
    latent_channels: int = 4
    layers_per_block: int = 1
    scaling_factor: float = 1.0  # latents are multiplied by it for the DiT: 1 / their std, set after training

    @property
    def latent_size(self) -> int:
        return self.sample_size // 2 ** (len(self.block_out_channels) - 1)


MASK_VAE_PRESETS = {
    "baby": dict(block_out_channels=(8, 8), norm_num_groups=4, sample_size=16),  # tests
    "embedded": dict(block_out_channels=(16, 32, 32), norm_num_groups=8, sample_size=32),
}


class MaskVAE(PretrainedModel):
    """One channel in and out; see the module docstring for shapes."""

    config_class = MaskVAEConfig
    model_type = "diffprompt-mask-vae"

    def __init__(self, config: MaskVAEConfig):
        super().__init__(config)
        n, c = len(config.block_out_channels), config.latent_channels
        blocks = dict(block_out_channels=config.block_out_channels, layers_per_block=config.layers_per_block,
                      norm_num_groups=config.norm_num_groups, act_fn="silu", mid_block_add_attention=False)
        self.encoder = Encoder(in_channels=1, out_channels=c, down_block_types=("DownEncoderBlock2D",) * n,
                               double_z=True, **blocks)
        self.decoder = Decoder(in_channels=c, out_channels=1, up_block_types=("UpDecoderBlock2D",) * n, **blocks)
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1)
        self.post_quant_conv = nn.Conv2d(c, c, 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """(B, 1, m, m) -> posterior with .mean, .sample(generator), .kl() over (B, C, h, w) latents (unscaled)."""
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (B, C, h, w) -> mask logits (B, 1, m, m)."""
        return self.decoder(self.post_quant_conv(z))


def build_mask_vae(preset: str = "embedded") -> MaskVAE:
    """A fresh Mask-VAE of one of MASK_VAE_PRESETS."""
    return MaskVAE(MaskVAEConfig(**MASK_VAE_PRESETS[preset]))


def masks_to_vae_input(masks: torch.Tensor) -> torch.Tensor:
    """(B, m, m) bool -> (B, 1, m, m) float in {-1, +1}."""
    return masks[:, None].float() * 2 - 1


@torch.no_grad()
def encode_masks(vae: MaskVAE, masks: torch.Tensor) -> torch.Tensor:
    """(B, m, m) bool -> scaled latent means (B, 4, m/4, m/4): the DiT's training targets."""
    return vae.encode(masks_to_vae_input(masks)).mean * vae.config.scaling_factor


def decode_latents(vae: MaskVAE, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents (B, 4, h, w) -> mask logits (B, 1, m, m); > 0 is the mask."""
    return vae.decode(latents / vae.config.scaling_factor)


def mask_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample IoU of two (B, ...) bool masks; two empty masks count as 1."""
    pred, target = pred.flatten(1), target.flatten(1)
    inter = (pred & target).sum(1).float()
    union = (pred | target).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
