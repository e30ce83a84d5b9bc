"""Torch datasets over `GroundingSample`s.

- `ImageQueriesDataset` groups samples by image: one item = one image with every query that
  was annotated on it (pretraining on category queries, several targets each).
- `detection_collate` builds a batch: the union of the batch's queries plus negatives from
  the dataset's query vocabulary, and for each image its distinct objects with, per query,
  whether the object is referred to. A query not annotated on an image counts as absent
  there: true for the synthetic world, where every category query of a scene is written.
- `RecDataset`: one item = one expression (REC stages and evaluation).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from diffprompt.training.data.records import DatasetError, GroundingSample
from diffprompt.training.losses import DetectionTargets
from diffprompt.core.image_spec import ImageSpec
from diffprompt.core.boxes import pixels_to_normalized


def load_pixels(sample: GroundingSample, spec: ImageSpec) -> np.ndarray:
    """(3, S, S) float32 for the sample's image; DatasetError naming the file if unreadable."""
    try:
        with Image.open(sample.image_path) as im:
            return spec.preprocess(im)
    except (OSError, ValueError) as e:
        raise DatasetError(f"{sample.image_path}: cannot read image ({e})") from e


class ImageQueriesDataset(Dataset):
    def __init__(self, samples: Sequence[GroundingSample], spec: ImageSpec):
        groups: OrderedDict[str, list[GroundingSample]] = OrderedDict()
        for s in samples:
            groups.setdefault(str(s.image_path), []).append(s)
        self.groups = list(groups.values())
        self.spec = spec
        self.vocabulary = sorted({s.expression for s in samples})

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> dict:
        group = self.groups[i]
        first = group[0]
        return {
            "pixels": torch.from_numpy(load_pixels(first, self.spec)),
            "queries": [s.expression for s in group],
            "boxes": [
                torch.from_numpy(pixels_to_normalized(s.boxes, s.width, s.height, self.spec.resize_mode))
                for s in group
            ],
        }


def detection_collate(items: list[dict], vocabulary: Sequence[str], max_queries: int, rng: np.random.Generator):
    """-> (pixels (B,3,S,S), queries list[str] (Q), DetectionTargets)."""
    queries = list(dict.fromkeys(q for it in items for q in it["queries"]))
    extra = [v for v in vocabulary if v not in set(queries)]
    room = max(0, max_queries - len(queries))
    if extra and room:
        picked = rng.choice(len(extra), size=min(room, len(extra)), replace=False)
        queries += [extra[j] for j in sorted(picked)]
    q_index = {q: j for j, q in enumerate(queries)}
    boxes, query_targets = [], []
    for it in items:
        objects: list[torch.Tensor] = []
        keys: dict[tuple, int] = {}
        refs: list[tuple[int, int]] = []
        for q, qboxes in zip(it["queries"], it["boxes"]):
            for b in qboxes:
                key = tuple(np.round(b.numpy(), 4).tolist())
                if key not in keys:
                    keys[key] = len(objects)
                    objects.append(b)
                refs.append((keys[key], q_index[q]))
        target = torch.zeros(len(objects), len(queries), dtype=torch.bool)
        for k, j in refs:
            target[k, j] = True
        boxes.append(torch.stack(objects) if objects else torch.zeros(0, 4))
        query_targets.append(target)
    pixels = torch.stack([it["pixels"] for it in items])
    return pixels, queries, DetectionTargets(boxes=boxes, query_targets=query_targets)


class RecDataset(Dataset):
    """One expression per item: pixels, expression, its boxes (normalised cxcywh), index."""

    def __init__(self, samples: Sequence[GroundingSample], spec: ImageSpec):
        self.samples = list(samples)
        self.spec = spec

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        s = self.samples[i]
        return {
            "pixels": torch.from_numpy(load_pixels(s, self.spec)),
            "expression": s.expression,
            "boxes": torch.from_numpy(pixels_to_normalized(s.boxes, s.width, s.height, self.spec.resize_mode)),
            "index": i,
        }


def rec_collate(items: list[dict]) -> dict:
    return {
        "pixels": torch.stack([it["pixels"] for it in items]),
        "expressions": [it["expression"] for it in items],
        "boxes": [it["boxes"] for it in items],
        "index": torch.tensor([it["index"] for it in items]),
    }
