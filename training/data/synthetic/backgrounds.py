"""Backgrounds of the synthetic world: the trained one (flat gray) and the shifted ones.

Every committed model saw only `gray`: one gray level per image plus Gaussian noise. The
`shift_background` split (splits.py) draws `gradient_or_texture` instead, a background whose
level changes across the image:

- `gradient`: a linear ramp between two gray levels, in any direction;
- `texture`: stripes (any angle) or a checkerboard of two gray levels, a few pixels per period.

Each background is a pure function of the generator and returns (H, W, 3) float64 before the
objects are painted; the same sigma-6 noise is added to all of them.
"""

from __future__ import annotations

import math

import numpy as np

BACKGROUND_GRAY = (90, 170)  # the trained gray level, both ends included
NOISE_SIGMA = 6.0
SHIFT_GRAY = (40, 220)  # gray levels of gradients and textures: wider than the trained range
SHIFT_MIN_CONTRAST = 60  # the two levels of a gradient or texture differ at least this much
TEXTURE_PERIOD = (6, 16)  # px per stripe pair / checker pair, both ends included


def _noise(rng: np.random.Generator, canvas: int) -> np.ndarray:
    return rng.normal(0.0, NOISE_SIGMA, size=(canvas, canvas, 3))


def gray(rng: np.random.Generator, canvas: int) -> np.ndarray:
    """The trained background: one gray level in BACKGROUND_GRAY, plus noise."""
    level = float(rng.integers(BACKGROUND_GRAY[0], BACKGROUND_GRAY[1] + 1))
    return level + _noise(rng, canvas)


def _two_levels(rng: np.random.Generator) -> tuple[float, float]:
    """Two gray levels of SHIFT_GRAY at least SHIFT_MIN_CONTRAST apart, in random order."""
    lo, hi = SHIFT_GRAY
    low = int(rng.integers(lo, hi - SHIFT_MIN_CONTRAST + 1))
    high = int(rng.integers(low + SHIFT_MIN_CONTRAST, hi + 1))
    return (float(low), float(high)) if rng.integers(2) else (float(high), float(low))


def _coordinates(canvas: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre x and y, each (canvas, canvas)."""
    ys, xs = np.mgrid[0:canvas, 0:canvas].astype(np.float64) + 0.5
    return xs, ys


def gradient(rng: np.random.Generator, canvas: int) -> np.ndarray:
    """A linear ramp from one gray level to another along a random direction, plus noise."""
    start, end = _two_levels(rng)
    angle = float(rng.uniform(0.0, 2 * math.pi))
    xs, ys = _coordinates(canvas)
    along = (xs - canvas / 2) * math.cos(angle) + (ys - canvas / 2) * math.sin(angle)
    t = (along - along.min()) / (along.max() - along.min())  # 0 at one corner/edge, 1 at the opposite
    level = start + (end - start) * t
    return level[..., None] + _noise(rng, canvas)


def texture(rng: np.random.Generator, canvas: int) -> np.ndarray:
    """Stripes at a random angle, or a checkerboard, of two gray levels, plus noise."""
    a, b = _two_levels(rng)
    period = int(rng.integers(TEXTURE_PERIOD[0], TEXTURE_PERIOD[1] + 1))
    xs, ys = _coordinates(canvas)
    if rng.integers(2):  # stripes
        angle = float(rng.uniform(0.0, math.pi))
        along = xs * math.cos(angle) + ys * math.sin(angle)
        first = np.floor(2 * along / period) % 2 == 0
    else:  # checkerboard
        first = (np.floor(2 * xs / period) + np.floor(2 * ys / period)) % 2 == 0
    level = np.where(first, a, b)
    return level[..., None] + _noise(rng, canvas)


def gradient_or_texture(rng: np.random.Generator, canvas: int) -> np.ndarray:
    """Half the images a gradient, half a texture."""
    return gradient(rng, canvas) if rng.integers(2) else texture(rng, canvas)


BACKGROUNDS = {"gray": gray, "gradient": gradient, "texture": texture, "gradient_or_texture": gradient_or_texture}


def draw_background(name: str, rng: np.random.Generator, canvas: int) -> np.ndarray:
    """Background `name` of BACKGROUNDS, (canvas, canvas, 3) float64, not yet clipped."""
    if name not in BACKGROUNDS:
        raise ValueError(f"unknown background {name!r}; expected one of {sorted(BACKGROUNDS)}")
    return BACKGROUNDS[name](rng, canvas)
