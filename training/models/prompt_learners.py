"""Stage 3 and its baselines: what is trained on top of the frozen foundation.

One class per row of the results table, registered under its method name (`LEARNERS`); each
creates only its own parameters, and all of them plug into `prompted_forward`, so training,
evaluation and export share one path:

    method         class         trains                                   vision prompts     text prompts
    diffprompt     DiffPrompt    Adapter^v, Adapter^l, global prompts     L/2 from mask_i + L/2 global, per layer
    vpt            VPT           deep visual prompts (VPT-deep)           L learnable per layer   -
    coop           CoOp          deep text prompts (CoOp, deep)           -                  L learnable per layer
    maple          MaPLe         text prompts + per-layer linear maps     linear(text prompt)     L learnable
    clip_adapter   CLIPAdapter   residual MLPs on patch / query features  -                  -      (ratio 0.2)
    linear_probe   LinearProbe   the foundation's class and box heads     -                  -

A learner has two hooks: `prompts(batch_size, masks)` -> deep prompts for the towers (or None),
and `predict(foundation, image, query)` -> the grounding output from the prompted features (the
foundation's own heads unless the method replaces or adapts them). Every learner is built from
one `LearnerConfig`, whose `method` names its class: `PromptLearner.from_config` /
`from_pretrained` return the registered class, and the method name is saved in config.json.
One config for all (a method ignores the fields it does not read) keeps one file format and lets
the command line pass the same options to every method.

Prompt depth counts layers from the input (from `first_layers` in single-pass mode); it is capped
by each tower's depth (the embedded default: 6 image layers, 3 text layers; depth 9 -> 6 and 3).

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

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from diffprompt.training.models.grounding import (
    BoxPredictionHead,
    ClassPredictionHead,
    GroundingConfig,
    GroundingModel,
    GroundingOutput,
    ImageFeatures,
    TowerConfig,
)
from diffprompt.training.models.pretrained import PretrainedModel

MASK_INPUTS = ("standardize", "tanh")  # how a Diff-Prompt adapter reads its decoded mask logits


@dataclass
class LearnerConfig:
    method: str = "diffprompt"  # the registered class (LEARNERS)
    vision_width: int = 192  # the foundation's towers (PromptLearner.for_foundation copies them)
    text_width: int = 128
    vision_layers: int = 6
    text_layers: int = 3
    query_width: int = 128  # projected query embedding (CLIP-Adapter)
    depth: int = 9  # prompted layers from the input, paper default; capped per tower
    length: int = 8  # prompt tokens per layer; Diff-Prompt: L/2 generated + L/2 global
    mask_size: int = 32  # decoded mask side (Diff-Prompt)
    mask_input: str = field(default="standardize", metadata={  # Diff-Prompt adapters' input: see MASK_INPUTS
        "missing": "a learner saved before 'mask_input' existed reads tanh of its mask logits: add "
                   '"mask_input": "tanh" to its config.json to load it with the input it was trained with'})
    adapter_ratio: float = 0.2  # CLIP-Adapter
    # The layers of (vision, text) where the prompts enter: [0, 0] = from the input. Above 0 (single-pass
    # mode, Diff-Prompt) the layers below run unprompted and once, shared with the DiT's conditions
    # (`prompted_forward(trunk=...)`), and the prompt depth counts from there.
    first_layers: list[int] = field(default_factory=lambda: [0, 0], metadata={"absent": [0, 0]})


# ----------------------------------------------------------------------------- building blocks


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


# ----------------------------------------------------------------------------- the registry

LEARNERS: dict[str, type[PromptLearner]] = {}


def register(method: str):
    """Class decorator: `LEARNERS[method] = cls`, and `cls.method = method`."""

    def add(cls: type[PromptLearner]) -> type[PromptLearner]:
        cls.method = method
        LEARNERS[method] = cls
        return cls

    return add


def learned_prompts(*shape: int) -> nn.Parameter:
    """Prompt tokens initialised as N(0, 0.02^2)."""
    return nn.Parameter(torch.randn(*shape) * 0.02)


def per_sample(prompts: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(depth, L, D) shared prompts -> (B, depth, L, D), a view."""
    return prompts[None].expand(batch_size, *prompts.shape)


