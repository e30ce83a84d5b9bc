"""The one in-memory record every dataset loader produces.

A `GroundingSample` is one referring expression (or category query) on one image, with the
boxes of *all* objects it refers to. REC expressions refer to exactly one object; category
queries of the pretraining split may refer to several.

Boxes are always `xyxy` in pixels of the original image: `[x0, y0, x1, y1]` with `x1 = x0 + w`
(COCO's `xywh` converted, edges not pixel centres).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diffprompt.core.errors import UserError

#: Expression kinds of the synthetic world; user datasets without a kind get "unknown".
EXPRESSION_KINDS = ("category", "attribute", "absolute", "relation", "ordinal")
UNKNOWN_KIND = "unknown"


class DatasetError(UserError):
    """A dataset file is missing, unreadable or malformed. The message names the file."""


@dataclass(frozen=True)
class GroundingSample:
    """One expression on one image.

    Attributes:
        sample_id: id of this expression, unique within its dataset.
        image_id: id of the image (several samples may share one image).
        image_path: absolute path of the image file.
        width, height: image size in pixels.
        expression: the referring expression or category query, as written.
        boxes: (K, 4) float32, xyxy pixels, the K >= 1 referred objects (K = 0 only for an
            expression whose object is absent, loaded with ``load_mdetr(..., keep_unannotated=True)``).
        masks: K COCO RLE dicts (``{"size": [h, w], "counts": ...}``) or empty when the dataset
            has no segmentation.
        kind: one of EXPRESSION_KINDS or UNKNOWN_KIND.
    """

    sample_id: int
    image_id: int
    image_path: Path
    width: int
    height: int
    expression: str
    boxes: np.ndarray
    masks: tuple[dict, ...] = field(default=())
    kind: str = UNKNOWN_KIND
