"""The OWL-style grounding model: deep prompts, batching, save/load, Hugging Face parity."""

from __future__ import annotations

import pytest
import torch

from diffprompt.core.tokenizer import QueryTokenizer
from diffprompt.training.data.synthetic.vocabulary import synthetic_tokenizer
from diffprompt.training.models.grounding import GROUNDING_PRESETS, GroundingModel, load_grounding_model
from diffprompt.training.models.pretrained import CheckpointError


@pytest.fixture(scope="module")
def baby():
    torch.manual_seed(0)
    tok = synthetic_tokenizer()
    model = GroundingModel(GROUNDING_PRESETS["baby"](vocab_size=tok.vocab_size)).eval()
    # Random heads so outputs depend on everything (the default init zeroes the box head's last layer).
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return model, tok


def _inputs(tok, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(n, 3, 128, 128, generator=g)
    ids, mask = tok(["the red star", "the second shape from the left", "blue circle"][:n])
    return pixels, torch.from_numpy(ids), torch.from_numpy(mask)


def _prompts(model, n, depth=1, length=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    v = torch.randn(n, depth, length, cfg.vision.hidden_size, generator=g)
    t = torch.randn(n, depth, length, cfg.text.hidden_size, generator=g)
    return v, t


def test_batch_of_two_equals_two_single_runs_with_prompts(baby):
    model, tok = baby
    pixels, ids, mask = _inputs(tok, 2)
    vp, tp = _prompts(model, 2)
    with torch.no_grad():
        both = model(pixels, ids, mask, vp, tp)
        one = [model(pixels[i:i + 1], ids[i:i + 1], mask[i:i + 1], vp[i:i + 1], tp[i:i + 1]) for i in range(2)]
    for i in range(2):
        torch.testing.assert_close(both.logits[i], one[i].logits[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(both.pred_boxes[i], one[i].pred_boxes[0], atol=1e-5, rtol=1e-5)


def test_prompts_change_the_output_and_stay_with_their_sample(baby):
    model, tok = baby
    pixels, ids, mask = _inputs(tok, 2)
    vp, tp = _prompts(model, 2)
    with torch.no_grad():
        plain = model(pixels, ids, mask)
        prompted = model(pixels, ids, mask, vp, tp)
        # Swap sample 1's prompts only: sample 0 must not move (no mixing across the batch).
        vp2, tp2 = vp.clone(), tp.clone()
        vp2[1], tp2[1] = _prompts(model, 1, seed=9)[0][0], _prompts(model, 1, seed=9)[1][0]
        swapped = model(pixels, ids, mask, vp2, tp2)
    assert not torch.allclose(plain.logits, prompted.logits)
    torch.testing.assert_close(swapped.logits[0], prompted.logits[0])
    assert not torch.allclose(swapped.logits[1], prompted.logits[1])


def test_prompts_are_dropped_after_their_layer(baby):
    model, tok = baby
    pixels, ids, mask = _inputs(tok, 1)
    vp, tp = _prompts(model, 1)
    with torch.no_grad():
        image = model.encode_image(pixels, vp)
        text = model.encode_text(ids, mask, tp)
    assert image.tokens.shape == (1, 1 + model.config.num_patches, model.config.vision.hidden_size)
    assert text.tokens.shape == (1, 16, model.config.text.hidden_size)


def test_prompt_depth_beyond_the_tower_is_refused(baby):
    model, tok = baby
    pixels, ids, mask = _inputs(tok, 1)
    vp, _ = _prompts(model, 1, depth=2)
    with pytest.raises(ValueError, match="exceeds the tower"):
        model.encode_image(pixels, vp)


def test_padding_does_not_change_the_text_embedding(baby):
    model, tok = baby
    ids, mask = tok(["the red star"])
    ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)
    short = QueryTokenizer(tok.tokenizer, max_length=8)
    ids8, mask8 = (torch.from_numpy(a) for a in short(["the red star"]))
    with torch.no_grad():
        a = model.encode_text(ids, mask).query_embeds
        b = model.encode_text(ids8, mask8).query_embeds
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_save_and_load_round_trip(baby, tmp_path):
    model, tok = baby
    model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "model.safetensors"}
    loaded = load_grounding_model(tmp_path)
    pixels, ids, mask = _inputs(tok, 2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels, ids, mask).logits, model(pixels, ids, mask).logits)


def test_broken_checkpoints_give_clear_errors(baby, tmp_path):
    model, _ = baby
    with pytest.raises(CheckpointError, match="config.json"):
        load_grounding_model(tmp_path)
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_grounding_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        load_grounding_model(tmp_path)


# ----------------------------------------------------------------------------- Hugging Face parity


def _tiny_hf(family: str):
    transformers = pytest.importorskip("transformers")
    Config = transformers.OwlViTConfig if family == "owlvit" else transformers.Owlv2Config
    Model = transformers.OwlViTForObjectDetection if family == "owlvit" else transformers.Owlv2ForObjectDetection
    tower = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
    config = Config(
        text_config=dict(**tower, vocab_size=99, max_position_embeddings=16, bos_token_id=97, eos_token_id=98),
        vision_config=dict(**tower, image_size=64, patch_size=16),
        projection_dim=32,  # OWL's class head requires text width == projection_dim
    )
    torch.manual_seed(0)
    return Model(config).eval()


@pytest.mark.parametrize("family", ["owlvit", "owlv2"])
def test_hugging_face_checkpoint_parity(family, tmp_path):
    hf = _tiny_hf(family)
    hf.save_pretrained(tmp_path)
    ours = load_grounding_model(tmp_path)
    assert ours.config.family == family and ours.config.objectness == (family == "owlv2")
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, 64, 64, generator=g)
    lengths = [4, 9, 6, 16]  # two queries per image, ragged, one filling the whole context
    ids = torch.zeros(4, 16, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, 0] = 97
        ids[i, 1:n - 1] = torch.randint(1, 97, (n - 2,), generator=g)
        ids[i, n - 1] = 98  # EOS, the largest id
    mask = (ids > 0).long()
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels, attention_mask=mask)
        out = ours(pixels, ids, mask)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.pred_boxes, ref.pred_boxes, atol=1e-4, rtol=0)
    if family == "owlv2":
        torch.testing.assert_close(out.objectness_logits, ref.objectness_logits, atol=1e-4, rtol=0)
    # Pooled image embedding = transformers' image features (what the DiT is conditioned on).
    with torch.no_grad():
        base = getattr(hf, family)
        ref_img = base.get_image_features(pixel_values=pixels)
        ref_img = ref_img.pooler_output if hasattr(ref_img, "pooler_output") else ref_img
        ref_txt = base.get_text_features(input_ids=ids, attention_mask=mask)
        ref_txt = ref_txt.pooler_output if hasattr(ref_txt, "pooler_output") else ref_txt
        torch.testing.assert_close(ours.encode_image(pixels).pooled, ref_img, atol=1e-4, rtol=0)
        torch.testing.assert_close(ours.encode_text(ids, mask).query_embeds, ref_txt, atol=1e-4, rtol=0)
