"""Rebuild the REC results table: the frozen foundation, every baseline and Diff-Prompt, 3 seeds.

    diffprompt results                       # uses the committed stage-1/2 checkpoints
    diffprompt results --from-scratch        # trains the Mask-VAE and both DiTs first
    diffprompt results --jobs 2 --threads 1  # two training jobs side by side

Every job (train one method with one seed, then evaluate it on val / testA / testB and the
distribution-shift splits of `--shift-splits`) writes
`{work-dir}/{job}/results.json`; a rerun skips finished jobs, so an interrupted build resumes
where it stopped. At the end the command writes the report (markdown tables with mean and
spread over seeds, trainable parameter counts, ablations of prompt depth, DDIM steps and the
adapters' mask input, the acceptance checks), its JSON, a plot of the table and a picture of
generated masks. All 27 jobs took about 55 min with `--jobs 2 --threads 1` on 2 CPU cores when each
Diff-Prompt job was evaluated at one sampling seed; `--sampling-seeds` (default 0-4) multiplies its
evaluation time.

Honest accounting:
- every choice ("best mode", "best baseline") is made on val (`choose_on_val`); testA / testB and the
  shift splits (shift_background, shift_size, shift_crowded: scenes unlike the train split's, in their
  own "under shift" table) are only reported;
- Diff-Prompt is evaluated at every sampling seed of `--sampling-seeds` under the service's seed
  policy (every expression gets the raw seed, `evaluation.rec.expression_seeds`), and a row's ± is
  the spread over (training seed, sampling seed) pairs;
- a method's trainable parameters and training time include every stage it needs: Diff-Prompt's
  DiT and Mask-VAE (stages 1-2) besides its adapters and prompts (stage 3);
- the pointer-ranking row ranks the frozen foundation's own boxes by the token DiT's pointer head,
  no diffusion and no prompts (`DiffPromptPipeline.pointer_ranking`), and the foundation-plus-pointer
  row ranks them by foundation logit + w x pointer log-probability (w of `--fusion-weights` chosen on
  val): the simplest uses of the parts Diff-Prompt carries, which the full pipeline has to beat (an
  acceptance check); each token Diff-Prompt job also gets a fused row (`pointer_weight` chosen on val).
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from diffprompt.cli import positive_int
from diffprompt.training.data.synthetic.splits import SHIFT_SPLITS
from diffprompt.training.options import add_image_root_arg

SPLITS = ("val", "testA", "testB")  # the main table's; choices are made on val
BASELINES = ("vpt", "coop", "maple", "clip_adapter", "linear_probe")
PD_BASES = ("vpt", "coop", "maple", "diffprompt")  # the learners with prompt tensors Prompt Diffusion plugs into
# the table row (and job name prefix) of each base's own learner: Diff-Prompt's is its token-conditioning mode
PD_BASE_ROWS = {"vpt": "vpt", "coop": "coop", "maple": "maple", "diffprompt": "diffprompt-tokens"}
LABELS = {"foundation": "Frozen foundation (zero-shot)", "vpt": "VPT-deep", "coop": "CoOp (deep text prompts)",
          "maple": "MaPLe", "clip_adapter": "CLIP-Adapter", "linear_probe": "Linear probe (heads)",
          "vpt-pd": "VPT-deep + Prompt Diffusion", "coop-pd": "CoOp + Prompt Diffusion",
          "maple-pd": "MaPLe + Prompt Diffusion",
          "diffprompt-pd": "Diff-Prompt (tokens) + Prompt Diffusion on its global prompts",
          "pointer": "Pointer ranking (foundation's boxes, DiT pointer head; no diffusion, no prompts)",
          "pointer-fused": "Foundation + pointer fusion (no diffusion, no prompts; weight chosen on val)",
          "diffprompt-pooled": "Diff-Prompt, pooled conditioning (paper)",
          "diffprompt-tokens": "Diff-Prompt, token conditioning (ours)",
          "diffprompt-tokens-fused": "Diff-Prompt, token conditioning + pointer fusion (weight chosen on val)",
          "diffprompt-single": "Diff-Prompt, single pass (token conditioning read inside the one foundation pass)"}
MODES = ("diffprompt-pooled", "diffprompt-tokens", "diffprompt-tokens-fused", "diffprompt-single")
SIMPLER = ("pointer", "pointer-fused")  # uses of Diff-Prompt's parts without diffusion: the pipeline must beat them
SERVED_STEPS = "5"  # the service's DDIM step count: what the best mode is chosen at
# Stages 1-2 of the committed generators, timed alone on the 2-core machine (docs/results.md,
# 'Training-time budget'); None = not measured. `--from-scratch` measures its own.
COMMITTED_GENERATOR_SECONDS = {"mask_vae": 155.6, "tokens": 649.7, "pooled": None}


@dataclass
class Job:
    name: str
    method: str  # "foundation", "pointer" or a PromptLearner method
    seed: int = 0
    conditioning: str | None = None  # Diff-Prompt's DiT
    depth: int = 9
    eval_steps: list[int] = field(default_factory=lambda: [25])  # DDIM steps evaluated (Diff-Prompt)
    mask_input: str = "standardize"  # Diff-Prompt adapters' input; "tanh" rows are an ablation
    prompt_diffusion: bool = False  # Prompt Diffusion on the trained `{method}-s{seed}` job's learner

    @property
    def main_row(self) -> bool:
        """Part of the main table (not a depth or adapter-input ablation)."""
        return self.depth == 9 and self.mask_input == "standardize"

    @property
    def row(self) -> str:
        if self.prompt_diffusion:
            return f"{self.method}-pd"
        return f"{self.method}-{self.conditioning}" if self.conditioning else self.method

    @property
    def base_job(self) -> str | None:
        """The job whose trained learner a Prompt Diffusion job starts from (it runs after that one)."""
        return f"{PD_BASE_ROWS[self.method]}-s{self.seed}" if self.prompt_diffusion else None

    @property
    def stochastic(self) -> bool:
        """Answers depend on the sampling seed (a DiT samples from noise)."""
        return self.prompt_diffusion or (self.method == "diffprompt" and self.conditioning is not None)


def plan(seeds: list[int], depths: list[int], ablation_steps: list[int],
         tower_layers: tuple[int, int] = (6, 3), single_pass: bool = False) -> list[Job]:
    """Every job of the table. A depth whose capped layout (image layers, text layers) equals
    depth 9's is the main run already and gets no job of its own. The adapter-input ablation
    (tanh of the mask logits instead of standardised masks) runs for every seed."""
    jobs = [Job("foundation", "foundation"), Job("pointer", "pointer")]
    for seed in seeds:
        for method in BASELINES:
            jobs.append(Job(f"{method}-s{seed}", method, seed))
        jobs.append(Job(f"diffprompt-pooled-s{seed}", "diffprompt", seed, "pooled", eval_steps=[25, 5]))
        jobs.append(Job(f"diffprompt-tokens-s{seed}", "diffprompt", seed, "tokens",
                        eval_steps=sorted(set(ablation_steps) | {25, 5}, reverse=True)))
        if single_pass:  # stage 3 on the single-pass DiT (--dit-single): the mode that runs the foundation once
            jobs.append(Job(f"diffprompt-single-s{seed}", "diffprompt", seed, "single", eval_steps=[25, 5]))
    layout = lambda d: (min(d, tower_layers[0]), min(d, tower_layers[1]))
    for depth in depths:
        if layout(depth) != layout(9):
            jobs.append(Job(f"diffprompt-tokens-depth{depth}-s{seeds[0]}", "diffprompt", seeds[0], "tokens", depth))
    jobs += [Job(f"diffprompt-tokens-tanh-s{seed}", "diffprompt", seed, "tokens", mask_input="tanh") for seed in seeds]
    jobs += [Job(f"{method}-pd-s{seed}", method, seed, eval_steps=[25, 5], prompt_diffusion=True)
             for seed in seeds for method in PD_BASES]
    return jobs


def count_parameters(directory: str | Path) -> int:
    """Parameters stored in a checkpoint directory's model.safetensors."""
    from safetensors import safe_open

    with safe_open(str(Path(directory) / "model.safetensors"), "np") as f:
        return int(sum(np.prod(f.get_slice(k).get_shape(), dtype=np.int64) for k in f.keys()))


