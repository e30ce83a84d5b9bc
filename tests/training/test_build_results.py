"""The results-table builder: job plan, aggregation over seeds, the report's acceptance checks, resume."""

from __future__ import annotations

import json

import pytest

from diffprompt.training import build_results
from diffprompt.training.build_results import BASELINES, Job, aggregate, choose_on_val, plan, render_report
from diffprompt.training.data.synthetic.splits import SHIFT_SPLITS
from tests.foundation_testkit import save_baby_foundation


def _result(job: Job, r1: dict[str, float], params: int = 10, sampling: dict[int, float] | None = None) -> dict:
    """A results.json; `sampling` maps sampling seed -> an offset added to every R@1 of that seed."""
    from dataclasses import asdict

    steps = job.eval_steps if job.method == "diffprompt" or job.prompt_diffusion else [0]
    offsets = sampling or {0: 0.0}
    runs = {str(s): {str(seed): {sp: {"n": 100, "R@1": r1[sp] * (0.99 if s == 5 else 1.0) + off, "R@5": 0.9,
                                      "UB": 1.0} for sp in r1}
                     for seed, off in offsets.items()} for s in steps}
    ev = {s: by_seed[str(next(iter(offsets)))] for s, by_seed in runs.items()}
    return {"job": asdict(job), "trainable_parameters": params, "train_seconds": 1.0, "seconds": 1.0, "eval": ev,
            "sampling": runs}


def _means(val: dict[str, float], test: dict[str, float]) -> dict:
    """A fake `means` table: row -> val R@1 and a testB R@1 (at steps "0")."""
    return {(row, "0"): {"val": v, "testA": test[row], "testB": test[row], "mean_ab": test[row]}
            for row, v in val.items()}


def test_choose_on_val_ignores_the_test_splits():
    means = _means({"vpt": 0.40, "coop": 0.35, "maple": 0.30}, {"vpt": 0.20, "coop": 0.25, "maple": 0.50})
    assert choose_on_val(means, BASELINES, "0") == "vpt"  # maple has the best test numbers, vpt the best val
    assert choose_on_val(means, ["coop", "maple"], "0") == "coop"
    assert choose_on_val(means, BASELINES, "5") is None  # no row at that step count
    assert choose_on_val(means, ["linear_probe"], "0") is None  # a row without results is never chosen


def test_report_picks_best_mode_and_baseline_on_val():
    """The pooled mode and MaPLe are best on the test splits, the token mode and CoOp on val: val decides."""
    results = [_result(Job("foundation", "foundation"), {"val": 0.30, "testA": 0.40, "testB": 0.20}),
               _result(Job("pointer", "pointer"), {"val": 0.50, "testA": 0.50, "testB": 0.30})]
    for seed in (0, 1):
        for method, r1 in {"coop": {"val": 0.45, "testA": 0.40, "testB": 0.20},
                           "maple": {"val": 0.35, "testA": 0.60, "testB": 0.40}}.items():
            results.append(_result(Job(f"{method}-s{seed}", method, seed), r1))
        for mode, r1 in {"pooled": {"val": 0.40, "testA": 0.90, "testB": 0.80},
                         "tokens": {"val": 0.60, "testA": 0.60, "testB": 0.45}}.items():
            results.append(_result(Job(f"diffprompt-{mode}-s{seed}", "diffprompt", seed, mode, eval_steps=[25, 5]), r1))
    _, data = render_report(results, "diffprompt results", [0, 1])
    checks = data["checks"]
    assert checks["best mode (highest val R@1 at the served steps)"] == "diffprompt-tokens, 5 DDIM steps"
    assert checks["best baseline (highest val R@1)"] == "coop"
    assert checks["testB R@1 minus best baseline's (> 0)"] == pytest.approx(100 * (0.45 * 0.99 - 0.20))
    assert checks["val R@1 of the best mode minus the pointer ranking's (> 0)"] == pytest.approx(100 * (0.594 - 0.5))


