"""The no-match calibrator: its features, its JSON form, the file beside a checkpoint, the manifest field."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diffprompt.core.errors import UserError
from diffprompt.core.manifest import ArtifactError, Manifest
from diffprompt.core.no_match import (
    FEATURES,
    NoMatchCalibration,
    calibration_file,
    feature_matrix,
    read_calibration,
    write_calibration,
)


def _outputs(b: int = 3, p: int = 4, m: int = 8, s: int = 1 + 4 + 5, d: int = 6, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    scores = rng.uniform(0.01, 0.99, (b, p))
    boxes = np.concatenate([rng.uniform(0.1, 0.9, (b, p, 2)), np.full((b, p, 2), 0.1)], axis=2)
    maps = rng.standard_normal((b, 2, 2, 2))  # (B, k, g, g) with P = 4 patches
    attention = np.array([[1, 1, 1, 0, 0]] * b)
    return {"scores": scores, "boxes": boxes, "mask_logits": rng.standard_normal((b, m, m)),
            "context": rng.standard_normal((b, s, d)), "maps": maps, "attention_mask": attention}


def test_features_compute_what_they_say():
    o = _outputs()
    logit = np.log(o["scores"]) - np.log1p(-o["scores"])
    top2 = -np.sort(-logit, axis=1)[:, :2]
    np.testing.assert_allclose(feature_matrix(["top_logit", "margin"], o),
                               np.stack([top2[:, 0], top2[:, 0] - top2[:, 1]], 1))
    np.testing.assert_allclose(feature_matrix(["mask_area"], o)[:, 0], (o["mask_logits"] > 0).mean(axis=(1, 2)))
    # the mask at the best box's centre: put the best box over cell (row 2, col 5) of an 8 x 8 mask
    o["scores"][0] = [0.1, 0.9, 0.2, 0.3]
    o["boxes"][0, 1, :2] = [5.5 / 8, 2.5 / 8]
    o["mask_logits"][0] = 0.0
    o["mask_logits"][0, 2, 5] = 3.0
    assert feature_matrix(["mask_at_top"], o)[0, 0] == 0.0  # the peak is under the best box
    o["mask_logits"][0, 0, 0] = 5.0
    assert feature_matrix(["mask_at_top"], o)[0, 0] == pytest.approx(-2.0)
    # the context at the pointed patch (row 1 + argmax of the pointer map) and over the words (last T rows)
    o["maps"][1, -1] = [[0.0, 0.0], [4.0, 0.0]]  # patch 2
    np.testing.assert_allclose(feature_matrix(["context_pointed"], o)[1], o["context"][1, 3])
    np.testing.assert_allclose(feature_matrix(["context_text"], o)[1], o["context"][1, -5:-2].mean(axis=0))
    assert feature_matrix(["context_summary", "pointer_peak"], o).shape == (3, 6 + 1)


def test_a_feature_without_its_input_is_refused():
    o = _outputs()
    o["mask_logits"] = None
    with pytest.raises(ValueError, match="mask_peak.*mask_logits"):
        feature_matrix(["mask_peak"], o)


def _calibration(names=("top_logit", "mask_peak", "context_summary"), columns=8, steps=5) -> NoMatchCalibration:
    rng = np.random.default_rng(1)
    return NoMatchCalibration(tuple(names), tuple(rng.standard_normal(columns)), tuple(rng.uniform(0.5, 2, columns)),
                              tuple(rng.standard_normal(columns)), 0.3, 0.4, steps, {"note": "test"})


def test_probability_is_the_logistic_model_and_round_trips_through_json(tmp_path):
    cal = _calibration()
    o = _outputs()
    x = feature_matrix(cal.features, o)
    want = 1 / (1 + np.exp(-(cal.bias + ((x - cal.mean) / cal.scale) @ np.array(cal.weights))))
    np.testing.assert_allclose(cal.probability(o), want, rtol=1e-12)
    again = NoMatchCalibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert again == cal
    path = write_calibration(tmp_path, cal)
    assert path.name == calibration_file(5) == "no_match-5steps.json"
    assert read_calibration(tmp_path, 5) == cal
    assert read_calibration(tmp_path, 25) is None
    with pytest.raises(ValueError, match="columns"):  # a calibration of another model's width
        _calibration(columns=9).probability(o)


@pytest.mark.parametrize("change, match", [
    ({"features": ["nope"]}, "unknown"),
    ({"weights": [1.0]}, "mean has 8 values, weights 1"),
    ({"scale": [0.0] * 8}, "scale"),
    ({"threshold": 1.5}, "threshold"),
    ({"mean": [float("nan")] * 8}, "non-finite"),
])
def test_malformed_calibrations_are_user_errors_naming_the_file(tmp_path, change, match):
    d = {**_calibration().to_dict(), **change}
    (tmp_path / "no_match-5steps.json").write_text(json.dumps(d))
    with pytest.raises(UserError, match=f"no_match-5steps.json.*{match}"):
        read_calibration(tmp_path, 5)


def test_the_manifest_carries_the_calibration_and_checks_it(tmp_path):
    base = {"format_version": 1, "name": "t", "method": "foundation", "ddim_steps": 0, "files": {},
            "image": {"size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "resize_mode": "pad"},
            "tokenizer": {"file": "tokenizer.json", "max_length": 8},
            "graphs": {"grounding": {"file": "g.onnx", "inputs": [], "outputs": []}}}
    assert Manifest.from_dict(base).no_match is None
    cal = _calibration(("top_logit", "margin"), columns=2, steps=0)
    with_cal = Manifest.from_dict({**base, "no_match": cal.to_dict()})
    assert with_cal.no_match == cal
    assert Manifest.from_dict(with_cal.to_dict()).no_match == cal  # written back as read
    # a calibration reading the mask, on an artifact that makes none
    with pytest.raises(ArtifactError, match="mask_logits"):
        Manifest.from_dict({**base, "no_match": _calibration(("mask_peak",), columns=1, steps=0).to_dict()})
    with pytest.raises(ArtifactError, match="malformed"):
        Manifest.from_dict({**base, "no_match": {"features": ["top_logit"]}})


def test_every_feature_is_documented():
    assert all(f.doc and f.needs for f in FEATURES.values())
