"""Write one deployable artifact directory from a PyTorch pipeline (`export_pipeline`).

The graphs of model_export/graphs.py are traced to ONNX, their weights stored once
(model_export/shared_weights.py), each graph checked with `onnx.checker` and run once in
onnxruntime against PyTorch; then the tokenizer and manifest.json. Everything is written into a
staging sibling that then replaces the target (diffprompt.core.files). What a directory holds and
the command that writes them: model_export/export.py (`diffprompt export`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler
from tqdm import tqdm

from diffprompt.core.ddim import steps_from_table
from diffprompt.core.files import replace_directory, staging_dir
from diffprompt.core.image_spec import ImageSpec
from diffprompt.core.manifest import (
    MANIFEST_FILE,
    GraphInfo,
    Manifest,
    SamplerInfo,
    TensorInfo,
    TokenizerInfo,
    file_entry,
)
from diffprompt.core.no_match import NoMatchCalibration
from diffprompt.core.prompt_solver import PromptSampler
from diffprompt.core.tokenizer import TOKENIZER_FILE
from diffprompt.model_export.float16 import PRECISIONS, to_float16
from diffprompt.model_export.fused_attention import DEFAULT_ATTENTION, check_attention_mode
from diffprompt.model_export.graphs import (
    PROMPT_CONDITIONS,
    ConditionEncoder,
    ContinuedGrounding,
    Denoiser,
    Grounding,
    PromptBuilder,
    PromptConditions,
    PromptDenoiser,
    PromptedGrounding,
    export_onnx,
)
from diffprompt.model_export.shared_weights import share_weights
from diffprompt.training.models.diffprompt import TRUNK_STATES, DiffPromptPipeline
from diffprompt.training.models.prompt_sampler import kept_outputs


def schedule_table(scheduler, steps: int) -> list[dict]:
    """Rows (timestep, alpha_bar_t, alpha_bar_prev) of a `steps`-step DDIM run, as DDIMScheduler.step uses them."""
    scheduler.set_timesteps(steps)
    alphas = scheduler.alphas_cumprod
    rows = []
    for t in scheduler.timesteps.tolist():
        prev = t - scheduler.config.num_train_timesteps // steps
        rows.append({"timestep": int(t), "alpha_prod_t": float(alphas[t]),
                     "alpha_prod_prev": float(alphas[prev]) if prev >= 0 else float(scheduler.final_alpha_cumprod)})
    return rows


def prompt_sampler_info(pipeline: DiffPromptPipeline, steps: int) -> PromptSampler:
    """The manifest's Prompt Diffusion sampler at `steps` steps: the pipeline's solver and its schedule,
    as diffusers computes them (diffprompt.core.prompt_solver runs them in numpy)."""
    sched = pipeline.prompt_sampler
    sched.set_timesteps(steps)
    timesteps = tuple(int(t) for t in sched.timesteps)
    num_features = pipeline.prompt_diffusion.num_features
    if isinstance(sched, DDIMScheduler):
        rows = tuple(steps_from_table(schedule_table(sched, steps)))
        return PromptSampler("ddim", num_features, timesteps, ddim=rows)
    return PromptSampler("dpm", num_features, timesteps, sigmas=tuple(float(v) for v in sched.sigmas))


def _io(names: list[str], tensors) -> tuple[TensorInfo, ...]:
    return tuple(TensorInfo(n, ("batch", *t.shape[1:]), str(t.dtype).replace("torch.", ""))
                 for n, t in zip(names, tensors))


def _versions() -> dict:
    import diffusers
    import onnx
    import onnxruntime

    from diffprompt import __version__

    return {"diffprompt": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "diffusers": diffusers.__version__}


def _check_graph(path: Path, module, example: tuple, input_names: list[str], output_names: list[str]) -> float:
    """onnx.checker + one onnxruntime run against PyTorch; returns the max abs difference."""
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(str(path))  # by path: the external weights file is checked too
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(output_names, {n: t.numpy() for n, t in zip(input_names, example)})
    with torch.no_grad():
        want = module(*example)
    want = want if isinstance(want, tuple) else (want,)
    return max(float(np.abs(g - w.numpy()).max()) for g, w in zip(got, want))


def example_inputs(pipeline: DiffPromptPipeline, batch: int = 2):
    """A small real batch for tracing: random pixels, two synthetic expressions."""
    cfg = pipeline.foundation.config
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=g)
    ids, mask = pipeline.tokenizer(["the small red circle", "the second star from the left"][:batch] * batch)
    return pixels, torch.from_numpy(ids[:batch]).long(), torch.from_numpy(mask[:batch]).long()


def export_pipeline(pipeline: DiffPromptPipeline, out: Path, steps: int | None, name: str,
                    progress: bool = True, precision: str = "fp32",
                    no_match: NoMatchCalibration | None = None, attention: str = DEFAULT_ATTENTION) -> Path:
    """Write one artifact directory; returns its path. precision "fp16": graphs for GPU providers
    (model_export/float16.py). `no_match` (a calibration for this step count) goes into the manifest as it is.
    attention "fused": the foundation's vision attention as onnxruntime's MultiHeadAttention operator,
    "plain": MatMul + Softmax (model_export/fused_attention.py)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    check_attention_mode(attention)
    tmp = staging_dir(out)
    try:
        _write_artifact(tmp, pipeline, steps, name, progress, precision, no_match, attention)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return replace_directory(tmp, out)


