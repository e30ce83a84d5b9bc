"""Scenes of the synthetic world: sampling and rendering (docs/design.md, "The synthetic world").

A scene is 3-6 coloured shapes on a noisy gray 128x128 canvas. Everything is drawn from a
`numpy.random.Generator`, so a scene is a pure function of its seed.

    scene = sample_scene(np.random.default_rng(0))
    scene.image   # (128, 128, 3) uint8
    scene.objects # tuple of SceneObject with shape/color/size, mask (128, 128) bool, box xyxy

A `SceneSpec` says how many objects, of which diameters, on which background; its default,
`TRAINED`, is the world above. The distribution-shift splits (splits.py) draw from other specs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from diffprompt.training.data.synthetic.backgrounds import BACKGROUNDS, draw_background

CANVAS = 128
SHAPES = ("circle", "square", "triangle", "diamond", "star", "hexagon")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 50, 47),
    "green": (60, 170, 70),
    "blue": (40, 90, 220),
    "yellow": (240, 200, 40),
    "purple": (150, 70, 190),
    "orange": (245, 135, 35),
}
SIZES: dict[str, tuple[int, int]] = {"small": (14, 20), "large": (28, 38)}  # outer diameter, px
COLOR_JITTER = 10  # per channel, +-
MIN_GAP = 2  # px between any two bounding boxes
N_OBJECTS = (3, 6)
STAR_INNER_RATIO = 0.45


@dataclass(frozen=True)
class SceneSpec:
    """How scenes are drawn: the defaults are the world every committed model was trained on."""

    small: tuple[float, float] = SIZES["small"]  # outer diameter range of "small" objects, px
    large: tuple[float, float] = SIZES["large"]
    n_objects: tuple[int, int] = N_OBJECTS  # both ends included; never fewer than the first
    background: str = "gray"  # a name of backgrounds.BACKGROUNDS

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; expected one of {sorted(BACKGROUNDS)}")
        if not 1 <= self.n_objects[0] <= self.n_objects[1]:
            raise ValueError(f"n_objects must be (min, max) with 1 <= min <= max, got {self.n_objects}")

    def diameters(self, size: str) -> tuple[float, float]:
        return self.small if size == "small" else self.large


TRAINED = SceneSpec()


@dataclass(frozen=True)
class SceneObject:
    """One drawn shape. `box` is xyxy in pixels, edges included: x1 = last column + 1."""

    shape: str
    color: str
    size: str
    mask: np.ndarray  # (H, W) bool
    box: tuple[int, int, int, int]
    diameter: float | None = None  # outer diameter drawn, px (None: not recorded)

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # (H, W, 3) uint8
    objects: tuple[SceneObject, ...]


def shape_polygon(shape: str, cx: float, cy: float, radius: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape with outer radius `radius` (px), y pointing down.

    "Outer diameter" (docs/design.md, "The synthetic world") is the diameter of the circle through the
    outermost points, for every shape: a square of outer diameter d has side d / sqrt(2),
    exactly the diamond's, as "diamond = square rotated by 45 degrees" requires.
    """

    def ring(n: int, start_deg: float, r: float) -> list[tuple[float, float]]:
        return [
            (cx + r * math.cos(math.radians(start_deg + 360 * i / n)),
             cy + r * math.sin(math.radians(start_deg + 360 * i / n)))
            for i in range(n)
        ]

    if shape == "square":  # axis-aligned: corners on the outer circle at 45 degrees
        return ring(4, -45, radius)
    if shape == "triangle":  # equilateral, apex up (-90 degrees in image coordinates)
        return ring(3, -90, radius)
    if shape == "diamond":  # square rotated by 45 degrees: vertices up/right/down/left
        return ring(4, -90, radius)
    if shape == "hexagon":  # regular, flat top: vertices at 0, 60, ... degrees
        return ring(6, 0, radius)
    if shape == "star":  # 5 points, apex up, alternating outer / inner radius
        outer = ring(5, -90, radius)
        inner = ring(5, -90 + 36, radius * STAR_INNER_RATIO)
        return [p for pair in zip(outer, inner) for p in pair]
    raise ValueError(f"not a polygonal shape: {shape!r}")


def draw_mask(shape: str, cx: float, cy: float, diameter: float, canvas: int = CANVAS) -> np.ndarray:
    """Filled pixels of one shape, (canvas, canvas) bool."""
    img = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(img)
    r = diameter / 2
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r - 1, cy + r - 1], fill=1)
    else:
        draw.polygon(shape_polygon(shape, cx, cy, r), fill=1)
    return np.asarray(img, dtype=bool)


def tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """xyxy box of the True pixels, x1/y1 exclusive (COCO w = x1 - x0)."""
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def boxes_apart(a: tuple[int, ...], b: tuple[int, ...], gap: int = MIN_GAP) -> bool:
    """True if boxes a and b (xyxy, exclusive ends) are at least `gap` px apart on some axis."""
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def sample_scene(rng: np.random.Generator, canvas: int = CANVAS, max_tries: int = 200,
                 spec: SceneSpec = TRAINED) -> Scene:
    """Draw one scene. An object that cannot be placed in `max_tries` is drawn anew (other shape,
    colour and size), unless the scene already has its minimum number of objects: then it stops."""
    n_objects = int(rng.integers(spec.n_objects[0], spec.n_objects[1] + 1))
    objects: list[SceneObject] = []
    while len(objects) < n_objects:
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        color = list(COLORS)[int(rng.integers(len(COLORS)))]
        size = list(SIZES)[int(rng.integers(len(SIZES)))]
        for _ in range(max_tries):
            lo, hi = spec.diameters(size)
            diameter = float(rng.uniform(lo, hi))
            margin = diameter / 2 + 1
            cx = float(rng.uniform(margin, canvas - margin))
            cy = float(rng.uniform(margin, canvas - margin))
            mask = draw_mask(shape, cx, cy, diameter, canvas)
            if not mask.any():
                continue
            box = tight_box(mask)
            if all(boxes_apart(box, o.box) for o in objects):
                objects.append(SceneObject(shape, color, size, mask, box, diameter))
                break
        else:
            # A crowded canvas: keep what we have if it already satisfies the minimum count.
            if len(objects) >= spec.n_objects[0]:
                break
    return Scene(render(objects, rng, canvas, spec.background), tuple(objects))


def render(objects: list[SceneObject], rng: np.random.Generator, canvas: int = CANVAS,
           background: str = "gray") -> np.ndarray:
    """Background (with noise), then each object in its jittered colour: (H, W, 3) uint8."""
    image = np.clip(draw_background(background, rng, canvas), 0, 255)
    for obj in objects:
        base = np.array(COLORS[obj.color], dtype=np.float64)
        jitter = rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3)
        image[obj.mask] = np.clip(base + jitter, 0, 255)
    return np.round(image).astype(np.uint8)
