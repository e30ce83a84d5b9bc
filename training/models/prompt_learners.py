"""Stage 3 and its baselines: what is trained on top of the frozen foundation.

One `PromptLearner` class, one `method` per row of the results table; all of them plug into
`prompted_forward`, so training, evaluation and export share one path:

    method         trains                                   vision prompts     text prompts
    diffprompt     Adapter^v, Adapter^l, global prompts     L/2 from mask_i + L/2 global, per layer
    vpt            deep visual prompts (VPT-deep)           L learnable per layer   -
    coop           deep text prompts (CoOp, deep)           -                  L learnable per layer
    maple          text prompts + per-layer linear maps     linear(text prompt)     L learnable
    clip_adapter   residual MLPs on patch / query features  -                  -      (ratio 0.2)
    linear_probe   the foundation's class and box heads     -                  -

Prompt depth counts layers from the input; it is capped by each tower's depth (the embedded
default: 6 image layers, 3 text layers; depth 9 -> 6 and 3).

Diff-Prompt's adapters: the decoded mask of layer i (B, 1, m, m) is standardised per mask (zero
mean, unit variance over its pixels; `mask_input="tanh"` squashes the logits instead), then goes
through strided 3x3 convs (m -> m/8) and one linear map to L/2 tokens of the tower's width.
One adapter per modality, shared by the layers; the layers differ by their masks and their
global prompts.

Why standardise: a generated mask is a small blob (logits near +1) on a flat background (near
-1), so after tanh the blob moves few of the convs' inputs and its position barely changes the
tokens; stage 3 then learns to ignore the mask (docs/results.md, "Stage 3 and the REC table").
Standardised, the blob stands out by sqrt((1 - a) / a) for a blob covering a fraction a of the
mask, whatever the decoder's logit scale.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from diffprompt.training.models.grounding import (
    BoxPredictionHead,
    ClassPredictionHead,
    GroundingConfig,
    GroundingModel,
    GroundingOutput,
    TowerConfig,
)

METHODS = ("diffprompt", "vpt", "coop", "maple", "clip_adapter", "linear_probe")
MASK_INPUTS = ("standardize", "tanh")  # how a Diff-Prompt adapter reads its decoded mask logits


def standardize_masks(mask_logits: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """(B, 1, m, m) -> the same, each mask shifted and scaled to zero mean and unit variance."""
    centred = mask_logits - mask_logits.mean(dim=(2, 3), keepdim=True)
    return centred / (centred.pow(2).mean(dim=(2, 3), keepdim=True).sqrt() + eps)


class MaskAdapter(nn.Module):
    """(B, 1, m, m) decoded mask logits -> (B, n_tokens, width)."""

    def __init__(self, mask_size: int, n_tokens: int, width: int, channels: int = 32, mask_input: str = "standardize"):
        super().__init__()
        if mask_input not in MASK_INPUTS:
            raise ValueError(f"mask_input must be one of {MASK_INPUTS}, got {mask_input!r}")
        self.n_tokens, self.width, self.mask_input = n_tokens, width, mask_input
        self.convs = nn.Sequential(
            nn.Conv2d(1, channels // 2, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(channels // 2, channels, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.GELU(),
        )
        self.linear = nn.Linear(channels * (mask_size // 8) ** 2, n_tokens * width)

    def forward(self, mask_logits: torch.Tensor) -> torch.Tensor:
        x = standardize_masks(mask_logits) if self.mask_input == "standardize" else torch.tanh(mask_logits)
        h = self.convs(x)  # (B, c, m/8, m/8)
        return self.linear(h.flatten(1)).view(-1, self.n_tokens, self.width)


class ResidualAdapter(nn.Module):
    """CLIP-Adapter: x -> ratio * MLP(x) + (1 - ratio) * x, bottleneck width / 4."""

    def __init__(self, width: int, ratio: float = 0.2):
        super().__init__()
        self.ratio = ratio
        self.mlp = nn.Sequential(nn.Linear(width, width // 4, bias=False), nn.ReLU(),
                                 nn.Linear(width // 4, width, bias=False), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ratio * self.mlp(x) + (1 - self.ratio) * x


class PromptLearner(ModelMixin, ConfigMixin):
    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        method: str = "diffprompt",
        vision_width: int = 192,
        text_width: int = 128,
        vision_layers: int = 6,
        text_layers: int = 3,
        depth: int = 9,  # paper default; capped per tower
        length: int = 8,  # tokens per layer; Diff-Prompt: L/2 generated + L/2 global
        mask_size: int = 32,  # decoded mask side (Diff-Prompt)
        mask_input: str = "standardize",  # Diff-Prompt adapters' input: see MASK_INPUTS
        adapter_ratio: float = 0.2,  # CLIP-Adapter
        query_width: int = 128,  # projected query embedding (CLIP-Adapter)
    ):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if mask_input not in MASK_INPUTS:
            raise ValueError(f"mask_input must be one of {MASK_INPUTS}, got {mask_input!r}")
        if method == "diffprompt" and length % 2:
            raise ValueError(f"Diff-Prompt splits the prompt length in halves: length must be even, got {length}")
        self.vision_depth = min(depth, vision_layers) if method in ("diffprompt", "vpt", "maple") else 0
        self.text_depth = min(depth, text_layers) if method in ("diffprompt", "coop", "maple") else 0
        init = lambda *shape: nn.Parameter(torch.randn(*shape) * 0.02)
        if method == "diffprompt":
            half = length // 2
            self.vision_adapter = MaskAdapter(mask_size, half, vision_width, mask_input=mask_input)
            self.text_adapter = MaskAdapter(mask_size, half, text_width, mask_input=mask_input)
            self.vision_global = init(self.vision_depth, half, vision_width)
            self.text_global = init(self.text_depth, half, text_width)
        elif method == "vpt":
            self.vision_prompts = init(self.vision_depth, length, vision_width)
        elif method == "coop":
            self.text_prompts = init(self.text_depth, length, text_width)
        elif method == "maple":
            n = max(self.vision_depth, self.text_depth)
            self.text_prompts = init(n, length, text_width)
            self.couplers = nn.ModuleList([nn.Linear(text_width, vision_width) for _ in range(self.vision_depth)])
        elif method == "clip_adapter":
            self.patch_adapter = ResidualAdapter(vision_width, adapter_ratio)
            self.query_adapter = ResidualAdapter(query_width, adapter_ratio)
        elif method == "linear_probe":  # copies of the foundation's heads (for_foundation loads them)
            widths = GroundingConfig(vision=TowerConfig(hidden_size=vision_width),
                                     text=TowerConfig(hidden_size=text_width))
            self.class_head = ClassPredictionHead(widths)
            self.box_head = BoxPredictionHead(vision_width)

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def for_foundation(cls, foundation: GroundingModel, method: str, **kw) -> PromptLearner:
        cfg = foundation.config
        learner = cls(method=method, vision_width=cfg.vision.hidden_size, text_width=cfg.text.hidden_size,
                      vision_layers=cfg.vision.num_hidden_layers, text_layers=cfg.text.num_hidden_layers,
                      query_width=cfg.projection_dim, **kw)
        if method == "linear_probe":
            learner.class_head.load_state_dict(foundation.class_head.state_dict())
            learner.box_head.load_state_dict(foundation.box_head.state_dict())
        return learner

    @property
    def needs_masks(self) -> bool:
        return self.config.method == "diffprompt"

    @property
    def mask_layers(self) -> int:
        """How many generated masks one query needs (Diff-Prompt): one per prompted layer."""
        return max(self.vision_depth, self.text_depth) if self.needs_masks else 0

    # -- prompts --------------------------------------------------------------------------------

    def prompts(self, batch_size: int, masks: torch.Tensor | None = None):
        """-> (vision prompts (B, Lv_depth, L, Dv) or None, text prompts (B, Lt_depth, L, Dt) or None).

        masks: (B, mask_layers, 1, m, m) decoded mask logits, shallowest layer first (Diff-Prompt).
        """
        method = self.config.method
        expand = lambda p: p[None].expand(batch_size, *p.shape)
        if method == "diffprompt":
            if masks is None or masks.shape[1] < self.mask_layers:
                raise ValueError(f"Diff-Prompt needs {self.mask_layers} masks per query")
            B, m = masks.shape[0], masks.shape[-1]
            flat = masks[:, : self.mask_layers].reshape(-1, 1, m, m)  # (B*n, 1, m, m)
            v = self.vision_adapter(flat).view(B, self.mask_layers, -1, self.config.vision_width)
            t = self.text_adapter(flat).view(B, self.mask_layers, -1, self.config.text_width)
            vision = torch.cat([v[:, : self.vision_depth], expand(self.vision_global)], dim=2)  # (B, dv, L, Dv)
            text = torch.cat([t[:, : self.text_depth], expand(self.text_global)], dim=2)  # (B, dt, L, Dt)
            return vision, text
        if method == "vpt":
            return expand(self.vision_prompts), None
        if method == "coop":
            return None, expand(self.text_prompts)
        if method == "maple":
            vision = torch.stack([c(self.text_prompts[i]) for i, c in enumerate(self.couplers)])  # (dv, L, Dv)
            return expand(vision), expand(self.text_prompts[: self.text_depth])
        return None, None


def prompted_forward(
    foundation: GroundingModel,
    learner: PromptLearner | None,
    pixels: torch.Tensor,  # (B, 3, S, S)
    ids: torch.Tensor,  # (B, T) one expression per image
    mask: torch.Tensor,  # (B, T)
    masks: torch.Tensor | None = None,  # (B, n, 1, m, m) decoded mask logits (Diff-Prompt)
) -> GroundingOutput:
    """The foundation with the learner's prompts / adapters / heads: logits (B, P, 1), boxes (B, P, 4)."""
    vision_prompts = text_prompts = None
    if learner is not None:
        vision_prompts, text_prompts = learner.prompts(pixels.shape[0], masks)
    image = foundation.encode_image(pixels, vision_prompts)
    query = foundation.encode_text(ids, mask, text_prompts).query_embeds[:, None, :]  # (B, 1, E)
    method = learner.config.method if learner is not None else None
    if method == "clip_adapter":
        image.patch_embeds = learner.patch_adapter(image.patch_embeds)
        query = learner.query_adapter(query)
    if method == "linear_probe":
        logits = learner.class_head(image.patch_embeds, query)
        boxes = torch.sigmoid(learner.box_head(image.patch_embeds) + foundation.box_bias)
        return GroundingOutput(logits=logits, pred_boxes=boxes, objectness_logits=None)
    return foundation.predict(image, query)
