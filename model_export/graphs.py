"""The four exported graphs, as torch modules with plain tensor inputs and outputs.

    condition_encoder  pixel_values (B,3,S,S), input_ids (B,T) int64, attention_mask (B,T) int64
                       -> image_embed (B,E), text_embed (B,E) [tokens conditioning: + context (B,S,D),
                          key_bias (B,1,1,S), maps (B,k,g,g), cross_kv (B,depth,S,2D)]: the unprompted
                          foundation's conditions
                          passed through the DiT's condition-only part (`PromptDiT.prepare_conditions`),
                          once per query rather than once per DDIM step
    denoiser           latents (B,C,h,w), timesteps (B,) int64, + the condition_encoder's outputs it reads
                       (image_embed, text_embed [, cross_kv, key_bias, maps]: the context only through
                       its precomputed cross-attention keys and values)
                       -> model_output (B,C,h,w)            (one DDIM step's network call)
    prompt_builder     kept_latents (B,n,C,h,w) [, prompt_offsets (B,F): Prompt Diffusion's global prompts]
                       -> vision_prompts (B,dv,L,Dv), text_prompts (B,dt,L,Dt), mask_logits (B,n,1,m,m)
    grounding          pixel_values, input_ids, attention_mask [, vision_prompts, text_prompts]
                       -> logits (B,P), boxes (B,P,4) cxcywh in [0, 1] of the input square

Single-pass mode (a DiT that reads its conditions at the layers where the learner's prompts enter):
the condition_encoder runs only the towers' layers below the prompts and also outputs their hidden
states, image_hidden (B,1+P,Dv) and text_hidden (B,T,Dt); grounding takes those instead of
pixel_values and runs only the remaining, prompted layers: one foundation pass per query.

Prompt Diffusion artifacts (a base learner whose prompts are generated per query) have three:

    prompt_conditions  pixel_values, input_ids, attention_mask
                       -> image_embed (B,E), text_embed (B,E), image_tokens (B,1+P,Dv), text_tokens (B,T,Dt),
                          text_mask (B,T): the unprompted foundation's outputs
    prompt_denoiser    x (B,F), timesteps (B,) int64, + the prompt_conditions outputs -> x0 (B,F)
    grounding          pixel_values, input_ids, attention_mask, prompt_offsets (B,F)
                       -> logits, boxes: the learner run with base prompts + the generated offsets

Prompt Diffusion on Diff-Prompt's global prompts keeps the four Diff-Prompt graphs and adds the
prompt_denoiser: the condition_encoder also outputs the prompt conditions (one unprompted pass for
both samplers) and the prompt_builder also takes the sampled prompt_offsets.

The DDIM loop between denoiser calls runs in numpy (diffprompt/core/ddim.py) from the schedule
table in the manifest, so one denoiser graph serves every step count; the artifact still
records and enforces its one step count.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from diffprompt.model_export.fused_attention import (
    CONTRIB_OPSET,
    DEFAULT_ATTENTION,
    check_attention_mode,
    fused_attention,
)
from diffprompt.training.models.diffprompt import TRUNK_STATES, dit_conditions, foundation_conditions
from diffprompt.training.models.grounding import GroundingModel
from diffprompt.training.models.mask_vae import decode_latents
from diffprompt.training.models.prompt_diffusion import PromptDiffusion
from diffprompt.training.models.prompt_dit import PromptDiT
from diffprompt.training.models.prompt_learners import PromptLearner, prompted_forward

# What the prompt denoiser reads: the unprompted foundation's pooled embeddings and tokens
PROMPT_CONDITIONS = ("image_embed", "text_embed", "image_tokens", "text_tokens", "text_mask")


class ConditionEncoder(nn.Module):
    """The frozen foundation's unprompted conditions, then the DiT's condition-only part. With
    `prompt_conditions` (Prompt Diffusion on Diff-Prompt's global prompts) it also outputs what the
    prompt denoiser reads (PROMPT_CONDITIONS), from the same unprompted pass."""

    def __init__(self, foundation: GroundingModel, dit: PromptDiT, prompt_conditions: bool = False,
                 trunk: bool = False):
        super().__init__()
        self.foundation, self.dit = foundation, dit
        self.output_names = list(dit.prepared_names)
        if prompt_conditions:
            self.output_names += [n for n in PROMPT_CONDITIONS if n not in self.output_names]
        if trunk:  # single-pass mode: the hidden states the grounding graph continues from
            self.output_names += list(TRUNK_STATES)

    def forward(self, pixel_values, input_ids, attention_mask):
        tokens = self.dit.config.conditioning == "tokens" or "image_tokens" in self.output_names
        cond = dit_conditions(self.foundation, self.dit, pixel_values, input_ids, attention_mask, tokens=tokens)
        prepared = self.dit.prepare_conditions(**cond)  # its image_embed / text_embed are cond's, unchanged
        return tuple(prepared[k] if k in prepared else cond[k] for k in self.output_names)


class Denoiser(nn.Module):
    """One DiT call on noisy latents, given the condition_encoder's outputs."""

    def __init__(self, dit: PromptDiT):
        super().__init__()
        self.dit = dit
        self.condition_names = list(dit.denoiser_names)

    def forward(self, latents, timesteps, *conditions):
        return self.dit.denoise(latents, timesteps, dict(zip(self.condition_names, conditions)))


class PromptBuilder(nn.Module):
    """Kept latents -> masks -> Diff-Prompt's prompts. With a Prompt Diffusion model its global prompts
    are the base ones + the generated offsets (a second input, prompt_offsets (B, F))."""

    def __init__(self, vae, learner: PromptLearner, prompt_diffusion: PromptDiffusion | None = None):
        super().__init__()
        self.vae, self.learner, self.prompt_diffusion = vae, learner, prompt_diffusion

    def forward(self, kept_latents, prompt_offsets=None):
        B, n = kept_latents.shape[:2]
        logits = decode_latents(self.vae, kept_latents.flatten(0, 1))  # (B*n, 1, m, m)
        masks = logits.view(B, n, *logits.shape[1:])
        values = None if self.prompt_diffusion is None else self.prompt_diffusion.prompts(prompt_offsets)
        vision, text = self.learner.prompts(B, masks, values)
        return vision, text, masks


class PromptConditions(nn.Module):
    """Prompt Diffusion's conditions: the unprompted foundation's pooled embeddings and tokens."""

    output_names = list(PROMPT_CONDITIONS)

    def __init__(self, foundation: GroundingModel):
        super().__init__()
        self.foundation = foundation

    def forward(self, pixel_values, input_ids, attention_mask):
        cond = foundation_conditions(self.foundation, pixel_values, input_ids, attention_mask, patch_scores=False)
        return tuple(cond[k] for k in PROMPT_CONDITIONS)


class PromptDenoiser(nn.Module):
    """One call of the prompt-space DiT: noisy packed offsets (B, F) -> predicted x0 (B, F)."""

    def __init__(self, model: PromptDiffusion):
        super().__init__()
        self.model = model

    def forward(self, x, timesteps, image_embed, text_embed, image_tokens, text_tokens, text_mask):
        return self.model(x, timesteps, image_embed, text_embed, image_tokens, text_tokens, text_mask)


class PromptedGrounding(nn.Module):
    """The learner run with per-query prompts: its base prompts + the generated offsets (B, F)."""

    def __init__(self, foundation: GroundingModel, learner: PromptLearner, model: PromptDiffusion):
        super().__init__()
        self.foundation, self.learner, self.model = foundation, learner, model

    def forward(self, pixel_values, input_ids, attention_mask, prompt_offsets):
        values = self.model.prompts(prompt_offsets)
        out = prompted_forward(self.foundation, self.learner, pixel_values, input_ids, attention_mask, None, values)
        return out.logits[..., 0], out.pred_boxes  # (B, P), (B, P, 4)


class Grounding(nn.Module):
    """The prompted foundation. With Diff-Prompt the prompts are inputs; other learners are baked in."""

    def __init__(self, foundation: GroundingModel, learner: PromptLearner | None):
        super().__init__()
        self.foundation, self.learner = foundation, learner
        self.takes_prompts = learner is not None and learner.needs_masks

    def forward(self, pixel_values, input_ids, attention_mask, vision_prompts=None, text_prompts=None):
        if self.takes_prompts:
            image = self.foundation.encode_image(pixel_values, vision_prompts)
            query = self.foundation.encode_text(input_ids, attention_mask, text_prompts).query_embeds[:, None, :]
            out = self.foundation.predict(image, query)
        else:
            out = prompted_forward(self.foundation, self.learner, pixel_values, input_ids, attention_mask)
        return out.logits[..., 0], out.pred_boxes  # (B, P), (B, P, 4)


class ContinuedGrounding(nn.Module):
    """Single-pass mode: the prompted towers from the condition encoder's hidden states (the layers
    below the prompts are not run again), then the heads. The learner's prompts are inputs."""

    def __init__(self, foundation: GroundingModel, learner: PromptLearner):
        super().__init__()
        self.foundation, self.learner = foundation, learner
        self.first_vision, self.first_text = learner.config.first_layers

    def forward(self, image_hidden, text_hidden, input_ids, attention_mask, vision_prompts, text_prompts):
        image = self.foundation.continue_image(image_hidden, self.first_vision, vision_prompts)
        text = self.foundation.continue_text(text_hidden, input_ids, attention_mask, self.first_text, text_prompts)
        out = self.foundation.predict(image, text.query_embeds[:, None, :])
        return out.logits[..., 0], out.pred_boxes  # (B, P), (B, P, 4)


def export_onnx(module: nn.Module, args: tuple, path, input_names: list[str], output_names: list[str],
                opset: int = 17, attention: str = DEFAULT_ATTENTION) -> None:
    """TorchScript-based export with a dynamic batch axis on every input and output.

    attention "fused": the foundation's unmasked attention as com.microsoft::MultiHeadAttention,
    "plain": MatMul + Softmax (model_export/fused_attention.py)."""
    fused = check_attention_mode(attention) == "fused"
    dynamic = {name: {0: "batch"} for name in [*input_names, *output_names]}
    module.eval()
    # The tracer warns about Python branches on shapes; here they depend only on fixed sizes
    # (prompt depth/length, grid), never on the batch, which the parity tests vary.
    with torch.no_grad(), warnings.catch_warnings(), fused_attention(module, fused):
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(module, args, str(path), input_names=input_names, output_names=output_names,
                          dynamic_axes=dynamic, opset_version=opset, dynamo=False, do_constant_folding=True,
                          custom_opsets=CONTRIB_OPSET if fused else None)
