"""Rebuild the REC results table: the frozen foundation, every baseline and Diff-Prompt, 3 seeds.

    diffprompt results                       # uses the committed stage-1/2 checkpoints
    diffprompt results --from-scratch        # trains the Mask-VAE and both DiTs first
    diffprompt results --jobs 2 --threads 1  # two training jobs side by side

Every job (train one method with one seed, then evaluate it on val / testA / testB) writes
`{work-dir}/{job}/results.json`; a rerun skips finished jobs, so an interrupted build resumes
where it stopped. At the end the command writes the report (markdown tables with mean and
spread over seeds, trainable parameter counts, ablations of prompt depth, DDIM steps and the
adapters' mask input, the acceptance checks), its JSON, a plot of the table and a picture of
generated masks. All 27 jobs take about 55 min with `--jobs 2 --threads 1` on 2 CPU cores.
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
from diffprompt.training.options import add_image_root_arg

SPLITS = ("val", "testA", "testB")
BASELINES = ("vpt", "coop", "maple", "clip_adapter", "linear_probe")
LABELS = {"foundation": "Frozen foundation (zero-shot)", "vpt": "VPT-deep", "coop": "CoOp (deep text prompts)",
          "maple": "MaPLe", "clip_adapter": "CLIP-Adapter", "linear_probe": "Linear probe (heads)",
          "diffprompt-pooled": "Diff-Prompt, pooled conditioning (paper)",
          "diffprompt-tokens": "Diff-Prompt, token conditioning (ours)"}


@dataclass
class Job:
    name: str
    method: str  # "foundation" or a PromptLearner method
    seed: int = 0
    conditioning: str | None = None  # Diff-Prompt's DiT
    depth: int = 9
    eval_steps: list[int] = field(default_factory=lambda: [25])  # DDIM steps evaluated (Diff-Prompt)
    mask_input: str = "standardize"  # Diff-Prompt adapters' input; "tanh" rows are an ablation

    @property
    def main_row(self) -> bool:
        """Part of the main table (not a depth or adapter-input ablation)."""
        return self.depth == 9 and self.mask_input == "standardize"

    @property
    def row(self) -> str:
        return f"{self.method}-{self.conditioning}" if self.conditioning else self.method


def plan(seeds: list[int], depths: list[int], ablation_steps: list[int],
         tower_layers: tuple[int, int] = (6, 3)) -> list[Job]:
    """Every job of the table. A depth whose capped layout (image layers, text layers) equals
    depth 9's is the main run already and gets no job of its own. The adapter-input ablation
    (tanh of the mask logits instead of standardised masks) runs for every seed."""
    jobs = [Job("foundation", "foundation")]
    for seed in seeds:
        for method in BASELINES:
            jobs.append(Job(f"{method}-s{seed}", method, seed))
        jobs.append(Job(f"diffprompt-pooled-s{seed}", "diffprompt", seed, "pooled", eval_steps=[25, 5]))
        jobs.append(Job(f"diffprompt-tokens-s{seed}", "diffprompt", seed, "tokens",
                        eval_steps=sorted(set(ablation_steps) | {25, 5}, reverse=True)))
    layout = lambda d: (min(d, tower_layers[0]), min(d, tower_layers[1]))
    for depth in depths:
        if layout(depth) != layout(9):
            jobs.append(Job(f"diffprompt-tokens-depth{depth}-s{seeds[0]}", "diffprompt", seeds[0], "tokens", depth))
    jobs += [Job(f"diffprompt-tokens-tanh-s{seed}", "diffprompt", seed, "tokens", mask_input="tanh") for seed in seeds]
    return jobs


def run_job(job: Job, cfg: dict) -> dict:
    """Train (unless the foundation) and evaluate one job; writes and returns its results.json."""
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
    if job.method == "foundation":
        pipeline = DiffPromptPipeline.foundation_only(cfg["foundation"])
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
        summary = train(build_parser().parse_args(argv))
        summary = {"trainable_parameters": summary["trainable_parameters"], "train_seconds": summary["seconds"]}
        pipeline = DiffPromptPipeline.from_pretrained(out / "model")
    evals = {}
    for steps in (job.eval_steps if job.method == "diffprompt" else [0]):
        pipeline.steps = steps or 25
        evals[str(steps)] = {}
        for split in SPLITS:
            samples = load_split(Path(cfg["data_dir"]) / f"{split}.json", cfg.get("image_root"))
            acc = evaluate_samples(pipeline, pipeline.tokenizer, samples, progress=False, seed=job.seed)
            evals[str(steps)][split] = {k: v for k, v in acc.summary()[-1].as_dict().items() if k != "group"}
    result = {"job": asdict(job), **summary, "seconds": time.time() - t0, "eval": evals}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    return result


# ----------------------------------------------------------------------------- report


def _stat(values: list[float]) -> str:
    v = 100 * np.asarray(values)
    return f"{v.mean():.2f}" if len(v) == 1 else f"{v.mean():.2f} ± {v.std(ddof=1):.2f}"


def aggregate(results: list[dict]) -> dict:
    """row -> steps -> split -> metric -> [values over seeds] (main rows, depth 9)."""
    table: dict = {}
    for r in results:
        job = Job(**r["job"])
        if not job.main_row:
            continue
        for steps, splits in r["eval"].items():
            for split, metrics in splits.items():
                for metric, value in metrics.items():
                    if metric in ("R@1", "R@5", "UB"):
                        (table.setdefault(job.row, {}).setdefault(steps, {}).setdefault(split, {})
                         .setdefault(metric, []).append(value))
        table[job.row].setdefault("_params", r["trainable_parameters"])
        table[job.row].setdefault("_seconds", []).append(r["train_seconds"])
    return table


def render_report(results: list[dict], cmd: str, seeds: list[int]) -> tuple[str, dict]:
    table = aggregate(results)
    lines = [f"Produced by `{cmd}`. Mean ± sample std over seeds {seeds} (one value: a single run). "
             "IoU >= 0.5, all expressions of each split.", "",
             "| Method | DDIM steps | trainable params | train s | val R@1 / R@5 / UB | testA R@1 / R@5 / UB | "
             "testB R@1 / R@5 / UB | mean(testA, testB) R@1 |", "|---|---|---|---|---|---|---|---|"]
    order = ["foundation", *BASELINES, "diffprompt-pooled", "diffprompt-tokens"]
    means = {}
    for row in order:
        if row not in table:
            continue
        for steps in sorted((k for k in table[row] if not k.startswith("_")), key=lambda s: -int(s)):
            if row == "diffprompt-tokens" and steps not in ("25", "5"):
                continue
            cells = [" / ".join(_stat(table[row][steps][sp][m]) for m in ("R@1", "R@5", "UB")) for sp in SPLITS]
            ev = table[row][steps]
            mean_ab = [(a + b) / 2 for a, b in zip(ev["testA"]["R@1"], ev["testB"]["R@1"])]
            means[(row, steps)] = {"mean_ab": float(np.mean(mean_ab)),
                                   "testB": float(np.mean(table[row][steps]["testB"]["R@1"]))}
            secs = np.mean(table[row]["_seconds"])
            lines.append(f"| {LABELS[row]} | {steps if steps != '0' else '-'} | {table[row]['_params']:,} | "
                         f"{secs:.0f} | {' | '.join(cells)} | {_stat(mean_ab)} |")

    # ablations
    lines += ["", "### Ablation: DDIM steps (token conditioning, depth 9)", "",
              "| DDIM steps | val R@1 | testA R@1 | testB R@1 |", "|---|---|---|---|"]
    for steps in sorted((k for k in table.get("diffprompt-tokens", {}) if not k.startswith("_")), key=int):
        lines.append(f"| {steps} | " + " | ".join(_stat(table["diffprompt-tokens"][steps][sp]["R@1"]) for sp in SPLITS)
                     + " |")
    lines += ["", f"### Ablation: prompt depth (token conditioning, 25 DDIM steps, seed {seeds[0]})", "",
              "| depth (image / text layers) | trainable params | val R@1 | testA R@1 | testB R@1 |",
              "|---|---|---|---|---|"]
    tokens_runs = [(job, r) for job, r in ((Job(**r["job"]), r) for r in results) if job.conditioning == "tokens"]
    depth_runs = [(job, r) for job, r in tokens_runs if job.seed == seeds[0] and job.mask_input == "standardize"]
    for job, r in sorted(depth_runs, key=lambda jr: jr[0].depth):
        d = job.depth
        ev = r["eval"]["25"]
        same = " = depth 6 (the image tower has 6 layers)" if d == 9 else ""
        lines.append(f"| {d} ({min(d, 6)} / {min(d, 3)}){same} | {r['trainable_parameters']:,} | "
                     + " | ".join(f"{100 * ev[sp]['R@1']:.2f}" for sp in SPLITS) + " |")

    lines += ["", "### Ablation: the adapters' mask input (token conditioning, depth 9, 25 DDIM steps)", "",
              "| mask input | val R@1 | testA R@1 | testB R@1 | mean(testA, testB) R@1 |", "|---|---|---|---|---|"]
    for mask_input, label in (("standardize", "standardised per mask (default)"), ("tanh", "tanh of the logits")):
        runs = [r["eval"]["25"] for job, r in tokens_runs if job.depth == 9 and job.mask_input == mask_input]
        if runs:
            mean_ab = [(ev["testA"]["R@1"] + ev["testB"]["R@1"]) / 2 for ev in runs]
            lines.append(f"| {label} | " + " | ".join(_stat([ev[sp]["R@1"] for ev in runs]) for sp in SPLITS)
                         + f" | {_stat(mean_ab)} |")

    # acceptance checks
    checks = {}
    if ("foundation", "0") in means and any(k[0].startswith("diffprompt") for k in means):
        best_mode = max(("diffprompt-pooled", "diffprompt-tokens"),
                        key=lambda r: means.get((r, "25"), {"mean_ab": -1})["mean_ab"])
        dp, dp5 = means[(best_mode, "25")], means.get((best_mode, "5"))
        base_b = max((means[(b, "0")]["testB"] for b in BASELINES if (b, "0") in means), default=float("nan"))
        gain = 100 * (dp["mean_ab"] - means[("foundation", "0")]["mean_ab"])
        checks = {
            "best mode": best_mode,
            "gain over foundation, mean(testA, testB) R@1 (>= 9 points)": gain,
            "testB R@1 minus best baseline's (> 0)": 100 * (dp["testB"] - base_b),
            "5-step / 25-step mean(testA, testB) R@1 (>= 0.98)":
                dp5["mean_ab"] / dp["mean_ab"] if dp5 else float("nan"),
        }
        lines += ["", "### Acceptance checks", ""]
        lines += [f"- {k}: {v:.2f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in checks.items()]
    return "\n".join(lines) + "\n", {"table": table, "checks": checks}


def plot_table(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(r, s) for r in ["foundation", *BASELINES, "diffprompt-pooled", "diffprompt-tokens"] if r in table
            for s in sorted((k for k in table[r] if not k.startswith("_")), key=lambda s: -int(s))
            if not (r == "diffprompt-tokens" and s not in ("25", "5"))]
    fig, ax = plt.subplots(figsize=(12, 4.5))
    width = 0.27
    x = np.arange(len(rows))
    for j, split in enumerate(SPLITS):
        vals = [100 * np.asarray(table[r][s][split]["R@1"]) for r, s in rows]
        ax.bar(x + (j - 1) * width, [v.mean() for v in vals], width, label=split,
               yerr=[v.std(ddof=1) if len(v) > 1 else 0 for v in vals], capsize=2)
    ax.set_xticks(x, [LABELS[r].split(",")[0].replace(" (zero-shot)", "") + (f"\n{s} steps" if s != "0" else "")
                      + ("\n(pooled)" if "pooled" in r else "\n(tokens)" if "tokens" in r else "") for r, s in rows],
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
    from diffprompt.training.evaluation.rec import sample_seed
    from diffprompt.training.models.diffprompt import DiffPromptPipeline

    pipeline = DiffPromptPipeline.from_pretrained(pipeline_dir)
    samples = load_split(data_dir / "val.json", image_root, n)
    spec = ImageSpec.from_config(pipeline.foundation.config)
    m = pipeline.vae.config.sample_size
    pixels = torch.stack([torch.from_numpy(load_pixels(s, spec)) for s in samples])
    ids, mask = (torch.from_numpy(a) for a in pipeline.tokenizer([s.expression for s in samples]))
    seeds = [sample_seed(seed, s.sample_id) for s in samples]
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
    if not (work / "mask_vae" / "config.json").exists():
        train_mask_vae.main(train_mask_vae.build_parser().parse_args(["--output", str(work / "mask_vae"), *common]))
    cfg["mask_vae"] = str(work / "mask_vae")
    for mode in ("pooled", "tokens"):
        out = work / f"prompt_dit_{mode}"
        if not (out / "config.json").exists():
            train_prompt_dit.main(train_prompt_dit.build_parser().parse_args(
                ["--conditioning", mode, "--foundation", cfg["foundation"], "--mask-vae", cfg["mask_vae"],
                 "--output", str(out), *common]))
        cfg[f"dit_{mode}"] = str(out)


def main(args: argparse.Namespace) -> int:
    import sys

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    cfg = {"work_dir": str(work), "foundation": args.foundation, "mask_vae": args.mask_vae,
           "dit_pooled": args.dit_pooled, "dit_tokens": args.dit_tokens, "data_dir": args.data_dir,
           "epochs": args.epochs, "threads": args.threads, "image_root": args.image_root}
    from diffprompt.training.data.synthetic.writer import ensure_split
    from diffprompt.training.stages.runner import get_logger

    log = get_logger("results", None)
    for split in ("train", *SPLITS):
        ensure_split(Path(args.data_dir), split, None, log, args.progress)
    if args.from_scratch:
        train_generators(args, cfg)
    fcfg = json.loads((Path(args.foundation) / "config.json").read_text())
    layers = (fcfg["vision"]["num_hidden_layers"], fcfg["text"]["num_hidden_layers"])
    jobs = plan(args.seeds, args.depths, args.ablation_steps, layers)
    if args.only:
        jobs = [j for j in jobs if any(j.name.startswith(o) for o in args.only)]
    results, todo = [], []
    for job in jobs:
        done = work / job.name / "results.json"
        (results.append(json.loads(done.read_text())) if done.exists() else todo.append(job))
    log.info(f"{len(jobs)} jobs, {len(results)} already done, {len(todo)} to run with {args.jobs} worker(s)")
    bar = tqdm(total=len(todo), desc="results", unit="job", disable=not args.progress)
    if args.jobs == 1:
        for job in todo:
            results.append(run_job(job, cfg))
            bar.update()
            log.info(f"finished {job.name}")
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(run_job, job, cfg): job for job in todo}
            for fut in as_completed(futures):
                results.append(fut.result())
                bar.update()
                log.info(f"finished {futures[fut].name}")
    bar.close()

    cmd = "diffprompt results " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["results"] else sys.argv[1:])
    report, data = render_report(results, cmd.strip(), args.seeds)
    out = Path(args.report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("# REC results (generated)\n\n" + report
                   + f"\n![R@1 per method]({Path(args.plot).name})\n\n![generated masks]({Path(args.masks).name})\n")
    (work / "results.json").write_text(json.dumps({"results": results, "checks": data["checks"]}, indent=2))
    plot_table(data["table"], Path(args.plot))
    main_dp = work / f"diffprompt-tokens-s{args.seeds[0]}" / "model"
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
    p.add_argument("--from-scratch", action="store_true", help="train the Mask-VAE and both DiTs into --work-dir first")
    p.add_argument("--data-dir", default="data/synthetic")
    add_image_root_arg(p)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=2, help="stage-3 epochs, the same for every method")
    p.add_argument("--depths", type=int, nargs="+", default=[1, 3, 6, 9], help="depth ablation (seed 0)")
    p.add_argument("--ablation-steps", type=int, nargs="+", default=[5, 10, 25], help="DDIM steps ablation")
    p.add_argument("--only", nargs="*", default=[], help="run only jobs whose name starts with one of these")
    p.add_argument("--jobs", type=int, default=1, help="jobs run side by side (processes)")
    p.add_argument("--threads", type=positive_int, default=2, help="torch threads per job")
    p.add_argument("--report", default="docs/rec_results.md")
    p.add_argument("--plot", default="docs/images/rec_results.png")
    p.add_argument("--masks", default="docs/images/generated_masks.png")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


if __name__ == "__main__":
    raise SystemExit(main(build_parser().parse_args()))
