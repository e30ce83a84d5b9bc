"""Image preprocessing and box post-processing shared by training, export and serving (numpy only).

Two resize modes, as in the OWL family:

- "pad" (OWLv2, and the embedded default): pad the image at the bottom/right to a square of
  side max(w, h) with mid-gray, then resize to the model's square input. Boxes normalised to
  the input square map back with a single scale `max(w, h)`.
- "stretch" (OWL-ViT): resize w x h straight to the square input. Boxes map back with (w, h).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

PAD_GRAY = 128


def preprocess_image(
    image: Image.Image | np.ndarray,
    image_size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    resize_mode: str = "pad",
) -> np.ndarray:
    """RGB image (H, W, 3) uint8 or PIL -> normalised pixels (3, S, S) float32."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image = image.convert("RGB")
    w, h = image.size
    if resize_mode == "pad":
        side = max(w, h)
        if (w, h) != (side, side):
            canvas = Image.new("RGB", (side, side), (PAD_GRAY,) * 3)
            canvas.paste(image, (0, 0))
            image = canvas
    elif resize_mode != "stretch":
        raise ValueError(f"resize_mode must be 'pad' or 'stretch', got {resize_mode!r}")
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.BICUBIC)
    x = np.asarray(image, dtype=np.float32) / 255.0  # (S, S, 3)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))  # (3, S, S)


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


def mask_to_input_frame(mask: np.ndarray, size: int, resize_mode: str = "pad") -> np.ndarray:
    """Binary mask (H, W) of the original image -> (size, size) bool in the model's input square.

    The mask goes through the same pad / stretch as its image, then an area (box-filter) resize;
    a pixel is set when at least half of it is covered.
    """
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    if resize_mode == "pad":
        side = max(w, h)
        canvas = np.zeros((side, side), dtype=bool)
        canvas[:h, :w] = mask
        mask = canvas
    elif resize_mode != "stretch":
        raise ValueError(f"resize_mode must be 'pad' or 'stretch', got {resize_mode!r}")
    img = Image.fromarray(mask.astype(np.uint8) * 255)
    if img.size != (size, size):
        img = img.resize((size, size), Image.BOX)
    return np.asarray(img) >= 128


def mask_from_input_frame(prob: np.ndarray, width: int, height: int, resize_mode: str = "pad") -> np.ndarray:
    """Mask probabilities (s, s) in [0, 1] of the input square -> (height, width) bool of the original image."""
    img = Image.fromarray(np.clip(np.asarray(prob, dtype=np.float32), 0.0, 1.0), mode="F")
    if resize_mode == "pad":
        side = max(width, height)
        full = np.asarray(img.resize((side, side), Image.BILINEAR))
        return full[:height, :width] >= 0.5
    if resize_mode != "stretch":
        raise ValueError(f"resize_mode must be 'pad' or 'stretch', got {resize_mode!r}")
    return np.asarray(img.resize((width, height), Image.BILINEAR)) >= 0.5
