"""Loader for MDETR-style COCO json (``finetune_refcoco_*.json``; our synthetic world too).

One image entry = one expression (``caption``) with all its annotations as the referred boxes.
Image files are not opened at load time; call `check_images` to verify they exist.

Image path rule: with an explicit ``image_root`` the path is ``image_root / file_name``.
Without one, the root is the json's directory; if ``<json dir>/images/`` exists and the file
is not directly in the json's directory but is in ``images/``, that one is used.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from diffprompt.training.data.masks import segmentation_to_rle
from diffprompt.training.data.records import (
    EXPRESSION_KINDS,
    UNKNOWN_KIND,
    DatasetError,
    GroundingSample,
)

logger = logging.getLogger(__name__)

_IMAGE_KEYS = ("id", "file_name", "height", "width", "caption")
_ANNOTATION_KEYS = ("id", "image_id", "bbox")


class SampleList(list[GroundingSample]):
    """A plain list of samples that also reports what the loader skipped.

    Attributes:
        source: the file the samples were loaded from.
        num_skipped: image entries dropped because no annotation refers to them.
    """

    def __init__(self, samples: Iterable[GroundingSample], source: Path, num_skipped: int = 0):
        super().__init__(samples)
        self.source = source
        self.num_skipped = num_skipped


def load_mdetr(json_path: str | Path, image_root: str | Path | None = None,
               keep_unannotated: bool = False) -> SampleList:
    """Load an MDETR-style COCO json into one `GroundingSample` per annotated image entry.

    Args:
        json_path: the json file.
        image_root: directory of the image files; defaults to the json's directory (with the
            ``images/`` fallback described in the module docstring).
        keep_unannotated: also return entries without annotations, as samples with no boxes
            (``boxes`` of shape (0, 4)): expressions whose object is absent (the synthetic
            ``*_absent`` splits).

    Returns:
        A `SampleList` (a list) in file order; ``num_skipped`` counts entries without any
        annotation that were dropped (also logged as a warning).

    Raises:
        DatasetError: missing/unreadable file, invalid JSON, missing keys, bad values. The
            message names the file and the offending entry id.
    """
    path = Path(json_path).absolute()
    data = read_json(path)
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: top level must be a JSON object with 'images' and 'annotations'")
    images = _require_list(data, "images", str(path))
    annotations = _require_list(data, "annotations", str(path))

    entries: dict[int, dict[str, Any]] = {}  # validated fields by entry id
    for index, entry in enumerate(images):
        where = f"{path}: images[{index}]"
        if not isinstance(entry, dict):
            raise DatasetError(f"{where}: must be an object")
        _require_keys(entry, _IMAGE_KEYS, where)
        entry_id = _require_int(entry, "id", where)
        where = f"{path}: image entry id={entry_id}"
        if entry_id in entries:
            raise DatasetError(f"{where}: duplicate image entry id")
        entries[entry_id] = {
            "image_id": _require_int(entry, "original_id", where) if "original_id" in entry else entry_id,
            "file_name": _require_str(entry, "file_name", where),
            "height": _require_positive_int(entry, "height", where),
            "width": _require_positive_int(entry, "width", where),
            "caption": _require_str(entry, "caption", where),
            "kind": _kind(entry, where),
        }

    boxes: dict[int, list[np.ndarray]] = {entry_id: [] for entry_id in entries}
    segmentations: dict[int, list[Any]] = {entry_id: [] for entry_id in entries}
    for index, ann in enumerate(annotations):
        where = f"{path}: annotations[{index}]"
        if not isinstance(ann, dict):
            raise DatasetError(f"{where}: must be an object")
        _require_keys(ann, _ANNOTATION_KEYS, where)
        where = f"{path}: annotation id={ann['id']!r}"
        image_id = _require_int(ann, "image_id", where)
        if image_id not in entries:
            raise DatasetError(f"{where}: image_id={image_id} has no image entry")
        boxes[image_id].append(bbox_xywh_to_xyxy(ann["bbox"], f"{where} (image entry id={image_id})"))
        segmentations[image_id].append(ann.get("segmentation"))

    default_root = image_root is None
    root = path.parent if default_root else Path(image_root).absolute()
    fallback = root / "images" if default_root and (root / "images").is_dir() else None

    samples: list[GroundingSample] = []
    skipped = 0
    for entry_id, entry in entries.items():
        if not boxes[entry_id] and not keep_unannotated:
            skipped += 1
            continue
        where = f"{path}: image entry id={entry_id}"
        height, width = entry["height"], entry["width"]
        entry_boxes = np.stack(boxes[entry_id]) if boxes[entry_id] else np.zeros((0, 4), np.float32)
        samples.append(
            GroundingSample(
                sample_id=entry_id,
                image_id=entry["image_id"],
                image_path=_image_path(root, fallback, entry["file_name"]),
                width=width,
                height=height,
                expression=entry["caption"],
                boxes=entry_boxes,
                masks=masks_from_segmentations(segmentations[entry_id], height, width, where),
                kind=entry["kind"],
            )
        )
    if skipped:
        logger.warning("%s: skipped %d image entries without annotations", path, skipped)
    return SampleList(samples, source=path, num_skipped=skipped)


def load_split(json_path: str | Path, image_root: str | Path | None = None,
               limit: int | None = None) -> list[GroundingSample]:
    """`load_mdetr`, the first `limit` samples, and `check_images` on them: a split that is ready to train
    or evaluate on. A missing json or image file raises `DatasetError` naming it, before any work."""
    samples = list(load_mdetr(json_path, image_root))[:limit]
    check_images(samples)
    return samples


def check_images(samples: Iterable[GroundingSample]) -> None:
    """Raise `DatasetError` naming the first sample whose ``image_path`` is not a file."""
    seen: set[Path] = set()
    for sample in samples:
        if sample.image_path in seen:
            continue
        seen.add(sample.image_path)
        if not sample.image_path.is_file():
            raise DatasetError(f"image file not found: {sample.image_path} (sample_id={sample.sample_id}; "
                               "--image-root sets the folder of the images)")


def read_json(path: Path) -> Any:
    """Parse a json file, turning every failure into a `DatasetError` naming the file."""
    try:
        with path.open("rb") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except OSError as e:
        raise DatasetError(f"{path}: cannot read file: {e}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: invalid JSON: {e}") from e


def bbox_xywh_to_xyxy(bbox: Any, where: str) -> np.ndarray:
    """COCO ``[x, y, w, h]`` -> (4,) float32 ``[x0, y0, x0 + w, y0 + h]``; needs w, h > 0.

    Raises:
        DatasetError: prefixed with ``where`` (file and entry), on wrong length/type/size.
    """
    if not isinstance(bbox, list) or len(bbox) != 4:
        raise DatasetError(f"{where}: bbox must be a list [x, y, w, h] of 4 numbers, got {bbox!r}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox):
        raise DatasetError(f"{where}: bbox must contain finite numbers, got {bbox!r}")
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        raise DatasetError(f"{where}: bbox width and height must be > 0, got {bbox!r}")
    return np.array([x, y, x + w, y + h], dtype=np.float32)


def masks_from_segmentations(
    segmentations: list[Any], height: int, width: int, where: str
) -> tuple[dict, ...]:
    """K ``segmentation`` fields -> K compressed RLE dicts, or ``()`` if none has one.

    A missing, ``None`` or empty segmentation counts as "none"; an entry mixing annotations
    with and without segmentation is an error (masks must be all K or empty).
    """
    present = [s is not None and s != [] for s in segmentations]
    if not any(present):
        return ()
    if not all(present):
        raise DatasetError(f"{where}: some annotations have a segmentation and some do not")
    try:
        return tuple(segmentation_to_rle(s, height, width) for s in segmentations)
    except ValueError as e:
        raise DatasetError(f"{where}: bad segmentation: {e}") from e


def _image_path(root: Path, fallback: Path | None, file_name: str) -> Path:
    direct = root / file_name
    if fallback is not None and not direct.exists() and (fallback / file_name).exists():
        return fallback / file_name
    return direct


def _kind(entry: dict, where: str) -> str:
    kind = entry.get("expression_kind", UNKNOWN_KIND)
    if kind not in (*EXPRESSION_KINDS, UNKNOWN_KIND):
        valid = ", ".join((*EXPRESSION_KINDS, UNKNOWN_KIND))
        raise DatasetError(f"{where}: unknown expression_kind {kind!r}; valid: {valid}")
    return kind


def _require_list(data: dict, key: str, where: str) -> list:
    if key not in data:
        raise DatasetError(f"{where}: missing required key {key!r}")
    if not isinstance(data[key], list):
        raise DatasetError(f"{where}: {key!r} must be a list")
    return data[key]


def _require_keys(obj: dict, keys: Iterable[str], where: str) -> None:
    missing = [k for k in keys if k not in obj]
    if missing:
        label = f"{where} (id={obj['id']!r})" if "id" in obj else where
        raise DatasetError(f"{label}: missing required key(s) {missing}")


def _require_int(obj: dict, key: str, where: str) -> int:
    value = obj[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise DatasetError(f"{where}: {key!r} must be an int, got {value!r}")
    return value


def _require_positive_int(obj: dict, key: str, where: str) -> int:
    value = _require_int(obj, key, where)
    if value <= 0:
        raise DatasetError(f"{where}: {key!r} must be > 0, got {value}")
    return value


def _require_str(obj: dict, key: str, where: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise DatasetError(f"{where}: {key!r} must be a string, got {value!r}")
    return value
