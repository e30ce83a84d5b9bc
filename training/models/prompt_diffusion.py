"""Prompt Diffusion (Du et al., 2024, arXiv 2410.20164): a diffusion transformer in a prompt learner's
prompt space, as a plug-in for any learner with learned prompt tensors (CoOp, VPT, MaPLe, Diff-Prompt).

The method: each training expression's prompts are first overfitted to that expression alone (a few
gradient steps from the trained base prompts: training/stages/prompt_diffusion.py). This model then
learns to turn noise into such a per-sample prompt, conditioned on the sample (the frozen foundation's
unprompted outputs) and on the base prompt. At test time a fast ODE sampler (DPM-Solver++ in 5 steps,
or DDIM) generates each query's own prompts from seeded noise, and the base learner runs with them
(`PromptLearner.prompts(values=...)`).

What is diffused: the *offset* of the overfitted prompts from the base prompts, packed into one
vector per sample and scaled to unit standard deviation (`offset_scale`, measured on the training
targets and saved in the config):

    x0 = pack(overfitted - base) * offset_scale                         (B, F), F = sum of depth * L * D

Inside the model every prompt vector is one token: the noisy offset's token and the base prompt's
token are embedded (one linear map per prompt tensor, since widths differ between towers), a learned
position per token is added, and adaLN-Zero DiT blocks (shared with the stage-2 DiT) read them,
conditioned on the timestep and the pooled image / text embeddings, with a cross-attention to the
foundation's image and text tokens. The output is the clean offset x0 (prediction type "sample").

Inputs of `forward`:

    x             (B, F)           noisy scaled offsets, packed
    timesteps     (B,)             integer diffusion steps in [0, T)
    image_embed   (B, Ei)          pooled image embedding (unprompted foundation)
    text_embed    (B, Et)          pooled query embedding
    image_tokens  (B, 1+P, Dv)     image tower's last hidden state
    text_tokens   (B, T, Dt)       text tower's last hidden state
    text_mask     (B, T)           1 = token, 0 = padding
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from diffprompt.training.models.pretrained import PretrainedModel
from diffprompt.training.models.prompt_dit import DiTBlock, TimestepEmbedder, dit_initialize, modulate


@dataclass
class PromptDiffusionConfig:
    # name -> [depth, L, D] of each prompt tensor the base learner exposes (`PromptLearner.prompt_names`)
    prompt_shapes: dict[str, list[int]] = field(default_factory=dict)
    base_method: str = "coop"  # the learner the prompts belong to
    image_embed_dim: int = 128
    text_embed_dim: int = 128
    image_token_dim: int = 192
    text_token_dim: int = 128
    hidden_size: int = 128
    depth: int = 3
    num_heads: int = 4
    mlp_ratio: float = 4.0
    offset_scale: float = 1.0  # x0 = offset * offset_scale has unit std on the training targets


class PromptDiffusion(PretrainedModel):
    """Denoiser of packed prompt offsets (B, F). See the module docstring."""

    config_class = PromptDiffusionConfig
    model_type = "diffprompt-prompt-diffusion"

    def __init__(self, config: PromptDiffusionConfig):
        super().__init__(config)
        if not config.prompt_shapes:
            raise ValueError("prompt_shapes is empty: the base learner has no prompt tensors to diffuse")
        D = config.hidden_size
        self.names = tuple(config.prompt_shapes)
        self.tokens = {n: s[0] * s[1] for n, s in config.prompt_shapes.items()}  # prompt vectors per tensor
        self.widths = {n: s[2] for n, s in config.prompt_shapes.items()}
        n_tokens = sum(self.tokens.values())
        self.noisy_in = nn.ModuleDict({n: nn.Linear(w, D) for n, w in self.widths.items()})
        self.base_in = nn.ModuleDict({n: nn.Linear(w, D) for n, w in self.widths.items()})
        self.pos_embed = nn.Parameter(torch.zeros(1, n_tokens, D))
        # The base prompts, saved with the weights: the model is conditioned on them, and a generated
        # prompt is base + offset.
        for n, shape in config.prompt_shapes.items():
            self.register_buffer(f"base_{n}", torch.zeros(*shape))
        self.t_embedder = TimestepEmbedder(D)
        self.image_embedder = nn.Linear(config.image_embed_dim, D)
        self.text_embedder = nn.Linear(config.text_embed_dim, D)
        self.image_token_proj = nn.Linear(config.image_token_dim, D)
        self.text_token_proj = nn.Linear(config.text_token_dim, D)
        cond_size = 2 * D  # concat(image + t, text + t), as the stage-2 DiT
        self.blocks = nn.ModuleList([DiTBlock(D, config.num_heads, config.mlp_ratio, cond_size, cross_attention=True)
                                     for _ in range(config.depth)])
        self.norm_final = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_size, 2 * D))
        self.out = nn.ModuleDict({n: nn.Linear(D, w) for n, w in self.widths.items()})
        self.initialize_weights()

    @property
    def num_features(self) -> int:
        """F: the length of a packed prompt offset."""
        return sum(self.tokens[n] * self.widths[n] for n in self.names)

    def initialize_weights(self) -> None:
        dit_initialize(self, self.t_embedder, self.blocks)  # adaLN-Zero: every block starts as identity
        nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.zeros_(self.final_modulation[-1].weight)
        nn.init.zeros_(self.final_modulation[-1].bias)
        for linear in self.out.values():
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    # -- prompt space <-> packed vectors ---------------------------------------------------------

    def base_prompts(self) -> dict[str, torch.Tensor]:
        """name -> the base learner's prompt tensor (depth, L, D)."""
        return {n: getattr(self, f"base_{n}") for n in self.names}

    def set_base_prompts(self, learner: nn.Module) -> None:
        """Copy the base learner's prompt tensors (its `prompt_names`) into the model."""
        with torch.no_grad():
            for n in self.names:
                getattr(self, f"base_{n}").copy_(getattr(learner, n))

    def pack(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """name -> (B, depth, L, D) -> (B, F)."""
        return torch.cat([values[n].flatten(1) for n in self.names], dim=1)

    def unpack(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, F) -> name -> (B, depth, L, D)."""
        out, lo = {}, 0
        for n in self.names:
            size = self.tokens[n] * self.widths[n]
            out[n] = x[:, lo: lo + size].reshape(x.shape[0], *self.config.prompt_shapes[n])
            lo += size
        return out

    def offsets(self, prompts: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-sample prompts name -> (B, depth, L, D) -> scaled packed offsets x0 (B, F)."""
        base = self.base_prompts()
        return self.pack({n: prompts[n] - base[n] for n in self.names}) * self.config.offset_scale

    def prompts(self, x0: torch.Tensor) -> dict[str, torch.Tensor]:
        """Scaled packed offsets (B, F) -> per-sample prompts name -> (B, depth, L, D) (base + offset)."""
        base = self.base_prompts()
        return {n: base[n] + v for n, v in self.unpack(x0 / self.config.offset_scale).items()}

    # -- the network -----------------------------------------------------------------------------

    def _tokens(self, values: dict[str, torch.Tensor], embed: nn.ModuleDict) -> torch.Tensor:
        """name -> (B, depth, L, D) -> (B, N, hidden), one token per prompt vector."""
        return torch.cat([embed[n](values[n].reshape(values[n].shape[0], -1, self.widths[n])) for n in self.names],
                         dim=1)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, image_embed: torch.Tensor, text_embed: torch.Tensor,
                image_tokens: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """-> the predicted clean scaled offsets x0 (B, F)."""
        B = x.shape[0]
        base = {n: v.expand(B, *v.shape) for n, v in self.base_prompts().items()}
        h = self._tokens(self.unpack(x), self.noisy_in) + self._tokens(base, self.base_in) + self.pos_embed  # (B, N, D)
        t = self.t_embedder(timesteps)  # (B, D)
        c = torch.cat([self.image_embedder(image_embed) + t, self.text_embedder(text_embed) + t], dim=-1)  # (B, 2D)
        context = torch.cat([self.image_token_proj(image_tokens), self.text_token_proj(text_tokens)], dim=1)  # (B,S,D)
        keep = torch.cat([torch.ones(image_tokens.shape[:2], device=x.device), text_mask.float()], dim=1)
        key_bias = ((1.0 - keep) * -1e4)[:, None, None, :].to(context.dtype)  # (B, 1, 1, S)
        for block in self.blocks:
            h = block(h, c, context, key_bias)  # (B, N, D)
        shift, scale = self.final_modulation(c).split([self.config.hidden_size] * 2, dim=-1)  # (B, D) each
        h = modulate(self.norm_final(h), shift, scale)
        out, lo = [], 0
        for n in self.names:  # back to each tensor's width, then packed
            out.append(self.out[n](h[:, lo: lo + self.tokens[n]]).flatten(1))
            lo += self.tokens[n]
        return torch.cat(out, dim=1)  # (B, F)


# ----------------------------------------------------------------------------- schedule and samplers

SCHEDULE_DEFAULTS = dict(
    num_train_timesteps=100,
    beta_schedule="squaredcos_cap_v2",
    prediction_type="sample",  # the model predicts the clean offset x0
    clip_sample=False,
    set_alpha_to_one=True,
    timestep_spacing="trailing",  # the first sampling step starts from pure noise, also at 5 steps
)
SOLVERS = ("dpm", "ddim")  # DPM-Solver++ (2nd order, the paper's fast ODE sampler) | DDIM (1st order, eta 0)


def make_sampler(config: dict, solver: str = "dpm"):
    """A diffusers scheduler for sampling, built from the one schedule saved with the weights."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if solver == "dpm":
        return DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True)
    if solver == "ddim":
        return DDIMScheduler.from_config(config)
    raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")


@torch.no_grad()
def sample_prompts(model: PromptDiffusion, scheduler, conditions: dict[str, torch.Tensor], seeds, steps: int
                   ) -> dict[str, torch.Tensor]:
    """Per-sample prompts name -> (B, depth, L, D) from seeded noise (one PCG64 stream per seed, as
    Diff-Prompt's sampler), `steps` solver steps. conditions: image_embed, text_embed, image_tokens,
    text_tokens, text_mask of the unprompted foundation (`foundation_conditions`)."""
    from diffprompt.core.pipeline import initial_noise

    device = next(model.parameters()).device
    x = torch.from_numpy(initial_noise(seeds, (model.num_features,))).to(device)  # (B, F)
    names = ("image_embed", "text_embed", "image_tokens", "text_tokens", "text_mask")
    cond = {k: conditions[k] for k in names}
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        x0 = model(x, t.expand(x.shape[0]).to(device), **cond)
        x = scheduler.step(x0, t, x).prev_sample  # (B, F)
    return model.prompts(x)
