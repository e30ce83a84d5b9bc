"""Detection loss pieces: matching, GIoU, the per-query ranking term."""

from __future__ import annotations

import math

import torch

from diffprompt.training.losses import DetectionTargets, detection_loss, match, pairwise_giou, ranking_loss


def test_ranking_loss_by_hand():
    # One image, 3 patches, 1 query; patch 0 is referred to. -log(e^2 / (e^2 + e^0 + e^1)).
    logits = torch.tensor([[[2.0], [0.0], [1.0]]])
    target = torch.tensor([[[1.0], [0.0], [0.0]]])
    expected = -math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(1)))
    assert abs(ranking_loss(logits, target).item() - expected) < 1e-6
    # Two referred patches compete only with the negatives, not with each other.
    target2 = torch.tensor([[[1.0], [0.0], [1.0]]])
    expected2 = -math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(math.exp(1) / (math.exp(1) + 1))
    assert abs(ranking_loss(logits, target2).item() - expected2) < 1e-6


def test_matching_picks_the_closest_patches():
    pred = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.8, 0.8, 0.1, 0.1], [0.5, 0.5, 0.5, 0.5]]])
    gt = [torch.tensor([[0.79, 0.81, 0.1, 0.1], [0.21, 0.2, 0.1, 0.1]])]
    (rows, cols), = match(pred, gt)
    assert dict(zip(cols.tolist(), rows.tolist())) == {0: 1, 1: 0}


def test_perfect_boxes_cost_nothing_and_scores_follow_targets():
    boxes = torch.tensor([[[0.25, 0.25, 0.2, 0.2], [0.75, 0.75, 0.2, 0.2]]])
    targets = DetectionTargets(boxes=[boxes[0, :1].clone()], query_targets=[torch.tensor([[True, False]])])
    good = torch.tensor([[[9.0, -9.0], [-9.0, -9.0]]])  # patch 0 matches query 0 only
    bad = torch.tensor([[[-9.0, 9.0], [9.0, -9.0]]])
    matches = match(boxes, targets.boxes)
    out_good = detection_loss(good, boxes, targets, matches, num_objects=1.0, w_rank=1.0)
    out_bad = detection_loss(bad, boxes, targets, matches, num_objects=1.0, w_rank=1.0)
    assert out_good["loss_l1"].item() < 1e-6 and out_good["loss_giou"].item() < 1e-6
    assert out_good["loss"].item() < 0.01 < out_bad["loss"].item()
    assert out_bad["loss_rank"].item() > 10


def test_giou_of_identical_and_far_boxes():
    a = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[2.0, 2.0, 3.0, 3.0]])
    assert pairwise_giou(a, a).item() == 1.0
    assert abs(pairwise_giou(a, b).item() - (0 - (9 - 2) / 9)) < 1e-6
