"""Image preprocessing shared by training, evaluation, export and serving (numpy + PIL, no torch).

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
