"""The pointer fusion's measurements: what the parts of a Diff-Prompt pipeline rank first, per seed.

`collect` runs a pipeline once per sampling seed over REC samples and keeps, per expression and box,
whether the box is right (IoU >= 0.5) and every score that could rank it: the unprompted foundation's
logit, the DiT pointer's log-probability of the box's patch, the prompted foundation's logit. `r1`
and `agreement` then score any combination without running the models again, and
`choose_pointer_weight` picks the fusion weight (`DiffPromptPipeline.pointer_weight`) with the highest
mean R@1 over the seeds; call it on val only.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from diffprompt.core.boxes import boxes_to_pixels
from diffprompt.training.data.grounding_dataset import RecDataset, rec_collate
from diffprompt.training.evaluation.metrics import box_iou
from diffprompt.training.evaluation.rec import expression_seeds
from diffprompt.training.models.diffprompt import DiffPromptPipeline, dit_conditions
from diffprompt.training.models.prompt_learners import prompted_forward


def collect(pipeline: DiffPromptPipeline, samples, seeds: Sequence[int],
            policy: str = "service") -> dict[str, np.ndarray]:
    """Per expression (N) and patch (P): correct (IoU >= 0.5) and boxes for the unprompted and, per seed,
    the prompted foundation; their logits; the pointer's log-probability."""
    spec = pipeline.image_spec
    loader = DataLoader(RecDataset(samples, spec), batch_size=64, collate_fn=rec_collate)
    out: dict[str, list] = defaultdict(list)
    for batch in loader:
        ids, mask = (torch.from_numpy(a.astype(np.int64)) for a in pipeline.tokenizer(batch["expressions"]))
        pixels = batch["pixels"]
        index = batch["index"].tolist()
        with torch.no_grad():
            cond = dit_conditions(pipeline.foundation, pipeline.dit, pixels, ids, mask, tokens=True)
            log_prob = torch.log_softmax(pipeline.dit.prepare_conditions(**cond)["pointer_logits"].float(), -1)
            base = pipeline.foundation(pixels, ids, mask)
            per_seed = []
            for seed in seeds:
                s_ids = expression_seeds([samples[i] for i in index], seed, policy)
                masks = pipeline.generate_masks(pixels, ids, mask, s_ids)
                o = prompted_forward(pipeline.foundation, pipeline.learner, pixels, ids, mask, masks)
                per_seed.append((o.logits[..., 0].float().numpy(), o.pred_boxes.float().numpy()))
        for j, i in enumerate(index):
            s = samples[i]
            truth = np.asarray(s.boxes, dtype=np.float64)
            def px(b, s=s):
                return boxes_to_pixels(b, s.width, s.height, spec.resize_mode)

            base_px = px(base.pred_boxes[j].float().numpy())
            out["base_correct"].append(box_iou(base_px, truth).max(1) >= 0.5)
            out["base_logits"].append(base.logits[j, :, 0].float().numpy())
            out["pointer"].append(log_prob[j].numpy())
            prompted_px = [px(b[j]) for _, b in per_seed]
            out["prompted_correct"].append(np.stack([box_iou(b, truth).max(1) >= 0.5 for b in prompted_px]))
            out["prompted_boxes"].append(np.stack(prompted_px))
            out["prompted_logits"].append(np.stack([lg[j] for lg, _ in per_seed]))
            out["kind"].append(s.kind)
    return {k: np.asarray(v) for k, v in out.items()}


def r1(correct: np.ndarray, score: np.ndarray) -> np.ndarray:
    """(N,) whether the top-scored box is correct; correct / score (N, P)."""
    return np.take_along_axis(correct, score.argmax(-1)[:, None], -1)[:, 0]


def agreement(boxes: np.ndarray, score: np.ndarray) -> np.ndarray:
    """(N,) whether the top-1 box of every seed overlaps seed 0's (IoU >= 0.5); boxes (N, S, P, 4), score (N, S, P)."""
    top = np.take_along_axis(boxes, score.argmax(-1)[..., None, None], 2)[:, :, 0]  # (N, S, 4)
    same = [np.diag(box_iou(top[:, 0], top[:, s])) >= 0.5 for s in range(1, top.shape[1])]
    return np.all(same, axis=0) if same else np.ones(len(top), bool)


def by_kind(hit: np.ndarray, kinds: np.ndarray) -> dict[str, float]:
    res = {k: 100 * hit[kinds == k].mean() for k in sorted(set(kinds))}
    res["all"] = 100 * hit.mean()
    return res


def fused_r1(d: dict[str, np.ndarray], weight: float) -> float:
    """Mean over the seeds of the R@1 of prompted logit + weight x pointer log-probability."""
    score = d["prompted_logits"] + weight * d["pointer"][:, None]  # (N, S, P)
    return float(np.mean([r1(d["prompted_correct"][:, s], score[:, s]).mean() for s in range(score.shape[1])]))


def choose_pointer_weight(d: dict[str, np.ndarray], weights: Sequence[float]) -> float:
    """The weight (0 = no fusion, always a candidate) with the highest mean R@1 on `d`; a tie goes to the smaller."""
    return max([0.0, *weights], key=lambda w: (fused_r1(d, w), -w))
