"""Run a grounding pipeline on REC samples and score it (R@1 / R@5 / UB per expression kind).

`predict_samples` is the PyTorch inference path of evaluation: it takes (image, expression)
pairs and returns, per pair, every box of the model ranked by score, in pixels of the original
image. The model is a `DiffPromptPipeline` (foundation + prompt learner + generator), a bare
`GroundingModel` (the frozen foundation alone), or anything with the same `image_spec` and
`score(pixels, ids, mask, seeds)` (diffprompt.core.runtime.GroundingRuntime: an exported artifact).

Diff-Prompt's noise is seeded by a seed policy (`expression_seeds`). `service` (the default, the
product's policy) gives every expression the raw seed, as the service does with a request's `seed`
(default 0), so evaluation measures what a user gets; `expression` gives expression `i` the seed
`sample_seed(seed, sample_id)`, independent noise per expression (what evaluation did before, and what
stage 3 trains on). Under both a result does not depend on the batch it was computed in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from torch.utils.data import DataLoader
from tqdm import tqdm

from diffprompt.core.boxes import boxes_to_pixels
from diffprompt.core.tokenizer import QueryTokenizer
from diffprompt.training.data.grounding_dataset import RecDataset, rec_collate
from diffprompt.training.data.records import GroundingSample
from diffprompt.training.evaluation.metrics import RecallAccumulator, ranked_by_score
from diffprompt.training.models.diffprompt import DiffPromptPipeline
from diffprompt.training.models.grounding import GroundingModel
from diffprompt.training.options import SEED_POLICIES


@dataclass
class RankedBoxes:
    boxes: np.ndarray  # (P, 4) xyxy pixels of the original image, best first
    scores: np.ndarray  # (P,) sigmoid scores, descending


def sample_seed(seed: int, sample_id: int) -> int:
    """The noise seed of one expression in an evaluation run with `seed`."""
    return (seed * 1_000_003 + sample_id) % 2**63


def expression_seeds(samples: Sequence[GroundingSample], seed: int, policy: str = "service") -> list[int]:
    """The noise seed of each sample under a seed policy (see the module docstring)."""
    if policy == "service":
        return [int(seed)] * len(samples)
    if policy == "expression":
        return [sample_seed(seed, s.sample_id) for s in samples]
    raise ValueError(f"unknown seed policy {policy!r}; expected one of {SEED_POLICIES}")


def as_pipeline(model, tokenizer: QueryTokenizer):
    if isinstance(model, GroundingModel):
        return DiffPromptPipeline(model.eval(), tokenizer, None)
    return model


def predict_samples(
    model: GroundingModel | DiffPromptPipeline,
    tokenizer: QueryTokenizer,
    samples: Sequence[GroundingSample],
    batch_size: int = 64,
    progress: bool = True,
    seed: int = 0,
    seed_policy: str = "service",
) -> list[RankedBoxes]:
    pipeline = as_pipeline(model, tokenizer)
    spec = pipeline.image_spec
    loader = DataLoader(RecDataset(samples, spec), batch_size=batch_size, collate_fn=rec_collate)
    results: list[RankedBoxes] = []
    for batch in tqdm(loader, desc="evaluating", unit="batch", disable=not progress, leave=False):
        ids, mask = tokenizer(batch["expressions"])
        index = batch["index"].tolist()
        seeds = expression_seeds([samples[i] for i in index], seed, seed_policy)
        scores, boxes = pipeline.score(batch["pixels"].numpy(), ids.astype(np.int64), mask.astype(np.int64), seeds)
        for j, i in enumerate(index):
            s = samples[i]
            px = boxes_to_pixels(boxes[j], s.width, s.height, spec.resize_mode)
            ranked, sc = ranked_by_score(px, scores[j])
            results.append(RankedBoxes(ranked, sc))
    return results


def evaluate_samples(
    model: GroundingModel | DiffPromptPipeline,
    tokenizer: QueryTokenizer,
    samples: Sequence[GroundingSample],
    criterion: str = "iou",
    batch_size: int = 64,
    progress: bool = True,
    seed: int = 0,
    seed_policy: str = "service",
) -> RecallAccumulator:
    """R@1 / R@5 / UB grouped by expression kind."""
    acc = RecallAccumulator(ks=(1, 5), criterion=criterion)
    predictions = predict_samples(model, tokenizer, samples, batch_size, progress, seed, seed_policy)
    for sample, pred in zip(samples, predictions):
        acc.add(pred.boxes, sample.boxes, group=sample.kind)
    return acc
