"""Turn trained checkpoints into deployable artifact directories (ONNX + manifest.json).

    diffprompt export --pipeline checkpoints/diffprompt --steps 25 5 --out artifacts
    # -> artifacts/diffprompt-25steps/, artifacts/diffprompt-5steps/
    diffprompt export ... --triton triton_repo   # + triton_repo/diffprompt-25steps/ (Triton model repository)
    diffprompt export ... --attention plain      # standard ONNX attention (default fused: onnxruntime's operator)

Each directory is one deployable model with one fixed DDIM step count (the directories of one
command share their graph files as hard links: only manifest.json differs): the four graphs of
model_export/graphs.py (`foundation-only` and baseline pipelines have just `grounding.onnx`),
their weights stored once in `weights.bin` (model_export/shared_weights.py: the foundation runs
in two graphs but is stored once), `tokenizer.json`, and `manifest.json`
(diffprompt/core/manifest.py says what is in it). A no-match calibration fitted for the step count
(`no_match-{steps}steps.json` in the pipeline directory, written by `diffprompt calibrate`) is
copied into the manifest (`no_match`).
Every graph is checked with `onnx.checker` and run once in onnxruntime against PyTorch before
the manifest is written; the directory appears atomically (written to a staging sibling,
then swapped in: diffprompt.core.files). The writing itself: model_export/artifact.py.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from diffprompt.cli import positive_int


def main(args: argparse.Namespace) -> int:
    import torch

    from diffprompt.core.manifest import MANIFEST_FILE
    from diffprompt.core.no_match import calibration_file, read_calibration
    from diffprompt.model_export.artifact import derive_steps, export_pipeline
    from diffprompt.training.models.diffprompt import PIPELINE_FILE, DiffPromptPipeline, weights_fingerprint
    from diffprompt.training.models.pretrained import CONFIG_NAME, CheckpointError

    torch.set_num_threads(args.threads)
    src = Path(args.pipeline)
    if (src / PIPELINE_FILE).exists():
        pipeline = DiffPromptPipeline.from_pretrained(src)
    elif (src / CONFIG_NAME).exists():  # a bare foundation (its tokenizer: diffprompt.core.tokenizer)
        pipeline = DiffPromptPipeline.foundation_only(src)
    else:
        raise CheckpointError(f"{src}: neither a pipeline directory ({PIPELINE_FILE}) nor a foundation "
                              f"({CONFIG_NAME})" + ("" if src.is_dir() else ": no such directory"))
    name = args.name or src.name
    out_root = Path(args.out)
    sampled = (pipeline.learner is not None and pipeline.learner.needs_masks) or pipeline.prompt_diffusion is not None
    first = None
    for steps in (args.steps if sampled else [None]):
        out = out_root / (f"{name}-{steps}steps" if steps else name)
        no_match = read_calibration(src, steps)
        if no_match is not None and no_match.fingerprint != weights_fingerprint(src):
            raise CheckpointError(f"{src / calibration_file(steps)}: fitted on other weights than {src} holds now; "
                                  f"refit it: diffprompt calibrate --checkpoint {src}"
                                  + (f" --ddim-steps {steps}" if steps else "") + " --overwrite")
        if first is None:
            first = export_pipeline(pipeline, out, steps, name, progress=args.progress, precision=args.precision,
                                    no_match=no_match, attention=args.attention)
        else:  # the graphs do not depend on the step count: share the first artifact's files
            derive_steps(first, pipeline, out, steps, no_match=no_match)
        manifest = json.loads((out / MANIFEST_FILE).read_text())
        worst = max(manifest["export_max_abs_diff"].values())
        print(f"wrote {out} ({manifest['model_version']}, {len(manifest['graphs'])} graphs, "
              f"max |onnxruntime - torch| {worst:.2e}; no-match calibration: "
              f"{calibration_file(steps) if no_match else 'none, fit one with `diffprompt calibrate`'})")
        if args.triton:
            from diffprompt.model_export.triton import write_triton_repository

            repo = write_triton_repository(out, Path(args.triton) / out.name, overwrite=True,
                                           instance_kind="KIND_CPU" if args.triton_cpu else "KIND_GPU")
            print(f"wrote Triton model repository {repo}")
    return 0


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", default="checkpoints/diffprompt",
                   help="a train-prompts pipeline directory, or a foundation directory")
    p.add_argument("--steps", type=positive_int, nargs="+", default=[25, 5], help="one artifact per DDIM step count")
    p.add_argument("--out", default="artifacts")
    p.add_argument("--name", default=None, help="artifact name (default: the pipeline directory's name)")
    p.add_argument("--triton", default=None, metavar="REPO",
                   help="also write a Triton model repository per artifact under REPO (deploy/triton/README.md)")
    p.add_argument("--triton-cpu", action="store_true", help="Triton instances on CPU instead of GPU")
    p.add_argument("--precision", choices=["fp32", "fp16"], default="fp32",
                   help="fp16: float16 weights and compute (float32 inputs / outputs), for CUDA / TensorRT only")
    # the modes and default of model_export/fused_attention.py (which imports torch: --help must not)
    p.add_argument("--attention", choices=["fused", "plain"], default="fused",
                   help="fused: the foundation's vision attention and the prompt DiT's attentions as onnxruntime's "
                        "com.microsoft::MultiHeadAttention (CPU: ~1/10 of the peak memory at OWL size, fewer nodes "
                        "per DDIM step; model_export/fused_attention.py); plain: standard ONNX "
                        "operators only, for runtimes other than onnxruntime")
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


if __name__ == "__main__":
    raise SystemExit(main(build_parser().parse_args()))
