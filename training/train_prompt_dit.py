"""Stage 2: train the prompt generator (DiT) to denoise Mask-VAE latents of referred objects.

Conditions come from the frozen foundation run without prompts (pooled embeddings; with
`--conditioning tokens` also its image and text tokens); they and the target latents are
computed once, then the DiT trains from memory with an MSE loss (official: epsilon, T = 100,
AdamW lr 1e-4, EMA 0.9999; our short CPU schedule uses lr 1e-3 and EMA 0.999 with warm-up).
The checkpoint holds the EMA weights (used for sampling) and the one noise schedule
(`scheduler_config.json`). Validation samples val masks with DDIM and reports the IoU of the
final decoded mask with the target; the checkpoint keeps the EMA weights of the best validation.

Deviations from the paper, measured here: the DiT predicts x0 (`--prediction-type sample`)
instead of epsilon, and DDIM clips its x0 estimate to [-3, 3]. With T = 100 the first sampling
step starts at alpha_bar ~ 2e-7, where an epsilon model's x0 estimate is its error times ~2000
(x0 MSE 8400 at t = 99 after 1000 steps), and the epsilon loss barely weighs the high-noise
steps that decide *where* the mask goes; x0 prediction weighs them fully.

    diffprompt train-dit --conditioning tokens             # -> runs/prompt_dit_tokens
    torchrun --nproc_per_node 2 -m diffprompt.training.train_prompt_dit --conditioning pooled --output ...
    diffprompt train-dit --resume runs/003-prompt_dit_tokens/checkpoint-last --overwrite   # after an interruption
"""

from __future__ import annotations

import argparse

from diffprompt.training.options import add_data_args, add_precision_arg, add_run_args
from diffprompt.training.utils.resume import add_resume_args

PRESETS = ("baby", "embedded", "small", "official")  # = models.prompt_dit.PROMPT_DIT_PRESETS (tests/training/test_cli)


def main(args: argparse.Namespace) -> dict:
    from diffprompt.training.stages import prompt_dit

    args.output = args.output or f"runs/prompt_dit_{args.conditioning}"
    return prompt_dit.main(args)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(p)
    p.add_argument("--foundation", default="checkpoints/foundation")
    p.add_argument("--mask-vae", default="checkpoints/mask_vae")
    p.add_argument("--conditioning", default="tokens", choices=["pooled", "tokens"],
                   help="pooled: the paper's adaLN-Zero on pooled embeddings; tokens: + cross-attention")
    p.add_argument("--preset", default="embedded", choices=PRESETS)
    p.add_argument("--context-layers", type=int, default=3,
                   help="tokens conditioning: transformer layers over the joint condition tokens, with a "
                        "pointer head trained to find the referred patch (0 = off, the cross-attention-only DiT)")
    p.add_argument("--condition-layers", type=int, nargs=2, default=None, metavar=("VISION", "TEXT"),
                   help="single-pass mode: read the conditions after this many layers of each tower; the prompts "
                        "then enter there and the layers below run once per query (default: after the last "
                        "layers, then a second, prompted pass: the paper's two passes)")
    p.add_argument("--pointer-loss-weight", type=float, default=1.0,
                   help="weight of the pointer head's cross-entropy next to the denoising MSE")
    add_run_args(p, output="runs/prompt_dit_<conditioning>")
    add_resume_args(p, save_every=500)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--train-timesteps", type=int, default=100, help="T of the noise schedule")
    p.add_argument("--prediction-type", default="sample", choices=["epsilon", "v_prediction", "sample"],
                   help="what the DiT predicts (the paper: epsilon)")
    p.add_argument("--clip-sample", type=float, default=3.0,
                   help="DDIM clips its x0 estimate to [-r, r] (latents have unit std); 0 = off")
    p.add_argument("--eval-every", type=int, default=1000, help="steps between val mask IoU checks (best kept)")
    p.add_argument("--eval-steps", type=int, nargs="+", default=[25, 5], help="DDIM step counts to validate")
    p.add_argument("--log-every", type=int, default=100)
    add_precision_arg(p)
    p.add_argument("--frozen-batch-size", type=int, default=64,
                   help="expressions per pass of the frozen foundation when computing the conditions")
    p.add_argument("--cache-dtype", default="float32", choices=["float32", "float16"],
                   help="how the foundation's conditions are kept on disk (float16 halves the bytes at real size)")
    return p


if __name__ == "__main__":
    main(build_parser().parse_args())
