"""The training loops, one module per stage, each run by the shared `runner.StageRunner`.

    foundation   stage 0: pretrain the embedded-default foundation (detection on category queries)
    mask_vae     stage 1: the Mask-VAE on referred-object masks
    prompt_dit   stage 2: the DiT prompt generator on Mask-VAE latents
    prompts      stage 3 and the baselines: prompts / adapters on the frozen foundation

Their command-line surface (options, `--help`) is training/{pretrain_foundation, train_mask_vae,
train_prompt_dit, train_prompts}.py, which import torch and these modules only when they run.
"""
