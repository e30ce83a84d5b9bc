"""The distribution-shift splits: deterministic, shifted in the one way each declares, the rest as trained."""

from __future__ import annotations

import numpy as np
import pytest

from diffprompt.training.data.synthetic.language import evaluate, kind_of, parse, to_text
from diffprompt.training.data.synthetic.splits import REC_KINDS, SHIFT_SPLITS, SPLITS, generate_image
from diffprompt.training.data.synthetic.world import N_OBJECTS, SIZES, TRAINED
from tests.foundation_testkit import save_baby_foundation

N = 20  # images looked at per split


def _images(name: str, n: int = N):
    return [generate_image(SPLITS[name], i) for i in range(n)]


def _background_spread(image: np.ndarray, objects) -> float:
    """5th to 95th percentile of the background's gray levels: noise alone gives about 20."""
    background = ~np.any([o.mask for o in objects], axis=0)
    values = image[background].astype(float).mean(axis=1)
    return float(np.percentile(values, 95) - np.percentile(values, 5))


def test_the_shift_splits_are_the_declared_ones_and_only_they_are_shifted():
    assert SHIFT_SPLITS == ("shift_background", "shift_size", "shift_crowded")
    assert all(not SPLITS[name].shifted for name in SPLITS if name not in SHIFT_SPLITS)
    seeds = [spec.seed for spec in SPLITS.values()]
    assert len(set(seeds)) == len(seeds)  # no scene is shared with another split
    for name in SHIFT_SPLITS:
        spec = SPLITS[name]
        assert spec.kinds == REC_KINDS and spec.per_image == 2 and not spec.absent
        assert spec.n_images == SPLITS["testB"].n_images


@pytest.mark.parametrize("name", SHIFT_SPLITS)
def test_a_shift_split_is_deterministic_and_its_expressions_mean_what_they_say(name):
    kinds = set()
    for item in _images(name, 12):
        again = generate_image(SPLITS[name], item.index)
        assert np.array_equal(again.scene.image, item.scene.image) and again.expressions == item.expressions
        for expr, targets in item.expressions:
            assert len(targets) == 1
            assert evaluate(parse(to_text(expr)), item.scene.objects) == list(targets)  # from the text alone
            kinds.add(kind_of(expr))
    assert kinds == set(REC_KINDS)


def test_shift_background_is_not_one_gray_level():
    trained = [_background_spread(i.scene.image, i.scene.objects) for i in _images("val")]
    shifted = [_background_spread(i.scene.image, i.scene.objects) for i in _images("shift_background")]
    assert max(trained) < 30  # one level plus sigma-6 noise
    assert min(shifted) > 35  # a gradient or a texture of two levels at least 60 apart
    # the objects are painted as trained: base colour +-10, no noise
    item = _images("shift_background", 1)[0]
    for o in item.scene.objects:
        assert np.ptp(item.scene.image[o.mask].astype(int), axis=0).max() <= 20


def test_shift_size_draws_diameters_outside_the_trained_ranges():
    trained, shifted = {"small": [], "large": []}, {"small": [], "large": []}
    for name, areas in (("val", trained), ("shift_size", shifted)):
        for item in _images(name):
            for o in item.scene.objects:
                lo, hi = SIZES[o.size]
                inside = lo <= o.diameter <= hi
                assert inside == (name == "val"), (name, o.size, o.diameter)
                areas[o.size].append(o.mask.sum())
    assert max(o.diameter for i in _images("shift_size") for o in i.scene.objects if o.size == "small") < 14
    assert min(o.diameter for i in _images("shift_size") for o in i.scene.objects if o.size == "large") > 38
    # in pixels too: shifted small objects are smaller, shifted large ones larger, on average
    assert np.mean(shifted["small"]) < 0.7 * np.mean(trained["small"])
    assert np.mean(shifted["large"]) > 1.3 * np.mean(trained["large"])


def test_shift_crowded_has_more_objects_than_any_trained_scene():
    assert max(len(i.scene.objects) for i in _images("train", 50)) <= N_OBJECTS[1] == TRAINED.n_objects[1]
    counts = [len(i.scene.objects) for i in _images("shift_crowded")]
    assert min(counts) > N_OBJECTS[1]
    assert max(counts) <= SPLITS["shift_crowded"].scene.n_objects[1]


def test_evaluate_scores_a_tiny_shift_split(small_world, tmp_path, capsys):
    """`diffprompt evaluate --split shift_*` on a few images: a table per split, every expression scored."""
    import json

    from diffprompt.cli import main as cli_main
    from diffprompt.training.data.mdetr import load_mdetr

    save_baby_foundation(tmp_path / "f")
    report = tmp_path / "report.json"
    rc = cli_main(["evaluate", "--checkpoint", str(tmp_path / "f"), "--split", *SHIFT_SPLITS,
                   "--data-dir", str(small_world), "--out", str(report), "--no-progress", "--threads", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    data = json.loads(report.read_text())
    for name in SHIFT_SPLITS:
        assert name in out
        rows = {r["group"]: r for r in data["results"][name]}
        assert rows["all"]["n"] == len(load_mdetr(small_world / f"{name}.json")) > 0
        assert 0.0 <= rows["all"]["R@1"] <= rows["all"]["R@5"] <= rows["all"]["UB"] <= 1.0


def test_a_scene_spec_with_an_unknown_background_or_count_is_a_clear_error():
    from diffprompt.training.data.synthetic.world import SceneSpec

    with pytest.raises(ValueError, match="unknown background 'plaid'"):
        SceneSpec(background="plaid")
    with pytest.raises(ValueError, match="n_objects"):
        SceneSpec(n_objects=(5, 3))
