"""What Diff-Prompt costs over the foundation it steers: pipeline / foundation alone, side by side, one command.

    python -m benchmarks.pipeline_cost --work /tmp/pipeline_cost                 # embedded default + OWL-ViT B/32
    python -m benchmarks.pipeline_cost --work /tmp/pc --models embedded --repeats 50

For each model it exports, into --work, the foundation alone (the `diffprompt export --pipeline
<foundation>` artifact: one grounding graph) and the Diff-Prompt pipeline at each of --steps, loads
every artifact as the service does (`GroundingRuntime`, onnxruntime CPU, `--threads` intra-op
threads, default 1), then times batch-1 requests round robin over the artifacts (foundation, pipeline
at 5 steps, pipeline at 25 steps, foundation, ...) so all see the same machine state. Each request
is one val image and expression (the same sequence for every artifact), timed around
`runtime.ground` (wall clock, numpy glue included). Prints, per model and step count, the p50 of
both, their ratio and the pipeline's p50 per stage (condition, sampler, prompt_builder, grounding).

`--attention fused plain` also times the pipeline exported with standard ONNX attention in the same
rounds (what the fused operator buys). Models: `embedded` = the committed `checkpoints/diffprompt`
(or --pipeline); `owlvit` = a random OWL-ViT B/32 at 768 px (benchmarks/owl_scale.py, full depth
unless --owl-layers; random weights: cost, not accuracy). Modes (`--modes`): `two-pass`, the paper's
pipeline (the foundation runs unprompted for the DiT's conditions, then prompted), and `single-pass`
(the DiT reads its conditions after the towers' first layers, `--single-pass-layers`, default half of
each, and the prompted pass continues from there: one foundation pass per query). The single-pass
row is a variant of the same shapes built from the two-pass pipeline (`single_pass_variant`: the DiT's
weights, a fresh learner), so it measures cost, not accuracy.
The service's own overhead for the same request is benchmarks/service_overhead.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np

STAGES = ("condition", "sampler", "prompt_builder", "grounding")


def export_pair(pipelines: dict[str, Path], work: Path, steps: list[int], threads: int,
                attentions: tuple[str, ...] = ("fused",)) -> dict:
    """{"foundation": runtime, (mode, attention, steps): runtime, ...}: each mode's pipeline directory
    exported with each of `attentions` at each step count (exports reused if present), and the first
    pipeline's foundation alone (fused attention)."""
    from diffprompt.core.providers import ProviderConfig
    from diffprompt.core.runtime import GroundingRuntime
    from diffprompt.model_export.artifact import export_pipeline
    from diffprompt.training.models.diffprompt import DiffPromptPipeline

    first = next(iter(pipelines.values()))
    foundation_dir = Path(first) / json.loads((Path(first) / "pipeline.json").read_text())["foundation"]
    config = ProviderConfig(preferred=("cpu",), intra_op_threads=threads)
    runtimes = {}
    targets = [("foundation", DiffPromptPipeline.foundation_only(foundation_dir), None, "fused", work / "foundation")]
    for mode, directory in pipelines.items():
        pipeline = DiffPromptPipeline.from_pretrained(directory)
        # the two-pass default keeps the old folder names; others are named by their source, so that an
        # export of another pipeline is never reused for this one
        source = hashlib.sha1(str(Path(directory).resolve()).encode()).hexdigest()[:8]
        prefix = "pipeline" if mode == "two-pass" else f"{mode}-{source}"
        targets += [((mode, a, s), pipeline, s, a, work / f"{prefix}-{s}steps{'' if a == 'fused' else '-' + a}")
                    for a in attentions for s in steps]
    for key, model, s, attention, out in targets:
        if not (out / "manifest.json").exists():
            t0 = time.time()
            export_pipeline(model, out, s, f"bench-{s}", progress=False, attention=attention)
            print(f"  exported {out} ({time.time() - t0:.0f} s)", flush=True)
        runtimes[key] = GroundingRuntime.load(out, config)
    return runtimes


