"""Synthetic splits written to disk load back through the MDETR loader, boxes and masks intact."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from diffprompt.cli import main as cli_main
from diffprompt.training.data.masks import rle_to_mask
from diffprompt.training.data.mdetr import check_images, load_mdetr
from diffprompt.training.data.synthetic.language import evaluate, parse
from diffprompt.training.data.synthetic.splits import SPLITS, generate_image


def test_written_split_round_trips(small_world):
    samples = load_mdetr(small_world / "testB.json")
    check_images(samples)
    assert samples and {s.kind for s in samples} <= {"relation", "ordinal"}
    entries = json.loads((small_world / "testB.json").read_text())["images"]
    for s, entry in zip(samples, entries):
        item = generate_image(SPLITS["testB"], entry["original_id"])
        pixels = np.asarray(Image.open(s.image_path))
        assert np.array_equal(pixels, item.scene.image)  # PNG is lossless
        (target,) = evaluate(parse(s.expression), item.scene.objects)
        obj = item.scene.objects[target]
        assert s.boxes.shape == (1, 4)
        assert np.allclose(s.boxes[0], obj.box)
        assert np.array_equal(rle_to_mask(s.masks[0]), obj.mask)


def test_pretrain_split_keeps_every_target(small_world):
    samples = load_mdetr(small_world / "pretrain.json")
    assert any(len(s.boxes) > 1 for s in samples)  # "star" with two stars
    assert {s.kind for s in samples} == {"category"}


def test_cli_writes_a_split_and_a_preview(tmp_path, capsys):
    argv = ["data", "write", "--split", "val", "--n-images", "3", "--out", str(tmp_path), "--no-progress"]
    assert cli_main(argv) == 0
    assert (tmp_path / "val.json").exists()
    png = tmp_path / "preview.png"
    assert cli_main(["data", "preview", "--split", "testA", "--out", str(png), "--n-images", "4"]) == 0
    with Image.open(png) as im:
        assert im.size[0] >= 3 * 128 and im.mode == "RGB"
    assert "wrote" in capsys.readouterr().out


def test_no_temporary_file_is_left_behind(tmp_path):
    from diffprompt.training.data.synthetic.writer import write_split

    write_split(SPLITS["val"], tmp_path, n_images=2, progress=False)
    assert not list(tmp_path.glob("*.tmp"))
