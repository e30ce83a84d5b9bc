"""Tests of the independent renderer itself (not of the training code)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from . import render as R

N_SCENES = 60


@pytest.fixture(scope="module")
def generated():
    return R.generate(N_SCENES, seed=123)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("indep")
    return R.write_dataset(out, 25, seed=7)


# ---------------------------------------------------------------- determinism


def _dir_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_deterministic_for_seed(tmp_path):
    a = R.write_dataset(tmp_path / "a", 6, seed=3)
    b = R.write_dataset(tmp_path / "b", 6, seed=3)
    c = R.write_dataset(tmp_path / "c", 6, seed=4)
    assert _dir_bytes(a.parent) == _dir_bytes(b.parent)
    assert json.loads(a.read_text()) != json.loads(c.read_text())


def test_prefix_stable():
    small = R.generate(3, seed=11)
    big = R.generate(5, seed=11)
    for (s1, e1), (s2, e2) in zip(small, big):
        assert np.array_equal(s1.image, s2.image)
        assert [(e.caption, e.targets) for e in e1] == [(e.caption, e.targets) for e in e2]


# ------------------------------------------------------------------ geometry


def test_object_count_and_attributes(generated):
    for scene, _ in generated:
        assert R.N_OBJECTS[0] <= len(scene.objects) <= R.N_OBJECTS[1]
        assert R.BG_RANGE[0] <= scene.background <= R.BG_RANGE[1]
        for o in scene.objects:
            assert o.shape in R.SHAPES and o.color in R.COLORS and o.size in R.SIZES


def test_objects_fully_inside_canvas(generated):
    pad = 40
    size = R.CANVAS + 2 * pad
    for scene, _ in generated:
        for o in scene.objects:
            big = R.shape_mask(o.shape, o.cx, o.cy, o.diameter, size, size, origin=(-pad, -pad))
            assert big.sum() == o.mask.sum() > 0  # nothing is cut off by the canvas
            assert np.array_equal(big[pad:pad + R.CANVAS, pad:pad + R.CANVAS], o.mask)
            r = o.diameter / 2
            assert r <= o.cx <= R.CANVAS - r and r <= o.cy <= R.CANVAS - r


def test_boxes_at_least_2px_apart(generated):
    for scene, _ in generated:
        for a, b in itertools.combinations(scene.objects, 2):
            ax0, ay0, ax1, ay1 = a.box
            bx0, by0, bx1, by1 = b.box
            empty_cols = max(bx0 - ax1, ax0 - bx1) - 1
            empty_rows = max(by0 - ay1, ay0 - by1) - 1
            assert empty_cols >= 2 or empty_rows >= 2
            assert not (a.mask & b.mask).any()


def test_box_is_tight_mask_box(generated):
    for scene, _ in generated:
        for o in scene.objects:
            ys, xs = np.nonzero(o.mask)
            assert o.box == (xs.min(), ys.min(), xs.max(), ys.max())
            assert o.xywh == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]


def test_sizes_in_range(generated):
    for scene, _ in generated:
        for o in scene.objects:
            lo, hi = R.SIZES[o.size]
            assert lo <= o.diameter <= hi
            _, _, w, h = o.xywh
            # the narrowest shape (square, side d/sqrt2) still spans > 0.65 d
            assert 0.65 * o.diameter - 1 <= max(w, h) <= o.diameter + 1


def test_colors_and_background(generated):
    for scene, _ in generated:
        fg = np.zeros((R.CANVAS, R.CANVAS), bool)
        for o in scene.objects:
            px = scene.image[o.mask]
            assert (px == px[0]).all()
            diff = px[0].astype(int) - np.array(R.COLORS[o.color])
            assert np.abs(diff).max() <= R.COLOR_JITTER
            fg |= o.mask
        bg = scene.image[~fg].astype(float)
        assert abs(bg.mean() - scene.background) < 1.0
        assert 4.5 < bg.std() < 7.5


def _even_odd(poly: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Crossing-number point-in-polygon, an independent cross-check of the star."""
    inside = np.zeros(np.broadcast(px, py).shape, bool)
    n = len(poly)
    for i in range(n):
        (x0, y0), (x1, y1) = poly[i], poly[(i + 1) % n]
        cond = (y0 > py) != (y1 > py)
        with np.errstate(divide="ignore", invalid="ignore"):
            xc = x0 + (py - y0) * (x1 - x0) / (y1 - y0)
        inside ^= cond & (px < xc)
    return inside


