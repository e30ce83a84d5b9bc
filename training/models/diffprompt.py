"""The Diff-Prompt pipeline in PyTorch: conditions -> DDIM prompt latents -> masks -> prompted grounding.

    conditions   the frozen foundation run once *without* prompts: pooled image / text
                 embeddings (and, for tokens conditioning, its image and text tokens)
    sampler      the DiT, DDIM with a chosen step count, seeded noise -> kept latents per layer
    decode       the Mask-VAE decoder -> mask logits per layer (B, n, 1, m, m)
    grounding    the foundation with the PromptLearner's prompts -> ranked boxes
    fusion       (`pointer_weight` w > 0, token DiTs with a pointer head) each box's logit plus
                 w x the pointer's log-probability of its patch relative to uniform,
                 log p(patch) + log P (the last `maps` channel of the condition encoder):
                 the DiT's REC pointer and the prompted foundation vote together. w is chosen
                 on val (`scripts/diagnose_fusion.py`) and stored in pipeline.json.

`DiffPromptPipeline.pointer_ranking` is the simplest use of the parts: the unprompted foundation's
boxes ranked by the pointer alone (no diffusion, no prompts), a row of the results table.

A pipeline directory (what `diffprompt train-prompts` writes) holds the learner
(`config.json`, `model.safetensors`), its parts in `foundation/`, `mask_vae/` and `prompt_dit/`
(hard links to the stages' checkpoints: self-contained, `write_pipeline_file`) and
`pipeline.json` naming them (relative paths are resolved from the pipeline directory). Baselines
are pipelines without VAE and DiT. Every model loads with its class's `from_pretrained`
(training/models/pretrained.py); a foundation directory also holds `tokenizer.json`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffprompt.core.errors import read_json_object
from diffprompt.core.manifest import sha256_file
from diffprompt.core.tokenizer import QueryTokenizer
from diffprompt.training.models.grounding import GroundingModel, GroundingOutput
from diffprompt.training.models.mask_vae import MaskVAE, decode_latents
from diffprompt.training.models.pretrained import CheckpointError
from diffprompt.training.models.prompt_diffusion import PromptDiffusion, make_sampler, sample_prompts
from diffprompt.training.models.prompt_dit import PromptDiT
from diffprompt.training.models.prompt_learners import PromptLearner, prompted_forward
from diffprompt.training.models.prompt_sampler import make_scheduler, sample_prompt_latents

PIPELINE_FILE = "pipeline.json"
SCHEDULER_FILE = "scheduler_config.json"
# Single-pass mode: the towers' hidden states where the prompts enter (`foundation_conditions(layers=...)`)
TRUNK_STATES = ("image_hidden", "text_hidden")


@torch.no_grad()
def foundation_conditions(
    foundation: GroundingModel, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, tokens: bool = True,
    patch_scores: bool = True, layers: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """The DiT's conditioning inputs from the unprompted foundation (see prompt_dit). With `tokens`, the
    towers' tokens too, and (unless `patch_scores` is False: Prompt Diffusion does not read them) the
    foundation's standardised score of the expression per patch, which takes its heads' pass.

    `layers` (vision, text): single-pass mode. Only the towers' first layers run; the conditions are read
    from their hidden states there (through the final norms, projections and heads, as if they were the
    last), and the hidden states themselves are returned too (TRUNK_STATES), image_hidden (B, 1+P, Dv)
    and text_hidden (B, T, Dt), for the prompted pass to continue from (`prompted_forward(trunk=...)`)."""
    if layers is None:
        image = foundation.encode_image(pixels)
        text = foundation.encode_text(ids, mask)
        cond = {}
    else:
        hidden_v, hidden_t = foundation.image_trunk(pixels, layers[0]), foundation.text_trunk(ids, mask, layers[1])
        image, text = foundation.image_features(hidden_v), foundation.text_features(hidden_t, ids)
        cond = dict(zip(TRUNK_STATES, (hidden_v, hidden_t)))
    cond.update(image_embed=image.pooled, text_embed=text.query_embeds)  # (B, E), (B, E)
    if tokens:
        cond.update(image_tokens=image.tokens, text_tokens=text.tokens, text_mask=mask.float())
    if tokens and patch_scores:
        logits = foundation.predict(image, text.query_embeds[:, None, :]).logits[..., 0]  # (B, P)
        cond["patch_scores"] = (logits - logits.mean(1, keepdim=True)) / (logits.std(1, keepdim=True) + 1e-6)
    return cond


def dit_conditions(foundation: GroundingModel, dit: PromptDiT, pixels: torch.Tensor, ids: torch.Tensor,
                   mask: torch.Tensor, **options) -> dict[str, torch.Tensor]:
    """`foundation_conditions` as `dit` reads them: its conditioning (pooled, or tokens with the per-patch
    scores) and, in single-pass mode, the layers it reads them at. `options`: tokens / patch_scores overrides."""
    token_dit = dit.config.conditioning == "tokens"
    options.setdefault("tokens", token_dit)
    options.setdefault("patch_scores", token_dit)
    return foundation_conditions(foundation, pixels, ids, mask, layers=dit.config.condition_layers, **options)


def load_foundation(directory: str | Path) -> tuple[GroundingModel, QueryTokenizer]:
    """(model, tokenizer) from a foundation directory: config.json, model.safetensors and tokenizer.json
    (or vocab.json + merges.txt, as Hugging Face saves a CLIP tokenizer)."""
    model = GroundingModel.from_pretrained(directory)
    return model, QueryTokenizer.from_file(Path(directory), model.config.max_text_length)


def load_dit(directory: str | Path) -> tuple[PromptDiT, object]:
    """(DiT with its EMA weights, its DDIMScheduler) from a stage-2 checkpoint."""
    directory = Path(directory)
    dit = PromptDiT.from_pretrained(directory)
    scheduler_cfg = read_json_object(directory / SCHEDULER_FILE, CheckpointError, "the DiT's noise schedule")
    return dit, make_scheduler(scheduler_cfg)


@dataclass
class DiffPromptPipeline:
    foundation: GroundingModel
    tokenizer: QueryTokenizer
    learner: PromptLearner | None  # None = the frozen foundation alone
    vae: MaskVAE | None = None
    dit: PromptDiT | None = None
    scheduler: object | None = None
    steps: int = 25
    pointer_weight: float = 0.0  # fusion weight of the pointer's log-probability (0 = the prompted logits alone)
    pointer_only: bool = False  # rank the unprompted foundation's boxes by the pointer alone (a baseline)
    prompt_diffusion: PromptDiffusion | None = None  # Prompt Diffusion: the learner's prompts generated per query
    prompt_sampler: object | None = None  # its solver (DPM-Solver++ or DDIM), `steps` steps

    @classmethod
    def from_pretrained(cls, directory: str | Path, steps: int = 25, prompt_diffusion: bool = True,
                        solver: str | None = None) -> DiffPromptPipeline:
        """The pipeline a train-prompts (or train-prompt-diffusion) directory holds. A Prompt Diffusion
        part is loaded unless `prompt_diffusion` is False (the base learner alone), sampled with
        `solver` if given, else with the solver pipeline.json names."""
        directory = Path(directory)
        spec = read_json_object(directory / PIPELINE_FILE, CheckpointError, "a train-prompts pipeline directory")

        def part(key: str) -> Path:
            """The directory pipeline.json names under `key`, resolved from the pipeline directory."""
            if not isinstance(spec.get(key), str):
                raise CheckpointError(f"{directory / PIPELINE_FILE}: names no {key} directory")
            return (directory / spec[key]).resolve()

        foundation, tokenizer = load_foundation(part("foundation"))
        learner = PromptLearner.from_pretrained(directory)
        vae = dit = scheduler = None
        if learner.needs_masks:
            vae = MaskVAE.from_pretrained(part("mask_vae"))
            dit, scheduler = load_dit(part("prompt_dit"))
        pipeline = cls(foundation, tokenizer, learner, vae, dit, scheduler, steps)
        if prompt_diffusion and spec.get("prompt_diffusion") is not None:
            pipeline.prompt_diffusion, pipeline.prompt_sampler = load_prompt_diffusion(
                part("prompt_diffusion"), solver or spec.get("prompt_diffusion_solver", "dpm"))
        pipeline.pointer_weight = pointer_weight_of(spec, directory)
        if pipeline.pointer_weight and not (dit is not None and dit.pointer):
            raise CheckpointError(f"{directory / PIPELINE_FILE}: pointer_weight needs a DiT with a pointer head")
        return pipeline

    @classmethod
    def foundation_only(cls, directory: str | Path) -> DiffPromptPipeline:
        return cls(*load_foundation(directory), None)

    @classmethod
    def pointer_ranking(cls, foundation: str | Path, prompt_dit: str | Path,
                        fused_with_foundation: float | None = None) -> DiffPromptPipeline:
        """The frozen foundation's own boxes ranked by the DiT's pointer logit: no diffusion, no prompts.
        With `fused_with_foundation` w: by the foundation's logit + w x the pointer's log-probability."""
        dit, scheduler = load_dit(prompt_dit)
        if not dit.pointer:
            raise CheckpointError(f"{prompt_dit}: the DiT has no pointer head (context_layers 0)")
        if fused_with_foundation is None:
            return cls(*load_foundation(foundation), None, None, dit, scheduler, pointer_only=True)
        return cls(*load_foundation(foundation), None, None, dit, scheduler, pointer_weight=fused_with_foundation)

    @torch.no_grad()
    def pointer_map(self, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, P) the pointer's log-probability per patch relative to uniform, log p + log P (the last
        `maps` channel of `PromptDiT.prepare_conditions`, what the exported condition encoder outputs)."""
        maps = self.dit.prepare_conditions(**cond)["maps"]  # (B, k, g, g)
        return maps[:, -1].flatten(1).float()

    @torch.no_grad()
    def generate_masks(self, pixels, ids, mask, seeds: Sequence[int], cond: dict | None = None) -> torch.Tensor:
        """Decoded mask logits (B, n, 1, m, m) for the learner's n prompted layers."""
        if cond is None:
            cond = dit_conditions(self.foundation, self.dit, pixels, ids, mask)
        n = self.learner.mask_layers
        latents = sample_prompt_latents(self.dit, self.scheduler, cond, seeds, self.steps, n)  # (B, n, C, h, w)
        B = latents.shape[0]
        logits = decode_latents(self.vae, latents.flatten(0, 1))  # (B*n, 1, m, m)
        return logits.view(B, n, *logits.shape[1:])

    @property
    def single_pass(self) -> bool:
        """The DiT reads its conditions at the layers where the learner's prompts enter: one foundation
        pass per query (its first layers shared), instead of an unprompted and a prompted pass."""
        layers = self.dit.config.condition_layers if self.dit is not None else None
        return (layers is not None and self.learner is not None
                and list(self.learner.config.first_layers) == list(layers))

    @property
    def image_spec(self):
        from diffprompt.core.image_spec import ImageSpec

        return ImageSpec.from_config(self.foundation.config)

    @torch.no_grad()
    def score(self, pixels: np.ndarray, ids: np.ndarray, mask: np.ndarray, seeds: Sequence[int]):
        """numpy in, numpy out: (scores (B, P) in [0, 1], boxes (B, P, 4) cxcywh) - the evaluation interface."""
        device = next(self.foundation.parameters()).device
        out, _ = self(torch.from_numpy(pixels).to(device), torch.from_numpy(ids).to(device),
                      torch.from_numpy(mask).to(device), seeds)
        return torch.sigmoid(out.logits[..., 0].float()).cpu().numpy(), out.pred_boxes.float().cpu().numpy()

    @torch.no_grad()
    def __call__(self, pixels, ids, mask, seeds: Sequence[int]) -> tuple[GroundingOutput, torch.Tensor | None]:
        """(grounding output, decoded masks or None) for one expression per image; with fusion or
        `pointer_only` the output's logits are the fused / pointer scores."""
        masks = cond = values = None
        pointer = self.dit is not None and (self.pointer_only or self.pointer_weight)
        needs_masks = self.learner is not None and self.learner.needs_masks
        if pointer or self.prompt_diffusion is not None or (needs_masks and self.single_pass):
            # one unprompted pass serves the DiT, Prompt Diffusion (its tokens) and (single pass) the prompted pass
            cond = (dit_conditions(self.foundation, self.dit, pixels, ids, mask, tokens=True) if self.dit is not None
                    else foundation_conditions(self.foundation, pixels, ids, mask, True, patch_scores=False))
        if needs_masks:
            masks = self.generate_masks(pixels, ids, mask, seeds, cond)
        if self.prompt_diffusion is not None:  # the learner's prompts, generated for each query
            values = sample_prompts(self.prompt_diffusion, self.prompt_sampler, cond, seeds, self.steps)
        trunk = cond if needs_masks and self.single_pass else None  # the prompted pass continues the trunk
        out = prompted_forward(self.foundation, self.learner, pixels, ids, mask, masks, values, trunk)
        if self.pointer_only:
            out.logits = self.pointer_map(cond)[..., None].to(out.logits.dtype)
        elif self.pointer_weight:
            out.logits = out.logits + self.pointer_weight * self.pointer_map(cond)[..., None].to(out.logits.dtype)
        return out, masks


