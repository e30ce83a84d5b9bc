"""Tests of the MDETR-style json loader and the RLE helpers."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image
from pycocotools import mask as mask_utils

from diffprompt.training.data.masks import mask_to_rle, rle_area, rle_to_mask, segmentation_to_rle
from diffprompt.training.data.mdetr import check_images, load_mdetr
from diffprompt.training.data.records import DatasetError

H, W = 30, 40
# pycocotools' decode trips numpy 2's __array__(copy=...) deprecation; harmless here.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SQUARE = [10.0, 5.0, 20.0, 5.0, 20.0, 15.0, 10.0, 15.0]
TRIANGLE = [25.0, 2.0, 38.0, 2.0, 30.0, 20.0]


def _image(entry_id: int, **extra: Any) -> dict:
    return {"id": entry_id, "file_name": f"img{entry_id}.png", "height": H, "width": W,
            "caption": f"thing {entry_id}", **extra}


def _ann(ann_id: int, image_id: int, bbox: list, segmentation: Any = None) -> dict:
    ann = {"id": ann_id, "image_id": image_id, "bbox": bbox, "area": 1.0, "iscrowd": 0, "category_id": 1}
    if segmentation is not None:
        ann["segmentation"] = segmentation
    return ann


def _write(tmp_path: Path, data: Any, name: str = "finetune_refcoco_val.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def _reference_area(polygons: list[list[float]]) -> int:
    return int(mask_utils.area(mask_utils.merge(mask_utils.frPyObjects(polygons, H, W))))


# ---------------------------------------------------------------- RLE helpers


def test_mask_rle_round_trip_keeps_orientation() -> None:
    mask = np.zeros((H, W), dtype=bool)
    mask[2, 7] = True  # asymmetric: a transposed decode would move it
    mask[10:20, 30:35] = True
    rle = mask_to_rle(mask)
    assert rle["size"] == [H, W]
    assert isinstance(rle["counts"], str)
    json.dumps(rle)
    decoded = rle_to_mask(rle)
    assert decoded.dtype == bool and decoded.shape == (H, W) and decoded.flags.c_contiguous
    np.testing.assert_array_equal(decoded, mask)
    assert rle_area(rle) == mask.sum()


@settings(max_examples=40, deadline=None)
@given(arrays(np.bool_, st.tuples(st.integers(1, 12), st.integers(1, 12))))
def test_mask_rle_round_trip_property(mask: np.ndarray) -> None:
    np.testing.assert_array_equal(rle_to_mask(mask_to_rle(mask)), mask)


def test_mask_to_rle_rejects_non_2d() -> None:
    with pytest.raises(ValueError, match="2-D"):
        mask_to_rle(np.zeros((2, 3, 4), dtype=bool))


def test_polygon_to_rle_area_matches_pycocotools() -> None:
    rle = segmentation_to_rle([SQUARE, TRIANGLE], H, W)
    assert isinstance(rle["counts"], str)
    expected = _reference_area([SQUARE, TRIANGLE])
    assert expected > 100
    assert rle_to_mask(rle).sum() == expected == rle_area(rle)
    # re-encoding the decoded mask gives the same RLE
    assert mask_to_rle(rle_to_mask(rle)) == rle


def test_uncompressed_and_compressed_rle_segmentations() -> None:
    mask = np.zeros((H, W), dtype=bool)
    mask[3:9, 4:30] = True
    flat = mask.flatten(order="F").astype(int)
    change = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()  # starts with zeros
    uncompressed = {"size": [H, W], "counts": counts}
    np.testing.assert_array_equal(rle_to_mask(segmentation_to_rle(uncompressed, H, W)), mask)
    compressed = mask_to_rle(mask)
    as_bytes = {"size": [H, W], "counts": compressed["counts"].encode()}
    assert segmentation_to_rle(as_bytes, H, W) == compressed
    with pytest.raises(ValueError, match="sum"):
        segmentation_to_rle({"size": [H, W], "counts": [1, 2]}, H, W)
    with pytest.raises(ValueError, match="image size"):
        segmentation_to_rle(compressed, H + 1, W)


def test_degenerate_polygons_dropped_and_odd_rejected() -> None:
    # pycocotools would read a 4-number first polygon as a box; we drop it instead
    rle = segmentation_to_rle([[1.0, 1.0, 5.0, 5.0], SQUARE], H, W)
    assert rle_area(rle) == _reference_area([SQUARE])
    with pytest.raises(ValueError, match="odd"):
        segmentation_to_rle([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]], H, W)


# ---------------------------------------------------------------- loader


def test_load_basic_entry(tmp_path: Path) -> None:
    data = {
        "images": [_image(7, original_id=581857, expression_kind="relation")],
        "annotations": [_ann(1, 7, [10, 5, 10, 10], [SQUARE])],
    }
    samples = load_mdetr(_write(tmp_path, data))
    assert len(samples) == 1 and samples.num_skipped == 0
    s = samples[0]
    assert (s.sample_id, s.image_id, s.kind, s.expression) == (7, 581857, "relation", "thing 7")
    assert (s.width, s.height) == (W, H)
    assert s.image_path == tmp_path / "img7.png" and s.image_path.is_absolute()
    assert s.boxes.dtype == np.float32 and s.boxes.shape == (1, 4)
    np.testing.assert_array_equal(s.boxes, [[10, 5, 20, 15]])
    assert len(s.masks) == 1 and isinstance(s.masks[0]["counts"], str)
    assert rle_to_mask(s.masks[0]).sum() == _reference_area([SQUARE])


def test_xywh_to_xyxy_with_floats(tmp_path: Path) -> None:
    data = {"images": [_image(1)], "annotations": [_ann(1, 1, [1.5, 2.25, 3.0, 4.5])]}
    (s,) = load_mdetr(_write(tmp_path, data))
    np.testing.assert_allclose(s.boxes, [[1.5, 2.25, 4.5, 6.75]])
    assert s.masks == () and s.kind == "unknown" and s.image_id == 1


def test_multi_annotation_entry_gives_k_boxes(tmp_path: Path) -> None:
    rle = mask_to_rle(np.eye(H, W, dtype=bool))
    data = {
        "images": [_image(1), _image(2)],
        "annotations": [
            _ann(10, 1, [10, 5, 10, 10], [SQUARE]),
            _ann(11, 2, [0, 0, 5, 5], [SQUARE]),
            _ann(12, 1, [25, 2, 13, 18], [TRIANGLE]),
            _ann(13, 1, [0, 0, 30, 30], rle),
        ],
    }
    first, second = load_mdetr(_write(tmp_path, data))
    assert first.boxes.shape == (3, 4) and second.boxes.shape == (1, 4)
    np.testing.assert_array_equal(first.boxes, [[10, 5, 20, 15], [25, 2, 38, 20], [0, 0, 30, 30]])
    assert len(first.masks) == 3
    assert first.masks[2] == rle
    assert rle_to_mask(first.masks[1]).sum() == _reference_area([TRIANGLE])


def test_entries_without_annotations_are_skipped_and_counted(tmp_path: Path, caplog) -> None:
    data = {"images": [_image(1), _image(2), _image(3)], "annotations": [_ann(1, 2, [0, 0, 1, 1])]}
    with caplog.at_level(logging.WARNING, logger="diffprompt.training.data.mdetr"):
        samples = load_mdetr(_write(tmp_path, data))
    assert [s.sample_id for s in samples] == [2]
    assert samples.num_skipped == 2 and isinstance(samples, list)
    assert "skipped 2 image entries" in caplog.text


def test_image_root_rules(tmp_path: Path) -> None:
    data = {"images": [_image(1), _image(2)], "annotations": [_ann(1, 1, [0, 0, 1, 1]), _ann(2, 2, [0, 0, 1, 1])]}
    path = _write(tmp_path, data)
    (tmp_path / "images").mkdir()
    Image.new("RGB", (W, H)).save(tmp_path / "images" / "img1.png")
    a, b = load_mdetr(path)
    assert a.image_path == tmp_path / "images" / "img1.png"  # found only in images/
    assert b.image_path == tmp_path / "img2.png"  # found nowhere: direct path
    (s, _) = load_mdetr(path, image_root=tmp_path / "elsewhere")
    assert s.image_path == tmp_path / "elsewhere" / "img1.png"


def test_check_images(tmp_path: Path) -> None:
    data = {"images": [_image(1), _image(2)], "annotations": [_ann(1, 1, [0, 0, 1, 1]), _ann(2, 2, [0, 0, 1, 1])]}
    samples = load_mdetr(_write(tmp_path, data))  # lazy: no image needed to load
    Image.new("RGB", (W, H)).save(tmp_path / "img1.png")
    with pytest.raises(DatasetError, match="img2.png"):
        check_images(samples)
    Image.new("RGB", (W, H)).save(tmp_path / "img2.png")
    check_images(samples)


# ---------------------------------------------------------------- errors


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="nope.json.*not found"):
        load_mdetr(tmp_path / "nope.json")


def test_invalid_json(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"images": [')
    with pytest.raises(DatasetError, match="bad.json.*invalid JSON"):
        load_mdetr(path)


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        ({"annotations": []}, "missing required key 'images'"),
        ({"images": [], "annotations": {}}, "'annotations' must be a list"),
        ({"images": [{"id": 5, "file_name": "a.png", "height": H, "width": W}], "annotations": []},
         r"images\[0\] \(id=5\).*'caption'"),
        ({"images": [_image(5)], "annotations": [{"id": 9, "image_id": 5}]}, r"\(id=9\).*'bbox'"),
        ({"images": [_image(5)], "annotations": [_ann(9, 6, [0, 0, 1, 1])]}, "annotation id=9.*image_id=6"),
        ({"images": [_image(5), _image(5)], "annotations": []}, "id=5: duplicate"),
        ({"images": [_image(5, expression_kind="vibe")], "annotations": []}, "id=5: unknown expression_kind"),
        ({"images": [_image(5, height=0)], "annotations": []}, "id=5: 'height' must be > 0"),
        ({"images": [_image(5)], "annotations": [_ann(9, 5, [0, 0, 1, 1], [[1.0, 2.0, 3.0]])]},
         "id=5: bad segmentation.*odd"),
        ({"images": [_image(5)], "annotations": [_ann(9, 5, [0, 0, 1, 1], [SQUARE]), _ann(10, 5, [0, 0, 1, 1])]},
         "id=5: some annotations have a segmentation"),
    ],
)
def test_malformed_entries(tmp_path: Path, data: dict, pattern: str) -> None:
    path = _write(tmp_path, data, name="broken.json")
    with pytest.raises(DatasetError, match=pattern) as info:
        load_mdetr(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("bbox", [[0, 0, 0, 5], [0, 0, 5, -1], [0, 0, 5], [0, 0, 5, 5, 5], "0,0,5,5", [0, 0, "5", 5]])
def test_bad_bbox(tmp_path: Path, bbox: Any) -> None:
    data = {"images": [_image(3)], "annotations": [_ann(42, 3, bbox)]}
    path = _write(tmp_path, data, name="boxes.json")
    with pytest.raises(DatasetError, match="bbox") as info:
        load_mdetr(path)
    message = str(info.value)
    assert str(path) in message and "annotation id=42" in message and "image entry id=3" in message
