"""OWL-ViT-style open-vocabulary grounding model with deep prompts (docs/design.md, "The foundation grounding model").

Architecture (Minderer et al., "Simple Open-Vocabulary Object Detection", and OWLv2):

    image (B, 3, S, S) -> ViT image tower -> patch tokens (B, P, Dv), P = (S / patch)**2
    query ids (Q, T)   -> CLIP text tower (causal) -> pooled at EOS -> query embeds (Q, E)
    class head: cosine(patch, query) with per-patch learned shift/scale -> logits (B, P, Q)
    box head:   MLP(patch) + grid bias -> sigmoid -> boxes (B, P, 4), cxcywh in [0, 1]
    [OWLv2]     objectness head: MLP(patch) -> (B, P)

Parameter names mirror `transformers`' OwlViTForObjectDetection / Owlv2ForObjectDetection with
the `owlvit.` / `owlv2.` prefix removed, so Hugging Face checkpoints load as they are
(`GroundingModel.from_pretrained`, also named `load_grounding_model`). Our own checkpoints use the
convention of every model here (training/models/pretrained.py): config.json + model.safetensors.

Deep prompts (VPT-deep style): `vision_prompts` (B, depth, L, Dv) and `text_prompts`
(Q, depth, L, Dt) are prepended in front of the token sequence before each of the first `depth`
layers of their tower and dropped after that layer. Each sample keeps its own prompts (no
mixing across the batch), and the prompts sit in front of the tokens, where the attention
mask expects them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from diffprompt.training.models.pretrained import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    PretrainedModel,
    read_config_file,
    read_weights,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------- config


@dataclass
class TowerConfig:
    """One transformer tower (image or text)."""

    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    intermediate_size: int = 256
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"  # CLIP's x * sigmoid(1.702 x)


@dataclass
class GroundingConfig:
    vision: TowerConfig = field(default_factory=TowerConfig)
    text: TowerConfig = field(default_factory=TowerConfig)
    image_size: int = 128  # model input, px (square)
    patch_size: int = 16
    # "linear": OWL's patchify conv (kernel = stride = patch), what every OWL checkpoint has.
    # "conv": a stack of 3x3 stride-2 convs reaching the same patch grid ("Early convolutions
    # help transformers see better", Xiao et al. 2021): a ViT trained from scratch on a few
    # minutes of CPU learns shapes far faster with it. Used by the embedded default only.
    patch_stem: str = "linear"
    num_channels: int = 3
    vocab_size: int = 64
    max_text_length: int = 16  # text position embeddings
    projection_dim: int = 64  # pooled image / text embedding width (CLIP space)
    objectness: bool = False  # OWLv2 has an objectness head
    family: str = "embedded"  # "embedded" | "owlvit" | "owlv2": where the weights came from
    resize_mode: str = "pad"  # "pad": pad to square then resize (OWLv2); "stretch": resize (OWL-ViT)
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD

    @property
    def resample(self) -> str:
        """Resampling filter of the preprocessing (diffprompt.core.images): OWLv2's own, else PIL bicubic."""
        return "owlv2" if self.family == "owlv2" else "bicubic"

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2


