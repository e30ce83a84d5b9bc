"""Loader for refer-style annotations (lichengunc/refer): ``refs(<split_by>).p`` + ``instances.json``.

The refs file is a Python pickle (often written by Python 2). It is read by `safe_load_refs`,
whose unpickler refuses every global, so only plain data (dicts, lists, tuples, strings, bytes,
numbers, bools, None) can come out of it and no code can run while loading.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NoReturn

from diffprompt.training.data.mdetr import bbox_xywh_to_xyxy, masks_from_segmentations, read_json
from diffprompt.training.data.records import UNKNOWN_KIND, DatasetError, GroundingSample

#: Splits used by RefCOCO / RefCOCO+ (train, val, testA, testB) and RefCOCOg-umd (train, val, test).
VALID_SPLITS = ("train", "val", "testA", "testB", "test")


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global and persistent id: only built-in opcodes remain."""

    def __init__(self, file: io.BufferedIOBase, path: Path):
        # "bytes": Python 2 `str` comes out as bytes; `_decode_bytes` turns it into str after.
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str) -> NoReturn:
        raise DatasetError(
            f"{self._path}: refuses to load global '{module}.{name}'; a refs pickle must contain "
            "only plain data (dicts, lists, strings, numbers), nothing was executed"
        )

    def persistent_load(self, pid: Any) -> NoReturn:
        raise DatasetError(f"{self._path}: refuses to load persistent id {pid!r}; nothing was executed")


def safe_load_refs(path: str | Path) -> Any:
    """Unpickle a refs file without allowing any global (class, function) to be loaded.

    Python 2 ``str`` and any other ``bytes`` (keys and values) are decoded to ``str`` as UTF-8,
    falling back to Latin-1.

    Raises:
        DatasetError: missing/unreadable file, corrupt pickle, or a pickle that needs a global
            (e.g. ``os.system``, ``builtins.eval``), always naming the file.
    """
    path = Path(path).absolute()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except OSError as e:
        raise DatasetError(f"{path}: cannot read file: {e}") from e
    try:
        obj = _PlainDataUnpickler(io.BytesIO(data), path).load()
    except DatasetError:
        raise
    except Exception as e:  # corrupt pickles raise many types (UnpicklingError, EOFError, ...)
        raise DatasetError(f"{path}: not a valid pickle: {type(e).__name__}: {e}") from e
    return _decode_bytes(obj)


def load_refer(
    refs_path: str | Path, instances_path: str | Path, image_root: str | Path, split: str
) -> list[GroundingSample]:
    """One `GroundingSample` per sentence of every ref in ``split``.

    Args:
        refs_path: ``refs(unc).p`` etc.
        instances_path: the matching ``instances.json`` (boxes, segmentations, image files).
        image_root: directory holding the COCO images named by ``instances.json``.
        split: one of `VALID_SPLITS`.

    Returns:
        Samples in refs order; ``sample_id`` = ``sent_id``, ``image_id`` = COCO image id,
        boxes (1, 4) float32 xyxy, masks one RLE (or empty without segmentation), kind "unknown".

    Raises:
        DatasetError: unknown split, missing files, malformed entries, refs pointing to missing
            annotation or image ids, duplicate sent ids.
    """
    if split not in VALID_SPLITS:
        raise DatasetError(f"unknown split {split!r}; valid splits: {', '.join(VALID_SPLITS)}")
    refs_path = Path(refs_path).absolute()
    instances_path = Path(instances_path).absolute()
    image_root = Path(image_root).absolute()

    refs = safe_load_refs(refs_path)
    if not isinstance(refs, list):
        raise DatasetError(f"{refs_path}: top level must be a list of refs, got {type(refs).__name__}")
    images, annotations = _load_instances(instances_path)

    samples: list[GroundingSample] = []
    seen_sent_ids: set[int] = set()
    splits_present: set[str] = set()
    for index, ref in enumerate(refs):
        where = f"{refs_path}: refs[{index}]"
        if not isinstance(ref, dict) or "split" not in ref:
            raise DatasetError(f"{where}: must be a dict with a 'split' key")
        splits_present.add(str(ref["split"]))
        if ref["split"] != split:
            continue
        _require(ref, ("ref_id", "ann_id", "image_id", "sentences"), where)
        where = f"{refs_path}: ref_id={ref['ref_id']!r}"
        ann = annotations.get(ref["ann_id"])
        if ann is None:
            raise DatasetError(f"{where}: ann_id={ref['ann_id']!r} not found in {instances_path}")
        if ann["image_id"] != ref["image_id"]:
            raise DatasetError(
                f"{where}: image_id={ref['image_id']!r} but its annotation {ref['ann_id']!r} is on "
                f"image {ann['image_id']!r} in {instances_path}"
            )
        image = images.get(ref["image_id"])
        if image is None:
            raise DatasetError(f"{where}: image_id={ref['image_id']!r} not found in {instances_path}")
        ann_where = f"{instances_path}: annotation id={ann['id']}"
        box = bbox_xywh_to_xyxy(ann["bbox"], ann_where)
        segmentation = [ann.get("segmentation")]
        masks = masks_from_segmentations(segmentation, image["height"], image["width"], ann_where)
        for sent_id, sent in _sentences(ref["sentences"], where):
            if sent_id in seen_sent_ids:
                raise DatasetError(f"{where}: duplicate sent_id={sent_id}")
            seen_sent_ids.add(sent_id)
            samples.append(
                GroundingSample(
                    sample_id=sent_id,
                    image_id=image["id"],
                    image_path=image_root / image["file_name"],
                    width=image["width"],
                    height=image["height"],
                    expression=sent,
                    boxes=box[None, :].copy(),
                    masks=masks,
                    kind=UNKNOWN_KIND,
                )
            )
    if split not in splits_present:
        raise DatasetError(
            f"{refs_path}: no ref has split {split!r}; splits in this file: {sorted(splits_present)}"
        )
    return samples


