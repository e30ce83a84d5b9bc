"""Run a grounding model on REC samples and score it (R@1 / R@5 / UB per expression kind).

`GroundingPredictor` is the PyTorch inference path used by evaluation: it takes a batch of
(image, expression) pairs and returns, per pair, every box of the model ranked by score, in
pixels of the original image. Later stages plug deep prompts in through `prompt_fn`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from training.data.grounding_dataset import ImageSpec, RecDataset, rec_collate
from training.data.records import GroundingSample
from training.evaluation.metrics import RecallAccumulator, ranked_by_score
from training.models.grounding import GroundingModel
from training.models.preprocess import boxes_to_pixels
from training.models.tokenizer import QueryTokenizer


@dataclass
class RankedBoxes:
    boxes: np.ndarray  # (P, 4) xyxy pixels of the original image, best first
    scores: np.ndarray  # (P,) sigmoid scores, descending


# prompt_fn(model, pixels (B,3,S,S), ids (B,T), mask (B,T)) -> (vision_prompts, text_prompts) or (None, None)
PromptFn = Callable[[GroundingModel, torch.Tensor, torch.Tensor, torch.Tensor], tuple]


@torch.no_grad()
def score_batch(
    model: GroundingModel,
    pixels: torch.Tensor,  # (B, 3, S, S)
    ids: torch.Tensor,  # (B, T), one expression per image
    mask: torch.Tensor,  # (B, T)
    prompt_fn: PromptFn | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores (B, P) in [0, 1], boxes (B, P, 4) cxcywh normalised)."""
    vision_prompts = text_prompts = None
    if prompt_fn is not None:
        vision_prompts, text_prompts = prompt_fn(model, pixels, ids, mask)
    image = model.encode_image(pixels, vision_prompts)
    text = model.encode_text(ids, mask, text_prompts)
    out = model.predict(image, text.query_embeds[:, None, :])  # (B, P, 1)
    return torch.sigmoid(out.logits[..., 0]), out.pred_boxes


def predict_samples(
    model: GroundingModel,
    tokenizer: QueryTokenizer,
    samples: Sequence[GroundingSample],
    batch_size: int = 64,
    prompt_fn: PromptFn | None = None,
    progress: bool = True,
) -> list[RankedBoxes]:
    model.eval()
    spec = ImageSpec.from_config(model.config)
    loader = DataLoader(RecDataset(samples, spec), batch_size=batch_size, collate_fn=rec_collate)
    device = next(model.parameters()).device
    results: list[RankedBoxes] = []
    for batch in tqdm(loader, desc="evaluating", unit="batch", disable=not progress, leave=False):
        ids, mask = tokenizer(batch["expressions"])
        scores, boxes = score_batch(
            model, batch["pixels"].to(device), torch.from_numpy(ids).to(device),
            torch.from_numpy(mask).to(device), prompt_fn,
        )
        for j, i in enumerate(batch["index"].tolist()):
            s = samples[i]
            px = boxes_to_pixels(boxes[j].cpu().numpy(), s.width, s.height, spec.resize_mode)
            ranked, sc = ranked_by_score(px, scores[j].cpu().numpy())
            results.append(RankedBoxes(ranked, sc))
    return results


def evaluate_samples(
    model: GroundingModel,
    tokenizer: QueryTokenizer,
    samples: Sequence[GroundingSample],
    criterion: str = "iou",
    batch_size: int = 64,
    prompt_fn: PromptFn | None = None,
    progress: bool = True,
) -> RecallAccumulator:
    """R@1 / R@5 / UB grouped by expression kind."""
    acc = RecallAccumulator(ks=(1, 5), criterion=criterion)
    predictions = predict_samples(model, tokenizer, samples, batch_size, prompt_fn, progress)
    for sample, pred in zip(samples, predictions):
        acc.add(pred.boxes, sample.boxes, group=sample.kind)
    return acc
