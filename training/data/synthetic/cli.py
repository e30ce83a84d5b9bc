"""Write the synthetic world's splits to disk, or draw a preview sheet of a split.

    diffprompt data write --split all --out data/synthetic
    diffprompt data write --split train --n-images 100 --out /tmp/world
    diffprompt data preview --split testB --out docs/images/synthetic_testB.png
    diffprompt data preview --split shift_background --out docs/images/synthetic_shift_background.png

Splits: pretrain, train, val, testA, testB, heldout, the *_absent splits and the distribution-shift
test splits shift_background, shift_size, shift_crowded (see training/data/synthetic/splits.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diffprompt.cli import positive_int
from diffprompt.training.data.synthetic.splits import SPLITS


def main(args: argparse.Namespace) -> int:
    from diffprompt.training.data.synthetic.writer import preview_sheet, write_split

    names = list(SPLITS) if args.split == "all" else [args.split]
    if args.action == "write":
        for name in names:
            path = write_split(SPLITS[name], Path(args.out), args.n_images, progress=args.progress)
            print(f"wrote {path}")
    else:
        for name in names:
            out = Path(args.out)
            if len(names) > 1 or out.suffix != ".png":
                out = out / f"synthetic_{name}.png"
            print(f"wrote {preview_sheet(SPLITS[name], out, n_images=args.n_images or 6)}")
    return 0


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["write", "preview"])
    p.add_argument("--split", default="all", choices=["all", *SPLITS])
    p.add_argument("--out", default="data/synthetic", help="directory (write) or .png / directory (preview)")
    p.add_argument("--n-images", type=positive_int, default=None, help="images per split (default: the split's size)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


if __name__ == "__main__":
    raise SystemExit(main(build_parser().parse_args()))