def _load_instances(path: Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """``instances.json`` -> (images by id, annotations by id), entries validated."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: top level must be a JSON object")
    images: dict[int, dict] = {}
    for index, image in enumerate(_list(data, "images", path)):
        where = f"{path}: images[{index}]"
        _require(image, ("id", "file_name", "height", "width"), where)
        where = f"{path}: image id={image['id']!r}"
        if not isinstance(image["file_name"], str):
            raise DatasetError(f"{where}: 'file_name' must be a string")
        if not all(_is_int(image[k]) and image[k] > 0 for k in ("height", "width")):
            raise DatasetError(f"{where}: 'height' and 'width' must be positive ints")
        images[image["id"]] = image
    annotations: dict[int, dict] = {}
    for index, ann in enumerate(_list(data, "annotations", path)):
        _require(ann, ("id", "image_id", "bbox"), f"{path}: annotations[{index}]")
        annotations[ann["id"]] = ann
    return images, annotations


def _sentences(sentences: Any, where: str) -> Iterable[tuple[int, str]]:
    """Validated ``(sent_id, sent)`` pairs of one ref."""
    if not isinstance(sentences, list):
        raise DatasetError(f"{where}: 'sentences' must be a list")
    for index, sentence in enumerate(sentences):
        _require(sentence, ("sent", "sent_id"), f"{where}: sentences[{index}]")
        if not _is_int(sentence["sent_id"]) or not isinstance(sentence["sent"], str):
            raise DatasetError(f"{where}: sentences[{index}]: need int 'sent_id' and str 'sent'")
        yield sentence["sent_id"], sentence["sent"]


def _decode_bytes(obj: Any) -> Any:
    """Recursively turn bytes (keys and values) into str: UTF-8, else Latin-1."""
    if isinstance(obj, (bytes, bytearray)):
        try:
            return bytes(obj).decode("utf-8")
        except UnicodeDecodeError:
            return bytes(obj).decode("latin1")
    if isinstance(obj, dict):
        return {_decode_bytes(k): _decode_bytes(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode_bytes(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_decode_bytes(v) for v in obj)
    return obj


def _list(data: dict, key: str, path: Path) -> list:
    if not isinstance(data.get(key), list):
        raise DatasetError(f"{path}: missing required list {key!r}")
    return data[key]


def _require(obj: Any, keys: Iterable[str], where: str) -> None:
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: must be a dict")
    missing = [k for k in keys if k not in obj]
    if missing:
        label = f"{where} (id={obj['id']!r})" if "id" in obj else where
        raise DatasetError(f"{label}: missing required key(s) {missing}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