def generator_cost(cfg: dict, conditioning: str) -> tuple[int, float | None]:
    """(parameters, training seconds) of stages 1-2 behind a DiT: the Mask-VAE and the DiT, trained for it."""
    params = count_parameters(cfg["mask_vae"]) + count_parameters(cfg[f"dit_{conditioning}"])
    seconds = cfg.get("generator_seconds", {})
    vae, dit = seconds.get("mask_vae"), seconds.get(conditioning)
    return params, (None if vae is None or dit is None else float(vae + dit))


def scored_splits(cfg: dict) -> tuple[str, ...]:
    """Every split a job is evaluated on: val / testA / testB, then cfg["shift_splits"]."""
    return (*SPLITS, *cfg.get("shift_splits", ()))


def run_job(job: Job, cfg: dict) -> dict:
    """Train (unless the foundation or the pointer ranking) and evaluate one job; writes and returns its
    results.json. `trainable_parameters` / `train_seconds` cover every stage the method needs; Diff-Prompt
    is evaluated at each of cfg["sampling_seeds"] (service seed policy), `eval` holding the first."""
    import torch

    from diffprompt.training.data.mdetr import load_split
    from diffprompt.training.evaluation.rec import evaluate_samples
    from diffprompt.training.models.diffprompt import DiffPromptPipeline
    from diffprompt.training.train_prompts import build_parser
    from diffprompt.training.train_prompts import main as train

    torch.set_num_threads(cfg["threads"])
    out = Path(cfg["work_dir"]) / job.name
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    summary: dict = {"trainable_parameters": 0, "train_seconds": 0.0}
    if job.prompt_diffusion:
        summary = train_prompt_diffusion_job(job, cfg, out)
        pipeline = DiffPromptPipeline.from_pretrained(out / "model")
    elif job.method == "foundation":
        pipeline = DiffPromptPipeline.foundation_only(cfg["foundation"])
    elif job.method == "pointer":
        pipeline = DiffPromptPipeline.pointer_ranking(cfg["foundation"], cfg["dit_tokens"])
        params, seconds = generator_cost(cfg, "tokens")  # the pointer trains with the DiT, on VAE latents
        summary = {"trainable_parameters": params, "train_seconds": seconds, "stage3_parameters": 0}
    else:
        argv = ["--method", job.method, "--seed", str(job.seed), "--depth", str(job.depth),
                "--epochs", str(cfg["epochs"]), "--output", str(out / "model"), "--overwrite",  # an unfinished job
                "--run-root", str(out / "runs"),
                "--foundation", cfg["foundation"], "--mask-vae", cfg["mask_vae"], "--data-dir", cfg["data_dir"],
                "--threads", str(cfg["threads"]), "--eval-every", "0", "--no-progress",
                "--mask-cache", str(Path(cfg["work_dir"]) / "mask_cache")]
        if cfg.get("image_root"):
            argv += ["--image-root", cfg["image_root"]]
        if job.conditioning:
            argv += ["--prompt-dit", cfg[f"dit_{job.conditioning}"], "--mask-input", job.mask_input]
        trained = train(build_parser().parse_args(argv))
        summary = {"trainable_parameters": trained["trainable_parameters"], "train_seconds": trained["seconds"],
                   "stage3_parameters": trained["trainable_parameters"], "stage3_seconds": trained["seconds"]}
        if job.conditioning:
            params, seconds = generator_cost(cfg, job.conditioning)
            summary["trainable_parameters"] += params
            summary["train_seconds"] = None if seconds is None else summary["train_seconds"] + seconds
        pipeline = DiffPromptPipeline.from_pretrained(out / "model")
    sampling = list(cfg.get("sampling_seeds", [0])) if job.stochastic else [0]
    runs: dict = {}
    for steps in (job.eval_steps if job.method == "diffprompt" or job.prompt_diffusion else [0]):
        pipeline.steps = steps or 25
        for sampling_seed in sampling:
            per_split = runs.setdefault(str(steps), {}).setdefault(str(sampling_seed), {})
            for split in scored_splits(cfg):
                samples = load_split(Path(cfg["data_dir"]) / f"{split}.json", cfg.get("image_root"))
                acc = evaluate_samples(pipeline, pipeline.tokenizer, samples, progress=False, seed=sampling_seed,
                                       seed_policy="service")
                per_split[split] = {k: v for k, v in acc.summary()[-1].as_dict().items() if k != "group"}
    evals = {steps: by_seed[str(sampling[0])] for steps, by_seed in runs.items()}
    result = {"job": asdict(job), **summary, "seconds": time.time() - t0, "eval": evals, "sampling": runs}
    if job.method == "pointer" and cfg.get("fusion_weights"):
        result["fused"] = foundation_fused_runs(cfg)
    if job.conditioning == "tokens" and job.main_row and pipeline.dit.pointer and cfg.get("fusion_weights"):
        result["fused"] = fused_runs(pipeline, cfg, sampling)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    return result