def test_the_single_pass_mode_is_a_row_for_every_seed_and_can_be_chosen_on_val():
    """--dit-single adds diffprompt-single-s{seed} (stage 3 on the single-pass DiT), a mode like the others:
    chosen when its val R@1 is the highest, whatever the test splits say."""
    assert not any(j.conditioning == "single" for j in plan([0], [9], [5]))
    single = [j for j in plan([0, 1, 2], [9], [5], single_pass=True) if j.conditioning == "single"]
    assert [(j.name, j.row, j.eval_steps, j.stochastic) for j in single] == [
        (f"diffprompt-single-s{s}", "diffprompt-single", [25, 5], True) for s in (0, 1, 2)]
    results = [_result(Job("foundation", "foundation"), {"val": 0.30, "testA": 0.40, "testB": 0.20})]
    for seed in (0, 1):
        for mode, r1 in {"tokens": {"val": 0.50, "testA": 0.70, "testB": 0.50},
                         "single": {"val": 0.55, "testA": 0.60, "testB": 0.40}}.items():
            results.append(_result(Job(f"diffprompt-{mode}-s{seed}", "diffprompt", seed, mode, eval_steps=[25, 5]), r1))
    report, data = render_report(results, "diffprompt results --dit-single runs/dit_single", [0, 1])
    assert data["checks"]["best mode (highest val R@1 at the served steps)"] == "diffprompt-single, 5 DDIM steps"
    assert build_results.LABELS["diffprompt-single"] in report


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
        if j.method in ("foundation", "pointer"):
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
    assert checks["best mode (highest val R@1 at the served steps)"] == "diffprompt-tokens, 5 DDIM steps"
    assert checks["gain over foundation, mean(testA, testB) R@1 (>= 9 points)"] == pytest.approx(
        100 * (0.99 * (0.60 + 0.46) / 2 - 0.30))  # at the served 5 steps
    assert checks["testB R@1 minus best baseline's (> 0)"] == pytest.approx(100 * (0.99 * 0.46 - 0.40))
    assert checks["5-step / 25-step mean(testA, testB) R@1 (>= 0.98)"] == pytest.approx(0.99)
    assert "diffprompt results --seeds 0 1" in report
    assert "| tanh of the logits | 35.00 ± 0.00 | 45.00 ± 0.00 | 25.00 ± 0.00 | 35.00 ± 0.00 |" in report
    assert "| standardised per mask (default) | 60.00 ± 0.00 | 60.00 ± 0.00 | 46.00 ± 1.41 | 53.00 ± 0.71 |" in report


def test_shift_splits_get_their_own_table_and_change_no_choice():
    """Rows scored on the shift splits show them beside val / testA / testB; a row from before them shows
    n/a; the best baseline is still chosen on val although the other one is far better under shift."""
    results = [_result(Job("foundation", "foundation"), {"val": 0.30, "testA": 0.40, "testB": 0.20}),
               _result(Job("diffprompt-tokens-s0", "diffprompt", 0, "tokens", eval_steps=[25, 5]),
                       {"val": 0.60, "testA": 0.60, "testB": 0.45})]
    for method, val, shift in (("coop", 0.45, 0.10), ("maple", 0.35, 0.90)):
        r = _result(Job(f"{method}-s0", method, 0), {"val": val, "testA": 0.40, "testB": 0.20})
        for split, value in zip(SHIFT_SPLITS, (shift, shift + 0.02, shift + 0.04)):
            r["sampling"]["0"]["0"][split] = {"n": 100, "R@1": value, "R@5": 0.9, "UB": 1.0}
        results.append(r)
    report, data = render_report(results, "diffprompt results", [0])
    assert data["checks"]["best baseline (highest val R@1)"] == "coop"
    table = report.split("### Under distribution shift (R@1)")[1].split("###")[0]
    assert "| Method | DDIM steps | val | testA | testB | shift_background | shift_size | shift_crowded | " \
           "mean(shift) |" in table
    assert "| CoOp (deep text prompts) | - | 45.00 | 40.00 | 20.00 | 10.00 | 12.00 | 14.00 | 12.00 |" in table
    assert "| MaPLe | - | 35.00 | 40.00 | 20.00 | 90.00 | 92.00 | 94.00 | 92.00 |" in table
    assert "| Frozen foundation (zero-shot) | - | 30.00 | 40.00 | 20.00 | n/a | n/a | n/a | n/a |" in table
    old_only, _ = render_report(results[:1], "diffprompt results", [0])
    assert "Under distribution shift" not in old_only  # no row was scored under shift: no table