def derive_steps(source: Path, pipeline: DiffPromptPipeline, out: Path, steps: int,
                 no_match: NoMatchCalibration | None = None) -> Path:
    """The same Diff-Prompt (or Prompt Diffusion) artifact at another step count, sharing `source`'s files.

    Only the manifest depends on the step count (its schedule table and kept outputs): the graphs,
    weights.bin and tokenizer.json are hard links to `source`'s, so a second step count costs no
    disk bytes (where the file system cannot link, they are copied). The file hashes stay those of
    `source`, so both manifests validate. `no_match` is this step count's calibration (or none).
    """
    manifest = Manifest.from_dict(json.loads((source / MANIFEST_FILE).read_text()))
    if manifest.sampler is None and manifest.prompt_sampler is None:
        raise ValueError(f"{source}: has no sampler; only Diff-Prompt and Prompt Diffusion artifacts have step counts")
    sampler, prompt_sampler = manifest.sampler, manifest.prompt_sampler
    if sampler is not None:
        sched, learner = pipeline.scheduler, pipeline.learner
        sampler = dataclasses.replace(sampler, schedule=tuple(steps_from_table(schedule_table(sched, steps))),
                                      kept_outputs=tuple(kept_outputs(sched, steps, learner.mask_layers)))
    if prompt_sampler is not None:
        prompt_sampler = prompt_sampler_info(pipeline, steps)
    tmp = staging_dir(out)
    try:
        for name in manifest.files:
            try:
                os.link(source / name, tmp / name)
            except OSError:  # another file system, or links not allowed
                shutil.copy2(source / name, tmp / name)
        derived = dataclasses.replace(manifest, ddim_steps=steps, sampler=sampler, prompt_sampler=prompt_sampler,
                                      no_match=no_match,
                                      created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
        (tmp / MANIFEST_FILE).write_text(json.dumps(derived.to_dict(), indent=2))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return replace_directory(tmp, out)


def _write_artifact(tmp: Path, pipeline: DiffPromptPipeline, steps: int | None, name: str,
                    progress: bool, precision: str = "fp32", no_match: NoMatchCalibration | None = None,
                    attention: str = DEFAULT_ATTENTION) -> None:
    """The artifact's files under `tmp`: graphs, tokenizer, manifest."""
    foundation, learner = pipeline.foundation.eval(), pipeline.learner
    pixels, ids, mask = example_inputs(pipeline)
    graphs: dict[str, GraphInfo] = {}
    diffs: dict[str, float] = {}
    jobs = []
    diffprompt = learner is not None and learner.needs_masks

    if diffprompt:
        pd = pipeline.prompt_diffusion.eval() if pipeline.prompt_diffusion is not None else None
        single = pipeline.single_pass  # one foundation pass: grounding continues the encoder's hidden states
        enc = ConditionEncoder(foundation, pipeline.dit.eval(), prompt_conditions=pd is not None, trunk=single)
        with torch.no_grad():
            cond = enc(pixels, ids, mask)
        jobs.append(("condition_encoder", enc, (pixels, ids, mask), ["pixel_values", "input_ids", "attention_mask"],
                     enc.output_names))
        den = Denoiser(pipeline.dit.eval())
        produced = dict(zip(enc.output_names, cond))
        used = [produced[name] for name in den.condition_names]  # the outputs the denoiser reads, in its order
        c = pipeline.dit.config
        latent_shape = (c.latent_channels, c.latent_size, c.latent_size)
        latents = torch.randn(2, *latent_shape, generator=torch.Generator().manual_seed(1))
        jobs.append(("denoiser", den, (latents, torch.tensor([99, 3]), *used),
                     ["latents", "timesteps", *den.condition_names], ["model_output"]))
        builder = PromptBuilder(pipeline.vae.eval(), learner.eval(), pd)
        kept = torch.randn(2, learner.mask_layers, c.latent_channels, c.latent_size, c.latent_size)
        builder_inputs, builder_names = (kept,), ["kept_latents"]
        if pd is not None:  # Prompt Diffusion on the global prompts: its denoiser, and offsets into the builder
            x = torch.randn(2, pd.num_features, generator=torch.Generator().manual_seed(2))
            jobs.append(("prompt_denoiser", PromptDenoiser(pd), (x, torch.tensor([99, 3]),
                                                                 *(produced[n] for n in PROMPT_CONDITIONS)),
                         ["x", "timesteps", *PROMPT_CONDITIONS], ["x0"]))
            builder_inputs, builder_names = (kept, x), ["kept_latents", "prompt_offsets"]
        with torch.no_grad():
            vp, tp, _ = builder(*builder_inputs)
        jobs.append(("prompt_builder", builder, builder_inputs, builder_names,
                     ["vision_prompts", "text_prompts", "mask_logits"]))
        if single:
            jobs.append(("grounding", ContinuedGrounding(foundation, learner.eval()),
                         (*(produced[n] for n in TRUNK_STATES), ids, mask, vp, tp),
                         [*TRUNK_STATES, "input_ids", "attention_mask", "vision_prompts", "text_prompts"],
                         ["logits", "boxes"]))
        else:
            jobs.append(("grounding", Grounding(foundation, learner.eval()), (pixels, ids, mask, vp, tp),
                         ["pixel_values", "input_ids", "attention_mask", "vision_prompts", "text_prompts"],
                         ["logits", "boxes"]))
    elif pipeline.prompt_diffusion is not None:
        model = pipeline.prompt_diffusion.eval()
        enc = PromptConditions(foundation)
        with torch.no_grad():
            cond = enc(pixels, ids, mask)
        jobs.append(("prompt_conditions", enc, (pixels, ids, mask), ["pixel_values", "input_ids", "attention_mask"],
                     enc.output_names))
        x = torch.randn(2, model.num_features, generator=torch.Generator().manual_seed(1))
        jobs.append(("prompt_denoiser", PromptDenoiser(model), (x, torch.tensor([99, 3]), *cond),
                     ["x", "timesteps", *enc.output_names], ["x0"]))
        jobs.append(("grounding", PromptedGrounding(foundation, learner.eval(), model), (pixels, ids, mask, x),
                     ["pixel_values", "input_ids", "attention_mask", "prompt_offsets"], ["logits", "boxes"]))
    else:
        ground = Grounding(foundation, learner.eval() if learner is not None else None)
        jobs.append(("grounding", ground, (pixels, ids, mask), ["pixel_values", "input_ids", "attention_mask"],
                     ["logits", "boxes"]))

    for gname, module, example, inputs, outputs in tqdm(jobs, desc=f"export {name}", disable=not progress):
        path = tmp / f"{gname}.onnx"
        export_onnx(module, example, path, inputs, outputs, attention=attention)
        if precision == "fp16":
            to_float16(path)
        with torch.no_grad():
            result = module(*example)
        result = result if isinstance(result, tuple) else (result,)
        graphs[gname] = GraphInfo(path.name, _io(inputs, example), _io(outputs, result))
    # The foundation's weights are in condition_encoder and grounding: store every tensor once.
    share_weights(tmp, [g.file for g in graphs.values()])
    for gname, module, example, inputs, outputs in jobs:  # check the graphs as they are shipped
        diffs[gname] = _check_graph(tmp / graphs[gname].file, module, example, inputs, outputs)
    pipeline.tokenizer.save(tmp)  # tokenizer.json, whichever files the foundation brought it in

    cfg = foundation.config
    sampler = None
    if diffprompt:
        sched = pipeline.scheduler
        sampler = SamplerInfo(
            conditioning=pipeline.dit.config.conditioning,
            denoiser_conditions=tuple(Denoiser(pipeline.dit).condition_names),
            latent_shape=(c.latent_channels, c.latent_size, c.latent_size),
            mask_size=pipeline.vae.config.sample_size,
            prediction_type=sched.config.prediction_type,
            clip_sample_range=float(sched.config.clip_sample_range) if sched.config.clip_sample else None,
            schedule=tuple(steps_from_table(schedule_table(sched, steps))),
            kept_outputs=tuple(kept_outputs(sched, steps, learner.mask_layers)),
            prompt_depth={"vision": learner.vision_depth, "text": learner.text_depth},
            prompt_length=learner.config.length,
        )
    prompt_sampler = prompt_sampler_info(pipeline, steps) if pipeline.prompt_diffusion is not None else None
    files = {p.name: file_entry(p) for p in sorted(tmp.iterdir())}
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:12]
    manifest = Manifest(
        name=name, model_version=f"{name}-{digest}",
        method=learner.config.method if learner is not None else "foundation",
        image=ImageSpec.from_config(cfg), num_patches=cfg.num_patches,
        tokenizer=TokenizerInfo(TOKENIZER_FILE, cfg.max_text_length),
        ddim_steps=steps if diffprompt or prompt_sampler else 0, graphs=graphs, files=files, sampler=sampler,
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), versions=_versions(),
        export_max_abs_diff=diffs, dtype=PRECISIONS[precision], no_match=no_match,
        pointer_weight=pipeline.pointer_weight if diffprompt else 0.0, prompt_sampler=prompt_sampler,
        attention=attention,
    )
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest.to_dict(), indent=2))
