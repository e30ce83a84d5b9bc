"""COCO RLE helpers (pycocotools): binary masks, polygons and RLE dicts, all JSON-friendly.

Every RLE dict produced here is *compressed* with ``counts`` as ``str`` (not ``bytes``), so it
can be written to JSON as is: ``{"size": [h, w], "counts": "..."}``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils


def mask_to_rle(mask: np.ndarray) -> dict:
    """Encode a binary mask as a compressed COCO RLE.

    Args:
        mask: (H, W) bool (or 0/1 integer) array, any memory order.

    Returns:
        ``{"size": [H, W], "counts": str}``.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    # pycocotools reads the buffer column-major: it needs a Fortran-ordered uint8 array.
    fortran = np.asfortranarray(mask.astype(bool), dtype=np.uint8)
    rle = mask_utils.encode(fortran)
    return _jsonable(rle)


def rle_to_mask(rle: dict) -> np.ndarray:
    """Decode a COCO RLE (compressed ``str``/``bytes`` or uncompressed ``list`` counts).

    Returns:
        (H, W) bool array, C-contiguous.
    """
    height, width = _rle_size(rle)
    decoded = mask_utils.decode(_to_pycocotools(rle, height, width))
    return np.ascontiguousarray(decoded, dtype=bool)


def rle_area(rle: dict) -> int:
    """Number of foreground pixels of a COCO RLE (any counts form)."""
    height, width = _rle_size(rle)
    return int(mask_utils.area(_to_pycocotools(rle, height, width)))


def segmentation_to_rle(segmentation: Any, height: int, width: int) -> dict:
    """Convert a COCO ``segmentation`` field to one compressed RLE of an (height, width) image.

    Accepts polygons (``[[x0, y0, x1, y1, ...], ...]``, merged into one mask), uncompressed RLE
    (``{"size", "counts": [int, ...]}``) or compressed RLE (``counts`` as ``str``/``bytes``).
    Polygons with fewer than 3 points are dropped (zero area; pycocotools would also misread a
    4-number polygon as a box). Raises ``ValueError`` on anything malformed.
    """
    if isinstance(segmentation, dict):
        size = _rle_size(segmentation)
        if size != (height, width):
            raise ValueError(f"RLE size {list(size)} != image size [{height}, {width}]")
        return _jsonable(_to_pycocotools(segmentation, height, width))
    if isinstance(segmentation, list):
        polygons = [_polygon(p) for p in segmentation]
        polygons = [p for p in polygons if len(p) >= 6]
        if not polygons:
            raise ValueError("segmentation has no polygon with >= 3 points")
        rles = mask_utils.frPyObjects(polygons, height, width)
        return _jsonable(mask_utils.merge(rles))
    kind = type(segmentation).__name__
    raise ValueError(f"segmentation must be a polygon list or an RLE dict, got {kind}")


def _polygon(polygon: Any) -> list[float]:
    """Validate one flat polygon ``[x0, y0, x1, y1, ...]`` of finite numbers."""
    if not isinstance(polygon, list) or not all(_is_number(v) for v in polygon):
        raise ValueError("polygon must be a flat list of numbers")
    if len(polygon) % 2:
        raise ValueError(f"polygon has an odd number of coordinates ({len(polygon)})")
    return [float(v) for v in polygon]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _rle_size(rle: Any) -> tuple[int, int]:
    """``(h, w)`` of an RLE dict, validated."""
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise ValueError("RLE must be a dict with 'size' and 'counts'")
    size = rle["size"]
    if (
        not isinstance(size, Sequence)
        or len(size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)
    ):
        raise ValueError(f"RLE size must be [h, w] with positive ints, got {size!r}")
    return int(size[0]), int(size[1])


def _to_pycocotools(rle: dict, height: int, width: int) -> dict:
    """The compressed ``bytes``-counts dict pycocotools functions expect."""
    counts = rle["counts"]
    if isinstance(counts, str):
        return {"size": [height, width], "counts": counts.encode("ascii")}
    if isinstance(counts, bytes):
        return {"size": [height, width], "counts": counts}
    if isinstance(counts, list):
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
            raise ValueError("uncompressed RLE counts must be non-negative ints")
        if sum(counts) != height * width:
            raise ValueError(f"uncompressed RLE counts sum to {sum(counts)}, expected {height * width}")
        return mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    raise ValueError(f"RLE counts must be str, bytes or list, got {type(counts).__name__}")


def _jsonable(rle: dict) -> dict:
    """pycocotools RLE -> ``{"size": [h, w], "counts": str}``."""
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": counts}