def train_prompt_diffusion_job(job: Job, cfg: dict, out: Path) -> dict:
    """Prompt Diffusion on the learner of `job.base_job` (finished first): -> the summary fields of
    results.json, counting the base learner's parameters and seconds too."""
    from diffprompt.core.errors import UserError
    from diffprompt.training.train_prompt_diffusion import build_parser
    from diffprompt.training.train_prompt_diffusion import main as train

    base = Path(cfg["work_dir"]) / job.base_job
    if not (base / "results.json").exists():
        raise UserError(f"{job.name}: its base job {job.base_job} has not finished ({base / 'results.json'} missing)")
    base_result = json.loads((base / "results.json").read_text())
    argv = ["--base", str(base / "model"), "--seed", str(job.seed), "--output", str(out / "model"), "--overwrite",
            "--run-root", str(out / "runs"), "--data-dir", cfg["data_dir"], "--threads", str(cfg["threads"]),
            "--no-progress", "--cache-dir", str(Path(cfg["work_dir"]) / "pd_cache")]
    if cfg.get("image_root"):
        argv += ["--image-root", cfg["image_root"]]
    if cfg.get("pd_train_steps"):
        argv += ["--train-steps", str(cfg["pd_train_steps"])]
    trained = train(build_parser().parse_args(argv))
    base_seconds = base_result["train_seconds"]  # None: a generator of the base was not timed here
    return {"trainable_parameters": base_result["trainable_parameters"] + trained["parameters"],
            "train_seconds": None if base_seconds is None else base_seconds + trained["seconds"],
            "stage_seconds": {"base": base_result["train_seconds"], **trained["seconds_by_part"]},
            "prompt_diffusion_parameters": trained["parameters"],
            "base_parameters": base_result["trainable_parameters"]}


def _split_metrics(pipeline, cfg: dict, split: str, seed: int = 0) -> dict:
    from diffprompt.training.data.mdetr import load_split
    from diffprompt.training.evaluation.rec import evaluate_samples

    samples = load_split(Path(cfg["data_dir"]) / f"{split}.json", cfg.get("image_root"))
    acc = evaluate_samples(pipeline, pipeline.tokenizer, samples, progress=False, seed=seed, seed_policy="service")
    return {k: v for k, v in acc.summary()[-1].as_dict().items() if k != "group"}


def foundation_fused_runs(cfg: dict) -> dict:
    """The foundation's boxes ranked by its logit + w x the pointer's log-probability (no diffusion, no
    prompts), w of cfg["fusion_weights"] with the highest val R@1, then every split at that weight."""
    from diffprompt.training.models.diffprompt import DiffPromptPipeline

    pipeline = DiffPromptPipeline.pointer_ranking(cfg["foundation"], cfg["dit_tokens"], fused_with_foundation=0.0)
    val_r1 = {}
    for weight in cfg["fusion_weights"]:
        pipeline.pointer_weight = weight
        val_r1[weight] = _split_metrics(pipeline, cfg, "val")["R@1"]
    pipeline.pointer_weight = max(val_r1, key=lambda w: (val_r1[w], -w))
    return {"pointer_weight": pipeline.pointer_weight, "val_R@1_by_weight": val_r1,
            "sampling": {"0": {"0": {split: _split_metrics(pipeline, cfg, split) for split in scored_splits(cfg)}}}}


def fused_runs(pipeline, cfg: dict, sampling: list[int]) -> dict:
    """The pointer fusion of a trained token pipeline at the served step count: the weight of
    cfg["fusion_weights"] (or 0) with the highest mean val R@1 over the sampling seeds, then every split
    at that weight. -> {"pointer_weight": w, "sampling": {steps: {seed: {split: metrics}}}}"""
    from diffprompt.training.data.mdetr import load_split
    from diffprompt.training.evaluation.fusion import choose_pointer_weight, collect

    pipeline.steps = int(SERVED_STEPS)
    val = load_split(Path(cfg["data_dir"]) / "val.json", cfg.get("image_root"))
    weight = choose_pointer_weight(collect(pipeline, val, sampling, "service"), cfg["fusion_weights"])
    pipeline.pointer_weight = weight
    runs = {SERVED_STEPS: {str(seed): {split: _split_metrics(pipeline, cfg, split, seed)
                                              for split in scored_splits(cfg)}
                           for seed in sampling}}
    pipeline.pointer_weight = 0.0
    return {"pointer_weight": weight, "sampling": runs}


