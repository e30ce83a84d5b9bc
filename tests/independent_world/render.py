"""Independent renderer of the synthetic referring-expression world spec.

Written from the synthetic world's spec only (now docs/design.md, "The synthetic world"; no code
shared with ``training/``), so that the other team's model and loader can be checked on data
they did not generate.  Shapes are rasterised with numpy: circles by a distance test,
polygons by half-plane tests (the star as a union of convex pieces), sampled at
pixel centres ``(col + 0.5, row + 0.5)``.

Interpretation choices (the spec leaves these open):

* "outer diameter" ``d`` is the diameter of the circumscribed circle for every
  shape (the circle itself, and the circle through the polygon vertices; for the
  star, through its outer points).  So a square of outer diameter ``d`` has side
  ``d / sqrt(2)``.
* "bounding boxes at least 2 px apart": with inclusive pixel boxes, at least two
  empty pixel columns or two empty pixel rows lie between any two boxes.
* Gaussian noise (sigma 6, independent per pixel and channel) is added to the
  background only; objects are painted in their flat, jittered colour.
* Expressions per image: up to ``max_per_kind`` (default 2) of *each* kind, drawn at random
  from all valid candidates of that kind, instead of the spec's "up to 2 per image, kinds in
  random order".  Category expressions are single-match queries only, and absolute ones use
  the groups "shape" and a shape name only (a subset of the spec's groups).
* Placement differs from the current spec text in two details, kept so that earlier numbers
  stay reproducible: centres are drawn in ``[d/2, 128 - d/2]`` (the spec: ``[d/2 + 1,
  128 - d/2 - 1]``), and when an object finds no place in 200 tries the whole scene is
  drawn again (the spec: redraw that object's attributes, or stop at 3 or more objects).
* A **group** (relation targets, ordinals) is any of the spec's four forms: "shape" (every
  object), a shape ("circle"), a colour + shape ("red circle") or a colour, written with the
  noun "shape" ("red shape").
* Relation ``the <group> <rel> the <description>``: the anchor description is the same
  minimal unique description as the attribute kind's (same subset preference, below).  The
  group must have at least 2 members other than the anchor, and exactly one of those members
  may stand in the relation.  The relations are the spec's exact box tests with exclusive
  ends (``x1_A <= x0_B`` for "left of", etc.), with no extra margin: the spec's "closer than
  4 px is a tie" speaks of positions (box centres), not of these box comparisons.
* Ordinal ``the {second,third} <group> from the {left,right,top,bottom}``: groups of at least
  3 members, ordered by box centre from the named side; the n-th member must be at least
  4 px (``ABSOLUTE_MARGIN``) from the member before it and, if there is one, the member after.

Usage::

    python -m tests.independent_world.render OUT_DIR --n 50 --seed 0
    python -m tests.independent_world.render OUT_DIR --n 300 --seed 12345 --kinds relation ordinal
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

CANVAS = 128
BG_RANGE = (90, 170)
NOISE_SIGMA = 6.0
N_OBJECTS = (3, 6)
MIN_GAP = 2
COLOR_JITTER = 10
STAR_INNER = 0.45
ABSOLUTE_MARGIN = 4.0

SHAPES = ("circle", "square", "triangle", "diamond", "star", "hexagon")
COLORS = {
    "red": (220, 50, 47),
    "green": (60, 170, 70),
    "blue": (40, 90, 220),
    "yellow": (240, 200, 40),
    "purple": (150, 70, 190),
    "orange": (245, 135, 35),
}
SIZES = {"small": (14.0, 20.0), "large": (28.0, 38.0)}

JSON_NAME = "independent_refexp.json"
# Attribute subsets tried in order: fewest attributes first, then this preference.
ATTRIBUTE_SUBSETS = (
    ("shape",),
    ("color",),
    ("size",),
    ("color", "shape"),
    ("size", "shape"),
    ("size", "color"),
    ("size", "color", "shape"),
)
DIRECTIONS = ("leftmost", "rightmost", "topmost", "bottommost")
RELATIONS = ("left of", "right of", "above", "below")
ORDINALS = {"second": 1, "third": 2}  # word -> 0-based rank from the named side
SIDES = ("left", "right", "top", "bottom")
KINDS = ("category", "attribute", "absolute", "relation", "ordinal")


# --------------------------------------------------------------------------- #
# Geometry
# --------------------------------------------------------------------------- #


def _regular_vertices(cx: float, cy: float, radius: float, n: int, start_deg: float) -> np.ndarray:
    """Vertices of a regular n-gon (image coordinates, y down), angles in degrees."""
    ang = np.deg2rad(start_deg + 360.0 * np.arange(n) / n)
    return np.stack([cx + radius * np.cos(ang), cy + radius * np.sin(ang)], axis=1)


def star_vertices(cx: float, cy: float, radius: float) -> np.ndarray:
    """10 vertices alternating outer/inner, starting at the top apex."""
    ang = np.deg2rad(-90.0 + 36.0 * np.arange(10))
    rad = np.where(np.arange(10) % 2 == 0, radius, STAR_INNER * radius)
    return np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], axis=1)


def shape_pieces(shape: str, cx: float, cy: float, diameter: float) -> list[np.ndarray] | None:
    """Convex polygons whose union is the shape (None for the circle)."""
    r = diameter / 2.0
    if shape == "circle":
        return None
    if shape == "square":  # axis-aligned, vertices on the circumscribed circle
        return [_regular_vertices(cx, cy, r, 4, 45.0)]
    if shape == "diamond":  # square rotated 45 degrees: vertices at E, S, W, N
        return [_regular_vertices(cx, cy, r, 4, 0.0)]
    if shape == "triangle":  # equilateral, apex up (y axis points down)
        return [_regular_vertices(cx, cy, r, 3, -90.0)]
    if shape == "hexagon":  # regular, flat top: vertices at 0, 60, ... degrees
        return [_regular_vertices(cx, cy, r, 6, 0.0)]
    if shape == "star":
        v = star_vertices(cx, cy, r)
        pieces = [v[1::2]]  # inner pentagon
        for k in range(0, 10, 2):  # one tip triangle per outer point
            pieces.append(np.stack([v[k - 1], v[k], v[(k + 1) % 10]]))
        return pieces
    raise ValueError(f"unknown shape {shape!r}")


def _convex_fill(poly: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Half-plane test: pixel centre inside (or on) a convex polygon."""
    x0, y0 = poly[:, 0], poly[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    area2 = np.sum(x0 * y1 - x1 * y0)
    sign = 1.0 if area2 >= 0 else -1.0
    inside = np.ones(np.broadcast(px, py).shape, dtype=bool)
    for ax, ay, bx, by in zip(x0, y0, x1, y1):
        cross = (bx - ax) * (py - ay) - (by - ay) * (px - ax)
        inside &= sign * cross >= -1e-9
    return inside


def shape_mask(
    shape: str,
    cx: float,
    cy: float,
    diameter: float,
    height: int = CANVAS,
    width: int = CANVAS,
    origin: tuple[float, float] = (0.0, 0.0),
) -> np.ndarray:
    """Boolean (height, width) mask; ``origin`` is the canvas coordinate of pixel (0, 0)."""
    px = origin[0] + np.arange(width, dtype=np.float64)[None, :] + 0.5
    py = origin[1] + np.arange(height, dtype=np.float64)[:, None] + 0.5
    pieces = shape_pieces(shape, cx, cy, diameter)
    if pieces is None:
        r = diameter / 2.0
        return (px - cx) ** 2 + (py - cy) ** 2 <= r * r
    out = np.zeros((height, width), dtype=bool)
    for poly in pieces:
        out |= _convex_fill(poly, px, py)
    return out


def tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Inclusive pixel box (x0, y0, x1, y1) of a non-empty mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def boxes_apart(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int = MIN_GAP) -> bool:
    """At least ``gap`` empty pixel columns or rows between inclusive boxes a and b."""
    gx = max(b[0] - a[2], a[0] - b[2]) - 1
    gy = max(b[1] - a[3], a[1] - b[3]) - 1
    return gx >= gap or gy >= gap


# --------------------------------------------------------------------------- #
# Scenes
# --------------------------------------------------------------------------- #


@dataclass
class Obj:
    shape: str
    color: str
    size: str
    diameter: float
    cx: float
    cy: float
    rgb: tuple[int, int, int]
    mask: np.ndarray  # bool (CANVAS, CANVAS)
    box: tuple[int, int, int, int]  # inclusive x0, y0, x1, y1

    def attr(self, name: str) -> str:
        return {"shape": self.shape, "color": self.color, "size": self.size}[name]

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1 + 1) / 2.0, (y0 + y1 + 1) / 2.0

    @property
    def xywh(self) -> list[int]:
        x0, y0, x1, y1 = self.box
        return [x0, y0, x1 - x0 + 1, y1 - y0 + 1]