def test_spread_counts_sampling_seeds_and_costs_count_every_stage():
    job = Job("diffprompt-tokens-s0", "diffprompt", 0, "tokens", eval_steps=[5])
    r = _result(job, {"val": 0.50, "testA": 0.50, "testB": 0.50}, params=4_000_000,
                sampling={0: 0.0, 1: 0.02, 2: -0.02})
    table = aggregate([r])
    assert table["diffprompt-tokens"]["5"]["val"]["R@1"] == pytest.approx([0.495, 0.515, 0.475])
    old = dict(r)
    del old["sampling"]  # a results.json from before sampling seeds: its one evaluation
    assert aggregate([old])["diffprompt-tokens"]["5"]["val"]["R@1"] == pytest.approx([0.495])
    report, _ = render_report([r], "diffprompt results", [0])
    assert "| 4,000,000 | 1 |" in report and "49.50 ± 2.00" in report


def test_the_fused_row_is_a_mode_chosen_on_val_with_its_weights():
    job = Job("diffprompt-tokens-s0", "diffprompt", 0, "tokens", eval_steps=[25, 5])
    results = [_result(Job("foundation", "foundation"), {"val": 0.30, "testA": 0.40, "testB": 0.20}),
               _result(job, {"val": 0.45, "testA": 0.60, "testB": 0.30})]
    fused = _result(job, {"val": 0.55, "testA": 0.50, "testB": 0.25})
    results[1]["fused"] = {"pointer_weight": 2.0, "sampling": {"5": fused["sampling"]["5"]}}
    table = aggregate(results)
    assert table["diffprompt-tokens-fused"]["5"]["val"]["R@1"] == pytest.approx([0.55 * 0.99])
    assert table["diffprompt-tokens-fused"]["_pointer_weight"] == [2.0]
    report, data = render_report(results, "diffprompt results", [0])
    assert "pointer fusion (weight chosen on val) (weights [2.0])" in report
    assert data["checks"]["best mode (highest val R@1 at the served steps)"] == "diffprompt-tokens-fused, 5 DDIM steps"


def test_generator_cost_adds_stages_1_and_2(tmp_path):
    from safetensors.numpy import save_file

    for name, shape in (("vae", (3, 4)), ("dit", (10,))):
        (tmp_path / name).mkdir()
        save_file({"w": __import__("numpy").zeros(shape, "f4")}, str(tmp_path / name / "model.safetensors"))
    cfg = {"mask_vae": str(tmp_path / "vae"), "dit_tokens": str(tmp_path / "dit"),
           "generator_seconds": {"mask_vae": 100.0, "tokens": 600.0, "pooled": None}}
    assert build_results.generator_cost(cfg, "tokens") == (22, 700.0)
    cfg["dit_pooled"] = cfg["dit_tokens"]
    assert build_results.generator_cost(cfg, "pooled") == (22, None)  # not measured: no made-up time


def test_builder_runs_jobs_and_skips_finished_ones(small_world, tmp_path):
    """Two real jobs (the foundation and one baseline) on a tiny world, then a rerun that trains nothing."""

    save_baby_foundation(tmp_path / "f")
    argv = ["--work-dir", str(tmp_path / "work"), "--foundation", str(tmp_path / "f"), "--data-dir", str(small_world),
            "--seeds", "0", "--only", "foundation", "vpt-s", "--threads", "1", "--report", str(tmp_path / "r.md"),
            "--plot", str(tmp_path / "r.png"), "--masks", str(tmp_path / "m.png"), "--no-progress"]
    assert build_results.main(build_results.build_parser().parse_args(argv)) == 0
    assert sorted(p.name for p in (tmp_path / "work").iterdir() if p.is_dir()) == ["foundation", "vpt-s0"]  # no PD job
    done = json.loads((tmp_path / "work" / "vpt-s0" / "results.json").read_text())
    assert set(done["eval"]["0"]) == {"val", "testA", "testB", *SHIFT_SPLITS} and done["trainable_parameters"] > 0
    assert (tmp_path / "r.png").stat().st_size > 0 and "VPT-deep" in (tmp_path / "r.md").read_text()
    assert "### Under distribution shift (R@1)" in (tmp_path / "r.md").read_text()
    mtime = (tmp_path / "work" / "vpt-s0" / "results.json").stat().st_mtime_ns
    assert build_results.main(build_results.build_parser().parse_args(argv)) == 0
    assert (tmp_path / "work" / "vpt-s0" / "results.json").stat().st_mtime_ns == mtime  # not rerun


