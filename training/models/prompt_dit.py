"""Stage 2 model: the prompt generator, a Diffusion Transformer over Mask-VAE latents.

Follows facebookresearch/DiT `models.py` (patchify -> adaLN-Zero blocks -> final layer ->
unpatchify). Two ways to condition on the frozen foundation's *unprompted* outputs:

- ``conditioning="pooled"`` (the paper, faithful): adaLN-Zero on
  concat(image embedding + t_emb, text embedding + t_emb), the CLIP-style pooled embeddings.
- ``conditioning="tokens"`` (ours, improved): the same adaLN-Zero conditioning, plus a
  cross-attention in every block from the latent tokens to the foundation's patch tokens and
  text tokens, so the generator can see *where* things are, not only a summary of the image.
  The foundation's own score of the expression on each patch (its class head on those tokens,
  standardised per image) is one more input channel of the latent grid and one more feature
  of each patch token: a spatial prior of "things the expression mentions" that the DiT then
  has to narrow down to the one referred object.
  With ``context_layers > 0`` (the embedded default) a small transformer first reads the image
  and text tokens *together*, so patches can compare themselves with the words and with each
  other ("left of the red circle", "second from the left"). A pointer head on its patch outputs
  scores which patch holds the referred object; training adds a cross-entropy on that choice
  (target: ``referred_patch`` of the true mask), and its log-probability map is one more input
  channel of the latent grid and one more feature of each patch token. The denoising loss alone
  teaches localisation slowly; the direct pointer signal tripled the val mask IoU of 2000-step
  DiTs (docs/results.md). This part reads the conditions only, so the sampler runs it once per
  query (`prepare_conditions`) and only the DiT blocks at every step (`denoise`).

The output is what the checkpoint's schedule names in `prediction_type` (x0, "sample", for our
checkpoints; the noise epsilon in the paper). Inputs:

    latents       (B, C, h, w)     noisy scaled Mask-VAE latents
    timesteps     (B,)             integer diffusion steps in [0, T)
    image_embed   (B, Ei)          pooled image embedding
    text_embed    (B, Et)          pooled text (query) embedding
    image_tokens  (B, 1+P, Dv)     image tower's last hidden state (tokens mode only)
    text_tokens   (B, T, Dt)       text tower's last hidden state (tokens mode only)
    text_mask     (B, T)           1 = token, 0 = padding (tokens mode only)
    patch_scores  (B, P)           foundation score of the expression per patch (tokens mode only)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from diffprompt.training.models.pretrained import PretrainedModel


@dataclass
class PromptDiTConfig:
    latent_channels: int = 4
    latent_size: int = 8
    patch_size: int = 1
    hidden_size: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    conditioning: str = "tokens"  # "pooled" (paper) | "tokens" (pooled + cross-attention)
    image_embed_dim: int = 128
    text_embed_dim: int = 128
    image_token_dim: int = 192
    text_token_dim: int = 128
    image_grid: int = 8  # the foundation's patch grid side (tokens mode: position of each patch token)
    context_layers: int = 0  # tokens mode: layers over the joint condition tokens + pointer head (0 = none)
    # Single-pass mode: the conditions are read after these (vision, text) layers of the unprompted pass,
    # whose hidden states the prompted pass then continues from (prompts enter there); None = after the
    # last layers, with a second, full prompted pass (the paper's two passes)
    condition_layers: list[int] | None = field(default=None, metadata={"absent": None})


PROMPT_DIT_PRESETS = {
    "baby": dict(hidden_size=32, depth=1, num_heads=2),  # tests
    "embedded": dict(hidden_size=128, depth=4, num_heads=4, patch_size=2),
    # a quarter of the width, half the blocks (0.4 M parameters with one context layer): a generator
    # whose DDIM step costs a fraction of the embedded foundation (issue: the pipeline's cost)
    "small": dict(hidden_size=64, depth=2, num_heads=2, patch_size=2),
    "official": dict(hidden_size=512, depth=12, num_heads=8, patch_size=2),  # the paper's DiT
}


def frame_sincos(grid: int, dim: int, span: float = 16.0) -> torch.Tensor:
    """(grid*grid, dim) 2-D sin-cos table of cell centres in one frame-wide scale, so grids of
    different sides (latent tokens, foundation patches) give the same code at the same place."""
    coords = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid * span  # (grid,)
    quarter = dim // 4
    omega = 1.0 / 100 ** (torch.arange(quarter, dtype=torch.float32) / quarter)  # (dim/4,)
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    parts = []
    for c in (xs.reshape(-1), ys.reshape(-1)):
        parts += [torch.sin(c[:, None] * omega), torch.cos(c[:, None] * omega)]
    return F.pad(torch.cat(parts, dim=1), (0, dim - 4 * quarter))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


# ----------------------------------------------------------------------------- embedders


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> (B, D) through a sinusoidal table and an MLP (DiT)."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]  # (B, half)
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class Attention(nn.Module):
    """Multi-head attention; `context` None = self-attention. key_bias (B, 1, 1, S) additive."""

    def __init__(self, hidden_size: int, num_heads: int, context_size: int | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(hidden_size, hidden_size)
        self.kv = nn.Linear(context_size or hidden_size, 2 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, key_bias: torch.Tensor | None = None,
                kv: torch.Tensor | None = None):
        """kv (B, S, 2D): `self.kv(context)` computed beforehand (it depends on the conditions only)."""
        B, N, D = x.shape
        if kv is None:
            kv = self.kv(x if context is None else context)  # (B, S, 2D)
        q = self.q(x).view(B, N, self.num_heads, -1).transpose(1, 2)  # (B, H, N, D/H)
        k, v = kv.view(B, kv.shape[1], 2, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # (B, H, S, D/H)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_bias)  # (B, H, N, D/H)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


# ----------------------------------------------------------------------------- blocks


class ContextBlock(nn.Module):
    """Pre-LN transformer layer over the condition tokens (no timestep: computed from the conditions only)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size)
        hidden_mlp = int(hidden_size * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, hidden_mlp), nn.GELU(approximate="tanh"),
                                 nn.Linear(hidden_mlp, hidden_size))

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), None, key_bias)
        return x + self.mlp(self.norm2(x))