def test_shape_geometry():
    c, d = 64.0, 36.0
    px = np.arange(R.CANVAS)[None, :] + 0.5
    py = np.arange(R.CANVAS)[:, None] + 0.5
    star = R.shape_mask("star", c, c, d)
    ref = _even_odd(R.star_vertices(c, c, d / 2), px, py)
    assert (star != ref).sum() <= 4  # only boundary-tie pixels may differ
    area = {s: R.shape_mask(s, c, c, d).sum() for s in R.SHAPES}
    r = d / 2
    expected = {
        "circle": np.pi * r * r,
        "square": 2 * r * r,
        "diamond": 2 * r * r,
        "triangle": 3 * np.sqrt(3) / 4 * r * r,
        "hexagon": 3 * np.sqrt(3) / 2 * r * r,
    }
    for s, a in expected.items():
        assert abs(area[s] - a) / a < 0.06, s
    # orientation: triangle/star apex up, hexagon flat top, diamond pointy top
    for s in ("triangle", "star", "diamond"):
        m = R.shape_mask(s, c, c, d)
        assert m.any(axis=1).nonzero()[0][0] <= c - r + 2
        assert m[m.any(axis=1).nonzero()[0][0]].sum() <= 2
    hexm = R.shape_mask("hexagon", c, c, d)
    top = hexm.any(axis=1).nonzero()[0][0]
    assert hexm[top].sum() >= 0.4 * d
    sq = R.shape_mask("square", c, c, d)
    top = sq.any(axis=1).nonzero()[0][0]
    assert sq[top].sum() == sq.any(axis=0).sum()  # axis-aligned: full-width top row


# --------------------------------------------------------------- expressions


def _resolve(caption: str, kind: str, objs) -> list[int]:
    """Independent interpretation of the caption grammar."""
    words = caption.split()
    if kind == "category":
        assert len(words) in (1, 2) and words[-1] in R.SHAPES
        if len(words) == 2:
            assert words[0] in R.COLORS
        return [i for i, o in enumerate(objs)
                if o.shape == words[-1] and (len(words) == 1 or o.color == words[0])]
    assert words[0] == "the"
    if kind == "attribute":
        rest = words[1:]
        size = rest.pop(0) if rest[0] in R.SIZES else None
        color = rest.pop(0) if rest[0] in R.COLORS else None
        assert len(rest) == 1 and (rest[0] in R.SHAPES or rest[0] == "shape")
        noun = rest[0]
        return [i for i, o in enumerate(objs)
                if (size is None or o.size == size) and (color is None or o.color == color)
                and (noun == "shape" or o.shape == noun)]
    if kind == "absolute":
        assert len(words) == 3
        direction, noun = words[1], words[2]
        group = [i for i, o in enumerate(objs) if noun == "shape" or o.shape == noun]
        assert len(group) >= 2
        ctr = {i: ((objs[i].box[0] + objs[i].box[2]) / 2, (objs[i].box[1] + objs[i].box[3]) / 2)
               for i in group}
        key = {"leftmost": lambda i: ctr[i][0], "rightmost": lambda i: -ctr[i][0],
               "topmost": lambda i: ctr[i][1], "bottommost": lambda i: -ctr[i][1]}[direction]
        order = sorted(group, key=key)
        assert key(order[1]) - key(order[0]) >= R.ABSOLUTE_MARGIN
        return [order[0]]
    if kind == "relation":
        # the <group> <rel> the [size] [colour] noun ; rel is "left of", "right of", "above", "below"
        rel_at = next(k for k, w in enumerate(words) if w in ("left", "right", "above", "below"))
        rel = " ".join(words[rel_at:rel_at + 2]) if words[rel_at] in ("left", "right") \
            else words[rel_at]
        group_words = words[1:rel_at]
        anchor_words = words[rel_at + len(rel.split()):]
        anchors = _resolve(" ".join(anchor_words), "attribute", objs)
        assert len(anchors) == 1, caption
        (a,) = anchors
        members = [i for i in _group(group_words, objs) if i != a]
        assert len(members) >= 2, caption
        ax0, ay0, ax1, ay1 = _excl(objs[a])

        def holds(i):
            x0, y0, x1, y1 = _excl(objs[i])
            return {"left of": x1 <= ax0, "right of": x0 >= ax1,
                    "above": y1 <= ay0, "below": y0 >= ay1}[rel]
        return [i for i in members if holds(i)]
    if kind == "ordinal":
        # the {second,third} <group> from the {left,right,top,bottom}
        assert words[-3:-1] == ["from", "the"]
        n = {"second": 2, "third": 3}[words[1]]
        side = words[-1]
        members = _group(words[2:-3], objs)
        assert len(members) >= 3, caption
        axis = 0 if side in ("left", "right") else 1
        pos = {i: (_excl(objs[i])[axis] + _excl(objs[i])[axis + 2]) / 2 for i in members}
        # count, for each member, how many are clearly (>= 4 px) nearer to the side; with ties
        # under 4 px the n-th must be clear of everything on both sides.
        sign = 1 if side in ("left", "top") else -1
        hits = []
        for i in members:
            nearer = [j for j in members if j != i and sign * (pos[i] - pos[j]) >= R.ABSOLUTE_MARGIN]
            tied = [j for j in members if j != i and abs(pos[i] - pos[j]) < R.ABSOLUTE_MARGIN]
            if len(nearer) == n - 1 and not tied:
                hits.append(i)
        return hits
    raise AssertionError(kind)


