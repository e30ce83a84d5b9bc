"""Write synthetic splits to disk in the MDETR-style COCO format, and draw a preview sheet.

Layout under `out_dir`:

    {split}.json                 # MDETR-style: one image entry per expression
    images/{split}/{index:06d}.png

Each image entry carries `caption` (the expression), `expression_kind`, `original_id` (the
scene index, shared by all expressions of one scene); its annotations are the referred objects
with `bbox` (COCO xywh) and `segmentation` (COCO RLE). The file is written to a temporary name
and renamed, so an interrupted run never leaves a half-written json behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from diffprompt.training.data.masks import mask_to_rle
from diffprompt.training.data.synthetic.language import kind_of, to_text
from diffprompt.training.data.synthetic.splits import SPLITS, SplitSpec, generate_image


def write_split(spec: SplitSpec, out_dir: Path, n_images: int | None = None, progress: bool = True) -> Path:
    """Render `n_images` scenes of `spec` (default: the split's size) under out_dir; returns the json path."""
    n_images = spec.n_images if n_images is None else n_images
    if n_images < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    out_dir = Path(out_dir)
    image_dir = out_dir / "images" / spec.name
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in tqdm(range(n_images), desc=f"writing {spec.name}", unit="img", disable=not progress):
        item = generate_image(spec, index)
        file_name = f"images/{spec.name}/{index:06d}.png"
        Image.fromarray(item.scene.image).save(out_dir / file_name)
        for expr, targets in item.expressions:
            entry_id = len(images) + 1
            images.append({
                "id": entry_id,
                "original_id": index,
                "file_name": file_name,
                "height": int(item.scene.image.shape[0]),
                "width": int(item.scene.image.shape[1]),
                "caption": to_text(expr),
                "expression_kind": kind_of(expr),
                "dataset_name": f"synthetic-{spec.name}",
            })
            for t in targets:
                obj = item.scene.objects[t]
                x0, y0, x1, y1 = obj.box
                annotations.append({
                    "id": len(annotations) + 1,
                    "image_id": entry_id,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": int(obj.mask.sum()),
                    "iscrowd": 0,
                    "category_id": 1,
                    "segmentation": mask_to_rle(obj.mask),
                    "attributes": {"shape": obj.shape, "color": obj.color, "size": obj.size},
                })
    dataset = {
        "info": {"description": f"Diff-Prompt synthetic world, split {spec.name}", "seed": spec.seed},
        "categories": [{"id": 1, "name": "object"}],
        "images": images,
        "annotations": annotations,
    }
    json_path = out_dir / f"{spec.name}.json"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(dataset))
    os.replace(tmp, json_path)
    return json_path


def ensure_split(data_dir: Path, split: str, n_images: int | None = None, log=None, progress: bool = True) -> Path:
    """data_dir/{split}.json, written first (`n_images` scenes, default the split's size) if it is missing."""
    path = Path(data_dir) / f"{split}.json"
    if not path.exists():
        if log is not None:
            log.info(f"writing synthetic split {split} to {data_dir}")
        write_split(SPLITS[split], Path(data_dir), n_images, progress=progress)
    return path


def preview_sheet(spec: SplitSpec, out_png: Path, n_images: int = 6, scale: int = 3) -> Path:
    """A PNG grid of scenes with mask overlays, boxes and expressions, for a person to look at."""
    tiles = []
    for index in range(n_images):
        item = generate_image(spec, index)
        if not item.expressions:
            continue
        expr, targets = item.expressions[0]
        image = item.scene.image.astype(np.float32)
        for t in targets:
            m = item.scene.objects[t].mask
            image[m] = 0.5 * image[m] + 0.5 * np.array([255, 255, 255])
        tile = Image.fromarray(image.astype(np.uint8)).resize(
            (image.shape[1] * scale, image.shape[0] * scale), Image.NEAREST
        )
        canvas = Image.new("RGB", (tile.width, tile.height + 28), "white")
        canvas.paste(tile, (0, 0))
        draw = ImageDraw.Draw(canvas)
        for t in targets:
            x0, y0, x1, y1 = (v * scale for v in item.scene.objects[t].box)
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=(255, 0, 0), width=2)
        draw.text((4, tile.height + 4), f"[{kind_of(expr)}] {to_text(expr)}", fill=(0, 0, 0))
        tiles.append(canvas)
    if not tiles:
        raise ValueError(f"split {spec.name} produced no expressions in {n_images} images")
    cols = min(3, len(tiles))
    rows = (len(tiles) + cols - 1) // cols
    w, h = tiles[0].size
    sheet = Image.new("RGB", (cols * w, rows * h), "white")
    for i, tile in enumerate(tiles):
        sheet.paste(tile, ((i % cols) * w, (i // cols) * h))
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_png)
    return out_png
