"""The synthetic world follows its spec (docs/design.md, "The synthetic world"); its expressions mean what they say."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diffprompt.training.data.synthetic.backgrounds import BACKGROUND_GRAY
from diffprompt.training.data.synthetic.expressions import GENERATORS, category_queries
from diffprompt.training.data.synthetic.language import Category, Relation, evaluate, kind_of, parse, to_text
from diffprompt.training.data.synthetic.splits import SPLITS, generate_image
from diffprompt.training.data.synthetic.world import (
    CANVAS,
    COLORS,
    MIN_GAP,
    SHAPES,
    SIZES,
    boxes_apart,
    draw_mask,
    sample_scene,
    tight_box,
)

# Box extent of each shape relative to its outer (circumscribed) diameter.
EXTENT = {"circle": 1.0, "square": 2**-0.5, "triangle": 3**0.5 / 2, "diamond": 1.0, "star": 0.951, "hexagon": 1.0}


def test_scene_is_deterministic_per_seed():
    a = sample_scene(np.random.default_rng(7))
    b = sample_scene(np.random.default_rng(7))
    c = sample_scene(np.random.default_rng(8))
    assert np.array_equal(a.image, b.image)
    assert [o.box for o in a.objects] == [o.box for o in b.objects]
    assert not np.array_equal(a.image, c.image)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31))
def test_scene_follows_the_spec(seed):
    scene = sample_scene(np.random.default_rng(seed))
    assert scene.image.shape == (CANVAS, CANVAS, 3) and scene.image.dtype == np.uint8
    assert 3 <= len(scene.objects) <= 6
    for i, o in enumerate(scene.objects):
        assert o.shape in SHAPES and o.color in COLORS and o.size in SIZES
        x0, y0, x1, y1 = o.box
        assert 0 <= x0 < x1 <= CANVAS and 0 <= y0 < y1 <= CANVAS
        assert o.box == tight_box(o.mask)
        lo, hi = SIZES[o.size]
        extent = EXTENT[o.shape]  # widest side of the box / outer diameter
        assert lo * extent - 2 <= max(x1 - x0, y1 - y0) <= hi * extent + 2  # rasterised edges
        # colour within +-10 of the base on every pixel of the mask (objects are not noisy)
        diff = np.abs(scene.image[o.mask].astype(int) - np.array(COLORS[o.color]))
        assert diff.max() <= 10
        for other in scene.objects[i + 1:]:
            assert boxes_apart(o.box, other.box, MIN_GAP)
    background = ~np.any([o.mask for o in scene.objects], axis=0)
    level = np.median(scene.image[background])
    assert BACKGROUND_GRAY[0] - 3 <= level <= BACKGROUND_GRAY[1] + 3
    assert 3.0 < scene.image[background].astype(float).std() < 10.0  # sigma 6 noise


def test_shapes_are_drawn_as_specified():
    star = draw_mask("star", 50, 50, 36)
    square = draw_mask("square", 50, 50, 30)
    diamond = draw_mask("diamond", 50, 50, 30)
    triangle = draw_mask("triangle", 50, 50, 36)
    hexagon = draw_mask("hexagon", 50, 50, 36)
    # A square fills its box; a star far less (inner radius 0.45).
    box_fill = lambda m: m.sum() / np.prod(np.subtract(tight_box(m)[2:], tight_box(m)[:2]))  # noqa: E731
    assert box_fill(square) > 0.97
    assert box_fill(star) < 0.6
    # A diamond is the square rotated by 45 degrees: same area, box sqrt(2) wider.
    assert abs(int(square.sum()) - int(diamond.sum())) < 0.05 * square.sum()
    assert abs((tight_box(diamond)[2] - tight_box(diamond)[0]) / (tight_box(square)[2] - tight_box(square)[0])
               - 2**0.5) < 0.1
    # Triangle apex up: the top row of its box is narrower than the bottom row.
    ys = np.nonzero(triangle.any(1))[0]
    assert triangle[ys[0]].sum() < triangle[ys[-1]].sum()
    # Hexagon with a flat top: its top row is wide, unlike a pointy-top hexagon.
    ys = np.nonzero(hexagon.any(1))[0]
    assert hexagon[ys[0]].sum() > 10


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**31), kind=st.sampled_from(sorted(GENERATORS)))
def test_every_generated_expression_denotes_exactly_its_target(seed, kind):
    rng = np.random.default_rng(seed)
    scene = sample_scene(rng)
    for expr, targets in GENERATORS[kind](scene.objects, rng):
        text = to_text(expr)
        assert text == text.lower()
        parsed = parse(text)
        assert parsed == expr
        found = evaluate(parsed, scene.objects)
        assert found == targets, (text, found, targets)
        assert len(found) == 1, f"non-category expression {text!r} must refer to one object"


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31))
def test_category_queries_have_every_matching_object_as_target(seed):
    scene = sample_scene(np.random.default_rng(seed))
    for expr, targets in category_queries(scene.objects):
        assert isinstance(expr, Category)
        assert sorted(evaluate(parse(to_text(expr)), scene.objects)) == sorted(targets)
        assert len(targets) >= 1


def test_evaluator_rejects_ambiguity():
    # Two identical red stars side by side: "the red star" is ambiguous, "the leftmost red star" is not.
    from diffprompt.training.data.synthetic.world import SceneObject

    def obj(x, shape="star", color="red"):
        m = draw_mask(shape, x, 60, 16)
        return SceneObject(shape, color, "small", m, tight_box(m))

    objects = [obj(20), obj(60), obj(100, "circle", "blue")]
    assert len(evaluate(parse("the red star"), objects)) == 2
    assert evaluate(parse("the leftmost red star"), objects) == [0]
    assert evaluate(parse("the star left of the blue circle"), objects) == [0, 1]  # two candidates
    assert evaluate(parse("the second star from the right"), objects) == [0]
    with pytest.raises(ValueError, match="not an expression"):
        parse("the purple elephant")


def test_splits_hold_their_kinds_and_differ():
    for name, spec in SPLITS.items():
        kinds = {kind_of(e) for i in range(30) for e, _ in generate_image(spec, i).expressions}
        assert kinds <= set(spec.kinds), name
        assert kinds, name
    assert {kind_of(e) for i in range(30) for e, _ in generate_image(SPLITS["testB"], i).expressions} == {
        "relation", "ordinal"}
    a = generate_image(SPLITS["train"], 0).scene.image
    b = generate_image(SPLITS["val"], 0).scene.image
    assert not np.array_equal(a, b)
    heldout = [t for i in range(20) for _, t in generate_image(SPLITS["heldout"], i).expressions]
    assert heldout and all(len(t) == 1 for t in heldout)


# -- absent-object splits --------------------------------------------------------------------------

# sha256 (first 16 hex) of the first 5 images and their expressions of every split, computed on the
# code before the absent-object splits were added: adding them must not change any other split.
DIGESTS_BEFORE_ABSENT_SPLITS = {
    "pretrain": "b64e599bb957fee2", "train": "e482102a376739e0", "val": "e891d644b8f7f989",
    "testA": "9198ed1a4e2d9907", "testB": "88824ea2bcf41de8", "heldout": "d47a534fe85e137c",
}


def _digest(spec, n: int = 5) -> str:
    import hashlib

    h = hashlib.sha256()
    for i in range(n):
        item = generate_image(spec, i)
        h.update(item.scene.image.tobytes())
        for e, t in item.expressions:
            h.update(f"{to_text(e)}|{t}".encode())
    return h.hexdigest()[:16]


def test_adding_absent_splits_changed_no_other_split():
    assert {name: _digest(SPLITS[name]) for name in DIGESTS_BEFORE_ABSENT_SPLITS} == DIGESTS_BEFORE_ABSENT_SPLITS


# The same digests of the absent-object splits, computed on the code before the distribution-shift
# splits (and their SceneSpec, backgrounds.py) were added: adding them must not change any split.
DIGESTS_BEFORE_SHIFT_SPLITS = {**DIGESTS_BEFORE_ABSENT_SPLITS, "train_absent": "ef761f8f0dd7259c",
                               "val_absent": "87aaaa59a7cceb49", "test_absent": "f4e0a99572a223c2"}


def test_adding_shift_splits_changed_no_other_split():
    assert {name: _digest(SPLITS[name]) for name in DIGESTS_BEFORE_SHIFT_SPLITS} == DIGESTS_BEFORE_SHIFT_SPLITS


@pytest.mark.parametrize("name", ["val_absent", "test_absent", "train_absent"])
def test_absent_splits_place_their_mirrors_expressions_where_nothing_fits(name):
    from diffprompt.training.data.synthetic.expressions import can_be_absent
    from diffprompt.training.data.synthetic.splits import mirrored_image

    spec = SPLITS[name]
    assert spec.absent and not any(SPLITS[m].absent for m in spec.mirror)
    kinds = set()
    second = [SPLITS[spec.mirror[0]].n_images + i for i in range(6)] if len(spec.mirror) > 1 else []
    indices = list(range(12)) + second
    for i in indices:
        item = generate_image(spec, i)
        source = generate_image(*mirrored_image(spec, i))
        assert len(item.scene.objects) == len(source.scene.objects)
        assert [e for e, _ in item.expressions] == [e for e, _ in source.expressions if can_be_absent(e)]
        for expr, targets in item.expressions:
            assert targets == ()
            assert evaluate(parse(to_text(expr)), item.scene.objects) == []  # the evaluator, from the text alone
            if isinstance(expr, Relation):  # absent, not ambiguous: the anchor is unique or missing
                assert sum(expr.anchor.matches(o) for o in item.scene.objects) <= 1
            kinds.add(kind_of(expr))
        again = generate_image(spec, i)
        assert np.array_equal(again.scene.image, item.scene.image) and again.expressions == item.expressions
    assert kinds >= {"attribute", "relation"}
    assert not np.array_equal(generate_image(spec, 0).scene.image, generate_image(*mirrored_image(spec, 0)).scene.image)


def test_test_absent_mirrors_testA_then_testB():
    from diffprompt.training.data.synthetic.splits import mirrored_image

    assert mirrored_image(SPLITS["test_absent"], 0) == (SPLITS["testA"], 0)
    assert mirrored_image(SPLITS["test_absent"], 300) == (SPLITS["testB"], 0)
    with pytest.raises(IndexError):
        mirrored_image(SPLITS["test_absent"], 600)


def test_absent_split_round_trips_through_the_mdetr_loader(tmp_path):
    from diffprompt.training.data.mdetr import load_mdetr
    from diffprompt.training.data.synthetic.writer import write_split

    path = write_split(SPLITS["val_absent"], tmp_path, n_images=4, progress=False)
    texts = [to_text(e) for i in range(4) for e, _ in generate_image(SPLITS["val_absent"], i).expressions]
    skipped = load_mdetr(path)
    assert len(skipped) == 0 and skipped.num_skipped == len(texts)  # the default: expressions with a target only
    samples = load_mdetr(path, keep_unannotated=True)
    assert [s.expression for s in samples] == texts
    assert all(s.boxes.shape == (0, 4) and s.masks == () and s.image_path.is_file() for s in samples)