@dataclass
class Scene:
    image: np.ndarray  # uint8 (CANVAS, CANVAS, 3)
    background: int
    objects: list[Obj]


@dataclass
class Expression:
    caption: str
    kind: str
    targets: list[int]  # indices into Scene.objects


def _place_objects(rng: np.random.Generator, n: int, tries: int = 200) -> list[Obj] | None:
    objs: list[Obj] = []
    for _ in range(n):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        color = list(COLORS)[int(rng.integers(len(COLORS)))]
        size = list(SIZES)[int(rng.integers(len(SIZES)))]
        lo, hi = SIZES[size]
        diameter = float(rng.uniform(lo, hi))
        base = np.array(COLORS[color])
        rgb = np.clip(base + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3), 0, 255)
        r = diameter / 2.0
        for _ in range(tries):
            # circumscribed circle fully inside [0, CANVAS] => every pixel inside
            cx = float(rng.uniform(r, CANVAS - r))
            cy = float(rng.uniform(r, CANVAS - r))
            m = shape_mask(shape, cx, cy, diameter)
            if not m.any():
                continue
            box = tight_box(m)
            if all(boxes_apart(box, o.box) for o in objs):
                objs.append(Obj(shape, color, size, diameter, cx, cy,
                                tuple(int(c) for c in rgb), m, box))
                break
        else:
            return None
    return objs


