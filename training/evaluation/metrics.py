"""Referring-expression-comprehension metrics (as reported by Diff-Prompt / MDETR).

Boxes are ``xyxy`` arrays of shape (N, 4). For one expression the model returns boxes ranked
by descending score; the expression refers to K >= 1 ground-truth boxes (exactly one for
REC, possibly several for category queries -- matching any of them counts).

Definitions, with ``criterion(p, g) >= threshold`` (threshold 0.5 by default) called a hit:

* ``R@k``: one of the top-k predicted boxes hits some ground-truth box. If fewer than k
  boxes are predicted, all of them are considered.
* ``UB`` (upper bound): any predicted box, whatever its rank, hits some ground-truth box.
* Criterion ``"iou"`` (the default) is plain intersection over union. ``"giou"`` is the
  generalised IoU, which the official MDETR RefExp evaluator uses; ``GIoU <= IoU``
  always, so GIoU is the stricter criterion at the same threshold.

Degenerate boxes: a box with ``x1 < x0`` (or ``y1 < y0``) is treated as ``x1 = x0`` (``y1 =
y0``), i.e. as a zero-area box at its ``(x0, y0)`` corner. Zero-area boxes have IoU 0 with
everything. For GIoU, a pair whose enclosing box also has zero area gets GIoU = IoU = 0.
No function here ever returns NaN or emits a floating-point warning.

Expression counts are aggregated per group (e.g. split and expression kind) by
`RecallAccumulator`. This module only needs numpy.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike

Criterion = Literal["iou", "giou"]
CRITERIA: tuple[str, ...] = ("iou", "giou")
DEFAULT_KS: tuple[int, ...] = (1, 5)
#: Name of the summary row that aggregates every expression.
ALL_GROUP = "all"
#: Key of the upper-bound entry in hit dicts and summary rows.
UB_KEY = "UB"


def recall_key(k: int) -> str:
    """The dict key of recall at k, e.g. ``"R@5"``."""
    return f"R@{k}"


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------


def _as_boxes(boxes: ArrayLike, name: str) -> np.ndarray:
    """(N, 4) float64 copy of `boxes`; raises ValueError on a wrong shape or non-finite values.

    An empty sequence (``[]``) is accepted as (0, 4).
    """
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.ndim == 1 and arr.size == 0:
        arr = arr.reshape(0, 4)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"{name} must have shape (N, 4) (xyxy boxes), got shape {arr.shape}")
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)[:5].tolist()
        raise ValueError(f"{name} contains NaN or infinite coordinates (rows {rows})")
    return arr


def _clamp_degenerate(boxes: np.ndarray) -> np.ndarray:
    """Inverted boxes collapse to zero width/height at their (x0, y0) corner."""
    out = boxes.copy()
    out[:, 2] = np.maximum(out[:, 2], out[:, 0])
    out[:, 3] = np.maximum(out[:, 3], out[:, 1])
    return out


def _check_criterion(criterion: str) -> None:
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")


def _check_ks(ks: Iterable[int]) -> tuple[int, ...]:
    """Sorted, de-duplicated ks; each must be a positive int."""
    ks = tuple(ks)
    if not ks:
        raise ValueError("ks must contain at least one k")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise TypeError(f"every k in ks must be an integer, got {k!r}")
        if k < 1:
            raise ValueError(f"every k in ks must be a positive integer, got {k!r}")
    return tuple(sorted({int(k) for k in ks}))


def _check_threshold(threshold: float) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.number)):
        raise TypeError(f"threshold must be a number, got {threshold!r}")
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold!r}")
    return float(threshold)


def _safe_divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den where den > 0, else 0 -- without warnings."""
    out = np.zeros(np.broadcast_shapes(num.shape, den.shape), dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


# --------------------------------------------------------------------------------------------
# IoU / GIoU
# --------------------------------------------------------------------------------------------


def _area(boxes: np.ndarray) -> np.ndarray:
    """(N,) areas of clamped (non-inverted) boxes."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _iou_and_union(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, M) IoU and union area of clamped boxes a (N, 4), b (M, 4)."""
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(bottom_right - top_left, 0.0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = _area(a)[:, None] + _area(b)[None, :] - inter
    return _safe_divide(inter, union), union


def box_iou(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """Pairwise IoU of xyxy boxes.

    Args:
        a: (N, 4) boxes.
        b: (M, 4) boxes.

    Returns:
        (N, M) float64 IoU in [0, 1]; 0 for any pair involving a zero-area box.

    Raises:
        ValueError: a box array is not (N, 4) or contains NaN/inf.
    """
    a = _clamp_degenerate(_as_boxes(a, "a"))
    b = _clamp_degenerate(_as_boxes(b, "b"))
    iou, _ = _iou_and_union(a, b)
    return iou


def generalized_box_iou(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """Pairwise generalised IoU, ``IoU - (|C| - |A u B|) / |C|`` with C the enclosing box.

    Args:
        a: (N, 4) boxes.
        b: (M, 4) boxes.

    Returns:
        (N, M) float64 GIoU in [-1, 1], never greater than the IoU. A pair whose enclosing box
        has zero area (both boxes degenerate and collinear) gets GIoU = IoU = 0.

    Raises:
        ValueError: a box array is not (N, 4) or contains NaN/inf.
    """
    a = _clamp_degenerate(_as_boxes(a, "a"))
    b = _clamp_degenerate(_as_boxes(b, "b"))
    iou, union = _iou_and_union(a, b)
    top_left = np.minimum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.maximum(a[:, None, 2:], b[None, :, 2:])
    wh = bottom_right - top_left  # >= 0: boxes are clamped
    enclosing = wh[..., 0] * wh[..., 1]
    # max(., 0) guards against rounding making |C| - |A u B| slightly negative.
    return iou - _safe_divide(np.maximum(enclosing - union, 0.0), enclosing)


def _criterion_matrix(pred: np.ndarray, gt: np.ndarray, criterion: str) -> np.ndarray:
    return box_iou(pred, gt) if criterion == "iou" else generalized_box_iou(pred, gt)


# --------------------------------------------------------------------------------------------
# Per-expression hits
# --------------------------------------------------------------------------------------------


def ranked_by_score(boxes: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Sort boxes by descending score; ties keep their input order (stable mergesort).

    Args:
        boxes: (N, 4) boxes.
        scores: (N,) scores; +-inf allowed, NaN not.

    Returns:
        (boxes_sorted (N, 4) float64, scores_sorted (N,) float64).

    Raises:
        ValueError: wrong shapes, mismatched N, NaN scores or non-finite boxes.
    """
    boxes_arr = _as_boxes(boxes, "boxes")
    scores_arr = np.asarray(scores, dtype=np.float64)
    if scores_arr.ndim != 1 or scores_arr.shape[0] != boxes_arr.shape[0]:
        raise ValueError(
            f"scores must have shape ({boxes_arr.shape[0]},) to match boxes, "
            f"got shape {scores_arr.shape}"
        )
    if np.isnan(scores_arr).any():
        raise ValueError("scores contains NaN")
    order = np.argsort(-scores_arr, kind="mergesort")
    return boxes_arr[order], scores_arr[order]


def hits_at_k(
    pred_boxes: ArrayLike,
    gt_boxes: ArrayLike,
    ks: Iterable[int] = DEFAULT_KS,
    criterion: Criterion = "iou",
    threshold: float = 0.5,
) -> dict[str, bool]:
    """Hits of one expression.

    Args:
        pred_boxes: (N, 4) predicted boxes sorted by descending score; N may be 0.
        gt_boxes: (K, 4) referred boxes, K >= 1; a match with any of them counts.
        ks: the k of each ``R@k``.
        criterion: ``"iou"`` or ``"giou"``.
        threshold: a pair hits when ``criterion >= threshold``.

    Returns:
        ``{"R@k": bool for each k, "UB": bool}`` (keys in ascending k, then "UB"). All False
        when there are no predictions.

    Raises:
        ValueError: unknown criterion, k < 1, non-finite threshold, bad box arrays, K == 0.
        TypeError: a k or the threshold is not a number.
    """
    _check_criterion(criterion)
    ks = _check_ks(ks)
    threshold = _check_threshold(threshold)
    pred = _as_boxes(pred_boxes, "pred_boxes")
    gt = _as_boxes(gt_boxes, "gt_boxes")
    if gt.shape[0] == 0:
        raise ValueError("gt_boxes must contain at least one box")

    hit = (_criterion_matrix(pred, gt, criterion) >= threshold).any(axis=1)  # (N,)
    result = {recall_key(k): bool(hit[:k].any()) for k in ks}
    result[UB_KEY] = bool(hit.any())
    return result


# --------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------

GroupKey = str | tuple[str, ...]


@dataclass(frozen=True)
class RecallRow:
    """One row of a recall table.

    Attributes:
        group: group name (tuple keys joined with "/"), or ALL_GROUP for the total row.
        n: number of expressions in the group.
        rates: metric name (``"R@k"`` ..., ``"UB"``) -> fraction of hits in [0, 1]
            (NaN only when n == 0, i.e. for the total row of an empty accumulator).
    """

    group: str
    n: int
    rates: Mapping[str, float]

    def __getitem__(self, metric: str) -> float:
        return self.rates[metric]

    def as_dict(self) -> dict[str, str | int | float]:
        """``{"group": ..., "n": ..., "R@1": ..., ..., "UB": ...}``."""
        return {"group": self.group, "n": self.n, **self.rates}


class RecallAccumulator:
    """Accumulates per-expression hits by group and summarises them as a recall table.

    A group key is a string or a tuple of strings, e.g. ``("val", "attribute")`` for split
    and expression kind; the "all" row aggregates every expression added (use one
    accumulator per split for per-split totals).

    Example::

        acc = RecallAccumulator()
        for sample, (boxes, scores) in zip(samples, predictions):
            acc.add(ranked_by_score(boxes, scores)[0], sample.boxes, group=sample.kind)
        print(acc.format_table())
    """

    def __init__(
        self,
        ks: Iterable[int] = DEFAULT_KS,
        criterion: Criterion = "iou",
        threshold: float = 0.5,
    ) -> None:
        _check_criterion(criterion)
        self.ks: tuple[int, ...] = _check_ks(ks)
        self.criterion: Criterion = criterion
        self.threshold = _check_threshold(threshold)
        self.metrics: tuple[str, ...] = (*(recall_key(k) for k in self.ks), UB_KEY)
        self._counts: dict[tuple[str, ...], int] = {}
        self._hits: dict[tuple[str, ...], dict[str, int]] = {}

    def __len__(self) -> int:
        """Total number of expressions added."""
        return sum(self._counts.values())

    def add(self, pred_boxes: ArrayLike, gt_boxes: ArrayLike, group: GroupKey) -> dict[str, bool]:
        """Score one expression (see `hits_at_k`), record it under `group`, return its hits."""
        hits = hits_at_k(pred_boxes, gt_boxes, self.ks, self.criterion, self.threshold)
        self.add_hits(hits, group)
        return hits

    def add_hits(self, hits: Mapping[str, bool], group: GroupKey) -> None:
        """Record already-computed hits (must contain every key of ``self.metrics``)."""
        missing = [m for m in self.metrics if m not in hits]
        if missing:
            raise ValueError(f"hits is missing metrics {missing}; expected {list(self.metrics)}")
        key = self._normalise_group(group)
        self._counts[key] = self._counts.get(key, 0) + 1
        totals = self._hits.setdefault(key, dict.fromkeys(self.metrics, 0))
        for metric in self.metrics:
            totals[metric] += bool(hits[metric])

    def summary(self) -> list[RecallRow]:
        """One row per group (sorted by key), then the ALL_GROUP row."""
        rows = [
            self._row("/".join(key), self._counts[key], self._hits[key])
            for key in sorted(self._counts)
        ]
        total_hits = {m: sum(h[m] for h in self._hits.values()) for m in self.metrics}
        rows.append(self._row(ALL_GROUP, len(self), total_hits))
        return rows

    def format_table(self) -> str:
        """Markdown table (also readable as plain text); rates in percent, 2 decimals."""
        header = ["group", "n", *self.metrics]
        body = [
            [row.group, str(row.n), *(_percent(row.rates[m]) for m in self.metrics)]
            for row in self.summary()
        ]
        widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

        def render(cells: Sequence[str]) -> str:
            padded = [
                cell.ljust(w) if i == 0 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
            ]
            return "| " + " | ".join(padded) + " |"

        # group left-aligned, numbers right-aligned ("---:")
        dashes = ["-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)]
        rule = "|" + "|".join(dashes) + "|"
        return "\n".join([render(header), rule, *(render(cells) for cells in body)])

    def _row(self, group: str, n: int, hits: Mapping[str, int]) -> RecallRow:
        rates = {m: (hits[m] / n if n else float("nan")) for m in self.metrics}
        return RecallRow(group=group, n=n, rates=rates)

    @staticmethod
    def _normalise_group(group: Hashable) -> tuple[str, ...]:
        key = (group,) if isinstance(group, str) else group
        if (
            not isinstance(key, tuple)
            or not key
            or not all(isinstance(part, str) and part for part in key)
        ):
            raise ValueError(f"group must be a non-empty string or tuple of them, got {group!r}")
        if key == (ALL_GROUP,):
            raise ValueError(f"group {ALL_GROUP!r} is reserved for the total row")
        return key


def _percent(rate: float) -> str:
    return "n/a" if np.isnan(rate) else f"{100.0 * rate:.2f}"
