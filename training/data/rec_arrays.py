"""REC samples held in memory as tensors, for the Diff-Prompt stages.

The REC train split is small (a few thousand expressions), so each stage decodes the images
and masks once and then trains from memory instead of reading PNGs every step.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from diffprompt.core.image_spec import ImageSpec
from diffprompt.training.data.grounding_dataset import load_pixels
from diffprompt.training.data.masks import rle_to_mask
from diffprompt.training.data.records import GroundingSample
from diffprompt.core.images import mask_to_input_frame
from diffprompt.core.boxes import pixels_to_normalized


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
    progress: bool = True, cache_dir: str | Path | None = None,
) -> RecArrays:
    """Decode every sample once. With `cache_dir`, the decoded pixels are kept in an .npy file
    keyed by the samples' image files and the image spec, so the next job maps it instead."""
    samples = list(samples)
    masks = np.zeros((len(samples), mask_size, mask_size), dtype=bool)
    boxes = []
    for i, s in enumerate(tqdm(samples, desc="loading masks", unit="expr", disable=not progress, leave=False)):
        masks[i] = target_mask(s, mask_size, spec.resize_mode)
        boxes.append(torch.from_numpy(pixels_to_normalized(s.boxes, s.width, s.height, spec.resize_mode)))
    pixels = None
    if with_pixels:
        cached = _pixel_cache_path(samples, spec, cache_dir) if cache_dir else None
        if cached is not None and cached.exists():
            pixels = torch.from_numpy(np.load(cached))
        else:
            pixels = _decode_pixels(samples, spec, progress)
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                tmp = cached.with_name(f"{cached.stem}.{os.getpid()}.tmp.npy")
                np.save(tmp, pixels.numpy())
                os.replace(tmp, cached)  # atomic: parallel jobs never read a half-written cache
    return RecArrays(samples, torch.from_numpy(masks), boxes, pixels)


def _decode_pixels(samples: list[GroundingSample], spec: ImageSpec, progress: bool) -> torch.Tensor:
    pixels = torch.zeros(len(samples), 3, spec.image_size, spec.image_size, dtype=torch.float16)
    last: tuple[str, torch.Tensor] | None = None  # samples of one image are adjacent and share its pixels
    for i, s in enumerate(tqdm(samples, desc="loading images", unit="expr", disable=not progress, leave=False)):
        if last is None or last[0] != str(s.image_path):
            last = (str(s.image_path), torch.from_numpy(load_pixels(s, spec)).half())
        pixels[i] = last[1]
    return pixels


def _pixel_cache_path(samples: list[GroundingSample], spec: ImageSpec, cache_dir: str | Path) -> Path:
    h = hashlib.sha256(repr(spec).encode())
    for s in samples:
        st = Path(s.image_path).stat()
        h.update(f"{s.image_path}|{st.st_size}|{st.st_mtime_ns};".encode())
    return Path(cache_dir) / f"pixels-{h.hexdigest()[:16]}.npy"