# ----------------------------------------------------------------------------- report


def _stat(values: list[float]) -> str:
    v = 100 * np.asarray(values)
    return f"{v.mean():.2f}" if len(v) == 1 else f"{v.mean():.2f} ± {v.std(ddof=1):.2f}"


def _runs(r: dict) -> dict:
    """steps -> [split -> metrics, one per sampling seed] of one job (older results.json: `eval` only)."""
    if "sampling" in r:
        return {steps: list(by_seed.values()) for steps, by_seed in r["sampling"].items()}
    return {steps: [splits] for steps, splits in r["eval"].items()}


def aggregate(results: list[dict]) -> dict:
    """row -> steps -> split -> metric -> [values over (training seed, sampling seed)] (main rows, depth 9)."""
    table: dict = {}
    for r in results:
        job = Job(**r["job"])
        if not job.main_row:
            continue
        rows = [(job.row, r)] + ([(f"{job.row}-fused", r["fused"])] if "fused" in r else [])
        for row, part in rows:
            for steps, runs in _runs(part).items():
                for splits in runs:
                    for split, metrics in splits.items():
                        for metric, value in metrics.items():
                            if metric in ("R@1", "R@5", "UB"):
                                (table.setdefault(row, {}).setdefault(steps, {}).setdefault(split, {})
                                 .setdefault(metric, []).append(value))
            table[row].setdefault("_params", r["trainable_parameters"])
            table[row].setdefault("_seconds", []).append(r["train_seconds"])
            if "pointer_weight" in part:
                table[row].setdefault("_pointer_weight", []).append(part["pointer_weight"])
    return table


def choose_on_val(means: dict, rows, steps: str) -> str | None:
    """The row (of `rows`, at `steps`) with the highest mean val R@1: every choice of the report is made
    on val, never on testA / testB. None if no row has results at `steps`."""
    scored = [(means[(row, steps)]["val"], row) for row in rows if (row, steps) in means]
    return max(scored)[1] if scored else None


def _seconds(values: list) -> str:
    known = [v for v in values if v is not None]
    return f"{np.mean(known):.0f}" if len(known) == len(values) and known else "n/a"


def _mean_over(ev: dict, splits) -> list[float]:
    """Per run (training seed, sampling seed): the mean R@1 over `splits`."""
    return [float(np.mean(v)) for v in zip(*(ev[sp]["R@1"] for sp in splits))]


def shift_table(table: dict, shown: list[tuple[str, str]]) -> list[str]:
    """Report lines: R@1 of the main table's rows on val / testA / testB beside the shift splits they were
    evaluated on (n/a: a job from before the shift splits, or run without them). No choice is made here."""
    shifts = [sp for sp in SHIFT_SPLITS if any(sp in table[row][steps] for row, steps in shown)]
    if not shifts:
        return []
    columns = [*SPLITS, *shifts]
    lines = ["", "### Under distribution shift (R@1)", "",
             "The same rows, on test splits whose scenes differ from the train split's in one way each "
             "(docs/design.md, 'Distribution-shift splits'). Reported only: every choice above was made on val.", "",
             "| Method | DDIM steps | " + " | ".join(columns) + " | mean(shift) |",
             "|---|---|" + "---|" * (len(columns) + 1)]
    for row, steps in shown:
        ev = table[row][steps]
        cells = [_stat(ev[sp]["R@1"]) if sp in ev else "n/a" for sp in columns]
        if all(sp in ev for sp in shifts):
            mean_shift = _stat(_mean_over(ev, shifts))
        else:
            mean_shift = "n/a"
        lines.append(f"| {LABELS[row]} | {steps if steps != '0' else '-'} | {' | '.join(cells)} | {mean_shift} |")
    return lines


