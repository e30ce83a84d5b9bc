"""Box conversions between the model's normalised frame and the original image's pixels (numpy only).

Model boxes are cxcywh in [0, 1] of the square input. With resize mode "pad" the image was
padded at the bottom/right to a square of side max(w, h), so one scale maps back; with
"stretch" each axis has its own scale.
"""

from __future__ import annotations

import numpy as np


def input_scale(width: int, height: int, resize_mode: str) -> np.ndarray:
    """Multiplier (4,) turning normalised xyxy boxes into pixels of the original image."""
    if resize_mode == "pad":
        side = float(max(width, height))
        return np.array([side, side, side, side], dtype=np.float32)
    return np.array([width, height, width, height], dtype=np.float32)


def cxcywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """(..., 4) centre/size -> corners."""
    cx, cy, w, h = np.moveaxis(boxes, -1, 0)
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)


def boxes_to_pixels(boxes_cxcywh: np.ndarray, width: int, height: int, resize_mode: str) -> np.ndarray:
    """Model boxes (..., 4) cxcywh in [0, 1] -> xyxy pixels of the original image, clipped to it."""
    xyxy = cxcywh_to_xyxy(np.asarray(boxes_cxcywh, dtype=np.float32)) * input_scale(width, height, resize_mode)
    limits = np.array([width, height, width, height], dtype=np.float32)
    return np.clip(xyxy, 0.0, limits)


def pixels_to_normalized(boxes_xyxy: np.ndarray, width: int, height: int, resize_mode: str) -> np.ndarray:
    """Inverse of `boxes_to_pixels` without clipping: xyxy pixels -> cxcywh in [0, 1] of the input square."""
    xyxy = np.asarray(boxes_xyxy, dtype=np.float32) / input_scale(width, height, resize_mode)
    x0, y0, x1, y1 = np.moveaxis(xyxy, -1, 0)
    return np.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)


def on_image(boxes_xyxy: np.ndarray, min_side: float = 0.01) -> np.ndarray:
    """(..., 4) clipped xyxy pixels -> (...) bool: the box keeps at least `min_side` px of width and height.

    In pad mode a box predicted wholly inside the padding clips to a zero-area sliver on the image's
    edge; such boxes are dropped rather than reported (one partly on the image keeps its visible part).
    """
    xyxy = np.asarray(boxes_xyxy)
    return ((xyxy[..., 2] - xyxy[..., 0]) >= min_side) & ((xyxy[..., 3] - xyxy[..., 1]) >= min_side)