class PromptLearner(PretrainedModel):
    """Base of every method: no prompts, the foundation's heads. See the module docstring."""

    config_class = LearnerConfig
    model_type = "diffprompt-prompt-learner"
    method: ClassVar[str] = ""  # set by @register
    towers: ClassVar[tuple[str, ...]] = ()  # which towers get deep prompts: "vision", "text"
    needs_masks: ClassVar[bool] = False  # Diff-Prompt: prompts are built from generated masks
    # The learned prompt tensors (depth, L, D) that Prompt Diffusion may replace per sample (`prompts(values=)`)
    prompt_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: LearnerConfig):
        if not self.method:
            raise TypeError(f"{type(self).__name__} is no registered method: build learners with "
                            "PromptLearner.from_config(config) or PromptLearner.for_foundation(...)")
        super().__init__(config)
        if config.method != self.method:
            raise ValueError(f"{type(self).__name__} is method {self.method!r}, the config says {config.method!r}")
        first_v, first_t = config.first_layers
        if not (0 <= first_v < config.vision_layers and 0 <= first_t < config.text_layers):
            raise ValueError(f"first_layers {list(config.first_layers)} must leave a layer of each tower "
                             f"({config.vision_layers} vision, {config.text_layers} text)")
        self.vision_depth = min(config.depth, config.vision_layers - first_v) if "vision" in self.towers else 0
        self.text_depth = min(config.depth, config.text_layers - first_t) if "text" in self.towers else 0

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: LearnerConfig) -> PromptLearner:
        """A fresh learner of the class registered under `config.method`."""
        if config.method not in LEARNERS:
            raise ValueError(f"method must be one of {tuple(LEARNERS)}, got {config.method!r}")
        return LEARNERS[config.method](config)

    @classmethod
    def for_foundation(cls, foundation: GroundingModel, method: str, **options) -> PromptLearner:
        """A fresh learner sized for `foundation`; `options` are other LearnerConfig fields."""
        c = foundation.config
        learner = cls.from_config(LearnerConfig(
            method=method, vision_width=c.vision.hidden_size, text_width=c.text.hidden_size,
            vision_layers=c.vision.num_hidden_layers, text_layers=c.text.num_hidden_layers,
            query_width=c.projection_dim, **options))
        learner.init_from_foundation(foundation)
        return learner

    def init_from_foundation(self, foundation: GroundingModel) -> None:
        """Start from the foundation's weights where the method has copies of them (LinearProbe)."""

    @property
    def mask_layers(self) -> int:
        """How many generated masks one query needs: one per prompted layer (Diff-Prompt), else 0."""
        return max(self.vision_depth, self.text_depth) if self.needs_masks else 0

    # -- the two hooks --------------------------------------------------------------------------

    def prompts(self, batch_size: int, masks: torch.Tensor | None = None,
                values: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """-> (vision prompts (B, vision_depth, L, Dv) or None, text prompts (B, text_depth, L, Dt) or None).

        masks: (B, mask_layers, 1, m, m) decoded mask logits, shallowest layer first (Diff-Prompt).
        values: per-sample values (B, *shape) of prompt tensors named in `prompt_names`, used instead
        of the learned ones (Prompt Diffusion's generated prompts)."""
        return None, None

    def prompt_values(self, batch_size: int, values: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """Each of `prompt_names` per sample, (B, *shape): `values[name]` where given, else the learned
        tensor broadcast over the batch (a view)."""
        values = values or {}
        unknown = set(values) - set(self.prompt_names)
        if unknown:
            raise ValueError(f"{self.method} has no prompt tensors {sorted(unknown)}; it has {list(self.prompt_names)}")
        return {name: values[name] if name in values else per_sample(getattr(self, name), batch_size)
                for name in self.prompt_names}

    def predict(self, foundation: GroundingModel, image: ImageFeatures, query: torch.Tensor) -> GroundingOutput:
        """Grounding output from the (prompted) image features and query embeddings (B, 1, E)."""
        return foundation.predict(image, query)


# ----------------------------------------------------------------------------- the methods


@register("diffprompt")
class DiffPrompt(PromptLearner):
    """Per layer: L/2 tokens from that layer's generated mask (one adapter per tower) + L/2 global tokens."""

    towers = ("vision", "text")
    needs_masks = True
    prompt_names = ("vision_global", "text_global")

    def __init__(self, config: LearnerConfig):
        if config.length % 2:
            raise ValueError(f"Diff-Prompt splits the prompt length in halves: it must be even, got {config.length}")
        super().__init__(config)
        half = config.length // 2
        self.vision_adapter = MaskAdapter(config.mask_size, half, config.vision_width, mask_input=config.mask_input)
        self.text_adapter = MaskAdapter(config.mask_size, half, config.text_width, mask_input=config.mask_input)
        self.vision_global = learned_prompts(self.vision_depth, half, config.vision_width)
        self.text_global = learned_prompts(self.text_depth, half, config.text_width)

    def prompts(self, batch_size, masks=None, values=None):
        if masks is None or masks.shape[1] < self.mask_layers:
            raise ValueError(f"Diff-Prompt needs {self.mask_layers} masks per query")
        B, m = masks.shape[0], masks.shape[-1]
        flat = masks[:, : self.mask_layers].reshape(-1, 1, m, m)  # (B*n, 1, m, m)
        v = self.vision_adapter(flat).view(B, self.mask_layers, -1, self.config.vision_width)
        t = self.text_adapter(flat).view(B, self.mask_layers, -1, self.config.text_width)
        p = self.prompt_values(batch_size, values)
        vision = torch.cat([v[:, : self.vision_depth], p["vision_global"]], dim=2)
        text = torch.cat([t[:, : self.text_depth], p["text_global"]], dim=2)
        return vision, text  # (B, dv, L, Dv), (B, dt, L, Dt)


@register("vpt")
class VPT(PromptLearner):
    """VPT-deep: L learnable visual prompts per layer."""

    towers = ("vision",)
    prompt_names = ("vision_prompts",)

    def __init__(self, config: LearnerConfig):
        super().__init__(config)
        self.vision_prompts = learned_prompts(self.vision_depth, config.length, config.vision_width)

    def prompts(self, batch_size, masks=None, values=None):
        return self.prompt_values(batch_size, values)["vision_prompts"], None


@register("coop")
class CoOp(PromptLearner):
    """CoOp, deep: L learnable text prompts per layer."""

    towers = ("text",)
    prompt_names = ("text_prompts",)

    def __init__(self, config: LearnerConfig):
        super().__init__(config)
        self.text_prompts = learned_prompts(self.text_depth, config.length, config.text_width)

    def prompts(self, batch_size, masks=None, values=None):
        return None, self.prompt_values(batch_size, values)["text_prompts"]


@register("maple")
class MaPLe(PromptLearner):
    """MaPLe: learnable text prompts; each prompted image layer gets a linear map of its layer's text prompts."""

    towers = ("vision", "text")
    prompt_names = ("text_prompts",)

    def __init__(self, config: LearnerConfig):
        super().__init__(config)
        n = max(self.vision_depth, self.text_depth)
        self.text_prompts = learned_prompts(n, config.length, config.text_width)
        self.couplers = nn.ModuleList([nn.Linear(config.text_width, config.vision_width)
                                       for _ in range(self.vision_depth)])

    def prompts(self, batch_size, masks=None, values=None):
        if not values:  # the learned prompts: map them once for the whole batch
            vision = torch.stack([c(self.text_prompts[i]) for i, c in enumerate(self.couplers)])  # (dv, L, Dv)
            return per_sample(vision, batch_size), per_sample(self.text_prompts[: self.text_depth], batch_size)
        text = self.prompt_values(batch_size, values)["text_prompts"]  # (B, n, L, Dt)
        vision = torch.stack([c(text[:, i]) for i, c in enumerate(self.couplers)], dim=1)  # (B, dv, L, Dv)
        return vision, text[:, : self.text_depth]


@register("clip_adapter")
class CLIPAdapter(PromptLearner):
    """CLIP-Adapter: residual MLPs on the patch features and on the query embedding; no prompts."""

    def __init__(self, config: LearnerConfig):
        super().__init__(config)
        self.patch_adapter = ResidualAdapter(config.vision_width, config.adapter_ratio)
        self.query_adapter = ResidualAdapter(config.query_width, config.adapter_ratio)

    def predict(self, foundation, image, query):
        image.patch_embeds = self.patch_adapter(image.patch_embeds)
        return foundation.predict(image, self.query_adapter(query))


@register("linear_probe")
class LinearProbe(PromptLearner):
    """Trains copies of the foundation's class and box heads; no prompts."""

    def __init__(self, config: LearnerConfig):
        super().__init__(config)
        widths = GroundingConfig(vision=TowerConfig(hidden_size=config.vision_width),
                                 text=TowerConfig(hidden_size=config.text_width))
        self.class_head = ClassPredictionHead(widths)
        self.box_head = BoxPredictionHead(config.vision_width)

    def init_from_foundation(self, foundation):
        self.class_head.load_state_dict(foundation.class_head.state_dict())
        self.box_head.load_state_dict(foundation.box_head.state_dict())

    def predict(self, foundation, image, query):
        logits = self.class_head(image.patch_embeds, query)
        boxes = torch.sigmoid(self.box_head(image.patch_embeds) + foundation.box_bias)
        return GroundingOutput(logits=logits, pred_boxes=boxes, objectness_logits=None)


METHODS = tuple(LEARNERS)  # ("diffprompt", "vpt", "coop", "maple", "clip_adapter", "linear_probe")


def prompted_forward(
    foundation: GroundingModel,
    learner: PromptLearner | None,
    pixels: torch.Tensor,  # (B, 3, S, S)
    ids: torch.Tensor,  # (B, T) one expression per image
    mask: torch.Tensor,  # (B, T)
    masks: torch.Tensor | None = None,  # (B, n, 1, m, m) decoded mask logits (Diff-Prompt)
    values: dict[str, torch.Tensor] | None = None,  # per-sample prompt tensors (Prompt Diffusion)
    trunk: dict[str, torch.Tensor] | None = None,  # single-pass: image_hidden / text_hidden at first_layers
    image: ImageFeatures | None = None,  # the unprompted image tower's output, for a learner without vision prompts
) -> GroundingOutput:
    """The foundation with the learner's prompts / adapters / heads: logits (B, P, 1), boxes (B, P, 4).

    A learner whose prompts enter above layer 0 (`first_layers`, single-pass mode) continues the towers
    from the hidden states there: `trunk`'s (the conditions pass's, `foundation_conditions(layers=...)`),
    or computed here without gradient when not given. `image`: the image features a learner without vision
    prompts (CoOp) gets, computed once by a caller that runs the same images several times."""
    vision_prompts = text_prompts = None
    if learner is not None:
        vision_prompts, text_prompts = learner.prompts(pixels.shape[0], masks, values)
    if image is not None and vision_prompts is not None:
        raise ValueError(f"{learner.method} prompts the image tower: its image features cannot be given")
    first_v, first_t = learner.config.first_layers if learner is not None else (0, 0)
    if first_v or first_t:
        if trunk is None:
            with torch.no_grad():  # the frozen, unprompted layers below the prompts
                trunk = {"image_hidden": foundation.image_trunk(pixels, first_v),
                         "text_hidden": foundation.text_trunk(ids, mask, first_t)}
        image = foundation.continue_image(trunk["image_hidden"], first_v, vision_prompts)
        text = foundation.continue_text(trunk["text_hidden"], ids, mask, first_t, text_prompts)
    else:
        image = image if image is not None else foundation.encode_image(pixels, vision_prompts)
        text = foundation.encode_text(ids, mask, text_prompts)
    query = text.query_embeds[:, None, :]  # (B, 1, E)
    if learner is None:
        return foundation.predict(image, query)
    return learner.predict(foundation, image, query)