def load_prompt_diffusion(directory: Path, solver: str = "dpm") -> tuple[PromptDiffusion, object]:
    """A Prompt Diffusion model and its sampler (`solver`), from the schedule saved with its weights."""
    model = PromptDiffusion.from_pretrained(directory).eval()
    config = read_json_object(directory / SCHEDULER_FILE, CheckpointError, "the noise schedule of the prompt diffusion")
    return model, make_sampler(config, solver)


def pointer_weight_of(spec: dict, where: Path) -> float:
    """The fusion weight a pipeline.json records (0 if none)."""
    w = spec.get("pointer_weight", 0.0)
    if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
        raise CheckpointError(f"{where / PIPELINE_FILE}: pointer_weight must be a number >= 0, got {w!r}")
    return float(w)


def weights_fingerprint(directory: str | Path) -> str:
    """16 hex of a sha256 over the weights and configs of a pipeline directory and of the components its
    pipeline.json names (or of a foundation directory): what a no-match calibration fitted on it belongs to."""
    directory = Path(directory)
    folders = [directory]
    digest = hashlib.sha256()
    if (directory / PIPELINE_FILE).exists():
        spec = read_json_object(directory / PIPELINE_FILE, CheckpointError, "a train-prompts pipeline directory")
        folders += [(directory / v).resolve() for _, v in sorted(spec.items()) if isinstance(v, str)]
        if weight := pointer_weight_of(spec, directory):  # the fusion changes every score
            digest.update(f"pointer_weight:{weight!r};".encode())
    for folder in folders:
        for path in sorted([*folder.glob("*.safetensors"), *folder.glob("*config.json"), *folder.glob("*.bin")]):
            digest.update(f"{path.name}:{sha256_file(path)};".encode())
    return digest.hexdigest()[:16]