def _preset(v_width, v_layers, t_width, t_layers, head_dim, **kw) -> GroundingConfig:
    return GroundingConfig(
        vision=TowerConfig(v_width, v_layers, v_width // head_dim, 4 * v_width),
        text=TowerConfig(t_width, t_layers, t_width // head_dim, 4 * t_width),
        projection_dim=t_width,
        **kw,
    )


GROUNDING_PRESETS = {
    "baby": lambda **kw: _preset(32, 1, 32, 1, 16, **kw),  # tests: trains for two steps in a blink
    # Plain OWL-style ViTs, 8x8 and 16x16 patch grids at 128 px.
    "vit-p16": lambda **kw: _preset(192, 6, 128, 3, 32, **kw),
    "vit-p8": lambda **kw: _preset(128, 4, 128, 3, 32, patch_size=8, **kw),
    # The committed default: the p16 ViT with a conv stem (see GroundingConfig.patch_stem and
    # docs/results.md for the pilot runs that chose it).
    "embedded": lambda **kw: _preset(192, 6, 128, 3, 32, patch_stem="conv", **kw),
}


# ----------------------------------------------------------------------------- transformer layers


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class Attention(nn.Module):
    def __init__(self, cfg: TowerConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        d = cfg.hidden_size
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.q_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None) -> torch.Tensor:
        B, N, D = x.shape
        heads = lambda t: t.view(B, N, self.num_heads, D // self.num_heads).transpose(1, 2)  # noqa: E731
        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))  # (B, H, N, D/H)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias)  # (B, H, N, D/H)
        return self.out_proj(out.transpose(1, 2).reshape(B, N, D))


class MLP(nn.Module):
    def __init__(self, cfg: TowerConfig):
        super().__init__()
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Pre-norm transformer block (CLIP)."""

    def __init__(self, cfg: TowerConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), attn_bias)
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, cfg: TowerConfig):
        super().__init__()
        self.layers = nn.ModuleList([EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.gradient_checkpointing = False  # recompute layer activations in backward (set_gradient_checkpointing)

    def forward(
        self,
        x: torch.Tensor,  # (B, N, D): the hidden state entering layer `start`
        prompts: torch.Tensor | None = None,  # (B, depth, L, D): prompts[:, j] enters layer start + j
        attn_bias_fn=None,  # L -> additive bias (B or 1, 1, L+N, L+N), or None
        start: int = 0,
        stop: int | None = None,
    ) -> torch.Tensor:
        """Layers start .. stop-1 (all by default) -> the hidden state (B, N, D) after them."""
        layers = self.layers[start:stop]
        depth = 0 if prompts is None else prompts.shape[1]
        if depth > len(layers):
            raise ValueError(f"prompt depth {depth} exceeds the tower's {len(layers)} layers from layer {start}")
        for i, layer in enumerate(layers):
            n_prompt = prompts.shape[2] if i < depth else 0
            if n_prompt:
                x = torch.cat([prompts[:, i].to(x.dtype), x], dim=1)  # (B, L+N, D): prompts in front
            bias = attn_bias_fn(n_prompt) if attn_bias_fn is not None else None
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, bias, use_reentrant=False)
            else:
                x = layer(x, bias)
            if n_prompt:
                x = x[:, n_prompt:]  # (B, N, D): prompts dropped after their layer
        return x


# ----------------------------------------------------------------------------- towers


class ConvStem(nn.Module):
    """log2(patch) 3x3 stride-2 convs (widths doubling up to D/2), then a 1x1 conv to D: (B, D, S/p, S/p)."""

    def __init__(self, in_channels: int, width: int, patch_size: int):
        super().__init__()
        n = int(math.log2(patch_size))
        if 2**n != patch_size:
            raise ValueError(f"the conv stem needs a power-of-two patch size, got {patch_size}")
        layers: list[nn.Module] = []
        c_in, c_out = in_channels, max(16, width // 2 ** n)
        for _ in range(n):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GELU()]
            c_in, c_out = c_out, min(c_out * 2, width // 2)
        layers.append(nn.Conv2d(c_in, width, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: GroundingConfig):
        super().__init__()
        d = cfg.vision.hidden_size
        self.class_embedding = nn.Parameter(torch.zeros(d))
        if cfg.patch_stem == "linear":
            self.patch_embedding = nn.Conv2d(cfg.num_channels, d, cfg.patch_size, cfg.patch_size, bias=False)
        elif cfg.patch_stem == "conv":
            self.patch_embedding = ConvStem(cfg.num_channels, d, cfg.patch_size)
        else:
            raise ValueError(f"patch_stem must be 'linear' or 'conv', got {cfg.patch_stem!r}")
        self.position_embedding = nn.Embedding(cfg.num_patches + 1, d)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        B = pixel_values.shape[0]
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # (B, P, D)
        cls = self.class_embedding.expand(B, 1, -1)  # (B, 1, D)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight  # (B, 1+P, D)


class VisionTransformer(nn.Module):
    def __init__(self, cfg: GroundingConfig):
        super().__init__()
        v = cfg.vision
        self.embeddings = VisionEmbeddings(cfg)
        self.pre_layernorm = nn.LayerNorm(v.hidden_size, eps=v.layer_norm_eps)
        self.encoder = Encoder(v)
        self.post_layernorm = nn.LayerNorm(v.hidden_size, eps=v.layer_norm_eps)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The hidden state entering layer 0 (B, 1+P, Dv)."""
        return self.pre_layernorm(self.embeddings(pixel_values))

    def forward(self, pixel_values: torch.Tensor, prompts: torch.Tensor | None = None) -> torch.Tensor:
        """Last hidden state (B, 1+P, Dv), before post_layernorm."""
        return self.encoder(self.embed(pixel_values), prompts)


class TextEmbeddings(nn.Module):
    def __init__(self, cfg: GroundingConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.text.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_text_length, cfg.text.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        T = input_ids.shape[-1]
        return self.token_embedding(input_ids) + self.position_embedding.weight[:T]  # (Q, T, Dt)


def causal_padding_bias(attention_mask: torch.Tensor, n_prompt: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention bias (Q, 1, L+T, L+T): causal over [prompts, tokens], padding keys
    masked, the L prompts always visible. attention_mask (Q, T), 1 = token, 0 = padding."""
    Q, T = attention_mask.shape
    n = n_prompt + T
    keep = torch.ones(n, n, dtype=torch.bool, device=attention_mask.device).tril()  # (n, n)
    keys = torch.cat([attention_mask.new_ones(Q, n_prompt), attention_mask], dim=1).bool()  # (Q, n)
    keep = keep[None] & keys[:, None, :]  # (Q, n, n)
    bias = torch.zeros(Q, 1, n, n, dtype=dtype, device=attention_mask.device)
    return bias.masked_fill(~keep[:, None], torch.finfo(dtype).min)


class TextTransformer(nn.Module):
    def __init__(self, cfg: GroundingConfig):
        super().__init__()
        self.embeddings = TextEmbeddings(cfg)
        self.encoder = Encoder(cfg.text)
        self.final_layer_norm = nn.LayerNorm(cfg.text.hidden_size, eps=cfg.text.layer_norm_eps)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, prompts: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(last hidden state (Q, T, Dt), pooled at EOS (Q, Dt)). EOS = the largest id, as in CLIP."""
        return self.finish(self.layers(self.embeddings(input_ids), attention_mask, prompts), input_ids)

    def layers(self, x: torch.Tensor, attention_mask: torch.Tensor | None, prompts: torch.Tensor | None = None,
               start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The hidden state x (Q, T, Dt) entering layer `start` through layers start .. stop-1."""
        if attention_mask is None:
            attention_mask = torch.ones(x.shape[:2], dtype=torch.long, device=x.device)
        biases: dict[int, torch.Tensor] = {}  # by prompt length: built once, shared by the layers
        dtype = x.dtype

        def attn_bias(n_prompt: int) -> torch.Tensor:
            if n_prompt not in biases:
                biases[n_prompt] = causal_padding_bias(attention_mask, n_prompt, dtype)
            return biases[n_prompt]

        return self.encoder(x, prompts, attn_bias, start, stop)

    def finish(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A hidden state (Q, T, Dt) -> (it after final_layer_norm, that pooled at EOS (Q, Dt))."""
        x = self.final_layer_norm(hidden)
        eos = input_ids.to(torch.int32).argmax(dim=-1)  # (Q,)
        return x, x[torch.arange(x.shape[0], device=x.device), eos]


# ----------------------------------------------------------------------------- heads


class BoxPredictionHead(nn.Module):
    def __init__(self, width: int, out_dim: int = 4):
        super().__init__()
        self.dense0 = nn.Linear(width, width)
        self.dense1 = nn.Linear(width, width)
        self.gelu = nn.GELU()
        self.dense2 = nn.Linear(width, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense2(self.gelu(self.dense1(self.gelu(self.dense0(x)))))


class ClassPredictionHead(nn.Module):
    def __init__(self, cfg: GroundingConfig):
        super().__init__()
        # transformers sizes this by the text width; OWL checkpoints have text width == projection_dim.
        self.dense0 = nn.Linear(cfg.vision.hidden_size, cfg.text.hidden_size)
        self.logit_shift = nn.Linear(cfg.vision.hidden_size, 1)
        self.logit_scale = nn.Linear(cfg.vision.hidden_size, 1)

    def forward(
        self,
        patch_embeds: torch.Tensor,  # (B, P, Dv)
        query_embeds: torch.Tensor,  # (B, Q, E) or (Q, E) shared by all images
        query_mask: torch.Tensor | None = None,  # (B, Q) or (Q,) bool, False = padding query
    ) -> torch.Tensor:
        img = self.dense0(patch_embeds)  # (B, P, E)
        img = img / (torch.linalg.norm(img, dim=-1, keepdim=True) + 1e-6)
        qry = query_embeds / (torch.linalg.norm(query_embeds, dim=-1, keepdim=True) + 1e-6)
        if qry.dim() == 2:
            logits = torch.einsum("bpd,qd->bpq", img, qry)  # (B, P, Q)
        else:
            logits = torch.einsum("bpd,bqd->bpq", img, qry)  # (B, P, Q)
        shift = self.logit_shift(patch_embeds)  # (B, P, 1)
        scale = F.elu(self.logit_scale(patch_embeds)) + 1  # (B, P, 1)
        logits = (logits + shift) * scale
        if query_mask is not None:
            mask = query_mask if query_mask.dim() == 2 else query_mask[None]
            logits = logits.masked_fill(~mask[:, None, :].bool(), torch.finfo(logits.dtype).min)
        return logits


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """(grid*grid, dim) fixed 2-D sin-cos position table, row-major like the patch tokens."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)  # (dim/4,)
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                            indexing="ij")
    out = []
    for coord in (xs.reshape(-1), ys.reshape(-1)):
        angles = coord[:, None] * omega[None]  # (P, dim/4)
        out += [torch.sin(angles), torch.cos(angles)]
    table = torch.cat(out, dim=1)  # (P, 4 * dim/4)
    return torch.nn.functional.pad(table, (0, dim - table.shape[1]))


def box_grid_bias(grid: int) -> torch.Tensor:
    """Logit-space bias that centres each patch's default box on the patch: (grid*grid, 4) cxcywh.

    Same as transformers' OwlViTForObjectDetection.compute_box_bias (its grid uses the patch's
    lower-right corner, kept for checkpoint compatibility).
    """
    coords = torch.arange(1, grid + 1, dtype=torch.float32) / grid
    xx, yy = torch.meshgrid(coords, coords, indexing="xy")
    xy = torch.stack([xx, yy], dim=-1).view(-1, 2).clip(0.0, 1.0)  # (P, 2)
    xy_bias = torch.log(xy + 1e-4) - torch.log1p(-xy + 1e-4)
    wh = torch.full_like(xy, 1.0 / grid)
    wh_bias = torch.log(wh + 1e-4) - torch.log1p(-wh + 1e-4)
    return torch.cat([xy_bias, wh_bias], dim=-1)


# ----------------------------------------------------------------------------- the model


@dataclass
class ImageFeatures:
    tokens: torch.Tensor  # (B, 1+P, Dv) last hidden state after post_layernorm (CLS first)
    patch_embeds: torch.Tensor  # (B, P, Dv) CLS-merged, layer-normed: input of the heads
    pooled: torch.Tensor  # (B, E) projected CLS, the CLIP image embedding


@dataclass
class TextFeatures:
    tokens: torch.Tensor  # (Q, T, Dt) last hidden state after final_layer_norm
    query_embeds: torch.Tensor  # (Q, E) projected EOS token, the CLIP text embedding


@dataclass
class GroundingOutput:
    logits: torch.Tensor  # (B, P, Q) score logits of every patch's box for every query
    pred_boxes: torch.Tensor  # (B, P, 4) cxcywh in [0, 1] of the model's input square
    objectness_logits: torch.Tensor | None  # (B, P) OWLv2 only


class GroundingModel(PretrainedModel):
    """The frozen foundation. See the module docstring for shapes."""

    config_class = GroundingConfig
    model_type = "diffprompt-grounding"

    def __init__(self, config: GroundingConfig):
        super().__init__(config)
        self.vision_model = VisionTransformer(config)
        self.text_model = TextTransformer(config)
        self.visual_projection = nn.Linear(config.vision.hidden_size, config.projection_dim, bias=False)
        self.text_projection = nn.Linear(config.text.hidden_size, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's; kept for loading
        self.class_head = ClassPredictionHead(config)
        self.box_head = BoxPredictionHead(config.vision.hidden_size)
        self.objectness_head = BoxPredictionHead(config.vision.hidden_size, 1) if config.objectness else None
        self.layer_norm = nn.LayerNorm(config.vision.hidden_size, eps=config.vision.layer_norm_eps)
        self.register_buffer("box_bias", box_grid_bias(config.grid_size), persistent=False)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # Transformer weights: small normal, zero biases, unit LayerNorms.
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.vision_model.embeddings.class_embedding, std=0.02)
        # A conv stem keeps its signal through depth only with fan-in (He) scaling.
        stem = self.vision_model.embeddings.patch_embedding
        if isinstance(stem, ConvStem):
            for conv in stem.layers:
                if isinstance(conv, nn.Conv2d):
                    nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        # 2-D sin-cos patch positions (MAE): the tower starts out knowing which patches are
        # neighbours instead of learning it; the table stays trainable, as in OWL.
        pos = self.vision_model.embeddings.position_embedding.weight
        with torch.no_grad():
            pos[0].zero_()
            pos[1:].copy_(sincos_2d(self.config.grid_size, pos.shape[1]))
        # Box head starts at the grid bias: every patch predicts a patch-sized box on itself.
        nn.init.zeros_(self.box_head.dense2.weight)
        # Scores start low (logit ~ -4.5, p ~ 0.01) with room to grow: (cos - 1.5) * 3, as RetinaNet's prior.
        nn.init.constant_(self.class_head.logit_shift.bias, -1.5)
        nn.init.constant_(self.class_head.logit_scale.bias, 2.0)

    def set_gradient_checkpointing(self, enabled: bool = True) -> GroundingModel:
        """Keep only each transformer layer's input for backward and recompute the rest there: training
        through the frozen towers (prompts) then holds one layer's activations at a time, for about a
        third more compute. Forward results and gradients are the same."""
        self.vision_model.encoder.gradient_checkpointing = enabled
        self.text_model.encoder.gradient_checkpointing = enabled
        return self

    # -- encoders -------------------------------------------------------------------------------

    def encode_image(self, pixel_values: torch.Tensor, prompts: torch.Tensor | None = None) -> ImageFeatures:
        """pixel_values (B, 3, S, S) normalised; prompts (B, depth, L, Dv) or None."""
        return self.image_features(self.vision_model(pixel_values, prompts))

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, prompts: torch.Tensor | None = None
    ) -> TextFeatures:
        """input_ids (Q, T); prompts (Q, depth, L, Dt) or None."""
        tokens, pooled = self.text_model(input_ids, attention_mask, prompts)
        return TextFeatures(tokens=tokens, query_embeds=self.text_projection(pooled))

    # -- one pass split at a layer (single-pass mode) -------------------------------------------
    # image_trunk / text_trunk run a tower's first k layers without prompts; continue_image /
    # continue_text run the rest from that hidden state with prompts entering at layer k. Together
    # they equal encode_image / encode_text with the prompts in layers k.. (tests/training/test_grounding_split).

    def image_trunk(self, pixel_values: torch.Tensor, layers: int) -> torch.Tensor:
        """The image tower's first `layers` layers, unprompted: hidden state (B, 1+P, Dv)."""
        return self.vision_model.encoder(self.vision_model.embed(pixel_values), stop=layers)

    def text_trunk(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, layers: int) -> torch.Tensor:
        """The text tower's first `layers` layers, unprompted: hidden state (Q, T, Dt)."""
        return self.text_model.layers(self.text_model.embeddings(input_ids), attention_mask, stop=layers)

    def continue_image(self, hidden: torch.Tensor, start: int, prompts: torch.Tensor | None = None) -> ImageFeatures:
        """image_trunk's hidden state at layer `start` through the remaining layers, prompts[:, j] entering
        layer start + j."""
        return self.image_features(self.vision_model.encoder(hidden, prompts, start=start))

    def continue_text(self, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      start: int, prompts: torch.Tensor | None = None) -> TextFeatures:
        """text_trunk's hidden state at layer `start` through the remaining layers (prompts as continue_image)."""
        return self.text_features(self.text_model.layers(hidden, attention_mask, prompts, start=start), input_ids)

    def image_features(self, hidden: torch.Tensor) -> ImageFeatures:
        """A vision hidden state (B, 1+P, Dv), the last or an earlier layer's, through the post-layernorm,
        projection and CLS merge that the heads read."""
        tokens = self.vision_model.post_layernorm(hidden)
        pooled = self.visual_projection(tokens[:, 0])  # (B, E)
        patch = tokens[:, 1:] * tokens[:, :1]  # (B, P, Dv): OWL merges the CLS token into patches
        return ImageFeatures(tokens=tokens, patch_embeds=self.layer_norm(patch), pooled=pooled)

    def text_features(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> TextFeatures:
        """A text hidden state (Q, T, Dt) through the final layernorm, EOS pooling and projection."""
        tokens, pooled = self.text_model.finish(hidden, input_ids)
        return TextFeatures(tokens=tokens, query_embeds=self.text_projection(pooled))

    # -- heads ----------------------------------------------------------------------------------

    def predict(
        self, image: ImageFeatures, query_embeds: torch.Tensor, query_mask: torch.Tensor | None = None
    ) -> GroundingOutput:
        """query_embeds (Q, E) shared by all images, or (B, Q, E) per image."""
        patch = image.patch_embeds
        logits = self.class_head(patch, query_embeds, query_mask)  # (B, P, Q)
        boxes = torch.sigmoid(self.box_head(patch) + self.box_bias)  # (B, P, 4)
        objectness = None
        if self.objectness_head is not None:
            objectness = self.objectness_head(patch.detach())[..., 0]  # (B, P)
        return GroundingOutput(logits=logits, pred_boxes=boxes, objectness_logits=objectness)

    def forward(
        self,
        pixel_values: torch.Tensor,  # (B, 3, S, S)
        input_ids: torch.Tensor,  # (B*Q, T), Q queries per image, as in transformers
        attention_mask: torch.Tensor | None = None,  # (B*Q, T)
        vision_prompts: torch.Tensor | None = None,  # (B, depth, L, Dv)
        text_prompts: torch.Tensor | None = None,  # (B*Q, depth, L, Dt)
    ) -> GroundingOutput:
        B = pixel_values.shape[0]
        image = self.encode_image(pixel_values, vision_prompts)
        text = self.encode_text(input_ids, attention_mask, text_prompts)
        Q = input_ids.shape[0] // B
        query_embeds = text.query_embeds.view(B, Q, -1)  # (B, Q, E)
        query_mask = input_ids.view(B, Q, -1)[..., 0] > 0  # first token 0 = padding query (OWL)
        return self.predict(image, query_embeds, query_mask)

    # -- loading --------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> GroundingModel:
        """Our own checkpoint, or a Hugging Face OWL-ViT / OWLv2 detection checkpoint, from a directory."""
        directory = Path(directory)
        raw = read_config_file(directory)
        family = raw.get("model_type")
        if family == cls.model_type:
            return super().from_pretrained(directory)
        if family not in HF_FAMILIES:
            raise CheckpointError(f"{directory / CONFIG_NAME}: unknown model_type {family!r} "
                                  f"(expected {cls.model_type}, {' or '.join(HF_FAMILIES)})")
        model = cls(_hf_config(raw))
        model.load_weights(_hf_state_dict(directory, family), directory)
        return model.eval()


def load_grounding_model(directory: str | Path) -> GroundingModel:
    """`GroundingModel.from_pretrained`: our checkpoint or a Hugging Face OWL-ViT / OWLv2 one."""
    return GroundingModel.from_pretrained(directory)


# ----------------------------------------------------------------------------- Hugging Face checkpoints

HF_FAMILIES = ("owlvit", "owlv2")  # transformers' model_type of OwlViTForObjectDetection / Owlv2ForObjectDetection


def _hf_config(d: dict[str, Any]) -> GroundingConfig:
    """GroundingConfig from a transformers OwlViTConfig / Owlv2Config dict."""
    v, t = d.get("vision_config", {}), d.get("text_config", {})

    def tower(c: dict, default_width: int, default_layers: int, default_heads: int) -> TowerConfig:
        width = c.get("hidden_size", default_width)
        return TowerConfig(
            hidden_size=width,
            num_hidden_layers=c.get("num_hidden_layers", default_layers),
            num_attention_heads=c.get("num_attention_heads", default_heads),
            intermediate_size=c.get("intermediate_size", 4 * width),
            layer_norm_eps=c.get("layer_norm_eps", 1e-5),
            hidden_act=c.get("hidden_act", "quick_gelu"),
        )

    family = d["model_type"]
    return GroundingConfig(
        vision=tower(v, 768, 12, 12),
        text=tower(t, 512, 12, 8),
        image_size=v.get("image_size", 768),
        patch_size=v.get("patch_size", 32),
        num_channels=v.get("num_channels", 3),
        vocab_size=t.get("vocab_size", 49408),
        max_text_length=t.get("max_position_embeddings", 16),
        projection_dim=d.get("projection_dim", 512),
        objectness=family == "owlv2",
        family=family,
        resize_mode="pad" if family == "owlv2" else "stretch",
    )


def _hf_state_dict(directory: Path, family: str) -> dict[str, torch.Tensor]:
    """transformers' state dict with the `owlvit.` / `owlv2.` prefix removed and its derived buffers dropped."""
    if (directory / WEIGHTS_NAME).exists():
        state = read_weights(directory / WEIGHTS_NAME)
    elif (directory / "pytorch_model.bin").exists():
        state = torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)  # no code
    else:
        raise CheckpointError(f"{directory}: no {WEIGHTS_NAME} (or pytorch_model.bin) found")
    prefix = f"{family}."
    state = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}
    return {k: v for k, v in state.items() if not k.endswith("position_ids") and k != "box_bias"}
