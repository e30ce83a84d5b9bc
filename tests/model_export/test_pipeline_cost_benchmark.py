"""benchmarks/pipeline_cost.py end to end on the tiny pipeline: real exports, real onnxruntime sessions,
one row per step count with the ratio the table prints (no speed is asserted: that is the benchmark's job)."""

from __future__ import annotations

import json

from benchmarks import pipeline_cost


def test_the_benchmark_times_foundation_and_pipeline_side_by_side(tiny_pipeline_dir, small_world, tmp_path, capsys):
    out = tmp_path / "rows.json"
    argv = ["--work", str(tmp_path / "work"), "--models", "embedded", "--pipeline", str(tiny_pipeline_dir),
            "--data-dir", str(small_world), "--steps", "2", "3", "--attention", "fused", "plain",
            "--repeats", "3", "--warmup", "1", "--out", str(out)]
    assert pipeline_cost.main(argv) == 0
    rows = json.loads(out.read_text())
    assert [(r["model"], r["mode"], r["attention"], r["steps"]) for r in rows] == [
        ("embedded", m, a, s) for m in ("two-pass", "single-pass") for a in ("fused", "plain") for s in (2, 3)]
    for r in rows:
        assert r["ratio"] == r["pipeline_p50_ms"] / r["foundation_p50_ms"] > 0
        assert all(r[f"{stage}_p50_ms"] > 0 for stage in pipeline_cost.STAGES)
    assert (tmp_path / "work" / "embedded" / "foundation" / "manifest.json").exists()  # the foundation alone
    printed = capsys.readouterr().out
    assert "| embedded | two-pass | plain | 3 |" in printed and "pipeline / foundation" in printed
    assert (tmp_path / "work" / "embedded" / "pipeline-3steps-plain" / "manifest.json").exists()
    # the single-pass variant: its grounding graph continues the condition encoder's hidden states
    (single_dir,) = (tmp_path / "work" / "embedded").glob("single-pass-*-2steps")
    single = json.loads((single_dir / "manifest.json").read_text())
    assert "image_hidden" in [i["name"] for i in single["graphs"]["grounding"]["inputs"]]
    mtime = (tmp_path / "work" / "embedded" / "pipeline-2steps" / "manifest.json").stat().st_mtime_ns
    assert pipeline_cost.main(argv) == 0  # exports are reused
    assert (tmp_path / "work" / "embedded" / "pipeline-2steps" / "manifest.json").stat().st_mtime_ns == mtime


def test_a_trained_single_pass_pipeline_is_timed_as_given_and_a_two_pass_one_refused(tiny_pipeline_dir, small_world,
                                                                                      tmp_path):
    import pytest

    single = pipeline_cost.single_pass_variant(tiny_pipeline_dir, tmp_path / "sp", (0, 0))
    out = tmp_path / "rows.json"
    argv = ["--work", str(tmp_path / "work"), "--models", "embedded", "--pipeline", str(tiny_pipeline_dir),
            "--data-dir", str(small_world), "--steps", "2", "--modes", "single-pass", "--repeats", "2",
            "--warmup", "0", "--out", str(out)]
    assert pipeline_cost.main([*argv, "--single-pass-pipeline", str(single)]) == 0
    assert [(r["mode"], r["steps"]) for r in json.loads(out.read_text())] == [("single-pass", 2)]
    assert not (tmp_path / "work" / "embedded" / "single-pass-model").exists()  # no variant was built
    with pytest.raises(SystemExit, match="not a single-pass pipeline"):
        pipeline_cost.main([*argv, "--single-pass-pipeline", str(tiny_pipeline_dir)])