def test_pointer_job_counts_stages_1_2_and_fuses_on_val(tiny_pipeline_dir, small_world, tmp_path):
    """The pointer-ranking job on the tiny pipeline's DiT: no training of its own, the generators' cost,
    and the no-diffusion fusion row with a weight of the given grid."""
    root = tiny_pipeline_dir.parent
    argv = ["--work-dir", str(tmp_path / "work"), "--foundation", str(root / "foundation"),
            "--mask-vae", str(root / "vae"), "--dit-tokens", str(root / "dit"), "--data-dir", str(small_world),
            "--seeds", "0", "--only", "pointer", "--fusion-weights", "1", "3", "--threads", "1",
            "--report", str(tmp_path / "r.md"), "--plot", str(tmp_path / "r.png"), "--masks", str(tmp_path / "m.png"),
            "--no-progress"]
    assert build_results.main(build_results.build_parser().parse_args(argv)) == 0
    done = json.loads((tmp_path / "work" / "pointer" / "results.json").read_text())
    assert done["trainable_parameters"] == (build_results.count_parameters(root / "vae")
                                            + build_results.count_parameters(root / "dit"))
    assert done["train_seconds"] is None  # not the committed generators: their time is unknown, not 0
    assert done["fused"]["pointer_weight"] in (1.0, 3.0)
    assert set(done["fused"]["val_R@1_by_weight"]) == {"1.0", "3.0"}
    report = (tmp_path / "r.md").read_text()
    assert "Pointer ranking" in report and "Foundation + pointer fusion" in report and "| n/a |" in report


def test_prompt_diffusion_rows_compare_each_learner_with_and_without_it():
    """CoOp + PD gains 5 points under shift and loses 1 in domain at 5 steps; its table, the time per
    stage and the checks say so; PD jobs come after their base learners' in the plan."""
    jobs = plan([0, 1], [9], [5])
    pd_jobs = [j for j in jobs if j.prompt_diffusion]
    assert {j.name for j in pd_jobs} == {f"{m}-pd-s{s}" for m in ("vpt", "coop", "maple", "diffprompt") for s in (0, 1)}
    bases = {"diffprompt": "diffprompt-tokens"}  # Diff-Prompt's global prompts: its token-conditioning learner
    assert all(j.base_job == f"{bases.get(j.method, j.method)}-s{j.seed}" and j.stochastic
               and j.row == f"{j.method}-pd" for j in pd_jobs)
    assert {j.base_job for j in pd_jobs} <= {j.name for j in jobs}
    results = []
    for seed in (0, 1):
        base = {"val": 0.40 + 0.02 * seed, "testA": 0.40, "testB": 0.20, **dict.fromkeys(SHIFT_SPLITS, 0.30)}
        results.append(_result(Job(f"coop-s{seed}", "coop", seed), base))
        pd = {**{sp: v - 0.01 for sp, v in base.items()}, **dict.fromkeys(SHIFT_SPLITS, 0.35)}
        r = _result(Job(f"coop-pd-s{seed}", "coop", seed, eval_steps=[25, 5], prompt_diffusion=True), pd)
        r.update(base_parameters=3072, prompt_diffusion_parameters=500_000, train_seconds=300.0,
                 stage_seconds={"base": 100.0, "conditions": 10.0, "targets": 150.0, "diffusion": 30.0,
                                "validation": 10.0})
        results.append(r)
    report, data = render_report(results, "diffprompt results --only coop", [0, 1])
    section = report.split("### Prompt Diffusion on each prompt learner (R@1)")[1].split("###")[0]
    assert "| CoOp (deep text prompts) | - | 41.00 ± 1.41 | 30.00 ± 0.00 | 30.00 ± 0.00 | | | 1.41 / 0.00 |" in section
    # at 25 steps: every split -1 point, shift 35; at 5 steps everything x 0.99
    assert "| CoOp (deep text prompts) + PD | 25 | 40.00 ± 1.41 | 29.00 ± 0.00 | 35.00 ± 0.00 | -1.00 / -1.00 | " \
           "+5.00 | |" in section
    assert "| CoOp (deep text prompts) | 3,072 | 500,000 | 100 | 10 | 150 | 30 | 10 | 300 |" in section
    checks = data["checks"]
    shift_change = checks["coop + PD (5 steps): mean(shift) R@1 change (>= 2 points)"]
    assert shift_change == pytest.approx(100 * (0.35 * 0.99 - 0.30))
    val_change = checks["coop + PD (5 steps): val R@1 change (>= -1.41, the base's seed noise)"]
    assert val_change == pytest.approx(100 * (0.40 * 0.99 - 0.41))
    assert checks["coop + PD: 5-step / 25-step R@1, mean of val, testA, testB (>= 0.98)"] == pytest.approx(0.99)
    assert "| CoOp + Prompt Diffusion | 5 |" in report.split("### Under distribution shift (R@1)")[1]