def referred_patch(masks: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, m, m) binary masks in the model-input frame -> (B,) index of the grid x grid patch that
    holds each mask's centroid (the pointer head's target)."""
    m = masks.shape[-1]
    w = masks.float().flatten(1)  # (B, m*m)
    coords = (torch.arange(m, dtype=torch.float32) + 0.5) / m  # pixel centres in [0, 1]
    ys, xs = (c.reshape(-1) for c in torch.meshgrid(coords, coords, indexing="ij"))
    total = w.sum(1).clamp_min(1.0)
    cx, cy = (w * xs).sum(1) / total, (w * ys).sum(1) / total  # (B,)
    col = (cx * grid).long().clamp(0, grid - 1)
    row = (cy * grid).long().clamp(0, grid - 1)
    return row * grid + col


def dit_initialize(model: nn.Module, t_embedder: TimestepEmbedder, blocks: nn.ModuleList) -> None:
    """DiT's initialisation (facebookresearch/DiT): every Linear Xavier-uniform with zero bias, the
    timestep MLP normal(0.02), and each block's adaLN modulation zeroed, so every block starts as
    the identity. The caller zeroes its own output layer."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    nn.init.normal_(t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(t_embedder.mlp[2].weight, std=0.02)
    for block in blocks:
        nn.init.zeros_(block.adaLN_modulation[-1].weight)
        nn.init.zeros_(block.adaLN_modulation[-1].bias)


class DiTBlock(nn.Module):
    """adaLN-Zero block; with `cross_attention`, a cross-attention to the condition tokens sits
    between self-attention and MLP (gated by adaLN as well, so the block starts as identity)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, cond_size: int, cross_attention: bool):
        super().__init__()
        self.hidden_size = hidden_size
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        hidden_mlp = int(hidden_size * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, hidden_mlp), nn.GELU(approximate="tanh"),
                                 nn.Linear(hidden_mlp, hidden_size))
        self.cross_attention = cross_attention
        n_mod = 9 if cross_attention else 6
        if cross_attention:
            self.norm_cross = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            self.cross_attn = Attention(hidden_size, num_heads)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_size, n_mod * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, context=None, key_bias=None, cross_kv=None) -> torch.Tensor:
        """cross_kv (B, S, 2D): the cross-attention's keys and values of `context`, if computed beforehand."""
        # split with constant sizes: one Split node when exported (chunk exports shape arithmetic)
        mods = self.adaLN_modulation(c).split([self.hidden_size] * (9 if self.cross_attention else 6), dim=-1)
        x = x + mods[2][:, None] * self.attn(modulate(self.norm1(x), mods[0], mods[1]))
        x = x + mods[5][:, None] * self.mlp(modulate(self.norm2(x), mods[3], mods[4]))
        if self.cross_attention:
            h = modulate(self.norm_cross(x), mods[6], mods[7])
            x = x + mods[8][:, None] * self.cross_attn(h, context, key_bias, cross_kv)
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, cond_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).split([self.hidden_size] * 2, dim=-1)  # (B, D) each
        return self.linear(modulate(self.norm_final(x), shift, scale))


# ----------------------------------------------------------------------------- the model


