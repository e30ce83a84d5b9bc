"""Image preprocessing shared by training, evaluation, export and serving (numpy + PIL, no torch).

Two resize modes, as in the OWL family:

- "pad" (OWLv2, and the embedded default): pad the image at the bottom/right to a square of
  side max(w, h) with mid-gray, then resize to the model's square input. Boxes normalised to
  the input square map back with a single scale `max(w, h)`.
- "stretch" (OWL-ViT): resize w x h straight to the square input. Boxes map back with (w, h).

and two resampling filters:

- "bicubic": PIL bicubic on the uint8 image, as transformers' `OwlViTImageProcessor` (and the
  embedded default, whose pad colour is 128 grey);
- "owlv2": as the original OWLv2 and transformers' `Owlv2ImageProcessor`: pixels to [0, 1] float,
  pad with 0.5 grey, Gaussian anti-aliasing (sigma = (factor - 1) / 2 when shrinking) then
  bilinear zoom with scipy.ndimage's conventions (mode "mirror", grid_mode=True), clipped to the
  input's range. Written in numpy here (no scipy / transformers in the service);
  tests/core/test_image_parity.py checks both filters against the transformers processors.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

PAD_GRAY = 128
OWLV2_PAD = 0.5  # the original OWLv2 pads with 0.5 grey after scaling to [0, 1]
RESAMPLES = ("bicubic", "owlv2")
GAUSS_TRUNCATE = 4.0  # scipy.ndimage.gaussian_filter's default: kernel radius = int(4 sigma + 0.5)


def _mirror(coords: np.ndarray, n: int) -> np.ndarray:
    """Reflect sample coordinates into [0, n - 1] about the edge pixels (scipy.ndimage mode "mirror")."""
    if n == 1:
        return np.zeros_like(coords)
    period = 2 * (n - 1)
    c = np.mod(coords, period)
    return np.where(c > n - 1, period - c, c)


def _gaussian_1d(x: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    """scipy.ndimage.gaussian_filter1d(x, sigma, axis, mode="mirror") (truncate 4)."""
    if sigma <= 0:
        return x
    radius = int(GAUSS_TRUNCATE * sigma + 0.5)
    taps = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (taps / sigma) ** 2)
    weights /= weights.sum()
    n = x.shape[axis]
    out = np.zeros_like(x)
    for tap, w in zip(taps, weights):
        idx = _mirror(np.arange(n) + tap, n).astype(np.intp)
        out += w * np.take(x, idx, axis=axis)
    return out


def _linear_zoom_1d(x: np.ndarray, size: int, axis: int) -> np.ndarray:
    """scipy.ndimage.zoom(order=1, mode="mirror", grid_mode=True) along one axis: n -> size samples.

    grid_mode: pixel centres at (i + 0.5), so output sample j reads input coordinate (j + 0.5) * n / size - 0.5.
    """
    n = x.shape[axis]
    if n == size:
        return x
    coords = _mirror((np.arange(size) + 0.5) * (n / size) - 0.5, n)
    lo = np.floor(coords).astype(np.intp)
    hi = np.minimum(lo + 1, n - 1)
    frac = (coords - lo).astype(x.dtype)
    shape = [1] * x.ndim
    shape[axis] = size
    frac = frac.reshape(shape)
    return np.take(x, lo, axis=axis) * (1 - frac) + np.take(x, hi, axis=axis) * frac


def owlv2_resize(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) float in [0, 1] -> (size, size, 3): anti-aliased bilinear resize as Owlv2ImageProcessor."""
    x = image.astype(np.float64)
    for axis in (0, 1):
        factor = x.shape[axis] / size
        x = _gaussian_1d(x, max(0.0, (factor - 1) / 2), axis)
    for axis in (0, 1):
        x = _linear_zoom_1d(x, size, axis)
    return np.clip(x, image.min(), image.max())



def preprocess_image(
    image: Image.Image | np.ndarray,
    image_size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    resize_mode: str = "pad",
    resample: str = "bicubic",
) -> np.ndarray:
    """RGB image (H, W, 3) uint8 or PIL -> normalised pixels (3, S, S) float32."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image = image.convert("RGB")
    if resize_mode not in ("pad", "stretch"):
        raise ValueError(f"resize_mode must be 'pad' or 'stretch', got {resize_mode!r}")
    if resample == "owlv2":
        x = np.asarray(image, dtype=np.float32) / 255.0  # (H, W, 3)
        if resize_mode == "pad":
            h, w = x.shape[:2]
            side = max(w, h)
            x = np.pad(x, ((0, side - h), (0, side - w), (0, 0)), constant_values=OWLV2_PAD)
        x = owlv2_resize(x, image_size).astype(np.float32)
        return _normalize(x, mean, std)
    if resample != "bicubic":
        raise ValueError(f"resample must be one of {RESAMPLES}, got {resample!r}")
    w, h = image.size
    if resize_mode == "pad":
        side = max(w, h)
        if (w, h) != (side, side):
            canvas = Image.new("RGB", (side, side), (PAD_GRAY,) * 3)
            canvas.paste(image, (0, 0))
            image = canvas
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.BICUBIC)
    return _normalize(np.asarray(image, dtype=np.float32) / 255.0, mean, std)


def _normalize(x: np.ndarray, mean, std) -> np.ndarray:
    """(S, S, 3) float in [0, 1] -> (3, S, S) float32 normalised per channel."""
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


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
