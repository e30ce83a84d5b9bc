"""The `diffprompt` command: one entry point, one subcommand per job.

Each subcommand lives in its own module and is imported only when it runs, so a command
pays only for the libraries it uses (`diffprompt serve` never imports torch).
`diffprompt COMMAND --help` shows the command's own options.

A mistake in what the user gave (a path, a file, a split name, a flag value) ends in one line
`error: <what is wrong>` on stderr and exit status 2, no traceback: argparse reports flags it
can check itself, and every `diffprompt.core.errors.UserError` raised while the command runs
is caught here. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from typing import Any

from diffprompt.core.errors import UserError, one_line

# name -> (module with build_parser() and main(args), one-line description)
P = "diffprompt."
COMMANDS: dict[str, tuple[str, str]] = {
    "data": (P + "training.data.synthetic.cli", "write synthetic splits (MDETR-style json + PNG) or a preview sheet"),
    "pretrain": (P + "training.pretrain_foundation", "stage 0: pretrain the embedded-default foundation"),
    "train-vae": (P + "training.train_mask_vae", "stage 1: train the Mask-VAE on referred-object masks"),
    "train-dit": (P + "training.train_prompt_dit", "stage 2: train the DiT prompt generator on mask latents"),
    "train-prompts": (P + "training.train_prompts", "stage 3 (or a baseline): train prompts on the frozen foundation"),
    "train-prompt-diffusion": (P + "training.train_prompt_diffusion",
                               "Prompt Diffusion on a trained prompt learner: per-query generated prompts"),
    "evaluate": (P + "training.evaluate", "score a checkpoint on a split: R@1 / R@5 / UB per expression kind"),
    "calibrate": (P + "training.calibrate", "fit the no-match calibrator on val, report its precision/recall on test"),
    "export": (P + "model_export.export", "export a pipeline to ONNX artifact directories (fixed DDIM step counts)"),
    "serve": (P + "service.cli", "serve an exported artifact over HTTP (FastAPI + onnxruntime, no torch)"),
    "results": (P + "training.build_results", "rebuild the whole results table from scratch (long)"),
}


def run(command: Callable[[Any], Any], args: Any) -> int:
    """`command(args)` with user mistakes turned into one `error:` line and status 2."""
    try:
        result = command(args)
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="diffprompt",
        description="Diff-Prompt visual grounding: train, evaluate, export and serve.",
        epilog="commands:\n" + "\n".join(f"  {n:<14} {d}" for n, (_, d) in COMMANDS.items())
        + "\n\nRun `diffprompt COMMAND --help` for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND")
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    if not argv:
        parser.print_help()
        return 2
    ns = parser.parse_args(argv[:1])
    module = importlib.import_module(COMMANDS[ns.command][0])
    sub = argparse.ArgumentParser(
        prog=f"diffprompt {ns.command}", description=module.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    args = module.build_parser(sub).parse_args(argv[1:])
    return run(module.main, args)


# -- argparse types for flag values argparse cannot check by itself -------------------------------


def positive_int(text: str) -> int:
    """An int >= 1 (counts, sizes, steps, threads)."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """An int >= 0 (seeds; 0 = off for intervals)."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


if __name__ == "__main__":
    sys.exit(main())
