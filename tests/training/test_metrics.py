"""Tests of training.evaluation.metrics with hand-computed values."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from numpy.typing import ArrayLike

from diffprompt.training.evaluation.metrics import (
    ALL_GROUP,
    RecallAccumulator,
    RecallRow,
    box_iou,
    generalized_box_iou,
    hits_at_k,
    ranked_by_score,
)

MISS = [100.0, 100.0, 101.0, 101.0]  # far away from every gt box below
GT = [[0.0, 0.0, 10.0, 10.0]]


def box(*xyxy: float) -> np.ndarray:
    return np.array([xyxy], dtype=np.float64)


# --------------------------------------------------------------------------------------------
# IoU / GIoU
# --------------------------------------------------------------------------------------------


def test_identical_boxes_have_iou_and_giou_one() -> None:
    b = box(1, 2, 5, 7)
    np.testing.assert_allclose(box_iou(b, b), [[1.0]])
    np.testing.assert_allclose(generalized_box_iou(b, b), [[1.0]])


def test_disjoint_boxes() -> None:
    # Unit squares 1 apart: union 2, enclosing [0, 0, 3, 1] of area 3 -> GIoU = 0 - 1/3.
    a, b = box(0, 0, 1, 1), box(2, 0, 3, 1)
    assert box_iou(a, b)[0, 0] == 0.0
    assert generalized_box_iou(a, b)[0, 0] == pytest.approx(-1.0 / 3.0)


def test_half_overlap() -> None:
    # b is the bottom half of a: inter 2, union 4; enclosing == a, so GIoU == IoU.
    a, b = box(0, 0, 2, 2), box(0, 0, 2, 1)
    assert box_iou(a, b)[0, 0] == pytest.approx(0.5)
    assert generalized_box_iou(a, b)[0, 0] == pytest.approx(0.5)
    # Side-by-side shift by half a width: inter 2, union 6, enclosing [0, 0, 3, 2] = 6.
    c = box(1, 0, 3, 2)
    assert box_iou(a, c)[0, 0] == pytest.approx(1.0 / 3.0)
    assert generalized_box_iou(a, c)[0, 0] == pytest.approx(1.0 / 3.0)


def test_iou_and_giou_differ_by_enclosing_gap() -> None:
    # inter 4*3 = 12, union 16 + 18 - 12 = 22, enclosing [0, 0, 6, 4] = 24.
    a, b = box(0, 0, 4, 4), box(0, 0, 6, 3)
    assert box_iou(a, b)[0, 0] == pytest.approx(6.0 / 11.0)
    assert generalized_box_iou(a, b)[0, 0] == pytest.approx(6.0 / 11.0 - 2.0 / 24.0)  # 61/132


def test_pairwise_shape_and_values() -> None:
    a = np.array([[0, 0, 2, 2], [0, 0, 1, 1], [5, 5, 6, 6]], dtype=float)
    b = np.array([[0, 0, 2, 2], [1, 1, 2, 2]], dtype=float)
    expected = np.array([[1.0, 0.25], [0.25, 0.0], [0.0, 0.0]])
    np.testing.assert_allclose(box_iou(a, b), expected)
    assert generalized_box_iou(a, b).shape == (3, 2)
    assert box_iou(np.zeros((0, 4)), b).shape == (0, 2)
    assert generalized_box_iou(a, np.zeros((0, 4))).shape == (3, 0)


@pytest.mark.parametrize(
    ("a", "b", "giou"),
    [
        # zero width inside a 2x2 box: enclosing == union == 4 -> GIoU 0
        ((1, 0, 1, 2), (0, 0, 2, 2), 0.0),
        # zero height
        ((0, 1, 2, 1), (0, 0, 2, 2), 0.0),
        # inverted box collapses to the point (2, 2): enclosing [0, 0, 2, 2] = 4, union 1
        ((2, 2, 1, 1), (0, 0, 1, 1), -0.75),
        # two identical points: enclosing area 0 -> defined as 0
        ((1, 1, 1, 1), (1, 1, 1, 1), 0.0),
        # two collinear zero-width boxes: enclosing area 0 -> 0
        ((1, 0, 1, 5), (1, 2, 1, 9), 0.0),
        # two distinct points: enclosing 1, union 0 -> -1
        ((0, 0, 0, 0), (1, 1, 1, 1), -1.0),
    ],
)
def test_degenerate_boxes_are_safe(a: tuple[float, ...], b: tuple[float, ...], giou: float) -> None:
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        iou_ab = box_iou(box(*a), box(*b))
        giou_ab = generalized_box_iou(box(*a), box(*b))
        giou_ba = generalized_box_iou(box(*b), box(*a))
    assert iou_ab[0, 0] == 0.0
    assert giou_ab[0, 0] == pytest.approx(giou)
    assert giou_ba[0, 0] == pytest.approx(giou)
    assert not np.isnan(giou_ab).any()


@pytest.mark.parametrize("fn", [box_iou, generalized_box_iou])
def test_invalid_boxes_raise(fn: Callable[[ArrayLike, ArrayLike], np.ndarray]) -> None:
    good = box(0, 0, 1, 1)
    with pytest.raises(ValueError, match=r"shape \(N, 4\)"):
        fn(np.zeros((2, 3)), good)
    with pytest.raises(ValueError, match=r"shape \(N, 4\)"):
        fn(good, np.zeros(4))
    with pytest.raises(ValueError, match="NaN"):
        fn(box(0, 0, np.nan, 1), good)
    with pytest.raises(ValueError, match="NaN or infinite"):
        fn(good, box(0, 0, np.inf, 1))


# --------------------------------------------------------------------------------------------
# hits_at_k
# --------------------------------------------------------------------------------------------


def test_top1_hit() -> None:
    assert hits_at_k([[0, 0, 10, 10]], GT) == {"R@1": True, "R@5": True, "UB": True}


def test_empty_predictions_are_all_false() -> None:
    expected = {"R@1": False, "R@5": False, "UB": False}
    assert hits_at_k(np.zeros((0, 4)), GT) == expected
    assert hits_at_k([], GT) == expected


def test_r1_false_r5_true() -> None:
    preds = [MISS, MISS, [0, 0, 10, 9], MISS]  # IoU of the third box = 0.9
    assert hits_at_k(preds, GT) == {"R@1": False, "R@5": True, "UB": True}


def test_ub_true_r5_false() -> None:
    preds = [MISS] * 5 + [[1, 1, 10, 10]] + [MISS]  # hit at rank 6 (IoU 0.81)
    assert hits_at_k(preds, GT) == {"R@1": False, "R@5": False, "UB": True}


def test_nothing_hits_below_threshold() -> None:
    preds = [[0, 0, 10, 4]] * 6  # IoU 0.4 each
    assert hits_at_k(preds, GT) == {"R@1": False, "R@5": False, "UB": False}
    assert hits_at_k(preds, GT, threshold=0.4)["R@1"]  # criterion >= threshold is a hit


def test_iou_and_giou_criteria_disagree() -> None:
    # IoU 6/11 ~ 0.545 >= 0.5 but GIoU 61/132 ~ 0.462 < 0.5.
    pred, gt = [[0, 0, 6, 3]], [[0, 0, 4, 4]]
    assert hits_at_k(pred, gt, criterion="iou")["R@1"] is True
    assert hits_at_k(pred, gt, criterion="giou")["R@1"] is False


def test_multi_gt_any_match_counts() -> None:
    gt = [[0, 0, 10, 10], [50, 50, 60, 60]]
    preds = [[50, 50, 60, 61], [0, 0, 1, 1]]  # top-1 matches the second gt box
    assert hits_at_k(preds, gt) == {"R@1": True, "R@5": True, "UB": True}


def test_custom_ks_keys_sorted() -> None:
    preds = [MISS] * 9 + [[0, 0, 10, 10]]
    assert hits_at_k(preds, GT, ks=(10, 1, 5)) == {
        "R@1": False,
        "R@5": False,
        "R@10": True,
        "UB": True,
    }


def test_returns_python_bools() -> None:
    result = hits_at_k([[0, 0, 10, 10]], GT)
    assert all(type(v) is bool for v in result.values())


@pytest.mark.parametrize("criterion", ["IoU", "dice", ""])
def test_invalid_criterion_raises(criterion: str) -> None:
    with pytest.raises(ValueError, match="criterion must be one of"):
        hits_at_k([[0, 0, 1, 1]], GT, criterion=criterion)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="criterion must be one of"):
        RecallAccumulator(criterion=criterion)  # type: ignore[arg-type]


def test_hits_invalid_inputs_raise() -> None:
    with pytest.raises(ValueError, match="gt_boxes must contain at least one box"):
        hits_at_k([[0, 0, 1, 1]], np.zeros((0, 4)))
    with pytest.raises(ValueError, match="pred_boxes must have shape"):
        hits_at_k([[0, 0, 1]], GT)
    with pytest.raises(ValueError, match="gt_boxes contains NaN"):
        hits_at_k([[0, 0, 1, 1]], [[0, 0, np.nan, 1]])
    with pytest.raises(ValueError, match="positive integer"):
        hits_at_k([[0, 0, 1, 1]], GT, ks=(0, 5))
    with pytest.raises(TypeError, match="must be an integer"):
        hits_at_k([[0, 0, 1, 1]], GT, ks=(1.5,))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="threshold"):
        hits_at_k([[0, 0, 1, 1]], GT, threshold=float("nan"))


# --------------------------------------------------------------------------------------------
# ranked_by_score
# --------------------------------------------------------------------------------------------


def test_ranked_by_score_descending_and_stable() -> None:
    boxes = np.array([[0, 0, 1, 1], [1, 1, 2, 2], [2, 2, 3, 3], [3, 3, 4, 4]], dtype=float)
    scores = np.array([0.5, 0.9, 0.5, 0.1])
    sorted_boxes, sorted_scores = ranked_by_score(boxes, scores)
    np.testing.assert_array_equal(sorted_scores, [0.9, 0.5, 0.5, 0.1])
    np.testing.assert_array_equal(sorted_boxes[:, 0], [1, 0, 2, 3])  # tie keeps input order


def test_ranked_by_score_validation() -> None:
    boxes = np.zeros((2, 4))
    with pytest.raises(ValueError, match=r"scores must have shape \(2,\)"):
        ranked_by_score(boxes, [1.0])
    with pytest.raises(ValueError, match="scores contains NaN"):
        ranked_by_score(boxes, [1.0, np.nan])
    empty_boxes, empty_scores = ranked_by_score(np.zeros((0, 4)), np.zeros(0))
    assert empty_boxes.shape == (0, 4) and empty_scores.shape == (0,)


# --------------------------------------------------------------------------------------------
# RecallAccumulator
# --------------------------------------------------------------------------------------------

HIT = [0.0, 0.0, 10.0, 10.0]


def _filled_accumulator() -> RecallAccumulator:
    acc = RecallAccumulator()
    # attribute: R@1 1/3, R@5 2/3, UB 3/3
    acc.add([HIT], GT, group="attribute")
    acc.add([MISS, HIT], GT, group="attribute")
    acc.add([MISS] * 5 + [HIT], GT, group="attribute")
    # relation: R@1 1/2, R@5 1/2, UB 1/2
    acc.add([HIT], GT, group="relation")
    acc.add([], GT, group="relation")
    return acc


def test_accumulator_summary_exact_fractions() -> None:
    rows = _filled_accumulator().summary()
    assert [r.group for r in rows] == ["attribute", "relation", ALL_GROUP]
    assert [r.n for r in rows] == [3, 2, 5]
    attribute, relation, total = rows
    assert attribute["R@1"] == pytest.approx(1 / 3)
    assert attribute["R@5"] == pytest.approx(2 / 3)
    assert attribute["UB"] == pytest.approx(1.0)
    assert relation.rates == pytest.approx({"R@1": 0.5, "R@5": 0.5, "UB": 0.5})
    assert total.rates == pytest.approx({"R@1": 2 / 5, "R@5": 3 / 5, "UB": 4 / 5})
    assert total.as_dict() == {"group": "all", "n": 5, **total.rates}
    assert isinstance(total, RecallRow)


def test_accumulator_format_table() -> None:
    table = _filled_accumulator().format_table()
    lines = table.splitlines()
    assert len(lines) == 2 + 3  # header, rule, 3 rows
    assert lines[0].split("|")[1:-1] == [
        f" {c} " for c in ("group    ", "n", "  R@1", "  R@5", "    UB")
    ]
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in lines[2:]]
    assert cells == [
        ["attribute", "3", "33.33", "66.67", "100.00"],
        ["relation", "2", "50.00", "50.00", "50.00"],
        ["all", "5", "40.00", "60.00", "80.00"],
    ]
    assert set(lines[1]) <= {"|", "-", ":"}


def test_accumulator_tuple_groups_and_custom_ks() -> None:
    acc = RecallAccumulator(ks=(1, 10), criterion="giou")
    acc.add([HIT], GT, group=("val", "ordinal"))
    acc.add([MISS] * 9 + [HIT], GT, group=("testA", "ordinal"))
    assert len(acc) == 2
    rows = acc.summary()
    assert [r.group for r in rows] == ["testA/ordinal", "val/ordinal", "all"]
    assert rows[-1].rates == pytest.approx({"R@1": 0.5, "R@10": 1.0, "UB": 1.0})
    assert "R@10" in acc.format_table().splitlines()[0]


def test_accumulator_add_hits_and_errors() -> None:
    acc = RecallAccumulator()
    acc.add_hits({"R@1": True, "R@5": True, "UB": True}, "category")
    assert acc.summary()[0].rates == {"R@1": 1.0, "R@5": 1.0, "UB": 1.0}
    with pytest.raises(ValueError, match="missing metrics"):
        acc.add_hits({"R@1": True}, "category")
    with pytest.raises(ValueError, match="reserved"):
        acc.add([HIT], GT, group="all")
    with pytest.raises(ValueError, match="group must be"):
        acc.add([HIT], GT, group="")


def test_empty_accumulator() -> None:
    acc = RecallAccumulator()
    (row,) = acc.summary()
    assert row.group == ALL_GROUP and row.n == 0
    assert all(math.isnan(v) for v in row.rates.values())
    assert "n/a" in acc.format_table()


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------

coords = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, width=64)
box_arrays = st.integers(min_value=0, max_value=6).flatmap(
    lambda n: arrays(np.float64, (n, 4), elements=coords)
)  # arbitrary corners, so degenerate and inverted boxes are included


@settings(max_examples=200, deadline=None)
@given(a=box_arrays, b=box_arrays)
def test_iou_giou_properties(a: np.ndarray, b: np.ndarray) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        iou_ab, iou_ba = box_iou(a, b), box_iou(b, a)
        giou_ab, giou_ba = generalized_box_iou(a, b), generalized_box_iou(b, a)
    assert np.isfinite(iou_ab).all() and np.isfinite(giou_ab).all()
    assert ((iou_ab >= 0.0) & (iou_ab <= 1.0)).all()
    assert ((giou_ab >= -1.0) & (giou_ab <= 1.0)).all()
    assert (giou_ab <= iou_ab).all()
    np.testing.assert_allclose(iou_ab, iou_ba.T, atol=1e-12)
    np.testing.assert_allclose(giou_ab, giou_ba.T, atol=1e-12)


@settings(max_examples=100, deadline=None)
@given(
    x0=coords,
    y0=coords,
    w=st.floats(min_value=1e-3, max_value=1e3),
    h=st.floats(min_value=1e-3, max_value=1e3),
)
def test_self_iou_is_one(x0: float, y0: float, w: float, h: float) -> None:
    b = box(x0, y0, x0 + w, y0 + h)
    assert box_iou(b, b)[0, 0] == pytest.approx(1.0)
    assert generalized_box_iou(b, b)[0, 0] == pytest.approx(1.0)
