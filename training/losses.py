"""The grounding model's own detection loss (OWL-ViT / DETR style).

Per image, the annotated objects are matched one-to-one to patches by the Hungarian algorithm
on box cost only (the box head is query-agnostic in OWL). A matched patch must then predict
its object's box and score high for every query that refers to its object and low for all
others; every unmatched patch must score low for every query.

    loss = focal(logits, targets) + 5 * L1(boxes) + 2 * (1 - GIoU(boxes)) [+ w_rank * ranking]

Normalised by the number of matched objects in the batch (averaged over DDP ranks).

The optional ranking term is a per-query softmax over patches: each referred object's patch
must out-score every patch that is not referred to by that query. Sigmoid focal loss scores
every (patch, query) pair on its own; REC ranks the patches of one query, so this term
optimises the quantity R@1 measures and speeds up training a lot on small data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment


def cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def xyxy_to_cxcywh(b: torch.Tensor) -> torch.Tensor:
    x0, y0, x1, y1 = b.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def pairwise_giou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (N, 4), b (M, 4) xyxy -> (N, M) generalised IoU; tolerant of degenerate predictions."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = area_a[:, None] + area_b[None] - inter
    iou = inter / union.clamp(min=1e-7)
    lt_c = torch.min(a[:, None, :2], b[None, :, :2])
    rb_c = torch.max(a[:, None, 2:], b[None, :, 2:])
    enclosing = (rb_c - lt_c).clamp(min=0).prod(-1)
    return iou - (enclosing - union) / enclosing.clamp(min=1e-7)


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0):
    """Element-wise focal loss (RetinaNet), summed."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.sum()


@dataclass
class DetectionTargets:
    """Targets of one batch.

    boxes: per image, (K_b, 4) cxcywh in [0, 1] of the model input: its distinct objects.
    query_targets: per image, (K_b, Q) bool: object k is referred to by query q.
    """

    boxes: list[torch.Tensor]
    query_targets: list[torch.Tensor]


@torch.no_grad()
def match(pred_boxes: torch.Tensor, gt_boxes: list[torch.Tensor], w_l1: float = 5.0, w_giou: float = 2.0):
    """Hungarian matching of objects to patches: list of (patch_idx, object_idx) per image."""
    out = []
    for pb, gb in zip(pred_boxes, gt_boxes):
        if len(gb) == 0:
            out.append((np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)))
            continue
        cost = w_l1 * torch.cdist(pb, gb, p=1) - w_giou * pairwise_giou(cxcywh_to_xyxy(pb), cxcywh_to_xyxy(gb))
        rows, cols = linear_sum_assignment(cost.cpu().numpy())
        out.append((rows, cols))
    return out


def ranking_loss(logits: torch.Tensor, cls_target: torch.Tensor) -> torch.Tensor:
    """Sum over (image, query, referred patch) of -log softmax against the non-referred patches.

    logits, cls_target: (B, P, Q); cls_target 1 where the patch's object is referred to.
    """
    logits = logits.float().transpose(1, 2)  # (B, Q, P)
    target = cls_target.transpose(1, 2).bool()  # (B, Q, P)
    negatives = logits.masked_fill(target, float("-inf"))
    neg_lse = torch.logsumexp(negatives, dim=-1, keepdim=True)  # (B, Q, 1)
    per_positive = torch.logaddexp(logits, neg_lse) - logits  # -log(e^l / (e^l + sum_neg e^n))
    return per_positive[target].sum()


def detection_loss(
    logits: torch.Tensor,  # (B, P, Q)
    pred_boxes: torch.Tensor,  # (B, P, 4) cxcywh
    targets: DetectionTargets,
    matches: list,  # from match(): (patch_idx, object_idx) per image
    num_objects: float,  # matched objects in the batch (mean over DDP ranks), >= 1
    w_l1: float = 5.0,
    w_giou: float = 2.0,
    w_rank: float = 0.0,
) -> dict[str, torch.Tensor]:
    cls_target = torch.zeros_like(logits)
    matched_pred, matched_gt = [], []
    for b, (rows, cols) in enumerate(matches):
        if len(rows) == 0:
            continue
        rows_t, cols_t = torch.as_tensor(rows), torch.as_tensor(cols)
        cls_target[b, rows_t] = targets.query_targets[b][cols_t].to(logits.dtype)
        matched_pred.append(pred_boxes[b, rows_t])
        matched_gt.append(targets.boxes[b][cols_t])
    loss_cls = sigmoid_focal_loss(logits, cls_target) / num_objects
    if matched_pred:
        pb, gb = torch.cat(matched_pred), torch.cat(matched_gt)
        loss_l1 = F.l1_loss(pb, gb, reduction="sum") / num_objects
        loss_giou = (1 - torch.diag(pairwise_giou(cxcywh_to_xyxy(pb), cxcywh_to_xyxy(gb)))).sum() / num_objects
    else:
        loss_l1 = loss_giou = pred_boxes.sum() * 0.0
    loss_rank = ranking_loss(logits, cls_target) / num_objects if w_rank else logits.new_zeros(())
    total = loss_cls + w_l1 * loss_l1 + w_giou * loss_giou + w_rank * loss_rank
    return {
        "loss": total,
        "loss_cls": loss_cls.detach(),
        "loss_l1": loss_l1.detach(),
        "loss_giou": loss_giou.detach(),
        "loss_rank": loss_rank.detach(),
    }
