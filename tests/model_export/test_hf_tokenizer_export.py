"""A Hugging Face OWL-ViT checkpoint with CLIP's BPE as vocab.json + merges.txt: load, export, serve.

The checkpoint is what `OwlViTForObjectDetection.save_pretrained` + `CLIPTokenizer.save_pretrained`
write (no tokenizer.json), tiny and random (nothing downloaded). The artifact's runtime must score a
query with a real "!" (CLIP id 0) exactly as transformers does with its own tokenizer.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffprompt.core.providers import ProviderConfig
from diffprompt.core.runtime import GroundingRuntime
from diffprompt.model_export.export import build_parser, main
from tests.clip_bpe import reference_tokens, write_clip_bpe

transformers = pytest.importorskip("transformers")
QUERIES = ["the red star!!", "the star left of the red star"]


def test_owlvit_checkpoint_with_vocab_and_merges_exports_and_scores_as_transformers(tmp_path):
    ckpt = tmp_path / "owlvit"
    vocab = write_clip_bpe(ckpt)
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"pad_token": "!"}))
    tower = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
    config = transformers.OwlViTConfig(
        text_config=dict(**tower, vocab_size=len(vocab), max_position_embeddings=16, pad_token_id=0,
                         bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(**tower, image_size=64, patch_size=16), projection_dim=32)
    torch.manual_seed(0)
    hf = transformers.OwlViTForObjectDetection(config).eval()
    hf.save_pretrained(ckpt)
    assert not (ckpt / "tokenizer.json").exists()

    out = tmp_path / "artifacts"
    assert main(build_parser().parse_args(["--pipeline", str(ckpt), "--out", str(out), "--name", "owl",
                                           "--threads", "1", "--no-progress"])) == 0
    runtime = GroundingRuntime.load(out / "owl", ProviderConfig(preferred=("cpu",)), warmup=False)
    ids, mask = runtime.tokenizer(QUERIES)
    ref_ids, ref_mask = reference_tokens(ckpt, QUERIES)
    assert np.array_equal(ids, ref_ids) and np.array_equal(mask, ref_mask)
    assert (ids == 0).sum(1)[0] > (mask == 0).sum(1)[0]  # the "!"s: id 0 inside the query, attended

    pixels = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    result = runtime.ground(pixels, ids, mask, [0, 1])
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ref_ids), pixel_values=torch.from_numpy(pixels),
                 attention_mask=torch.from_numpy(ref_mask))
    ref_scores = torch.sigmoid(ref.logits[..., 0]).numpy()  # (2 images, P): one query per image
    assert np.abs(result.scores - ref_scores).max() < 1e-4
    assert np.abs(result.boxes - ref.pred_boxes.numpy()).max() < 1e-4
