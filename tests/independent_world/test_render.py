"""The independent renderer itself follows DESIGN section 4 (checked with its own code only)."""

from __future__ import annotations

import json

import numpy as np
from pycocotools.coco import COCO

from tests.independent_world import render


def test_deterministic_and_seed_dependent():
    a = render.generate(3, seed=5)
    b = render.generate(3, seed=5)
    c = render.generate(3, seed=6)
    assert all(np.array_equal(x[0].image, y[0].image) for x, y in zip(a, b))
    assert not np.array_equal(a[0][0].image, c[0][0].image)


def test_scenes_follow_the_spec():
    for scene, exprs in render.generate(25, seed=1):
        assert scene.image.shape == (128, 128, 3)
        assert 3 <= len(scene.objects) <= 6
        for i, o in enumerate(scene.objects):
            assert o.box == render.tight_box(o.mask)
            lo, hi = render.SIZES[o.size]
            assert lo <= o.diameter <= hi
            for other in scene.objects[i + 1:]:
                assert render.boxes_apart(o.box, other.box)
        for e in exprs:
            assert e.caption == e.caption.lower()
            if e.kind != "category":
                assert len(e.targets) == 1


def test_written_json_is_valid_coco(tmp_path):
    path = render.write_dataset(tmp_path, n_images=6, seed=2)
    coco = COCO(str(path))
    data = json.loads(path.read_text())
    assert data["images"] and data["annotations"]
    for ann in data["annotations"]:
        assert int(coco.annToMask(ann).sum()) == ann["area"]
        x, y, w, h = ann["bbox"]
        m = coco.annToMask(ann).astype(bool)
        ys, xs = np.nonzero(m)
        assert (x, y, w, h) == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