def prompt_diffusion_table(results: list[dict], table: dict) -> tuple[list[str], dict]:
    """Report lines and acceptance checks of each base learner with and without Prompt Diffusion: R@1 in
    domain and under shift (mean ± std over runs), the change, 5 against 25 solver steps, trainable
    parameters and seconds per stage. Nothing is chosen here."""
    pairs = [b for b in PD_BASES if PD_BASE_ROWS[b] in table and f"{b}-pd" in table]
    if not pairs:
        return [], {}
    shifts = [sp for sp in SHIFT_SPLITS if all(sp in table[r][s] for b in pairs for r in (PD_BASE_ROWS[b], f"{b}-pd")
                                               for s in table[r] if not s.startswith("_"))]
    lines = ["", "### Prompt Diffusion on each prompt learner (R@1)", "",
             "Base = the learner's own prompts; + PD = prompts generated per query by DPM-Solver++ at the given "
             "steps (service seed policy, every sampling seed). mean(shift) averages "
             f"{', '.join(shifts) or 'no shift split'}; the change is + PD minus base, with the base's std over "
             "training seeds as the seed noise.", "",
             "| Base | solver steps | val | mean(testA, testB) | mean(shift) "
             "| change in domain (val / mean(testA, testB)) | change under shift | seed noise (val / shift) |",
             "|---|---|---|---|---|---|---|---|"]
    checks = {}
    for b in pairs:
        # the base's own prompts: learned (steps "0"), or Diff-Prompt's with sampled masks, each + PD row
        # compared with it at the same steps (its served steps on the base row)
        own, pd = table[PD_BASE_ROWS[b]], table[f"{b}-pd"]
        base_steps = "0" if "0" in own else SERVED_STEPS
        base = own[base_steps]
        noise_val = 100 * float(np.std(base["val"]["R@1"], ddof=1)) if len(base["val"]["R@1"]) > 1 else float("nan")
        base_shift = _mean_over(base, shifts) if shifts else []
        noise_shift = 100 * float(np.std(base_shift, ddof=1)) if len(base_shift) > 1 else float("nan")
        noise = (f"{noise_val:.2f} / {noise_shift:.2f}" if np.isfinite(noise_val)
                 else "n/a (one training seed)")
        lines.append(f"| {LABELS[PD_BASE_ROWS[b]]} | {'-' if base_steps == '0' else base_steps} | "
                     f"{_stat(base['val']['R@1'])} | {_stat(_mean_over(base, ('testA', 'testB')))} | "
                     f"{_stat(base_shift) if shifts else 'n/a'} | | | {noise} |")
        for steps in sorted((k for k in pd if not k.startswith("_")), key=lambda k: -int(k)):
            ev, ref = pd[steps], own.get(steps, base) if base_steps != "0" else base
            d_val = 100 * (np.mean(ev["val"]["R@1"]) - np.mean(ref["val"]["R@1"]))
            d_ab = 100 * (np.mean(_mean_over(ev, ("testA", "testB"))) - np.mean(_mean_over(ref, ("testA", "testB"))))
            d_shift = (100 * (np.mean(_mean_over(ev, shifts)) - np.mean(_mean_over(ref, shifts))) if shifts
                       else float("nan"))
            lines.append(f"| {LABELS[PD_BASE_ROWS[b]]} + PD | {steps} | {_stat(ev['val']['R@1'])} | "
                         f"{_stat(_mean_over(ev, ('testA', 'testB')))} | "
                         f"{_stat(_mean_over(ev, shifts)) if shifts else 'n/a'} | {d_val:+.2f} / {d_ab:+.2f} | "
                         f"{d_shift:+.2f} | |")
            if steps == SERVED_STEPS:
                checks[f"{b} + PD ({steps} steps): mean(shift) R@1 change (>= 2 points)"] = d_shift
                bound = (f"-{noise_val:.2f}, the base's seed noise" if np.isfinite(noise_val)
                         else "one training seed: no noise")
                checks[f"{b} + PD ({steps} steps): val R@1 change (>= {bound})"] = d_val
        if SERVED_STEPS in pd and "25" in pd:
            keep = np.mean(_mean_over(pd[SERVED_STEPS], SPLITS)) / np.mean(_mean_over(pd["25"], SPLITS))
            checks[f"{b} + PD: 5-step / 25-step R@1, mean of val, testA, testB (>= 0.98)"] = float(keep)
    lines += ["", "Time per stage (s, mean over training seeds; the base learner's training, then Prompt Diffusion's "
              "parts) and trainable parameters:", "",
              "| Base | base params | + PD params | base s | conditions s | overfitted targets s | DiT s | val check s "
              "| total s |", "|---|---|---|---|---|---|---|---|---|"]
    for b in pairs:
        runs = [r for r in results if Job(**r["job"]).row == f"{b}-pd" and "stage_seconds" in r]
        if not runs:
            continue
        # None (a part not timed here) counts as nan
        sec = lambda k, runs=runs: f"{np.mean([r['stage_seconds'].get(k) or np.nan for r in runs]):.0f}"
        total = np.mean([np.nan if r["train_seconds"] is None else r["train_seconds"] for r in runs])
        lines.append(f"| {LABELS[PD_BASE_ROWS[b]]} | {runs[0]['base_parameters']:,} | "
                     f"{runs[0]['prompt_diffusion_parameters']:,} | {sec('base')} | {sec('conditions')} | "
                     f"{sec('targets')} | {sec('diffusion')} | {sec('validation')} | {total:.0f} |")
    return lines, checks


def ablation_tables(results: list[dict], table: dict, seeds: list[int]) -> list[str]:
    """Report lines of Diff-Prompt's ablations (DDIM steps, prompt depth, the adapters' mask input), all
    from token-conditioning jobs; none when the run had no such job."""
    tokens_runs = [(job, r) for job, r in ((Job(**r["job"]), r) for r in results) if job.conditioning == "tokens"]
    if not tokens_runs:
        return []
    lines = ["", "### Ablation: DDIM steps (token conditioning, depth 9)", "",
              "| DDIM steps | val R@1 | testA R@1 | testB R@1 |", "|---|---|---|---|"]
    for steps in sorted((k for k in table.get("diffprompt-tokens", {}) if not k.startswith("_")), key=int):
        lines.append(f"| {steps} | " + " | ".join(_stat(table["diffprompt-tokens"][steps][sp]["R@1"]) for sp in SPLITS)
                     + " |")
    lines += ["", f"### Ablation: prompt depth (token conditioning, 25 DDIM steps, seed {seeds[0]})", "",
              "| depth (image / text layers) | trainable params | val R@1 | testA R@1 | testB R@1 |",
              "|---|---|---|---|---|"]
    depth_runs = [(job, r) for job, r in tokens_runs
                  if job.seed == seeds[0] and job.mask_input == "standardize" and "25" in r["eval"]]
    for job, r in sorted(depth_runs, key=lambda jr: jr[0].depth):
        d = job.depth
        ev = r["eval"]["25"]
        same = " = depth 6 (the image tower has 6 layers)" if d == 9 else ""
        lines.append(f"| {d} ({min(d, 6)} / {min(d, 3)}){same} | {r['trainable_parameters']:,} | "
                     + " | ".join(f"{100 * ev[sp]['R@1']:.2f}" for sp in SPLITS) + " |")

    lines += ["", "### Ablation: the adapters' mask input (token conditioning, depth 9, 25 DDIM steps)", "",
              "| mask input | val R@1 | testA R@1 | testB R@1 | mean(testA, testB) R@1 |", "|---|---|---|---|---|"]
    for mask_input, label in (("standardize", "standardised per mask (default)"), ("tanh", "tanh of the logits")):
        runs = [r["eval"]["25"] for job, r in tokens_runs
                if job.depth == 9 and job.mask_input == mask_input and "25" in r["eval"]]
        if runs:
            mean_ab = [(ev["testA"]["R@1"] + ev["testB"]["R@1"]) / 2 for ev in runs]
            lines.append(f"| {label} | " + " | ".join(_stat([ev[sp]["R@1"] for ev in runs]) for sp in SPLITS)
                         + f" | {_stat(mean_ab)} |")
    return lines


