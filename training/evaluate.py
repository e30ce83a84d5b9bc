"""Score a grounding checkpoint on a split: R@1 / R@5 / UB per expression kind.

    diffprompt evaluate --checkpoint checkpoints/foundation --split val testA testB
    diffprompt evaluate --checkpoint checkpoints/diffprompt --ddim-steps 5 --split val testA testB
    diffprompt evaluate --checkpoint checkpoints/foundation --split shift_background shift_size shift_crowded
    diffprompt evaluate --checkpoint checkpoints/foundation --json path/to/finetune_refcoco_val.json
    diffprompt evaluate --checkpoint /models/owlv2-base --json ... --criterion giou
    diffprompt evaluate --artifact artifacts/diffprompt-5steps --split val      # onnxruntime

`--split` names synthetic splits under `--data-dir` (written there first if missing);
`--json` takes any MDETR-style file. IoU >= 0.5 is the default criterion; `giou` is the
official MDETR evaluator's. `--out` also writes the tables as JSON.

`--checkpoint` is a foundation directory (config.json + model.safetensors + tokenizer.json)
or a pipeline directory written by `diffprompt train-prompts` (it has pipeline.json): then
the prompts, and for Diff-Prompt the DDIM sampler with `--ddim-steps` and noise seeded from
`--seed` by `--seed-policy`: `service` (the default, the product's policy) seeds every expression
with the raw seed, as `POST /v1/ground` does with a request's `seed` (default 0); `expression`
seeds each expression with (seed, sample id), independent noise per expression.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from diffprompt.cli import non_negative_int, positive_int
from diffprompt.core.errors import UserError
from diffprompt.core.providers import PROVIDER_NAMES
from diffprompt.training.data.synthetic.splits import SPLITS
from diffprompt.training.options import SEED_POLICIES, add_image_root_arg


def main(args: argparse.Namespace) -> int:
    import torch

    from diffprompt.training.data.mdetr import load_split
    from diffprompt.training.evaluation.rec import evaluate_samples
    from diffprompt.training.models.diffprompt import PIPELINE_FILE, DiffPromptPipeline, load_foundation

    torch.set_num_threads(args.threads)
    if args.artifact:
        from diffprompt.core.providers import ProviderConfig
        from diffprompt.core.runtime import GroundingRuntime

        model = GroundingRuntime.load(args.artifact, ProviderConfig(preferred=tuple(args.providers)))
        tokenizer = model.tokenizer
        args.ddim_steps = model.steps
    elif args.checkpoint is None:
        raise UserError("give --checkpoint (PyTorch) or --artifact (onnxruntime)")
    elif (Path(args.checkpoint) / PIPELINE_FILE).exists():
        model = DiffPromptPipeline.from_pretrained(args.checkpoint, steps=args.ddim_steps,
                                                   prompt_diffusion=args.prompt_diffusion, solver=args.solver)
        tokenizer = model.tokenizer
    else:
        model, tokenizer = load_foundation(args.checkpoint)
    datasets: list[tuple[str, Path]] = [(Path(j).stem, Path(j)) for j in args.json]
    if args.split:
        from diffprompt.training.data.synthetic.writer import ensure_split

        for name in args.split:
            if SPLITS[name].absent:
                raise UserError(f"split {name} holds expressions whose object is absent (nothing to recall): "
                                "score it with `diffprompt calibrate`")
            datasets.append((name, ensure_split(Path(args.data_dir), name, progress=args.progress)))
    if not datasets:
        raise UserError("nothing to evaluate: give --split and/or --json")
    report = {}
    for name, path in datasets:
        samples = load_split(path, args.image_root, args.limit)
        acc = evaluate_samples(model, tokenizer, samples, criterion=args.criterion, batch_size=args.batch_size,
                               progress=args.progress, seed=args.seed, seed_policy=args.seed_policy)
        print(f"\n{name} ({path}, {len(samples)} expressions, {args.criterion.upper()} >= 0.5)")
        print(acc.format_table())
        report[name] = [row.as_dict() for row in acc.summary()]
    if args.out:
        Path(args.out).write_text(json.dumps({"checkpoint": str(args.checkpoint or args.artifact),
                                              "criterion": args.criterion,
                                              "ddim_steps": args.ddim_steps, "seed": args.seed,
                                              "seed_policy": args.seed_policy,
                                              "results": report}, indent=2))
    return 0


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="a foundation directory or a train-prompts pipeline directory")
    p.add_argument("--artifact", default=None, help="an exported artifact directory, run with onnxruntime instead")
    p.add_argument("--providers", nargs="+", default=["cpu"], choices=list(PROVIDER_NAMES), metavar="PROVIDER",
                   help=f"onnxruntime providers in order (--artifact), of {list(PROVIDER_NAMES)}")
    p.add_argument("--split", nargs="*", default=[], choices=list(SPLITS), metavar="SPLIT",
                   help=f"synthetic split names, of {list(SPLITS)}")
    p.add_argument("--json", nargs="*", default=[], help="MDETR-style json files")
    p.add_argument("--data-dir", default="data/synthetic")
    add_image_root_arg(p)
    p.add_argument("--batch-size", type=positive_int, default=64,
                   help="expressions per forward pass (lower it for big models)")
    p.add_argument("--criterion", default="iou", choices=["iou", "giou"])
    p.add_argument("--ddim-steps", type=positive_int, default=25,
                   help="sampling steps (Diff-Prompt's DDIM, Prompt Diffusion's solver)")
    p.add_argument("--no-prompt-diffusion", dest="prompt_diffusion", action="store_false",
                   help="a Prompt Diffusion pipeline: score its base learner alone (the learned prompts)")
    p.add_argument("--solver", default=None, choices=["dpm", "ddim"],
                   help="a Prompt Diffusion pipeline: sample its prompts with this solver (default: its own)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="Diff-Prompt noise seed")
    p.add_argument("--seed-policy", choices=list(SEED_POLICIES), default="service",
                   help="service: every expression gets --seed, as the service does (default); "
                        "expression: (seed, sample id) per expression")
    p.add_argument("--limit", type=positive_int, default=None, help="evaluate the first N expressions only")
    p.add_argument("--out", default=None, help="also write the tables as JSON here")
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


if __name__ == "__main__":
    raise SystemExit(main(build_parser().parse_args()))
