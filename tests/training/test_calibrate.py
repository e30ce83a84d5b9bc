"""`diffprompt calibrate`: fits and stores the no-match calibrator, reports it, and PyTorch and onnxruntime agree."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from diffprompt.cli import main as cli_main
from diffprompt.core.no_match import read_calibration
from diffprompt.training import calibrate


@pytest.fixture(scope="module")
def pipeline(tiny_pipeline_dir, tmp_path_factory):
    """A copy of the tiny pipeline (next to its components, so pipeline.json's paths hold) to write into."""
    out = tiny_pipeline_dir.with_name("diffprompt_to_calibrate")
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(tiny_pipeline_dir, out)
    return out


def test_fit_writes_the_calibrator_and_reports_on_val_and_test(pipeline, small_world, tmp_path, capsys):
    report = tmp_path / "report.json"
    common = ["calibrate", "--checkpoint", str(pipeline), "--ddim-steps", "3", "--data-dir", str(small_world),
              "--threads", "1", "--no-progress"]
    args = [*common, "--out", str(report)]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    stored = read_calibration(pipeline, 3)
    data = json.loads(report.read_text())
    assert data["calibration"] == stored.to_dict()
    assert set(data["rows"]) == {*calibrate.CANDIDATES, calibrate.WORDS}
    assert data["chosen"] in calibrate.CANDIDATES and stored.features == calibrate.CANDIDATES[data["chosen"]]
    chosen = data["rows"][data["chosen"]]
    assert chosen["val"]["auroc"] == max(data["rows"][k]["val"]["auroc"] for k in calibrate.CANDIDATES)
    assert chosen["val"]["threshold"] == stored.threshold
    n_val = sum(len(calibrate.load_split(s, small_world, False, None)) for s in calibrate.VAL)
    assert chosen["val"]["n_present"] + chosen["val"]["n_absent"] == n_val
    assert set(chosen["test"]["flagged"]) == set(calibrate.TEST)
    for row in data["rows"].values():
        for part in ("val", "test"):
            assert 0 <= row[part]["precision"] <= 1 and 0 <= row[part]["recall"] <= 1
    assert "| features |" in out and "(chosen)" in out and "wrote" in out

    # refitting needs --overwrite; --no-fit reports the stored calibrator with the same numbers
    assert cli_main(args) == 2
    assert "exists: give --overwrite" in capsys.readouterr().err
    again = tmp_path / "again.json"
    assert cli_main([*common, "--no-fit", "--out", str(again)]) == 0
    stored_row = json.loads(again.read_text())["rows"]["stored"]
    for part in ("val", "test"):
        for key in ("precision", "recall", "auroc", "threshold"):
            assert stored_row[part][key] == pytest.approx(chosen[part][key], abs=1e-9), (part, key)


def test_pytorch_and_onnxruntime_give_the_same_probabilities(pipeline, small_world, tmp_path):
    from diffprompt.core.providers import ProviderConfig
    from diffprompt.core.runtime import GroundingRuntime
    from diffprompt.model_export.export import build_parser, main
    from diffprompt.training.models.diffprompt import DiffPromptPipeline

    if read_calibration(pipeline, 3) is None:  # the fit above ran first in this module; alone, fit here
        assert cli_main(["calibrate", "--checkpoint", str(pipeline), "--ddim-steps", "3", "--data-dir",
                         str(small_world), "--threads", "1", "--no-progress"]) == 0
    stored = read_calibration(pipeline, 3)
    assert main(build_parser().parse_args(["--pipeline", str(pipeline), "--steps", "3", "--out", str(tmp_path),
                                           "--name", "cal", "--threads", "1", "--no-progress"])) == 0
    runtime = GroundingRuntime.load(tmp_path / "cal-3steps", ProviderConfig(preferred=("cpu",)))
    torch_pipeline = DiffPromptPipeline.from_pretrained(pipeline, steps=3)
    for split in ("val", "test_absent"):
        samples = calibrate.load_split(split, small_world, False, None)
        ort = calibrate.run_split(runtime, samples, split, (), None, 0, 8, False)
        pt = calibrate.run_split(torch_pipeline, samples, split, (), stored, 0, 8, False)
        np.testing.assert_allclose(ort.stored, pt.stored, atol=2e-3)
        assert np.array_equal(ort.absent, pt.absent) and ort.absent.all() == (split == "test_absent")
        assert np.ptp(pt.stored) > 0.01  # the rows differ: the check compares something


def test_fit_logistic_recovers_a_known_model():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4000, 3))
    w_true, b_true = np.array([1.5, -2.0, 0.0]), 0.5
    y = rng.uniform(size=4000) < 1 / (1 + np.exp(-(x @ w_true + b_true)))
    w, b = calibrate.fit_logistic(x, y.astype(float), l2=1e-6)
    np.testing.assert_allclose(w, w_true, atol=0.15)
    assert b == pytest.approx(b_true, abs=0.15)


def test_balanced_threshold_and_auroc():
    p = np.array([0.9, 0.8, 0.7, 0.4, 0.3, 0.2, 0.1])
    absent = np.array([True, True, False, True, False, False, False])
    assert calibrate.auroc(p, absent) == pytest.approx(11 / 12)
    # flagging the first 4 finds every absent one and 1 of 4 present: TPR - FPR = 3/4, the best cut
    # (the first 2: 2/3 - 0); the threshold is halfway between 0.4 and 0.3
    assert calibrate.balanced_threshold(p, absent) == pytest.approx(0.35)
    assert calibrate.auroc(np.array([0.5, 0.5]), np.array([True, False])) == 0.5
