"""Query tokenizer conventions (CLIP/OWL) and image/box geometry."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from diffprompt.core.boxes import boxes_to_pixels, pixels_to_normalized
from diffprompt.core.errors import CheckpointError
from diffprompt.core.images import preprocess_image
from diffprompt.core.tokenizer import QueryTokenizer
from diffprompt.training.data.synthetic.vocabulary import synthetic_tokenizer


def test_ids_follow_owl_conventions(tmp_path):
    tok = synthetic_tokenizer()
    ids, mask = tok(["The  RED star", "the second shape from the left"])
    assert ids.shape == (2, 16) and ids.dtype == np.int64
    assert (ids[:, 0] > 0).all()  # first id non-zero: not a padding query
    eos = tok.vocab_size - 1
    assert ids[0, ids[0].argmax()] == eos and ids[0].argmax() == 4  # <bos> the red star <eos>
    assert mask[0].sum() == 5 and (ids[0, 5:] == 0).all()
    tok.save(tmp_path)
    again = QueryTokenizer.from_file(tmp_path)
    assert np.array_equal(again(["the red star"])[0], ids[:1])


def test_unknown_words_and_truncation_keep_eos():
    tok = synthetic_tokenizer(max_length=6)
    ids, _ = tok(["the big fluffy red star on the left side"])
    assert ids[0, -1] == tok.vocab_size - 1
    unk = tok.tokenizer.token_to_id("<unk>")
    assert unk in ids[0]


def test_missing_tokenizer_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        QueryTokenizer.from_file(tmp_path)


@pytest.mark.parametrize("mode", ["pad", "stretch"])
def test_boxes_round_trip_through_the_model_frame(mode):
    w, h = 300, 200
    boxes = np.array([[10, 20, 110, 120], [0, 0, 300, 200]], dtype=np.float32)
    norm = pixels_to_normalized(boxes, w, h, mode)
    assert np.allclose(boxes_to_pixels(norm, w, h, mode), boxes, atol=1e-3)


def test_pad_mode_keeps_aspect_and_pads_bottom_right():
    image = np.zeros((50, 100, 3), dtype=np.uint8)  # wide, black
    x = preprocess_image(Image.fromarray(image), 64, (0, 0, 0), (1, 1, 1), "pad")
    assert x.shape == (3, 64, 64)
    assert x[:, :30].max() < 0.05  # the image (top half)
    assert x[:, 40:].min() > 0.45  # gray padding (bottom)
    with pytest.raises(ValueError, match="resize_mode"):
        preprocess_image(Image.fromarray(image), 64, (0, 0, 0), (1, 1, 1), "crop")
