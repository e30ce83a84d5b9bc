"""Are the demo page's shipped samples answered right? (top-1 box IoU >= 0.5 against the truth)

The demo page (service/static/index.html) ships sample images with an expression each. Each image is
a synthetic val image (found here by pixel equality in `--data-dir`'s val split), and its expression
one of that image's val expressions, so the truth is the val annotation. The pipeline runs as the
service runs it: the request's seed (the service's default 0) for the expression.

    python scripts/check_demo_samples.py --pipeline checkpoints/diffprompt --steps 5
    python scripts/check_demo_samples.py --artifact artifacts/diffprompt-5steps      # onnxruntime
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
from PIL import Image

from diffprompt.cli import run
from diffprompt.core.boxes import boxes_to_pixels
from diffprompt.training.data.mdetr import load_split
from diffprompt.training.evaluation.metrics import box_iou, ranked_by_score
from diffprompt.training.options import add_image_root_arg

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "service" / "static" / "index.html"


def demo_samples(page: Path = PAGE) -> list[tuple[Path, str]]:
    """(image file, expression) of each sample button of the demo page."""
    found = re.findall(r'data-src="/static/([^"]+)"\s+data-expression="([^"]+)"', page.read_text())
    return [(page.parent / src, expression) for src, expression in found]


def find_truth(image: Path, expression: str, samples) -> object:
    """The val sample with this image's pixels and this expression."""
    pixels = np.asarray(Image.open(image).convert("RGB"))
    for s in samples:
        if s.expression == expression and s.width == pixels.shape[1] and s.height == pixels.shape[0]:
            with Image.open(s.image_path) as im:
                if np.array_equal(np.asarray(im.convert("RGB")), pixels):
                    return s
    raise SystemExit(f"{image.name}: no val image with these pixels has the expression {expression!r}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", default="checkpoints/diffprompt")
    p.add_argument("--artifact", default=None, help="an exported artifact, run with onnxruntime instead")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--seed", type=int, default=0, help="the request's seed (the service's default: 0)")
    p.add_argument("--data-dir", default="data/synthetic")
    add_image_root_arg(p)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    from diffprompt.training.data.grounding_dataset import load_pixels

    if args.artifact:
        from diffprompt.core.providers import ProviderConfig
        from diffprompt.core.runtime import GroundingRuntime

        model = GroundingRuntime.load(args.artifact, ProviderConfig(preferred=("cpu",)))
    else:
        import torch

        from diffprompt.training.models.diffprompt import DiffPromptPipeline

        torch.set_num_threads(args.threads)
        model = DiffPromptPipeline.from_pretrained(args.pipeline, steps=args.steps)
    val = load_split(Path(args.data_dir) / "val.json", args.image_root)
    spec = model.image_spec
    right = 0
    print("| sample | expression | val id | top-1 IoU | top-1 score | rank of the first right box | right |")
    print("|---|---|---|---|---|---|---|")
    for image, expression in demo_samples():
        s = find_truth(image, expression, val)
        ids, mask = model.tokenizer([expression])
        scores, boxes = model.score(load_pixels(s, spec)[None], ids.astype(np.int64), mask.astype(np.int64),
                                    [args.seed])
        ranked, sc = ranked_by_score(boxes_to_pixels(boxes[0], s.width, s.height, spec.resize_mode), scores[0])
        iou = box_iou(ranked, np.asarray(s.boxes, dtype=np.float64)).max(1)
        ok = bool(iou[0] >= 0.5)
        right += ok
        first = int(np.argmax(iou >= 0.5)) + 1 if (iou >= 0.5).any() else "-"
        print(f"| {image.name} | {expression} | {s.sample_id} | {iou[0]:.2f} | {sc[0]:.3f} | {first} | "
              f"{'yes' if ok else 'no'} |")
    print(f"{right} of {len(demo_samples())} answered right")


if __name__ == "__main__":  # a user mistake (missing file, bad option) is one `error:` line, status 2
    raise SystemExit(run(lambda _: main(), None))
