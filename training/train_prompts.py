"""Stage 3 (and the baselines): train prompts on top of the frozen foundation for REC.

`--method diffprompt` trains Diff-Prompt's adapters and global prompts; the other methods are
the baselines at equal budget (same data, epochs, optimizer, loss): vpt, coop, maple,
clip_adapter, linear_probe (one registered class each: training/models/prompt_learners.py).
Everything else is frozen; the loss is the foundation's own grounding loss (training/losses.py).

Diff-Prompt's masks: the frozen DiT samples each training expression's prompt latents once,
with the expression's own noise seed, and the frozen VAE decodes them. That is exactly what
sampling on the fly with a per-expression seed gives, without repeating 25 DiT passes per
epoch.

    diffprompt train-prompts --method diffprompt --prompt-dit checkpoints/prompt_dit_tokens   # -> runs/diffprompt
    diffprompt train-prompts --method vpt                                                      # -> runs/vpt
    torchrun --nproc_per_node 2 -m diffprompt.training.train_prompts --method coop --output runs/coop_ddp
    diffprompt train-prompts --method vpt --resume runs/007-vpt/checkpoint-last     # after an interruption
"""

from __future__ import annotations

import argparse

from diffprompt.cli import positive_int
from diffprompt.training.options import add_data_args, add_precision_arg, add_run_args
from diffprompt.training.utils.resume import add_resume_args

# = models.prompt_learners.METHODS and MASK_INPUTS (tests/training/test_cli): the parser stays torch-free
METHODS = ("diffprompt", "vpt", "coop", "maple", "clip_adapter", "linear_probe")
MASK_INPUTS = ("standardize", "tanh")


def main(args: argparse.Namespace) -> dict:
    from diffprompt.training.stages import prompts

    args.output = args.output or f"runs/{args.method}"
    summary = prompts.main(args)
    if not args.prompt_diffusion:
        return summary
    # Prompt Diffusion on the learner just trained, into the same --output (the base learner stays in it:
    # `evaluate --no-prompt-diffusion` scores it alone)
    from diffprompt.training import train_prompt_diffusion

    pd_args = train_prompt_diffusion.build_parser().parse_args(["--base", args.output])
    for name in SHARED_WITH_PROMPT_DIFFUSION:
        setattr(pd_args, name, getattr(args, name))
    pd_args.overwrite = True
    if args.prompt_diffusion_steps:
        pd_args.train_steps = args.prompt_diffusion_steps
    return {**summary, "prompt_diffusion": train_prompt_diffusion.main(pd_args)}


# options train-prompts hands on to the Prompt Diffusion stage (--prompt-diffusion)
SHARED_WITH_PROMPT_DIFFUSION = ("output", "data_dir", "train_json", "val_json", "image_root", "val_limit", "workers",
                                "cache_dir", "run_root", "seed", "threads", "device", "progress")


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(p)
    p.add_argument("--method", default="diffprompt", choices=METHODS)
    p.add_argument("--foundation", default="checkpoints/foundation")
    p.add_argument("--mask-vae", default="checkpoints/mask_vae", help="Diff-Prompt only")
    p.add_argument("--prompt-dit", default="checkpoints/prompt_dit_tokens", help="Diff-Prompt only")
    p.add_argument("--ddim-steps", type=int, default=25, help="DDIM steps of the training masks (Diff-Prompt)")
    p.add_argument("--mask-cache", default=None,
                   help="keep the sampled training masks here and reuse them (same DiT, VAE, seed, steps, data; "
                        "default: --cache-dir)")
    p.add_argument("--mask-input", default="standardize", choices=MASK_INPUTS,
                   help="how Diff-Prompt's adapters read a decoded mask: standardised per mask, or tanh of its logits")
    p.add_argument("--depth", type=int, default=9, help="prompted layers from the input (capped per tower)")
    p.add_argument("--length", type=int, default=8, help="prompt tokens per layer")
    p.add_argument("--prompt-diffusion", action="store_true",
                   help="then Prompt Diffusion on the trained prompts (coop, vpt, maple; diffprompt: its global "
                        "prompts), with the defaults of `diffprompt train-prompt-diffusion`, into the same --output")
    p.add_argument("--prompt-diffusion-steps", type=positive_int, default=None,
                   help="--prompt-diffusion: its DiT's training steps (default: train-prompt-diffusion's)")
    add_run_args(p, output="runs/<method>")
    add_resume_args(p, save_every=100)
    p.add_argument("--epochs", type=int, default=2,
                   help="passes over the train split (paper: 5 over RefCOCO; ours: 2 over 8000 synthetic expressions)")
    p.add_argument("--batch-size", type=int, default=32, help="expressions per optimizer step and process")
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help="expressions per forward/backward pass: gradients of the batch's micro-batches accumulate "
                        "into one optimizer step, the same as the whole batch at once (default: --batch-size)")
    p.add_argument("--pixel-cache", default="auto", choices=["auto", "on", "off"],
                   help="decode the train images once into float16 rows under --cache-dir and read each batch "
                        "from there (auto: when those take at most 4 GB, e.g. the 128 px synthetic split); "
                        "off: decode each batch's images as it comes")
    p.add_argument("--frozen-batch-size", type=int, default=None,
                   help="expressions per pass of the frozen models when sampling masks and validating "
                        "(default: 128 and 64; lower it for big foundations)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute the frozen towers' layer activations in backward: memory of one layer at a time")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--rank-weight", type=float, default=1.0, help="weight of the patch ranking term of the loss")
    p.add_argument("--eval-every", type=int, default=1, help="epochs between val R@1 checks (0 = never)")
    add_precision_arg(p, fp16=True)
    return p


if __name__ == "__main__":
    main(build_parser().parse_args())
