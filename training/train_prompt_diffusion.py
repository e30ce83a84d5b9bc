"""Prompt Diffusion (arXiv 2410.20164) on a trained prompt learner: per-expression overfitted prompts,
then a diffusion transformer that generates each query's prompts from noise (training/stages/prompt_diffusion.py).

    diffprompt train-prompts --method coop --output runs/coop
    diffprompt train-prompt-diffusion --base runs/coop --output runs/coop_pd     # -> a pipeline directory
    diffprompt evaluate --checkpoint runs/coop_pd --ddim-steps 5                  # 5 DPM-Solver++ steps
"""

from __future__ import annotations

import argparse

from diffprompt.cli import positive_int
from diffprompt.training.options import add_data_args, add_run_args

SOLVERS = ("dpm", "ddim")  # = models.prompt_diffusion.SOLVERS (the parser stays torch-free)


def main(args: argparse.Namespace) -> dict:
    from diffprompt.training.stages import prompt_diffusion

    args.output = args.output or f"{args.base.rstrip('/')}_prompt_diffusion"
    return prompt_diffusion.main(args)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(p)
    p.add_argument("--base", required=True,
                   help="a train-prompts pipeline directory (coop, vpt, maple, or diffprompt: its global prompts)")
    add_run_args(p, output="<base>_prompt_diffusion")
    p.add_argument("--overfit-steps", type=positive_int, default=5,
                   help="Adam steps that overfit the base prompts to each train expression alone")
    p.add_argument("--overfit-lr", type=float, default=1e-2, help="their learning rate")
    p.add_argument("--train-steps", type=positive_int, default=2000, help="steps of the prompt-space DiT")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--hidden-size", type=positive_int, default=128)
    p.add_argument("--depth", type=positive_int, default=3, help="DiT blocks")
    p.add_argument("--num-heads", type=positive_int, default=4)
    p.add_argument("--solver", default="dpm", choices=SOLVERS, help="how prompts are sampled: DPM-Solver++ or DDIM")
    p.add_argument("--steps", type=positive_int, default=5,
                   help="solver steps for the val check (Diff-Prompt: also the DDIM steps of the masks its "
                        "global prompts are overfitted with)")
    p.add_argument("--frozen-batch-size", type=positive_int, default=64,
                   help="expressions per pass of the frozen models (conditions, overfitting, validation)")
    p.add_argument("--log-every", type=positive_int, default=200)
    return p


if __name__ == "__main__":
    main(build_parser().parse_args())
