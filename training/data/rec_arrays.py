"""REC samples held in memory as tensors, for the Diff-Prompt stages.

The REC train split is small (a few thousand expressions), so each stage decodes the images
and masks once and then trains from memory instead of reading PNGs every step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from training.data.grounding_dataset import ImageSpec, load_pixels
from training.data.masks import rle_to_mask
from training.data.records import GroundingSample
from training.models.preprocess import mask_to_input_frame, pixels_to_normalized


def target_mask(sample: GroundingSample, size: int, resize_mode: str) -> np.ndarray:
    """(size, size) bool: union of the referred objects' masks in the model's input square.

    Datasets without segmentation fall back to the filled boxes.
    """
    full = np.zeros((sample.height, sample.width), dtype=bool)
    if sample.masks:
        for rle in sample.masks:
            full |= rle_to_mask(rle)
    else:
        for x0, y0, x1, y1 in np.round(sample.boxes).astype(int):
            full[max(0, y0): max(0, y1), max(0, x0): max(0, x1)] = True
    return mask_to_input_frame(full, size, resize_mode)


@dataclass
class RecArrays:
    samples: list[GroundingSample]
    masks: torch.Tensor  # (N, m, m) bool, target masks in the input square
    boxes: list[torch.Tensor]  # N x (K, 4) cxcywh normalised to the input square
    pixels: torch.Tensor | None = None  # (N, 3, S, S) float16, normalised

    def __len__(self) -> int:
        return len(self.samples)


def load_rec_arrays(
    samples: Sequence[GroundingSample], spec: ImageSpec, mask_size: int, with_pixels: bool = True,
    progress: bool = True,
) -> RecArrays:
    samples = list(samples)
    masks = np.zeros((len(samples), mask_size, mask_size), dtype=bool)
    pixels = torch.zeros(len(samples), 3, spec.image_size, spec.image_size, dtype=torch.float16) if with_pixels else None
    boxes = []
    cache: dict[str, torch.Tensor] = {}  # samples of one image share its pixels
    for i, s in enumerate(tqdm(samples, desc="loading samples", unit="expr", disable=not progress, leave=False)):
        masks[i] = target_mask(s, mask_size, spec.resize_mode)
        boxes.append(torch.from_numpy(pixels_to_normalized(s.boxes, s.width, s.height, spec.resize_mode)))
        if pixels is not None:
            key = str(s.image_path)
            if key not in cache:
                cache = {key: torch.from_numpy(load_pixels(s, spec)).half()}
            pixels[i] = cache[key]
    return RecArrays(samples, torch.from_numpy(masks), boxes, pixels)