def test_a_prompt_diffusion_job_trains_its_base_first_and_counts_both(small_world, tmp_path):
    """`--only coop-pd` runs coop-s0 (its base) and then coop-pd-s0 on a tiny world, for real."""
    save_baby_foundation(tmp_path / "f")
    argv = ["--work-dir", str(tmp_path / "work"), "--foundation", str(tmp_path / "f"), "--data-dir", str(small_world),
            "--seeds", "0", "--only", "coop-pd", "--pd-train-steps", "2", "--sampling-seeds", "0", "1",
            "--shift-splits", "shift_size", "--threads", "1", "--report", str(tmp_path / "r.md"),
            "--plot", str(tmp_path / "r.png"), "--masks", str(tmp_path / "m.png"), "--no-progress"]
    assert build_results.main(build_results.build_parser().parse_args(argv)) == 0
    base = json.loads((tmp_path / "work" / "coop-s0" / "results.json").read_text())
    done = json.loads((tmp_path / "work" / "coop-pd-s0" / "results.json").read_text())
    assert done["base_parameters"] == base["trainable_parameters"] > 0
    assert done["trainable_parameters"] == base["trainable_parameters"] + done["prompt_diffusion_parameters"]
    assert done["stage_seconds"]["base"] == base["train_seconds"] and done["stage_seconds"]["targets"] > 0
    assert set(done["sampling"]) == {"25", "5"} and set(done["sampling"]["5"]) == {"0", "1"}
    assert set(done["sampling"]["5"]["0"]) == {"val", "testA", "testB", "shift_size"}
    assert (tmp_path / "work" / "coop-pd-s0" / "model" / "prompt_diffusion" / "config.json").exists()
    assert "### Prompt Diffusion on each prompt learner (R@1)" in (tmp_path / "r.md").read_text()


def test_diffprompt_prompt_diffusion_is_compared_with_diffprompt_at_the_same_steps():
    """Diff-Prompt + PD (global prompts) against Diff-Prompt tokens at 5 steps (its own masks sampled),
    its untimed generators leaving the total blank rather than failing."""
    base_job = Job("diffprompt-tokens-s0", "diffprompt", 0, "tokens", eval_steps=[25, 5])
    scores = {"val": 0.50, "testA": 0.60, "testB": 0.40, **dict.fromkeys(SHIFT_SPLITS, 0.30)}
    base = _result(base_job, scores)  # at 5 steps every R@1 x 0.99
    pd = _result(Job("diffprompt-pd-s0", "diffprompt", 0, eval_steps=[25, 5], prompt_diffusion=True),
                 {**scores, **dict.fromkeys(SHIFT_SPLITS, 0.33)})
    pd.update(base_parameters=3_900_000, prompt_diffusion_parameters=400_000, train_seconds=None,
              stage_seconds={"base": None, "conditions": 10.0, "targets": 150.0, "diffusion": 30.0, "validation": 10.0})
    report, data = render_report([base, pd], "diffprompt results --only diffprompt-pd", [0])
    section = report.split("### Prompt Diffusion on each prompt learner (R@1)")[1].split("###")[0]
    label = build_results.LABELS["diffprompt-tokens"]
    assert f"| {label} | 5 | 49.50 | 49.50 | 29.70 | | | n/a (one training seed) |" in section
    assert f"| {label} + PD | 5 | 49.50 | 49.50 | 32.67 | +0.00 / +0.00 | +2.97 | |" in section
    assert f"| {label} + PD | 25 | 50.00 | 50.00 | 33.00 | +0.00 / +0.00 | +3.00 | |" in section  # base at 25
    assert f"| {label} | 3,900,000 | 400,000 | nan | 10 | 150 | 30 | 10 | nan |" in section
    assert data["checks"]["diffprompt + PD (5 steps): mean(shift) R@1 change (>= 2 points)"] == pytest.approx(2.97)
