"""PyTorch eager vs onnxruntime latency, side by side, per stage and end to end.

    python -m benchmarks.export_latency --pipeline checkpoints/diffprompt --steps 25 5 --batch 1 8

Exports the pipeline to a temporary directory (one artifact per step count), then for each
(steps, batch) times the same real inputs (val images and expressions) through both paths,
alternating them request by request so both see the same machine state. Prints p50 / p90 per
stage (condition, sampler, prompt_builder, grounding) and end to end, and the eager / onnxruntime
ratio. Threads: both paths get `--threads` intra-op threads.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

STAGES = ("condition", "sampler", "prompt_builder", "grounding")


def torch_stages(pipeline, pixels, ids, mask, seeds) -> dict[str, float]:
    """One eager request, timed per stage (the stage split of model_export.runtime)."""
    from diffprompt.training.models.diffprompt import dit_conditions
    from diffprompt.training.models.mask_vae import decode_latents
    from diffprompt.training.models.prompt_sampler import sample_prompt_latents

    f, learner = pipeline.foundation, pipeline.learner
    with torch.no_grad():
        t0 = time.perf_counter()
        cond = dit_conditions(f, pipeline.dit, pixels, ids, mask)
        t1 = time.perf_counter()
        kept = sample_prompt_latents(pipeline.dit, pipeline.scheduler, cond, seeds, pipeline.steps, learner.mask_layers)
        t2 = time.perf_counter()
        B, n = kept.shape[:2]
        logits = decode_latents(pipeline.vae, kept.flatten(0, 1))  # (B*n, 1, m, m)
        masks = logits.view(B, n, *logits.shape[1:])
        vision, text = learner.prompts(B, masks)
        t3 = time.perf_counter()
        if pipeline.single_pass:  # the towers continue from the conditions pass's hidden states
            first_v, first_t = learner.config.first_layers
            image = f.continue_image(cond["image_hidden"], first_v, vision)
            query = f.continue_text(cond["text_hidden"], ids, mask, first_t, text).query_embeds[:, None, :]
        else:
            image = f.encode_image(pixels, vision)
            query = f.encode_text(ids, mask, text).query_embeds[:, None, :]
        f.predict(image, query)
        t4 = time.perf_counter()
    return {"condition": t1 - t0, "sampler": t2 - t1, "prompt_builder": t3 - t2, "grounding": t4 - t3}


def percentiles(values: list[float]) -> tuple[float, float]:
    return float(np.percentile(values, 50)), float(np.percentile(values, 90))


def run(args) -> dict:
    from diffprompt.core.providers import ProviderConfig
    from diffprompt.core.runtime import GroundingRuntime
    from diffprompt.model_export.artifact import export_pipeline
    from diffprompt.training.data.grounding_dataset import load_pixels
    from diffprompt.training.data.mdetr import load_mdetr
    from diffprompt.training.models.diffprompt import DiffPromptPipeline

    torch.set_num_threads(args.threads)
    pipeline = DiffPromptPipeline.from_pretrained(args.pipeline)
    samples = list(load_mdetr(Path(args.data_dir) / "val.json"))[: max(args.batch) * 4]
    all_pixels = np.stack([load_pixels(s, pipeline.image_spec) for s in samples])
    all_ids, all_mask = pipeline.tokenizer([s.expression for s in samples])
    report = {"threads": args.threads, "repeats": args.repeats, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        for steps in args.steps:
            art = export_pipeline(pipeline, Path(tmp) / f"a{steps}", steps, "bench", progress=False)
            runtime = GroundingRuntime.load(art, ProviderConfig(preferred=("cpu",), intra_op_threads=args.threads))
            pipeline.steps = steps
            for batch in args.batch:
                timings = {name: {k: [] for k in (*STAGES, "total")} for name in ("torch", "onnxruntime")}
                for r in range(args.warmup + args.repeats):
                    lo = (r * batch) % (len(samples) - batch + 1)
                    px, ids, mk = all_pixels[lo: lo + batch], all_ids[lo: lo + batch], all_mask[lo: lo + batch]
                    seeds = list(range(lo, lo + batch))
                    t = torch_stages(pipeline, torch.from_numpy(px), torch.from_numpy(ids).long(),
                                     torch.from_numpy(mk).long(), seeds)
                    o = runtime.ground(px, ids.astype(np.int64), mk.astype(np.int64), seeds).seconds
                    if r < args.warmup:
                        continue
                    for name, d in (("torch", t), ("onnxruntime", o)):
                        for k in STAGES:
                            timings[name][k].append(d[k])
                        timings[name]["total"].append(sum(d.values()))
                for k in (*STAGES, "total"):
                    tp50, tp90 = percentiles(timings["torch"][k])
                    op50, op90 = percentiles(timings["onnxruntime"][k])
                    report["rows"].append({"steps": steps, "batch": batch, "stage": k, "torch_p50_ms": 1e3 * tp50,
                                           "torch_p90_ms": 1e3 * tp90, "ort_p50_ms": 1e3 * op50,
                                           "ort_p90_ms": 1e3 * op90, "speedup_p50": tp50 / op50})
    return report


def format_table(report: dict) -> str:
    lines = [f"threads {report['threads']}, {report['repeats']} timed requests per row (after warm-up)", "",
             "| DDIM steps | batch | stage | eager p50 ms | eager p90 ms | onnxruntime p50 ms | onnxruntime p90 ms "
             "| eager / onnxruntime (p50) |", "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['steps']} | {r['batch']} | {r['stage']} | {r['torch_p50_ms']:.1f} "
                     f"| {r['torch_p90_ms']:.1f} | {r['ort_p50_ms']:.1f} | {r['ort_p90_ms']:.1f} "
                     f"| {r['speedup_p50']:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", default="checkpoints/diffprompt")
    p.add_argument("--data-dir", default="data/synthetic")
    p.add_argument("--steps", type=int, nargs="+", default=[25, 5])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="also write the rows as JSON")
    args = p.parse_args(argv)
    report = run(args)
    print(format_table(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
