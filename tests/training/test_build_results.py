"""The results-table builder: job plan, aggregation over seeds, the report's acceptance checks, resume."""

from __future__ import annotations

import json

import pytest
import torch

from diffprompt.training import build_results
from diffprompt.training.build_results import BASELINES, Job, aggregate, plan, render_report


def _result(job: Job, r1: dict[str, float], params: int = 10) -> dict:
    steps = job.eval_steps if job.method == "diffprompt" else [0]
    ev = {str(s): {sp: {"n": 100, "R@1": r1[sp] * (0.99 if s == 5 else 1.0), "R@5": 0.9, "UB": 1.0}
                   for sp in ("val", "testA", "testB")} for s in steps}
    from dataclasses import asdict
    return {"job": asdict(job), "trainable_parameters": params, "train_seconds": 1.0, "seconds": 1.0, "eval": ev}


def test_plan_has_every_row_for_every_seed():
    jobs = plan([0, 1, 2], [1, 3, 6, 9], [5, 10, 25])
    names = {j.name for j in jobs}
    assert "foundation" in names
    for seed in (0, 1, 2):
        assert {f"{m}-s{seed}" for m in BASELINES} <= names
        assert {f"diffprompt-pooled-s{seed}", f"diffprompt-tokens-s{seed}"} <= names
    assert {"diffprompt-tokens-depth1-s0", "diffprompt-tokens-depth3-s0"} <= names
    assert "diffprompt-tokens-depth6-s0" not in names  # 6 image / 3 text layers: depth 6 is depth 9
    assert "diffprompt-tokens-depth6-s0" in {j.name for j in plan([0], [6], [25], tower_layers=(12, 12))}
    tokens = next(j for j in jobs if j.name == "diffprompt-tokens-s0")
    assert tokens.eval_steps == [25, 10, 5] and tokens.mask_input == "standardize" and tokens.main_row
    tanh = [j for j in jobs if j.mask_input == "tanh"]
    assert {j.name for j in tanh} == {f"diffprompt-tokens-tanh-s{seed}" for seed in (0, 1, 2)}
    assert not any(j.main_row for j in tanh)


def test_report_means_spreads_and_checks():
    jobs = plan([0, 1], [9], [5, 25])
    results = []
    for j in jobs:
        if j.method == "foundation":
            r1 = {"val": 0.30, "testA": 0.40, "testB": 0.20}
        elif j.method == "diffprompt" and j.conditioning == "tokens" and j.mask_input == "tanh":
            r1 = {"val": 0.35, "testA": 0.45, "testB": 0.25}  # the ablation stays out of the main rows
        elif j.method == "diffprompt" and j.conditioning == "tokens":
            r1 = {"val": 0.60, "testA": 0.60, "testB": 0.45 + 0.02 * j.seed}
        else:
            r1 = {"val": 0.50, "testA": 0.50, "testB": 0.40}
        results.append(_result(j, r1))
    table = aggregate(results)
    assert table["diffprompt-tokens"]["25"]["testB"]["R@1"] == pytest.approx([0.45, 0.47])
    report, data = render_report(results, "diffprompt results --seeds 0 1", [0, 1])
    assert "46.00 ± 1.41" in report  # testB R@1 of the token rows, mean ± sample std
    checks = data["checks"]
    assert checks["best mode"] == "diffprompt-tokens"
    assert checks["gain over foundation, mean(testA, testB) R@1 (>= 9 points)"] == pytest.approx(23.0)
    assert checks["testB R@1 minus best baseline's (> 0)"] == pytest.approx(6.0)
    assert checks["5-step / 25-step mean(testA, testB) R@1 (>= 0.98)"] == pytest.approx(0.99)
    assert "diffprompt results --seeds 0 1" in report
    assert "| tanh of the logits | 35.00 ± 0.00 | 45.00 ± 0.00 | 25.00 ± 0.00 | 35.00 ± 0.00 |" in report
    assert "| standardised per mask (default) | 60.00 ± 0.00 | 60.00 ± 0.00 | 46.00 ± 1.41 | 53.00 ± 0.71 |" in report


def test_builder_runs_jobs_and_skips_finished_ones(small_world, tmp_path):
    """Two real jobs (the foundation and one baseline) on a tiny world, then a rerun that trains nothing."""
    from diffprompt.training.data.synthetic.vocabulary import synthetic_tokenizer
    from diffprompt.training.models.grounding import GROUNDING_PRESETS, GroundingModel

    torch.manual_seed(0)
    tok = synthetic_tokenizer()
    GroundingModel(GROUNDING_PRESETS["baby"](vocab_size=tok.vocab_size)).save_pretrained(tmp_path / "f")
    tok.save(tmp_path / "f")
    argv = ["--work-dir", str(tmp_path / "work"), "--foundation", str(tmp_path / "f"), "--data-dir", str(small_world),
            "--seeds", "0", "--only", "foundation", "vpt", "--threads", "1", "--report", str(tmp_path / "r.md"),
            "--plot", str(tmp_path / "r.png"), "--masks", str(tmp_path / "m.png"), "--no-progress"]
    assert build_results.main(build_results.build_parser().parse_args(argv)) == 0
    done = json.loads((tmp_path / "work" / "vpt-s0" / "results.json").read_text())
    assert set(done["eval"]["0"]) == {"val", "testA", "testB"} and done["trainable_parameters"] > 0
    assert (tmp_path / "r.png").stat().st_size > 0 and "VPT-deep" in (tmp_path / "r.md").read_text()
    mtime = (tmp_path / "work" / "vpt-s0" / "results.json").stat().st_mtime_ns
    assert build_results.main(build_results.build_parser().parse_args(argv)) == 0
    assert (tmp_path / "work" / "vpt-s0" / "results.json").stat().st_mtime_ns == mtime  # not rerun