def _link_part(source: Path, target: Path) -> None:
    """Every file of checkpoint directory `source` into `target`: hard links (no bytes), copies across file systems."""
    target.mkdir(parents=True, exist_ok=True)
    for f in sorted(source.iterdir()):
        if not f.is_file():
            continue
        dest = target / f.name
        dest.unlink(missing_ok=True)
        try:
            os.link(f, dest)
        except OSError:
            shutil.copy2(f, dest)


def write_pipeline_file(directory: Path, foundation: Path, mask_vae: Path | None, prompt_dit: Path | None,
                        relative_to: Path | None = None, pointer_weight: float = 0.0,
                        prompt_diffusion: Path | None = None, solver: str = "dpm") -> None:
    """pipeline.json in `directory`, with its parts inside it, so the directory moves and copies as one.

    The parts' files go to `directory/foundation/`, `mask_vae/` and `prompt_dit/` as hard links (on
    the same file system they take no extra bytes; elsewhere they are copied) and pipeline.json
    names those sub-directories. `relative_to` is accepted for callers that wrote paths relative to
    a final directory; with the parts inside it is not needed. Pipelines written before keep loading
    (their relative paths such as "../foundation" are resolved from the pipeline directory).
    A non-zero `pointer_weight` (the fusion, module docstring) is stored too, and so is a Prompt
    Diffusion part (`prompt_diffusion/`, with the `solver` its prompts are sampled with).
    """
    directory = Path(directory)
    spec = {}
    for key, part in (("foundation", foundation), ("mask_vae", mask_vae), ("prompt_dit", prompt_dit)):
        if part is None:
            spec[key] = None
            continue
        inside = directory / key
        if Path(part).resolve() != inside.resolve():
            _link_part(Path(part), inside)
        spec[key] = key
    if pointer_weight:
        spec["pointer_weight"] = float(pointer_weight)
    if prompt_diffusion is not None:
        inside = directory / "prompt_diffusion"
        if Path(prompt_diffusion).resolve() != inside.resolve():
            _link_part(Path(prompt_diffusion), inside)
        spec.update(prompt_diffusion="prompt_diffusion", prompt_diffusion_solver=solver)
    (directory / PIPELINE_FILE).write_text(json.dumps(spec, indent=2))
