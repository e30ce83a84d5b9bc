"""Choosing the pointer-fusion weight from collected scores (training/evaluation/fusion.py), on small fake arrays."""

from __future__ import annotations

import numpy as np
import pytest

from diffprompt.training.evaluation.fusion import agreement, by_kind, choose_pointer_weight, fused_r1, r1


def _collected() -> dict[str, np.ndarray]:
    """3 expressions, 2 seeds, 3 boxes; box 0 is right everywhere. The prompted logits prefer box 1 for the
    first expression, where the pointer is sure of box 0; for the second the pointer is wrong but unsure."""
    correct = np.array([[1, 0, 0]] * 3, bool)
    prompted = np.array([[[1.0, 1.5, 0.0], [1.0, 1.6, 0.0]],
                         [[2.0, 1.5, 0.0], [2.0, 1.4, 0.0]],
                         [[3.0, 0.0, 0.0], [3.0, 0.0, 0.0]]])
    pointer = np.array([[0.0, -2.0, -2.0], [-0.5, 0.0, -3.0], [0.0, 0.0, 0.0]])  # log-probabilities
    return {"prompted_correct": np.repeat(correct[:, None], 2, 1), "prompted_logits": prompted, "pointer": pointer}


def test_the_weight_that_fixes_most_is_chosen_and_zero_is_always_a_candidate():
    d = _collected()
    assert fused_r1(d, 0.0) == 2 / 3
    assert fused_r1(d, 1.0) == 1.0  # expression 0 flips to box 0, expression 1 keeps it
    assert fused_r1(d, 10.0) == 2 / 3  # too much: expression 1 follows the wrong pointer
    assert choose_pointer_weight(d, [1.0, 10.0]) == 1.0
    assert choose_pointer_weight(d, [10.0]) == 0.0  # no fusion beats a harmful one
    assert choose_pointer_weight(d, [1.0, 2.0]) == 1.0  # a tie goes to the smaller weight


def test_r1_agreement_and_kinds():
    correct = np.array([[True, False], [False, True]])
    assert r1(correct, np.array([[0.9, 0.1], [0.9, 0.1]])).tolist() == [True, False]
    boxes = np.zeros((2, 3, 2, 4))
    boxes[..., 0, :] = [0, 0, 10, 10]
    boxes[..., 1, :] = [50, 50, 60, 60]
    score = np.zeros((2, 3, 2))
    score[:, :, 0] = 1.0
    score[1, 2] = [0.0, 1.0]  # expression 1: the third seed picks the other box
    assert agreement(boxes, score).tolist() == [True, False]
    assert by_kind(np.array([True, False, True]), np.array(["a", "b", "a"])) == pytest.approx(
        {"a": 100.0, "b": 0.0, "all": 200 / 3})