def render_scene(rng: np.random.Generator) -> Scene:
    """One image with 3-6 non-overlapping objects."""
    while True:
        n = int(rng.integers(N_OBJECTS[0], N_OBJECTS[1] + 1))
        objs = _place_objects(rng, n)
        if objs is not None:
            break
    level = int(rng.integers(BG_RANGE[0], BG_RANGE[1] + 1))
    img = level + rng.normal(0.0, NOISE_SIGMA, size=(CANVAS, CANVAS, 3))
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    for o in objs:
        img[o.mask] = np.array(o.rgb, dtype=np.uint8)
    return Scene(img, level, objs)


# --------------------------------------------------------------------------- #
# Expressions
# --------------------------------------------------------------------------- #


def _matching(objs: list[Obj], attrs: dict[str, str]) -> list[int]:
    return [i for i, o in enumerate(objs) if all(o.attr(k) == v for k, v in attrs.items())]


def attribute_phrase(attrs: dict[str, str]) -> str:
    words = ["the"]
    if "size" in attrs:
        words.append(attrs["size"])
    if "color" in attrs:
        words.append(attrs["color"])
    words.append(attrs.get("shape", "shape"))
    return " ".join(words)


def category_candidates(objs: list[Obj]) -> list[Expression]:
    out = []
    seen = set()
    for o in objs:
        for attrs in ({"shape": o.shape}, {"color": o.color, "shape": o.shape}):
            caption = " ".join(attrs[k] for k in ("color", "shape") if k in attrs)
            hits = _matching(objs, attrs)
            if caption not in seen and len(hits) == 1:
                seen.add(caption)
                out.append(Expression(caption, "category", hits))
    return out


def minimal_attributes(objs: list[Obj], idx: int) -> dict[str, str] | None:
    """Smallest attribute subset that singles out objs[idx] (None if impossible)."""
    o = objs[idx]
    for subset in ATTRIBUTE_SUBSETS:
        attrs = {k: o.attr(k) for k in subset}
        if _matching(objs, attrs) == [idx]:
            return attrs
    return None