def single_pass_variant(pipeline_dir: Path, out: Path, layers: tuple[int, int]) -> Path:
    """A single-pass pipeline of the same shapes as `pipeline_dir`'s: its DiT reading its conditions after
    `layers` (vision, text) layers (weights kept; only where they are read changes) and a fresh Diff-Prompt
    learner whose prompts enter there (random weights: its prompt tensors have fewer layers). For cost, not
    accuracy. Written once under `out`; returns the pipeline directory."""
    import dataclasses

    from diffprompt.training.models.diffprompt import SCHEDULER_FILE, DiffPromptPipeline, write_pipeline_file
    from diffprompt.training.models.prompt_learners import PromptLearner

    target = out / "diffprompt"
    if (target / "pipeline.json").exists():
        return target
    spec = json.loads((Path(pipeline_dir) / "pipeline.json").read_text())
    pipeline = DiffPromptPipeline.from_pretrained(pipeline_dir)
    dit = type(pipeline.dit)(dataclasses.replace(pipeline.dit.config, condition_layers=list(layers)))
    dit.load_state_dict(pipeline.dit.state_dict())
    dit.save_pretrained(out / "dit")
    (out / "dit" / SCHEDULER_FILE).write_text((Path(pipeline_dir) / spec["prompt_dit"] / SCHEDULER_FILE).read_text())
    c = pipeline.learner.config
    learner = PromptLearner.for_foundation(pipeline.foundation, "diffprompt", depth=c.depth, length=c.length,
                                           mask_size=c.mask_size, mask_input=c.mask_input, first_layers=list(layers))
    learner.save_pretrained(target)
    write_pipeline_file(target, (Path(pipeline_dir) / spec["foundation"]).resolve(),
                        (Path(pipeline_dir) / spec["mask_vae"]).resolve(), out / "dit")
    return target


def time_round_robin(runtimes: dict, requests: list[tuple], warmup: int, repeats: int) -> dict:
    """key -> {"total": [s], stage: [s]} over `repeats` rounds (after `warmup`), one request per artifact per round."""
    times = {k: {"total": [], **{s: [] for s in STAGES}} for k in runtimes}
    for r in range(warmup + repeats):
        pixels, ids, mask = requests[r % len(requests)]
        for key, runtime in runtimes.items():
            t0 = time.perf_counter()
            result = runtime.ground(pixels, ids, mask, [r])
            elapsed = time.perf_counter() - t0
            if r < warmup:
                continue
            times[key]["total"].append(elapsed)
            for stage, seconds in result.seconds.items():
                times[key][stage].append(seconds)
    return times


def requests_for(runtime, data_dir: Path, n: int) -> list[tuple]:
    """n batch-1 (pixels, input_ids, attention_mask) from the val split, preprocessed for `runtime`."""
    from diffprompt.training.data.grounding_dataset import load_pixels
    from diffprompt.training.data.mdetr import load_split

    out = []
    for sample in load_split(data_dir / "val.json")[:n]:
        pixels = load_pixels(sample, runtime.image_spec)[None]
        ids, mask = runtime.tokenizer([sample.expression])
        out.append((pixels, ids.astype(np.int64), mask.astype(np.int64)))
    return out


def measure(name: str, pipeline_dir: Path, work: Path, repeats: int, args) -> list[dict]:
    """One model's rows: `repeats` timed rounds over its foundation-alone and pipeline artifacts, every mode."""
    print(f"{name}: exporting and loading", flush=True)
    pipelines = {}
    for mode in args.modes:
        if mode == "two-pass":
            pipelines[mode] = pipeline_dir
        elif name == "embedded" and args.single_pass_pipeline:  # a trained one (its own DiT and learner)
            from diffprompt.training.models.diffprompt import DiffPromptPipeline

            if not DiffPromptPipeline.from_pretrained(args.single_pass_pipeline).single_pass:
                raise SystemExit(f"--single-pass-pipeline {args.single_pass_pipeline}: not a single-pass pipeline "
                                 "(its DiT reads no --condition-layers, or its learner's prompts enter elsewhere)")
            pipelines[mode] = args.single_pass_pipeline
        else:
            layers = args.single_pass_layers or default_split(pipeline_dir)
            pipelines[mode] = single_pass_variant(pipeline_dir, work / name / "single-pass-model", layers)
    runtimes = export_pair(pipelines, work / name, args.steps, args.threads, tuple(args.attention))
    requests = requests_for(runtimes["foundation"], Path(args.data_dir), 8)
    times = time_round_robin(runtimes, requests, args.warmup, repeats)
    base = float(np.median(times["foundation"]["total"]))
    rows = []
    for mode, attention, s in ((m, a, s) for m in args.modes for a in args.attention for s in args.steps):
        t = times[(mode, attention, s)]
        rows.append({"model": name, "mode": mode, "attention": attention, "steps": s, "rounds": repeats,
                     "foundation_p50_ms": 1e3 * base,
                     "pipeline_p50_ms": 1e3 * float(np.median(t["total"])),
                     "ratio": float(np.median(t["total"])) / base,
                     **{f"{stage}_p50_ms": 1e3 * float(np.median(t[stage])) for stage in STAGES if t[stage]}})
    return rows


