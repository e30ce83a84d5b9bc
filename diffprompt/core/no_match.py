"""P(no match): how likely it is that the expression's object is not in the image at all.

The grounding model always ranks boxes, even for "the purple star" in an image without one. The
no-match calibrator is logistic regression on named features of what the pipeline computes for
one expression anyway:

- from its output: the best box's score, its margin to the second, the mean score, and for
  Diff-Prompt the generated mask's peak, area, and its value at the best box's centre;
- from the condition encoder (token-conditioned DiT with context layers): the joint image-text
  context at the image's summary token, at the patch the pointer head picks, and averaged over
  the expression's words, and the pointer's peak log-probability.

    p = sigmoid(bias + sum_i weights[i] * (x_i - mean[i]) / scale[i])     # x: the features' columns

`diffprompt calibrate` fits it (weights on train + train_absent, feature set and a rescaling on
val, threshold on val) and stores it beside the pipeline checkpoint (`no_match-{steps}steps.json`);
`diffprompt export` copies it into the artifact's manifest (`Manifest.no_match`), and the one
inference pipeline computes P(no match) per row from the same arrays on every runtime. numpy only.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffprompt.core.errors import UserError

_EPS = 1e-7
Outputs = Mapping[str, Any]  # "scores", "boxes", "mask_logits", "context", "maps", "attention_mask" -> arrays


def _logits(scores: np.ndarray) -> np.ndarray:
    s = np.clip(np.asarray(scores, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(s) - np.log1p(-s)


def _top2(o: Outputs) -> np.ndarray:
    """(B, 2) logits of the best and second-best box."""
    return -np.sort(-_logits(o["scores"]), axis=1)[:, :2]


def _flat_mask(o: Outputs) -> np.ndarray:
    m = np.asarray(o["mask_logits"], dtype=np.float64)
    return m.reshape(len(m), -1)


def _mask_at_top(o: Outputs) -> np.ndarray:
    """Mask logit at the best box's centre minus the mask's peak (mask and boxes share the input square)."""
    mask = np.asarray(o["mask_logits"], dtype=np.float64)
    b, m = mask.shape[0], mask.shape[-1]
    top = np.argmax(o["scores"], axis=1)
    centre = np.asarray(o["boxes"])[np.arange(b), top, :2].astype(np.float64)  # (B, 2) cx, cy in [0, 1]
    cells = np.clip(np.floor(centre * m).astype(np.int64), 0, m - 1)
    return mask[np.arange(b), cells[:, 1], cells[:, 0]] - mask.reshape(b, -1).max(axis=1)


def _pointer(o: Outputs) -> np.ndarray:
    """(B, P) the pointer head's log-probability map (the last spatial condition map)."""
    maps = np.asarray(o["maps"], dtype=np.float64)
    return maps[:, -1].reshape(len(maps), -1)


def _context_pointed(o: Outputs) -> np.ndarray:
    """Context vector of the patch the pointer picks: context rows 1..P are the patches (row 0 the summary)."""
    context = np.asarray(o["context"], dtype=np.float64)
    pick = np.argmax(_pointer(o), axis=1)
    return context[np.arange(len(context)), 1 + pick]


def _context_text(o: Outputs) -> np.ndarray:
    """Mean context vector over the expression's tokens (the last T rows; padding left out)."""
    context = np.asarray(o["context"], dtype=np.float64)
    keep = np.asarray(o["attention_mask"], dtype=np.float64)  # (B, T)
    text = context[:, -keep.shape[1]:]
    return (text * keep[..., None]).sum(axis=1) / np.maximum(keep.sum(axis=1, keepdims=True), 1.0)


@dataclass(frozen=True)
class Feature:
    needs: tuple[str, ...]  # keys of the outputs it reads
    fn: Callable[[Outputs], np.ndarray]  # -> (B,) or (B, k)
    doc: str


FEATURES: dict[str, Feature] = {
    "top_logit": Feature(("scores",), lambda o: _top2(o)[:, 0], "logit of the best box's score"),
    "margin": Feature(("scores",), lambda o: np.subtract(*_top2(o).T), "best minus second-best logit"),
    "mean_logit": Feature(("scores",), lambda o: _logits(o["scores"]).mean(axis=1), "mean logit over every box"),
    "mask_peak": Feature(("mask_logits",), lambda o: _flat_mask(o).max(axis=1), "the generated mask's highest logit"),
    "mask_area": Feature(("mask_logits",), lambda o: (_flat_mask(o) > 0).mean(axis=1), "fraction of the mask on"),
    "mask_at_top": Feature(("mask_logits", "scores", "boxes"), _mask_at_top,
                           "mask logit at the best box's centre minus its peak (0: they agree)"),
    "pointer_peak": Feature(("maps",), lambda o: _pointer(o).max(axis=1),
                            "the pointer head's highest log-probability (0 = uniform)"),
    "context_summary": Feature(("context",), lambda o: np.asarray(o["context"], dtype=np.float64)[:, 0],
                               "joint image-text context at the image's summary token (D values)"),
    "context_pointed": Feature(("context", "maps"), _context_pointed,
                               "context at the patch the pointer picks (D values)"),
    "context_text": Feature(("context", "attention_mask"), _context_text,
                            "context averaged over the expression's tokens (D values)"),
}


