"""The `diffprompt` command: one entry point, one subcommand per job.

Each subcommand lives in its own module and is imported only when it runs, so a command
pays only for the libraries it uses. `diffprompt COMMAND --help` shows the command's own
options. The service has its own entry point (`python -m diffprompt.service`), which never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module with build_parser() and main(args), one-line description)
P = "diffprompt."
COMMANDS: dict[str, tuple[str, str]] = {
    "data": (P + "training.data.synthetic.cli", "write synthetic splits (MDETR-style json + PNG) or a preview sheet"),
    "pretrain": (P + "training.pretrain_foundation", "stage 0: pretrain the embedded-default foundation"),
    "train-vae": (P + "training.train_mask_vae", "stage 1: train the Mask-VAE on referred-object masks"),
    "train-dit": (P + "training.train_prompt_dit", "stage 2: train the DiT prompt generator on mask latents"),
    "train-prompts": (P + "training.train_prompts", "stage 3 (or a baseline): train prompts on the frozen foundation"),
    "evaluate": (P + "training.evaluate", "score a checkpoint on a split: R@1 / R@5 / UB per expression kind"),
    "export": (P + "model_export.export", "export a pipeline to ONNX artifact directories (fixed DDIM step counts)"),
    "results": (P + "training.build_results", "rebuild the whole results table from scratch (long)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="diffprompt",
        description="Diff-Prompt visual grounding: train, evaluate, export and serve.",
        epilog="commands:\n" + "\n".join(f"  {n:<14} {d}" for n, (_, d) in COMMANDS.items())
        + "\n\nRun `diffprompt COMMAND --help` for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND")
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
    result = module.main(args)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