def default_split(pipeline_dir: Path) -> tuple[int, int]:
    """Half of each tower (rounded down) below the prompts: the embedded default's 6 / 3 layers -> 3 / 1."""
    cfg = json.loads((Path(pipeline_dir) / "config.json").read_text())
    return cfg["vision_layers"] // 2, cfg["text_layers"] // 2


def format_table(rows: list[dict], args) -> str:
    lines = [f"batch 1, {args.threads} intra-op thread(s), timed rounds (per model) after {args.warmup} warm-up, "
             "artifacts round robin", "",
             "| model | mode | attention | DDIM steps | foundation alone p50 ms | pipeline p50 ms "
             "| pipeline / foundation | condition | sampler | prompt builder | grounding | rounds |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        stages = " | ".join(f"{r.get(f'{s}_p50_ms', float('nan')):.1f}" for s in STAGES)
        lines.append(f"| {r['model']} | {r['mode']} | {r['attention']} | {r['steps']} | {r['foundation_p50_ms']:.1f} | "
                     f"{r['pipeline_p50_ms']:.1f} | **{r['ratio']:.2f}x** | {stages} | {r['rounds']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="artifacts and the random OWL model go here (reused)")
    p.add_argument("--models", nargs="+", default=["embedded", "owlvit"], choices=["embedded", "owlvit"])
    p.add_argument("--pipeline", type=Path, default=Path("checkpoints/diffprompt"), help="the embedded pipeline")
    p.add_argument("--owl-layers", type=int, default=None, help="layers per OWL tower (default: the base model's 12)")
    p.add_argument("--data-dir", default="data/synthetic")
    p.add_argument("--steps", type=int, nargs="+", default=[5, 25])
    p.add_argument("--attention", nargs="+", default=["fused"], choices=["fused", "plain"],
                   help="export the pipeline with each (diffprompt export --attention), timed in the same rounds")
    p.add_argument("--modes", nargs="+", default=["two-pass", "single-pass"], choices=["two-pass", "single-pass"],
                   help="two-pass: the paper's (unprompted pass for the conditions, then the prompted pass); "
                        "single-pass: the conditions read inside the one pass (a variant of the same shapes)")
    p.add_argument("--single-pass-layers", type=int, nargs=2, default=None, metavar=("VISION", "TEXT"),
                   help="single-pass split: layers below the prompts (default: half of each tower)")
    p.add_argument("--single-pass-pipeline", type=Path, default=None,
                   help="embedded: a trained single-pass pipeline (train-dit --condition-layers, then train-prompts) "
                        "to time as the single-pass mode instead of the variant built from --pipeline")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--owl-repeats", type=int, default=5, help="timed rounds for the OWL model (seconds each)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="also write the rows as JSON")
    args = p.parse_args(argv)
    rows = []
    for name in args.models:
        if name == "embedded":
            rows += measure(name, args.pipeline, args.work, args.repeats, args)
        else:
            from benchmarks.owl_scale import build_random_owl_pipeline

            owl = args.work / "owlvit-model"
            if not (owl / "diffprompt" / "pipeline.json").exists():
                build_random_owl_pipeline(owl, "owlvit", args.owl_layers)
            rows += measure("owlvit-b32-768", owl / "diffprompt", args.work, args.owl_repeats, args)
    print(format_table(rows, args))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
