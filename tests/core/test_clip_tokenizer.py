"""Real OWL tokenizers: CLIP's byte-level BPE as `vocab.json` + `merges.txt` or `tokenizer.json`.

A small CLIP-layout vocabulary (tests/clip_bpe.py, nothing downloaded); transformers' CLIPTokenizer
on the same files is the reference.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from diffprompt.core.errors import CheckpointError
from diffprompt.core.tokenizer import QueryTokenizer
from tests.clip_bpe import reference_tokens, write_clip_bpe

TEXTS = ["the red star", "The  RED star!!", "the star left of the red star on the left", "!", "ünïcode 42"]


def test_vocab_and_merges_match_transformers_clip_tokenizer(tmp_path):
    vocab = write_clip_bpe(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "!"}))  # as OWL-ViT's processor saves
    tok = QueryTokenizer.from_file(tmp_path)
    ids, mask = tok(TEXTS)
    ref_ids, ref_mask = reference_tokens(tmp_path, TEXTS)
    assert np.array_equal(ids, ref_ids) and np.array_equal(mask, ref_mask)
    assert ids[0, :5].tolist() == [vocab["<|startoftext|>"], vocab["the</w>"], vocab["red</w>"], vocab["star</w>"],
                                   vocab["<|endoftext|>"]]
    assert tok.eos_id == vocab["<|endoftext|>"] == len(vocab) - 1


def test_a_real_exclamation_mark_is_attended_although_its_id_is_the_pad_id(tmp_path):
    write_clip_bpe(tmp_path)
    ids, mask = QueryTokenizer.from_file(tmp_path)(["red!!"])  # "!" (id 0) then "!</w>" (CLIP without a pad token)
    n = int(mask[0].sum())
    assert ids[0, 2] == 0 and mask[0, 2] == 1  # inside the sequence: a token, not padding
    assert ids[0, n - 1] == ids[0].max()  # EOS last, and the largest id (the text tower pools there)
    assert (ids[0, n:] == 0).all() and (mask[0, n:] == 0).all()


def test_truncation_keeps_eos_and_the_tokenizer_json_form_gives_the_same_ids(tmp_path):
    write_clip_bpe(tmp_path / "slow")
    tok = QueryTokenizer.from_file(tmp_path / "slow", max_length=6)
    long = ["the red star left of the red star"]
    ids, mask = tok(long)
    assert ids[0, -1] == tok.eos_id and mask[0].all()
    tok.save(tmp_path / "fast")
    again = QueryTokenizer.from_file(tmp_path / "fast", max_length=6)
    assert np.array_equal(again(TEXTS)[0], tok(TEXTS)[0])
    assert np.array_equal(again(long)[0], ids)


def test_a_checkpoint_without_a_tokenizer_says_which_files_it_needs(tmp_path):
    (tmp_path / "vocab.json").write_text("{}")  # merges.txt missing
    with pytest.raises(CheckpointError) as info:
        QueryTokenizer.from_file(tmp_path)
    message = str(info.value)
    assert "\n" not in message and "tokenizer.json" in message and "merges.txt" in message
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        QueryTokenizer.from_file(tmp_path / "tokenizer.json")