class PromptDiT(PretrainedModel):
    """DiT over mask latents. See the module docstring for the inputs."""

    config_class = PromptDiTConfig
    model_type = "diffprompt-prompt-dit"

    def __init__(self, config: PromptDiTConfig):
        super().__init__(config)
        conditioning, context_layers = config.conditioning, config.context_layers
        if conditioning not in ("pooled", "tokens"):
            raise ValueError(f"conditioning must be 'pooled' or 'tokens', got {conditioning!r}")
        if context_layers and conditioning != "tokens":
            raise ValueError("context_layers needs conditioning='tokens' (pooled conditioning has no tokens)")
        num_heads, mlp_ratio = config.num_heads, config.mlp_ratio
        D, p = config.hidden_size, config.patch_size
        self.grid = config.latent_size // p
        cross = conditioning == "tokens"
        self.pointer = context_layers > 0
        # + the foundation's patch-score map (tokens mode) + the pointer's log-probability map
        in_channels = config.latent_channels + (1 if cross else 0) + (1 if self.pointer else 0)
        self.x_embedder = nn.Linear(in_channels * p * p, D)
        self.register_buffer("pos_embed", frame_sincos(self.grid, D)[None], persistent=False)  # (1, N, D)
        self.t_embedder = TimestepEmbedder(D)
        self.image_embedder = nn.Linear(config.image_embed_dim, D)
        self.text_embedder = nn.Linear(config.text_embed_dim, D)
        cond_size = 2 * D  # concat(image + t, text + t)
        if cross:
            self.score_proj = nn.Linear(1, D)
            self.image_token_proj = nn.Linear(config.image_token_dim, D)
            self.text_token_proj = nn.Linear(config.text_token_dim, D)
            self.context_type = nn.Parameter(torch.zeros(2, D))  # image / text token type embedding
            # The tower's last hidden state keeps little explicit position; the same 2-D sin-cos
            # table as the latent tokens lets a latent token find "its" patches by position.
            context_pos = torch.cat([torch.zeros(1, D), frame_sincos(config.image_grid, D)])  # (1+P, D), CLS first
            self.register_buffer("context_pos", context_pos[None], persistent=False)
        if self.pointer:
            self.context_blocks = nn.ModuleList([ContextBlock(D, num_heads, mlp_ratio) for _ in range(context_layers)])
            self.pointer_norm = nn.LayerNorm(D)
            self.pointer_head = nn.Linear(D, 1)
            self.pointer_proj = nn.Linear(1, D)
        self.blocks = nn.ModuleList([DiTBlock(D, num_heads, mlp_ratio, cond_size, cross) for _ in range(config.depth)])
        self.final_layer = FinalLayer(D, cond_size, p, config.latent_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        dit_initialize(self, self.t_embedder, self.blocks)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)  # zero-out the output layer
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        p, g = self.config.patch_size, self.grid  # (B, C, g*p, g*p) -> (B, g*g, p*p*C)
        x = x.view(B, C, g, p, g, p).permute(0, 2, 4, 3, 5, 1)  # (B, g, g, p, p, C)
        return x.reshape(B, g * g, p * p * C)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        p, g, C = self.config.patch_size, self.grid, self.config.latent_channels
        x = x.view(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4)  # (B, C, g, p, g, p)
        return x.reshape(B, C, g * p, g * p)

    def forward(
        self,
        latents: torch.Tensor,  # (B, C, h, w)
        timesteps: torch.Tensor,  # (B,)
        image_embed: torch.Tensor,  # (B, Ei)
        text_embed: torch.Tensor,  # (B, Et)
        image_tokens: torch.Tensor | None = None,  # (B, 1+P, Dv)
        text_tokens: torch.Tensor | None = None,  # (B, T, Dt)
        text_mask: torch.Tensor | None = None,  # (B, T)
        patch_scores: torch.Tensor | None = None,  # (B, P)
        return_pointer: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """-> model output (B, C, h, w); with `return_pointer` also the pointer logits (B, P)."""
        if return_pointer and not self.pointer:
            raise ValueError("return_pointer needs a DiT with context_layers > 0")
        prepared = self.prepare_conditions(image_embed, text_embed, image_tokens, text_tokens, text_mask, patch_scores)
        out = self.denoise(latents, timesteps, prepared)
        return (out, prepared["pointer_logits"]) if return_pointer else out

    @property
    def prepared_names(self) -> tuple[str, ...]:
        """The tensors `prepare_conditions` computes once per sample, in the exported condition encoder's order."""
        if self.config.conditioning == "pooled":
            return ("image_embed", "text_embed")
        return ("image_embed", "text_embed", "context", "key_bias", "maps", "cross_kv")

    @property
    def denoiser_names(self) -> tuple[str, ...]:
        """The prepared tensors `denoise` reads at every step, in the exported denoiser's input order
        (the context itself is only read through its precomputed keys and values, `cross_kv`)."""
        if self.config.conditioning == "pooled":
            return ("image_embed", "text_embed")
        return ("image_embed", "text_embed", "cross_kv", "key_bias", "maps")

    def prepare_conditions(self, image_embed, text_embed, image_tokens=None, text_tokens=None, text_mask=None,
                           patch_scores=None, image_hidden=None, text_hidden=None) -> dict[str, torch.Tensor | None]:
        """Everything that depends on the conditions only, not on (latents, t): computed once per
        sample by the sampler and reused at every DDIM step (`denoise`). image_hidden / text_hidden (the
        single-pass trunk's states, in `foundation_conditions(layers=...)`'s output) are not read.

        -> image_embed (B, Ei), text_embed (B, Et), context (B, S, D) | None, key_bias (B, 1, 1, S) | None,
           maps (B, k, g, g) | None (spatial condition channels), cross_kv (B, depth, S, 2D) | None (every
           block's cross-attention keys and values of the context: step-invariant, so not recomputed per
           step), pointer_logits (B, P) | None
        """
        tokens_mode = self.config.conditioning == "tokens"
        if tokens_mode and (image_tokens is None or text_tokens is None or patch_scores is None):
            raise ValueError("tokens conditioning needs image_tokens, text_tokens and patch_scores")
        prepared = {"image_embed": image_embed, "text_embed": text_embed, "context": None, "key_bias": None,
                    "maps": None, "cross_kv": None, "pointer_logits": None}
        if not tokens_mode:
            return prepared
        scores = torch.cat([torch.zeros_like(patch_scores[:, :1]), patch_scores], dim=1)  # (B, 1+P), CLS 0
        image_ctx = (self.image_token_proj(image_tokens) + self.score_proj(scores[..., None].to(image_tokens.dtype))
                     + self.context_type[0] + self.context_pos)  # (B, 1+P, D)
        context = torch.cat([image_ctx, self.text_token_proj(text_tokens) + self.context_type[1]], dim=1)  # (B, S, D)
        if text_mask is None:
            text_mask = torch.ones(text_tokens.shape[:2], device=context.device)
        keep = torch.cat([torch.ones(image_tokens.shape[:2], device=context.device), text_mask.float()], dim=1)
        key_bias = ((1.0 - keep) * -1e4)[:, None, None, :].to(context.dtype)  # (B, 1, 1, S)
        maps = [patch_scores]  # spatial condition maps, each (B, P), stacked onto the latent channels
        if self.pointer:
            for block in self.context_blocks:
                context = block(context, key_bias)  # (B, S, D)
            P = patch_scores.shape[1]
            pointer_logits = self.pointer_head(self.pointer_norm(context[:, 1: 1 + P]))[..., 0]  # (B, P)
            # log-probability of "the referred object is here", 0 = uniform over the P patches
            log_prob = torch.log_softmax(pointer_logits.float(), dim=-1).to(context.dtype) + math.log(P)
            context = context + F.pad(self.pointer_proj(log_prob[..., None]), (0, 0, 1, context.shape[1] - 1 - P))
            maps.append(log_prob)
            prepared["pointer_logits"] = pointer_logits
        g = self.config.image_grid
        cross_kv = torch.stack([block.cross_attn.kv(context) for block in self.blocks], dim=1)  # (B, depth, S, 2D)
        prepared.update(context=context, key_bias=key_bias, maps=torch.stack(maps, dim=1).view(-1, len(maps), g, g),
                        cross_kv=cross_kv)
        return prepared

    def denoise(self, latents: torch.Tensor, timesteps: torch.Tensor, prepared: dict) -> torch.Tensor:
        """One network call on noisy latents (B, C, h, w) at timesteps (B,) -> model output (B, C, h, w)."""
        x_in = latents
        if prepared.get("maps") is not None:
            maps = prepared["maps"].to(latents.dtype)  # (B, k, g, g)
            if maps.shape[-1] != latents.shape[-1]:
                maps = F.interpolate(maps, size=latents.shape[-2:], mode="bilinear", align_corners=False)
            x_in = torch.cat([latents, maps], dim=1)  # (B, C+k, h, w)
        x = self.x_embedder(self.patchify(x_in)) + self.pos_embed  # (B, N, D), N = (h/p)^2
        t = self.t_embedder(timesteps)  # (B, D)
        c = torch.cat([self.image_embedder(prepared["image_embed"]) + t,
                       self.text_embedder(prepared["text_embed"]) + t], dim=-1)  # (B, 2D)
        cross_kv = prepared.get("cross_kv")  # (B, depth, S, 2D) | None
        for i, block in enumerate(self.blocks):
            kv = None if cross_kv is None else cross_kv[:, i]
            x = block(x, c, prepared.get("context"), prepared.get("key_bias"), kv)  # (B, N, D)
        return self.unpatchify(self.final_layer(x, c))  # (B, C, h, w)