def feature_matrix(names: tuple[str, ...] | list[str], outputs: Outputs) -> np.ndarray:
    """(B, columns) float64: the named features side by side, each one column or D of them."""
    blocks = []
    for name in names:
        feature = FEATURES[name]
        missing = [k for k in feature.needs if outputs.get(k) is None]
        if missing:
            raise ValueError(f"no-match feature {name!r} needs {missing}, which this pipeline does not compute")
        value = np.asarray(feature.fn(outputs), dtype=np.float64)
        blocks.append(value.reshape(len(value), -1))
    return np.concatenate(blocks, axis=1)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))  # 1 / (1 + exp(-x)), no overflow


@dataclass(frozen=True)
class NoMatchCalibration:
    """Logistic regression on standardised feature columns, and the decision threshold chosen on val."""

    features: tuple[str, ...]
    mean: tuple[float, ...]  # one value per column
    scale: tuple[float, ...]
    weights: tuple[float, ...]
    bias: float
    threshold: float  # report "no match" when the probability is >= threshold
    ddim_steps: int  # the sampler step count it was fitted at (0: no sampler)
    fitted_on: dict[str, Any] = field(default_factory=dict)  # splits, counts, choices: for the record
    fingerprint: str = ""  # of the pipeline's weights it was fitted on: export refuses it for other weights

    @property
    def needs(self) -> set[str]:
        """Output keys the features read."""
        return {k for name in self.features for k in FEATURES[name].needs}

    def logit(self, outputs: Outputs) -> np.ndarray:
        x = feature_matrix(self.features, outputs)
        if x.shape[1] != len(self.weights):
            raise ValueError(f"the no-match features give {x.shape[1]} columns, the calibration has "
                             f"{len(self.weights)} weights (fitted on another model?)")
        z = (x - np.asarray(self.mean)) / np.asarray(self.scale)
        return self.bias + z @ np.asarray(self.weights, dtype=np.float64)

    def probability(self, outputs: Outputs) -> np.ndarray:
        """(B,) P(no match) in [0, 1] for B expressions."""
        return sigmoid(self.logit(outputs))

    # -- JSON ------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {"features": list(self.features), "threshold": self.threshold, "ddim_steps": self.ddim_steps,
                "bias": self.bias, "weights": list(self.weights), "mean": list(self.mean),
                "scale": list(self.scale), "fitted_on": self.fitted_on, "fingerprint": self.fingerprint}

    @classmethod
    def from_dict(cls, d: Any) -> NoMatchCalibration:
        """Parse and check a dict; ValueError naming the field if it is malformed."""
        if not isinstance(d, dict):
            raise ValueError(f"no_match must be an object, got {type(d).__name__}")
        missing = [k for k in ("features", "mean", "scale", "weights", "bias", "threshold", "ddim_steps")
                   if k not in d]
        if missing:
            raise ValueError(f"no_match: missing {missing}")
        names = tuple(str(n) for n in d["features"])
        unknown = [n for n in names if n not in FEATURES]
        if unknown or not names:
            raise ValueError(f"no_match: unknown or no features {unknown} (known: {list(FEATURES)})")
        vectors = {k: tuple(float(v) for v in d[k]) for k in ("mean", "scale", "weights")}
        width = len(vectors["weights"])
        for key, values in vectors.items():
            if len(values) != width or width < len(names):
                raise ValueError(f"no_match: {key} has {len(values)} values, weights {width}, for {len(names)} "
                                 "features")
            if not all(np.isfinite(values)):
                raise ValueError(f"no_match: {key} has non-finite values")
        if any(v <= 0 for v in vectors["scale"]):
            raise ValueError("no_match: scale values must be > 0")
        bias, threshold = float(d["bias"]), float(d["threshold"])
        if not np.isfinite(bias) or not 0.0 <= threshold <= 1.0:
            raise ValueError(f"no_match: bias must be finite and threshold in [0, 1], got {bias}, {threshold}")
        return cls(names, vectors["mean"], vectors["scale"], vectors["weights"], bias, threshold,
                   int(d["ddim_steps"]), dict(d.get("fitted_on", {})), str(d.get("fingerprint", "")))


# -- the file beside a pipeline checkpoint ----------------------------------------------------------


def calibration_file(steps: int | None) -> str:
    """File name of the calibration for a sampler step count (None or 0: a pipeline without a sampler)."""
    return f"no_match-{steps}steps.json" if steps else "no_match.json"


def read_calibration(directory: str | Path, steps: int | None) -> NoMatchCalibration | None:
    """The calibration stored in a pipeline directory for `steps`, None if there is none."""
    path = Path(directory) / calibration_file(steps)
    if not path.exists():
        return None
    try:
        calibration = NoMatchCalibration.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError) as e:
        raise UserError(f"{path}: not a no-match calibration ({e}); refit it with `diffprompt calibrate`") from e
    if calibration.ddim_steps != (steps or 0):
        raise UserError(f"{path}: fitted at {calibration.ddim_steps} DDIM steps, named for {steps or 0}")
    return calibration


def write_calibration(directory: str | Path, calibration: NoMatchCalibration) -> Path:
    path = Path(directory) / calibration_file(calibration.ddim_steps)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(calibration.to_dict(), indent=1) + "\n")
    tmp.replace(path)
    return path