def attribute_candidates(objs: list[Obj]) -> list[Expression]:
    out = []
    for i in range(len(objs)):
        attrs = minimal_attributes(objs, i)
        if attrs is not None:
            out.append(Expression(attribute_phrase(attrs), "attribute", [i]))
    return out


def _extreme(objs: list[Obj], group: list[int], direction: str) -> int | None:
    """Index of the unambiguous extreme object of ``group`` (>= margin), else None."""
    axis = 0 if direction in ("leftmost", "rightmost") else 1
    sign = 1.0 if direction in ("leftmost", "topmost") else -1.0
    keyed = sorted(group, key=lambda i: sign * objs[i].center[axis])
    first, second = keyed[0], keyed[1]
    if abs(objs[first].center[axis] - objs[second].center[axis]) >= ABSOLUTE_MARGIN:
        return first
    return None


def absolute_candidates(objs: list[Obj]) -> list[Expression]:
    """'the <direction> <shape>' for shape groups of >= 2 objects (and 'shape' = all)."""
    groups: list[tuple[str, list[int]]] = [("shape", list(range(len(objs))))]
    for s in SHAPES:
        g = _matching(objs, {"shape": s})
        if g:
            groups.append((s, g))
    out = []
    for noun, group in groups:
        if len(group) < 2:
            continue
        for d in DIRECTIONS:
            hit = _extreme(objs, group, d)
            if hit is not None:
                out.append(Expression(f"the {d} {noun}", "absolute", [hit]))
    return out


def group_candidates(objs: list[Obj]) -> list[tuple[str, list[int]]]:
    """Every group phrase (description without size) that matches at least one object."""
    out: list[tuple[str, list[int]]] = [("shape", list(range(len(objs))))]
    for s in SHAPES:
        out.append((s, _matching(objs, {"shape": s})))
    for c in COLORS:
        out.append((f"{c} shape", _matching(objs, {"color": c})))
        for s in SHAPES:
            out.append((f"{c} {s}", _matching(objs, {"color": c, "shape": s})))
    return [(phrase, members) for phrase, members in out if members]


def exclusive_box(o: Obj) -> tuple[int, int, int, int]:
    """The spec's box: (x0, y0, x1, y1) with x1, y1 exclusive."""
    x0, y0, x1, y1 = o.box
    return x0, y0, x1 + 1, y1 + 1


def in_relation(a: Obj, rel: str, b: Obj) -> bool:
    """'a <rel> b' by the spec's box tests (exclusive ends)."""
    ax0, ay0, ax1, ay1 = exclusive_box(a)
    bx0, by0, bx1, by1 = exclusive_box(b)
    if rel == "left of":
        return ax1 <= bx0
    if rel == "right of":
        return ax0 >= bx1
    if rel == "above":
        return ay1 <= by0
    if rel == "below":
        return ay0 >= by1
    raise ValueError(f"unknown relation {rel!r}")


def relation_candidates(objs: list[Obj]) -> list[Expression]:
    """'the <group> <rel> the <anchor>': exactly one group member stands in the relation."""
    groups = group_candidates(objs)
    out = []
    for anchor in range(len(objs)):
        attrs = minimal_attributes(objs, anchor)
        if attrs is None:
            continue
        anchor_phrase = attribute_phrase(attrs)
        for phrase, members in groups:
            others = [i for i in members if i != anchor]
            if len(others) < 2:
                continue
            for rel in RELATIONS:
                hits = [i for i in others if in_relation(objs[i], rel, objs[anchor])]
                if len(hits) == 1:
                    out.append(Expression(f"the {phrase} {rel} {anchor_phrase}", "relation", hits))
    return out


def side_order(objs: list[Obj], members: list[int], side: str) -> list[tuple[int, float]]:
    """(index, distance key) of the members, nearest to ``side`` first, by box centre."""
    axis = 0 if side in ("left", "right") else 1
    sign = 1.0 if side in ("left", "top") else -1.0
    keyed = [(i, sign * objs[i].center[axis]) for i in members]
    return sorted(keyed, key=lambda t: t[1])


