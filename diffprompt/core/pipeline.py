"""The Diff-Prompt inference pipeline over an artifact's graphs, written once for every runtime.

    result = run_pipeline(infer, manifest, pixels, input_ids, attention_mask, seeds)

`infer(graph name, {input name: array}, [output names]) -> [arrays]` runs one exported graph:
an onnxruntime session in `GroundingRuntime`, a BLS call in the Triton Python model. For a
Diff-Prompt artifact the pipeline is

    condition_encoder -> DDIM loop (one `denoiser` call per step, numpy update) -> prompt_builder -> grounding
                                                                                     -> fusion (numpy)

where the fusion (`Manifest.pointer_weight` w > 0) adds w x the DiT pointer's log-probability of each
box's patch relative to uniform (the condition encoder's last `maps` channel) to the box's logit,
as `DiffPromptPipeline` does in PyTorch,

and for a foundation or baseline artifact just `grounding`. A calibrated artifact also gets
P(no match) per row from those outputs (`Manifest.no_match`, diffprompt.core.no_match). The
schedule, kept outputs, condition names, latent shape, prediction type and clip range come from the typed manifest.
Noise is numpy PCG64 per seed (`initial_noise`), as in training, so PyTorch, onnxruntime and
Triton agree for the same seed. numpy only: the Triton model imports this file.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from diffprompt.core.ddim import ddim_update
from diffprompt.core.manifest import Manifest
from diffprompt.core.prompt_solver import sample_offsets

Infer = Callable[[str, dict[str, np.ndarray], list[str]], list[np.ndarray]]
STAGES = ("condition", "sampler", "prompt_builder", "grounding")


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...]) -> np.ndarray:
    """(B, *shape) float32 standard normal, one PCG64 stream per sample seed."""
    return np.stack([np.random.default_rng(int(s)).standard_normal(shape, dtype=np.float32) for s in seeds])


def sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x)) without overflow for large |x| (random or badly calibrated logits reach 1e3)."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(np.result_type(x, np.float32))


@dataclass
class GroundingResult:
    scores: np.ndarray  # (B, P) in [0, 1]
    boxes: np.ndarray  # (B, P, 4) cxcywh in [0, 1] of the model's input square
    mask_logits: np.ndarray | None  # (B, m, m) the final generated mask (logits > 0 = mask), Diff-Prompt only
    seconds: dict[str, float] = field(default_factory=dict)  # per stage (STAGES), wall clock
    no_match: np.ndarray | None = None  # (B,) P(the object is absent), if the artifact is calibrated


def _outputs(manifest: Manifest, graph: str) -> list[str]:
    return [o.name for o in manifest.graphs[graph].outputs]


def sample_kept_latents(infer: Infer, manifest: Manifest, conditions: dict[str, np.ndarray],
                        seeds: Sequence[int]) -> np.ndarray:
    """DDIM (eta = 0) from seeded noise over the denoiser graph -> kept latents (B, n, C, h, w)."""
    sampler = manifest.sampler
    if sampler is None:
        raise ValueError(f"{manifest.model_version} has no sampler (method {manifest.method!r})")
    x = initial_noise(seeds, sampler.latent_shape)  # (B, C, h, w)
    feeds = {name: conditions[name] for name in sampler.denoiser_conditions}
    outputs = _outputs(manifest, "denoiser")
    kept: dict[int, np.ndarray] = {}
    for i, step in enumerate(sampler.schedule):
        t = np.full((len(x),), step.timestep, dtype=np.int64)  # (B,)
        (model_output,) = infer("denoiser", {"latents": x, "timesteps": t, **feeds}, outputs)
        x = ddim_update(x, model_output, step, sampler.prediction_type, sampler.clip_sample_range)
        if i in sampler.kept_outputs:
            kept[i] = x
    return np.ascontiguousarray(np.stack([kept[i] for i in sampler.kept_outputs], axis=1))


def run_pipeline(infer: Infer, manifest: Manifest, pixels: np.ndarray, input_ids: np.ndarray,
                 attention_mask: np.ndarray, seeds: Sequence[int],
                 clock: Callable[[], float] = time.perf_counter) -> GroundingResult:
    """One batch of B rows through the artifact's graphs.

    pixels (B, 3, S, S) float32 normalised, input_ids / attention_mask (B, T) int64, one seed per row.
    """
    base = {"pixel_values": np.ascontiguousarray(pixels, dtype=np.float32),
            "input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
            "attention_mask": np.ascontiguousarray(attention_mask, dtype=np.int64)}
    if len(seeds) != len(base["pixel_values"]):
        raise ValueError(f"{len(seeds)} seeds for a batch of {len(base['pixel_values'])}")
    if manifest.prompt_sampler is not None and manifest.sampler is None:
        return _run_prompt_diffusion(infer, manifest, base, seeds, clock)
    if manifest.sampler is None:
        t0 = clock()
        logits, boxes = infer("grounding", base, _outputs(manifest, "grounding"))
        result = GroundingResult(sigmoid(logits), boxes, None, {"grounding": clock() - t0})
        return _with_no_match(manifest, result, base["attention_mask"], {})
    t0 = clock()
    conditions = dict(zip(_outputs(manifest, "condition_encoder"),
                          infer("condition_encoder", base, _outputs(manifest, "condition_encoder"))))
    t1 = clock()
    kept = sample_kept_latents(infer, manifest, conditions, seeds)
    builder_feeds = {"kept_latents": kept}
    if manifest.prompt_sampler is not None:  # Prompt Diffusion on the global prompts, from the same conditions
        builder_feeds["prompt_offsets"] = _sample_prompt_offsets(infer, manifest, conditions, seeds)
    t2 = clock()
    vision, text, masks = infer("prompt_builder", builder_feeds, _outputs(manifest, "prompt_builder"))
    t3 = clock()
    # the graph's inputs by name: pixels, or (single-pass mode) the condition encoder's hidden states
    available = {**base, **conditions, "vision_prompts": vision, "text_prompts": text}
    logits, boxes = infer("grounding", {t.name: available[t.name] for t in manifest.graphs["grounding"].inputs},
                          _outputs(manifest, "grounding"))
    if manifest.pointer_weight:
        logits = fuse_pointer(logits, conditions["maps"], manifest.pointer_weight)
    t4 = clock()
    seconds = {"condition": t1 - t0, "sampler": t2 - t1, "prompt_builder": t3 - t2, "grounding": t4 - t3}
    mask_logits = np.ascontiguousarray(masks[:, 0, 0], dtype=np.float32)  # shallowest layer's mask = final x0
    result = GroundingResult(sigmoid(logits), boxes, mask_logits, seconds)
    return _with_no_match(manifest, result, base["attention_mask"], conditions)


def _run_prompt_diffusion(infer: Infer, manifest: Manifest, base: dict[str, np.ndarray], seeds: Sequence[int],
                          clock: Callable[[], float]) -> GroundingResult:
    """Prompt Diffusion: the unprompted foundation's conditions, the solver loop over the prompt
    denoiser from seeded noise (one PCG64 stream per seed), then grounding with the generated prompts."""
    t0 = clock()
    cond_names = _outputs(manifest, "prompt_conditions")
    conditions = dict(zip(cond_names, infer("prompt_conditions", base, cond_names)))
    t1 = clock()
    offsets = _sample_prompt_offsets(infer, manifest, conditions, seeds)  # (B, F)
    t2 = clock()
    logits, boxes = infer("grounding", {**base, "prompt_offsets": offsets}, _outputs(manifest, "grounding"))
    t3 = clock()
    seconds = {"condition": t1 - t0, "sampler": t2 - t1, "grounding": t3 - t2}
    return _with_no_match(manifest, GroundingResult(sigmoid(logits), boxes, None, seconds), base["attention_mask"],
                          conditions)


def _sample_prompt_offsets(infer: Infer, manifest: Manifest, conditions: dict[str, np.ndarray],
                           seeds: Sequence[int]) -> np.ndarray:
    """Prompt Diffusion's solver loop over the prompt_denoiser graph from seeded noise -> packed
    offsets (B, F). `conditions` holds (at least) every input of the graph but x and timesteps."""
    sampler = manifest.prompt_sampler
    out = _outputs(manifest, "prompt_denoiser")
    feeds = {t.name: conditions[t.name] for t in manifest.graphs["prompt_denoiser"].inputs
             if t.name not in ("x", "timesteps")}

    def denoise(x: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
        return infer("prompt_denoiser", {"x": x, "timesteps": timesteps, **feeds}, out)[0]

    return sample_offsets(denoise, sampler, initial_noise(seeds, (sampler.num_features,)))


def fuse_pointer(logits: np.ndarray, maps: np.ndarray, weight: float) -> np.ndarray:
    """logits (B, P) + weight x the pointer's log-probability map (maps[:, -1], (B, g, g), g x g = P)."""
    pointer = maps[:, -1].reshape(len(maps), -1)
    if pointer.shape != logits.shape:
        raise ValueError(f"pointer map {maps.shape[1:]} does not match {logits.shape[1]} boxes")
    return (logits + np.float32(weight) * pointer).astype(np.float32)


def _with_no_match(manifest: Manifest, result: GroundingResult, attention_mask: np.ndarray,
                   conditions: dict[str, np.ndarray]) -> GroundingResult:
    """P(no match) per row from the manifest's calibrator (diffprompt.core.no_match), if it has one."""
    if manifest.no_match is not None:
        result.no_match = manifest.no_match.probability({
            **conditions, "scores": result.scores, "boxes": result.boxes, "mask_logits": result.mask_logits,
            "attention_mask": attention_mask})
    return result