def render_report(results: list[dict], cmd: str, seeds: list[int]) -> tuple[str, dict]:
    table = aggregate(results)
    lines = [f"Produced by `{cmd}`. Mean ± sample std over training seeds {seeds} and, for Diff-Prompt, "
             "the sampling seeds of each (service seed policy: every expression gets the raw seed); one value: "
             "a single run. IoU >= 0.5, all expressions of each split. Trainable params and train s count every "
             "stage a method needs (Diff-Prompt and the pointer ranking: the Mask-VAE and the DiT of stages "
             "1-2 too; n/a: a stage's time was not measured).", "",
             "| Method | DDIM steps | trainable params | train s | val R@1 / R@5 / UB | testA R@1 / R@5 / UB | "
             "testB R@1 / R@5 / UB | mean(testA, testB) R@1 |", "|---|---|---|---|---|---|---|---|"]
    order = ["foundation", *SIMPLER, *BASELINES, *(f"{b}-pd" for b in PD_BASES), *MODES]
    means = {}
    shown = []  # (row, steps) of the main table, in its order
    for row in order:
        if row not in table:
            continue
        for steps in sorted((k for k in table[row] if not k.startswith("_")), key=lambda s: -int(s)):
            if row == "diffprompt-tokens" and steps not in ("25", "5"):
                continue
            cells = [" / ".join(_stat(table[row][steps][sp][m]) for m in ("R@1", "R@5", "UB")) for sp in SPLITS]
            ev = table[row][steps]
            mean_ab = _mean_over(ev, ("testA", "testB"))
            means[(row, steps)] = {"mean_ab": float(np.mean(mean_ab)),
                                   **{sp: float(np.mean(ev[sp]["R@1"])) for sp in SPLITS}}
            label = LABELS[row] + (f" (weights {sorted(set(table[row]['_pointer_weight']))})"
                                   if "_pointer_weight" in table[row] else "")
            lines.append(f"| {label} | {steps if steps != '0' else '-'} | {table[row]['_params']:,} | "
                         f"{_seconds(table[row]['_seconds'])} | {' | '.join(cells)} | {_stat(mean_ab)} |")
            shown.append((row, steps))
    lines += shift_table(table, shown)
    pd_lines, pd_checks = prompt_diffusion_table(results, table)
    lines += pd_lines

    lines += ablation_tables(results, table, seeds)

    # acceptance checks
    checks = {}
    best_mode = choose_on_val(means, MODES, SERVED_STEPS) or choose_on_val(means, MODES, "25")
    if ("foundation", "0") in means and best_mode is not None:
        steps = SERVED_STEPS if (best_mode, SERVED_STEPS) in means else "25"
        dp, dp25 = means[(best_mode, steps)], means.get((best_mode, "25"))
        best_baseline = choose_on_val(means, BASELINES, "0")
        base = means[(best_baseline, "0")] if best_baseline else {sp: float("nan") for sp in SPLITS}
        gain = 100 * (dp["mean_ab"] - means[("foundation", "0")]["mean_ab"])
        checks = {
            "best mode (highest val R@1 at the served steps)": f"{best_mode}, {steps} DDIM steps",
            "best baseline (highest val R@1)": best_baseline or "none",
            "val R@1 of the best mode minus the foundation's": 100 * (dp["val"] - means[("foundation", "0")]["val"]),
            "val R@1 of the best mode minus the pointer ranking's (> 0)":
                100 * (dp["val"] - means[("pointer", "0")]["val"]) if ("pointer", "0") in means else float("nan"),
            "val R@1 of the best mode minus the best use of its parts without diffusion (> 0)":
                100 * (dp["val"] - means[(simpler, "0")]["val"])
                if (simpler := choose_on_val(means, SIMPLER, "0")) else float("nan"),
            "gain over foundation, mean(testA, testB) R@1 (>= 9 points)": gain,
            "testB R@1 minus best baseline's (> 0)": 100 * (dp["testB"] - base["testB"]),
            "5-step / 25-step mean(testA, testB) R@1 (>= 0.98)":
                means[(best_mode, "5")]["mean_ab"] / dp25["mean_ab"] if dp25 and (best_mode, "5") in means
                else float("nan"),
        }
    checks.update(pd_checks)
    if checks:
        lines += ["", "### Acceptance checks", ""]
        lines += [f"- {k}: {v:.2f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in checks.items()]
    return "\n".join(lines) + "\n", {"table": table, "checks": checks}


def plot_table(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(r, s) for r in ["foundation", *SIMPLER, *BASELINES, *(f"{b}-pd" for b in PD_BASES), *MODES] if r in table
            for s in sorted((k for k in table[r] if not k.startswith("_")), key=lambda s: -int(s))
            if not (r == "diffprompt-tokens" and s not in ("25", "5"))]
    fig, ax = plt.subplots(figsize=(12, 4.5))
    width = 0.27
    x = np.arange(len(rows))
    for j, split in enumerate(SPLITS):
        vals = [100 * np.asarray(table[r][s][split]["R@1"]) for r, s in rows]
        ax.bar(x + (j - 1) * width, [v.mean() for v in vals], width, label=split,
               yerr=[v.std(ddof=1) if len(v) > 1 else 0 for v in vals], capsize=2)
    ax.set_xticks(x, [LABELS[r].split(",")[0].split(" (")[0] + (f"\n{s} steps" if s != "0" else "")
                      + ("\n(pooled)" if "pooled" in r else "\n(tokens+pointer)" if "fused" in r
                         else "\n(tokens)" if "tokens" in r else "") for r, s in rows],
                  fontsize=8)
    ax.set_ylabel("R@1 (%)")
    ax.set_title("REC on the synthetic world: R@1, mean ± std over seeds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def mask_picture(pipeline_dir: Path, data_dir: Path, path: Path, n: int = 6, seed: int = 0,
                 image_root: str | None = None) -> None:
    """Val samples: image with the target box, the ground-truth mask, generated masks at 25 and 5 steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from PIL import Image

    from diffprompt.core.image_spec import ImageSpec
    from diffprompt.training.data.grounding_dataset import load_pixels
    from diffprompt.training.data.mdetr import load_split
    from diffprompt.training.data.rec_arrays import target_mask
    from diffprompt.training.evaluation.rec import expression_seeds
    from diffprompt.training.models.diffprompt import DiffPromptPipeline

    pipeline = DiffPromptPipeline.from_pretrained(pipeline_dir)
    samples = load_split(data_dir / "val.json", image_root, n)
    spec = ImageSpec.from_config(pipeline.foundation.config)
    m = pipeline.vae.config.sample_size
    pixels = torch.stack([torch.from_numpy(load_pixels(s, spec)) for s in samples])
    ids, mask = (torch.from_numpy(a) for a in pipeline.tokenizer([s.expression for s in samples]))
    seeds = expression_seeds(samples, seed, "service")
    gen = {}
    for steps in (25, 5):
        pipeline.steps = steps
        gen[steps] = pipeline.generate_masks(pixels, ids, mask, seeds)[:, 0, 0] > 0  # shallowest layer = x0
    fig, axes = plt.subplots(n, 4, figsize=(8, 2.1 * n))
    for i, s in enumerate(samples):
        with Image.open(s.image_path) as im:
            axes[i, 0].imshow(im.convert("RGB"))
        x0, y0, x1, y1 = s.boxes[0]
        axes[i, 0].add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="lime", lw=1.5))
        axes[i, 0].set_title(s.expression, fontsize=7)
        axes[i, 1].imshow(target_mask(s, m, spec.resize_mode), cmap="gray")
        axes[i, 2].imshow(gen[25][i], cmap="gray")
        axes[i, 3].imshow(gen[5][i], cmap="gray")
        for ax in axes[i]:
            ax.axis("off")
    for ax, t in zip(axes[0, 1:], ["ground truth", "generated, 25 steps", "generated, 5 steps"]):
        ax.set_title(t if not ax.get_title() else ax.get_title(), fontsize=8)
    for ax, t in zip(axes[0, 1:], ["ground truth", "generated, 25 steps", "generated, 5 steps"]):
        ax.set_title(t, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def train_generators(args, cfg: dict) -> None:
    """--from-scratch: stage 1 and both stage-2 DiTs into the work dir."""
    from diffprompt.training import train_mask_vae, train_prompt_dit

    work = Path(args.work_dir)
    common = ["--data-dir", args.data_dir, "--threads", str(cfg["threads"] * args.jobs),
              "--run-root", str(work / "runs"), "--overwrite"]  # what is there has no config.json: unfinished
    if args.image_root:
        common += ["--image-root", args.image_root]
    timing_file = work / "generator_seconds.json"
    timing = json.loads(timing_file.read_text()) if timing_file.exists() else {}
    if not (work / "mask_vae" / "config.json").exists():
        t0 = time.time()
        train_mask_vae.main(train_mask_vae.build_parser().parse_args(["--output", str(work / "mask_vae"), *common]))
        timing["mask_vae"] = time.time() - t0
    cfg["mask_vae"] = str(work / "mask_vae")
    for mode in ("pooled", "tokens"):
        out = work / f"prompt_dit_{mode}"
        if not (out / "config.json").exists():
            t0 = time.time()
            train_prompt_dit.main(train_prompt_dit.build_parser().parse_args(
                ["--conditioning", mode, "--foundation", cfg["foundation"], "--mask-vae", cfg["mask_vae"],
                 "--output", str(out), *common]))
            timing[mode] = time.time() - t0
        cfg[f"dit_{mode}"] = str(out)
    timing_file.write_text(json.dumps(timing, indent=2))
    cfg["generator_seconds"] = {k: timing.get(k) for k in ("mask_vae", "pooled", "tokens")}


def committed_generator_seconds(args: argparse.Namespace) -> dict:
    """Stages 1-2 seconds of the generators in use: the measured ones for the committed checkpoints,
    None (not measured) for any other directory."""
    defaults = build_parser().parse_args([])
    same = lambda key: Path(getattr(args, key)).resolve() == Path(getattr(defaults, key)).resolve()
    return {"mask_vae": COMMITTED_GENERATOR_SECONDS["mask_vae"] if same("mask_vae") else None,
            **{mode: COMMITTED_GENERATOR_SECONDS[mode] if same(f"dit_{mode}") and same("mask_vae") else None
               for mode in ("pooled", "tokens")}, "single": None}


def run_jobs(jobs: list[Job], cfg: dict, workers: int, bar, log) -> list[dict]:
    """Run `jobs` (in order with one worker, side by side in spawned processes with more); their results."""
    results = []
    if workers == 1:
        for job in jobs:
            results.append(run_job(job, cfg))
            bar.update()
            log.info(f"finished {job.name}")
        return results
    import multiprocessing as mp

    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(run_job, job, cfg): job for job in jobs}
        for fut in as_completed(futures):
            results.append(fut.result())
            bar.update()
            log.info(f"finished {futures[fut].name}")
    return results


def main(args: argparse.Namespace) -> int:
    import sys

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    cfg = {"work_dir": str(work), "foundation": args.foundation, "mask_vae": args.mask_vae,
           "dit_pooled": args.dit_pooled, "dit_tokens": args.dit_tokens, "dit_single": args.dit_single,
           "data_dir": args.data_dir,
           "epochs": args.epochs, "threads": args.threads, "image_root": args.image_root,
           "sampling_seeds": args.sampling_seeds, "fusion_weights": args.fusion_weights,
           "shift_splits": args.shift_splits, "pd_train_steps": args.pd_train_steps,
           "generator_seconds": committed_generator_seconds(args)}
    from diffprompt.training.data.synthetic.writer import ensure_split
    from diffprompt.training.stages.runner import get_logger

    log = get_logger("results", None)
    for split in ("train", *scored_splits(cfg)):
        ensure_split(Path(args.data_dir), split, None, log, args.progress)
    if args.from_scratch:
        train_generators(args, cfg)
    fcfg = json.loads((Path(args.foundation) / "config.json").read_text())
    layers = (fcfg["vision"]["num_hidden_layers"], fcfg["text"]["num_hidden_layers"])
    jobs = plan(args.seeds, args.depths, args.ablation_steps, layers, single_pass=args.dit_single is not None)
    if args.only:
        chosen = [j for j in jobs if any(j.name.startswith(o) for o in args.only)]
        bases = {j.base_job for j in chosen if j.base_job}  # a Prompt Diffusion job needs its base learner
        jobs = [j for j in jobs if j in chosen or j.name in bases]
    results, todo = [], []
    for job in jobs:
        done = work / job.name / "results.json"
        (results.append(json.loads(done.read_text())) if done.exists() else todo.append(job))
    log.info(f"{len(jobs)} jobs, {len(results)} already done, {len(todo)} to run with {args.jobs} worker(s)")
    bar = tqdm(total=len(todo), desc="results", unit="job", disable=not args.progress)
    # two waves: Prompt Diffusion jobs start from the learners the first wave trains
    for wave in ([j for j in todo if not j.prompt_diffusion], [j for j in todo if j.prompt_diffusion]):
        results += run_jobs(wave, cfg, args.jobs, bar, log)
    bar.close()

    cmd = "diffprompt results " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["results"] else sys.argv[1:])
    report, data = render_report(results, cmd.strip(), args.seeds)
    out = Path(args.report)
    out.parent.mkdir(parents=True, exist_ok=True)
    main_dp = work / f"diffprompt-tokens-s{args.seeds[0]}" / "model"  # the generated-mask picture's pipeline
    out.write_text("# REC results (generated)\n\n" + report + f"\n![R@1 per method]({Path(args.plot).name})\n"
                   + (f"\n![generated masks]({Path(args.masks).name})\n" if main_dp.exists() else ""))
    (work / "results.json").write_text(json.dumps({"results": results, "checks": data["checks"]}, indent=2))
    plot_table(data["table"], Path(args.plot))
    if main_dp.exists():
        mask_picture(main_dp, Path(args.data_dir), Path(args.masks), image_root=args.image_root)
    print(report)
    return 0


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", default="runs/results", help="one folder per job; finished jobs are skipped")
    p.add_argument("--foundation", default="checkpoints/foundation")
    p.add_argument("--mask-vae", default="checkpoints/mask_vae")
    p.add_argument("--dit-pooled", default="checkpoints/prompt_dit_pooled")
    p.add_argument("--dit-tokens", default="checkpoints/prompt_dit_tokens")
    p.add_argument("--dit-single", default=None,
                   help="a single-pass DiT (diffprompt train-dit --condition-layers ...): adds the diffprompt-single "
                        "rows, stage 3 on it for every seed (default: none)")
    p.add_argument("--from-scratch", action="store_true", help="train the Mask-VAE and both DiTs into --work-dir first")
    p.add_argument("--data-dir", default="data/synthetic")
    add_image_root_arg(p)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--sampling-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                   help="Diff-Prompt's noise seeds evaluated per trained seed (service seed policy)")
    p.add_argument("--fusion-weights", type=float, nargs="*", default=[0.25, 0.5, 1, 2, 4, 8],
                   help="pointer-fusion weights tried on val for each token Diff-Prompt job (none: no fused row)")
    p.add_argument("--shift-splits", nargs="*", default=list(SHIFT_SPLITS), choices=list(SHIFT_SPLITS),
                   metavar="SPLIT", help=f"distribution-shift splits every job is also scored on, of "
                                         f"{list(SHIFT_SPLITS)} (none: val / testA / testB only)")
    p.add_argument("--epochs", type=int, default=2, help="stage-3 epochs, the same for every method")
    p.add_argument("--pd-train-steps", type=positive_int, default=None,
                   help="Prompt Diffusion jobs: their DiT's training steps (default: train-prompt-diffusion's)")
    p.add_argument("--depths", type=int, nargs="+", default=[1, 3, 6, 9], help="depth ablation (seed 0)")
    p.add_argument("--ablation-steps", type=int, nargs="+", default=[5, 10, 25], help="DDIM steps ablation")
    p.add_argument("--only", nargs="*", default=[],
                   help="run only jobs whose name starts with one of these (a prefix: `vpt` also selects the "
                        "vpt-pd-s* Prompt Diffusion jobs, `vpt-s` the learner alone)")
    p.add_argument("--jobs", type=int, default=1, help="jobs run side by side (processes)")
    p.add_argument("--threads", type=positive_int, default=2, help="torch threads per job")
    p.add_argument("--report", default="docs/rec_results.md")
    p.add_argument("--plot", default="docs/images/rec_results.png")
    p.add_argument("--masks", default="docs/images/generated_masks.png")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


if __name__ == "__main__":
    raise SystemExit(main(build_parser().parse_args()))