def ordinal_candidates(objs: list[Obj]) -> list[Expression]:
    """'the {second,third} <group> from the <side>' for groups of >= 3 members."""
    out = []
    for phrase, members in group_candidates(objs):
        if len(members) < 3:
            continue
        for side in SIDES:
            order = side_order(objs, members, side)
            for word, n in ORDINALS.items():
                if n >= len(order):
                    continue
                pos = order[n][1]
                if pos - order[n - 1][1] < ABSOLUTE_MARGIN:
                    continue
                if n + 1 < len(order) and order[n + 1][1] - pos < ABSOLUTE_MARGIN:
                    continue
                out.append(Expression(f"the {word} {phrase} from the {side}", "ordinal",
                                      [order[n][0]]))
    return out


def make_expressions(scene: Scene, rng: np.random.Generator, max_per_kind: int = 2) -> list[Expression]:
    """A few expressions per kind, sampled deterministically from all valid candidates."""
    out: list[Expression] = []
    objs = scene.objects
    # Kinds are sampled in this fixed order; relation and ordinal come last, so adding them
    # left the category/attribute/absolute expressions of every (seed, image) unchanged.
    for cands in (category_candidates(objs), attribute_candidates(objs),
                  absolute_candidates(objs), relation_candidates(objs),
                  ordinal_candidates(objs)):
        if len(cands) > max_per_kind:
            pick = sorted(rng.choice(len(cands), size=max_per_kind, replace=False).tolist())
            cands = [cands[i] for i in pick]
        out.extend(cands)
    return out


def generate(n_images: int, seed: int, max_per_kind: int = 2) -> list[tuple[Scene, list[Expression]]]:
    """Scene i depends only on (seed, i), so smaller n gives a prefix of larger n."""
    result = []
    for i in range(n_images):
        rng = np.random.default_rng([seed, i])
        scene = render_scene(rng)
        result.append((scene, make_expressions(scene, rng, max_per_kind)))
    return result


# --------------------------------------------------------------------------- #
# Output
# --------------------------------------------------------------------------- #


def encode_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def write_dataset(out_dir: Path, n_images: int, seed: int, max_per_kind: int = 2,
                  kinds: tuple[str, ...] = KINDS) -> Path:
    """Render ``n_images`` PNGs plus an MDETR-style COCO json into ``out_dir``.

    ``kinds`` only filters what is written: the expressions of a kind are the same whichever
    other kinds are asked for.
    """
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown expression kinds {sorted(unknown)}; valid: {', '.join(KINDS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for idx, (scene, exprs) in enumerate(generate(n_images, seed, max_per_kind)):
        file_name = f"indep_{seed}_{idx:05d}.png"
        Image.fromarray(scene.image, mode="RGB").save(out_dir / file_name)
        for expr in (e for e in exprs if e.kind in kinds):
            entry_id = len(images) + 1
            images.append({
                "id": entry_id,
                "original_id": idx,
                "file_name": file_name,
                "height": CANVAS,
                "width": CANVAS,
                "caption": expr.caption,
                "expression_kind": expr.kind,
            })
            for t in expr.targets:
                o = scene.objects[t]
                annotations.append({
                    "id": len(annotations) + 1,
                    "image_id": entry_id,
                    "bbox": o.xywh,
                    "area": int(o.mask.sum()),
                    "iscrowd": 0,
                    "category_id": 1,
                    "segmentation": encode_rle(o.mask),
                })
    data = {
        "info": {"description": "independent renderer"},
        "categories": [{"id": 1, "name": "object"}],
        "images": images,
        "annotations": annotations,
    }
    path = out_dir / JSON_NAME
    path.write_text(json.dumps(data))
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-per-kind", type=int, default=2)
    ap.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS),
                    help="expression kinds to write (default: all five)")
    args = ap.parse_args(argv)
    print(write_dataset(args.out_dir, args.n, args.seed, args.max_per_kind, tuple(args.kinds)))


if __name__ == "__main__":
    main()