def _excl(o) -> tuple[int, int, int, int]:
    """Exclusive-end box from the object's mask (independent of render.exclusive_box)."""
    ys, xs = np.nonzero(o.mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _group(words: list[str], objs) -> list[int]:
    """Members of a group: 'shape', '<shape>', '<colour> <shape>' or '<colour> shape'."""
    assert words and words[-1] in (*R.SHAPES, "shape") and len(words) <= 2
    colour = words[0] if len(words) == 2 else None
    if colour is not None:
        assert colour in R.COLORS
    noun = words[-1]
    return [i for i, o in enumerate(objs)
            if (colour is None or o.color == colour) and (noun == "shape" or o.shape == noun)]


def test_expressions_refer_to_exactly_one_object(generated):
    kinds = set()
    for scene, exprs in generated:
        assert exprs
        captions = [e.caption for e in exprs]
        assert len(captions) == len(set(captions))
        for e in exprs:
            kinds.add(e.kind)
            assert e.caption == e.caption.lower()
            hits = _resolve(e.caption, e.kind, scene.objects)
            assert hits == e.targets and len(hits) == 1, e.caption
    assert kinds == set(R.KINDS)


def test_attribute_uses_fewest_attributes(generated):
    for scene, exprs in generated:
        objs = scene.objects
        for e in exprs:
            if e.kind != "attribute":
                continue
            words = e.caption.split()[1:]
            used = len(words) - (words[-1] == "shape")
            (t,) = e.targets
            for k in range(used):
                for subset in itertools.combinations(("shape", "color", "size"), k):
                    n = sum(all(o.attr(a) == objs[t].attr(a) for a in subset) for o in objs)
                    assert n > 1, (e.caption, subset)


def _attribute_words_minimal(words: list[str], t: int, objs) -> None:
    used = len(words) - (words[-1] == "shape")
    for k in range(used):
        for subset in itertools.combinations(("shape", "color", "size"), k):
            n = sum(all(o.attr(a) == objs[t].attr(a) for a in subset) for o in objs)
            assert n > 1, (words, subset)


def test_relation_anchor_is_minimal_and_group_ambiguous(generated):
    n_rel = 0
    for scene, exprs in generated:
        objs = scene.objects
        for e in exprs:
            if e.kind != "relation":
                continue
            n_rel += 1
            words = e.caption.split()
            at = max(k for k, w in enumerate(words) if w == "the")
            anchor_words = words[at + 1:]
            (a,) = _resolve("the " + " ".join(anchor_words), "attribute", objs)
            assert a not in e.targets
            _attribute_words_minimal(anchor_words, a, objs)
            # the group alone does not single out the target
            rel_at = next(k for k, w in enumerate(words) if w in ("left", "right", "above", "below"))
            assert len([i for i in _group(words[1:rel_at], objs) if i != a]) >= 2
    assert n_rel >= N_SCENES  # about two per scene


def test_ordinal_gaps(generated):
    n_ord = 0
    for scene, exprs in generated:
        objs = scene.objects
        for e in exprs:
            if e.kind != "ordinal":
                continue
            n_ord += 1
            words = e.caption.split()
            assert words[1] in ("second", "third") and words[-1] in ("left", "right", "top", "bottom")
            members = _group(words[2:-3], objs)
            axis = 0 if words[-1] in ("left", "right") else 1
            sign = 1 if words[-1] in ("left", "top") else -1
            order = sorted(members, key=lambda i: sign * objs[i].center[axis])
            n = {"second": 1, "third": 2}[words[1]]
            assert order[n] == e.targets[0]
            for j in (n - 1, n + 1):
                if 0 <= j < len(order):
                    gap = abs(objs[order[n]].center[axis] - objs[order[j]].center[axis])
                    assert gap >= R.ABSOLUTE_MARGIN, e.caption
    assert n_ord >= N_SCENES


def test_relations_and_ordinals_by_hand():
    """A fixed scene: four circles on a diagonal and one red square far right."""
    def obj(shape, color, size, cx, cy, d):
        m = R.shape_mask(shape, cx, cy, d)
        return R.Obj(shape, color, size, d, cx, cy, R.COLORS[color], m, R.tight_box(m))

    objs = [obj("circle", "blue", "small", 15, 15, 16), obj("circle", "blue", "small", 40, 40, 16),
            obj("circle", "green", "small", 65, 65, 16), obj("circle", "blue", "small", 90, 20, 16),
            obj("square", "red", "large", 112, 100, 30)]
    rel = {e.caption: e.targets for e in R.relation_candidates(objs)}
    # anchor "the green shape" (minimal: colour alone); blue circles: 0 and 1 are left of it
    assert "the blue circle left of the green shape" not in rel
    assert rel["the blue circle right of the green shape"] == [3]
    assert "the circle below the green shape" not in rel  # no circle is below it
    assert "the blue circle above the green shape" not in rel  # all three are
    assert rel["the shape below the green shape"] == [4]
    ords = {e.caption: e.targets for e in R.ordinal_candidates(objs)}
    assert ords["the second circle from the left"] == [1]
    assert ords["the third circle from the left"] == [2]
    assert ords["the second blue shape from the right"] == [1]
    assert ords["the second shape from the bottom"] == [2]
    assert "the second green shape from the left" not in ords  # group of one
    for caption, targets in {**rel, **ords}.items():
        kind = "relation" if caption in rel else "ordinal"
        assert _resolve(caption, kind, objs) == targets


def test_kinds_filter(tmp_path):
    full = json.loads(R.write_dataset(tmp_path / "all", 5, seed=9).read_text())
    part = json.loads(R.write_dataset(tmp_path / "ro", 5, seed=9,
                                      kinds=("relation", "ordinal")).read_text())
    keep = [(im["original_id"], im["caption"], im["expression_kind"]) for im in full["images"]
            if im["expression_kind"] in ("relation", "ordinal")]
    assert keep == [(im["original_id"], im["caption"], im["expression_kind"]) for im in part["images"]]
    with pytest.raises(ValueError, match="unknown expression kinds"):
        R.write_dataset(tmp_path / "bad", 1, seed=9, kinds=("spatial",))


# ---------------------------------------------------------------------- json


def test_json_is_valid_coco(dataset):
    data = json.loads(dataset.read_text())
    assert data["info"] == {"description": "independent renderer"}
    assert data["categories"] == [{"id": 1, "name": "object"}]
    coco = COCO(str(dataset))
    ids = [im["id"] for im in data["images"]]
    assert len(ids) == len(set(ids))
    assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"])
    for im in data["images"]:
        assert im["height"] == im["width"] == 128
        assert im["expression_kind"] in R.KINDS
        assert isinstance(im["caption"], str) and im["caption"]
        path = dataset.parent / im["file_name"]
        assert path.name == im["file_name"] and path.exists()
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[im["id"]]))
        assert len(anns) == 1
    for pil_name in {im["file_name"] for im in data["images"]}:
        with Image.open(dataset.parent / pil_name) as img:
            assert img.mode == "RGB" and img.size == (128, 128)
    for ann in data["annotations"]:
        seg = ann["segmentation"]
        assert isinstance(seg["counts"], str) and seg["size"] == [128, 128]
        m = coco.annToMask(ann)
        assert m.shape == (128, 128)
        assert int(m.sum()) == ann["area"] == int(mask_utils.area(
            {"size": seg["size"], "counts": seg["counts"].encode()}))
        ys, xs = np.nonzero(m)
        assert ann["bbox"] == [int(xs.min()), int(ys.min()),
                               int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
        assert ann["iscrowd"] == 0 and ann["category_id"] == 1


def test_json_masks_match_pixels(dataset):
    """Every annotated mask is painted in one flat colour in the saved PNG."""
    data = json.loads(dataset.read_text())
    by_id = {im["id"]: im for im in data["images"]}
    for ann in data["annotations"]:
        img = np.array(Image.open(dataset.parent / by_id[ann["image_id"]]["file_name"]))
        m = mask_utils.decode({"size": ann["segmentation"]["size"],
                               "counts": ann["segmentation"]["counts"].encode()}).astype(bool)
        px = img[m]
        assert (px == px[0]).all()


def test_cli(tmp_path, capsys):
    R.main([str(tmp_path / "cli"), "--n", "2", "--seed", "0"])
    out = Path(capsys.readouterr().out.strip())
    assert out == tmp_path / "cli" / R.JSON_NAME and out.exists()
    assert len(list((tmp_path / "cli").glob("*.png"))) == 2
