"""Full-resolution OWL foundations with random weights, and RefCOCO-style data layouts, for tests.

Nothing is downloaded: the foundation is a `transformers` OWL-ViT / OWLv2 detector built from its
config (the family's real input resolution and patch size; few layers and a small width keep it
cheap) and saved with `save_pretrained` plus a tokenizer.json, as a user's checkpoint would be.
`annotations_apart` copies MDETR json files into a folder of their own, the way RefCOCO's
`finetune_refcoco_*.json` sit apart from COCO's `train2014/`: the images are then found only
with `--image-root`.
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.owl_scale import build_random_owl_foundation

OWL_LAYERS = 2  # per tower
OWL_WIDTH = 64  # both towers and the projection


def build_owl_foundation(out: Path, family: str = "owlvit", layers: int = OWL_LAYERS, width: int = OWL_WIDTH) -> Path:
    """A random `family` detector at its full input size (owlvit: 768 px, patch 32) saved under `out`."""
    return build_random_owl_foundation(out, family, layers=layers, width=width)


def annotations_apart(world: Path, out: Path, splits: tuple[str, ...] = ("train", "val"),
                      limit: int | None = None) -> tuple[Path, Path]:
    """(annotation folder, image root): `world`'s `<split>.json` (its first `limit` expressions) written
    into `out`, the images left where they are (the json files name them relative to `world`, which
    becomes the image root)."""
    out.mkdir(parents=True, exist_ok=True)
    for split in splits:
        data = json.loads((world / f"{split}.json").read_text())
        data["images"] = data["images"][:limit]
        kept = {entry["id"] for entry in data["images"]}
        data["annotations"] = [a for a in data["annotations"] if a["image_id"] in kept]
        (out / f"{split}.json").write_text(json.dumps(data))
    return out, world
