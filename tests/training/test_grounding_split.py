"""One foundation pass split at a layer (single-pass mode): the trunk's first k layers, then the rest with
prompts entering at layer k, equal one pass with those prompts in layers k.. ."""

from __future__ import annotations

import pytest
import torch

from diffprompt.training.models.grounding import GroundingModel, TowerConfig


@pytest.fixture(scope="module")
def model():
    """Small, with 3 layers per tower so that a split can fall inside."""
    from diffprompt.training.models.grounding import GroundingConfig

    torch.manual_seed(0)
    return GroundingModel(GroundingConfig(vision=TowerConfig(32, 3, 2, 64), text=TowerConfig(32, 3, 2, 64),
                                          projection_dim=32, vocab_size=50, image_size=32, patch_size=8)).eval()


def _inputs(model, B=2):
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(B, 3, cfg.image_size, cfg.image_size, generator=g)
    ids = torch.randint(1, 40, (B, 6), generator=g)
    ids[:, 4] = 49  # EOS = the largest id
    mask = torch.ones(B, 6, dtype=torch.long)
    mask[1, 5] = 0
    return pixels, ids, mask


def _reference_tower(encoder, x, prompts, k, bias_fn=None):
    """Every layer by hand: prompts[:, i - k] in front of the tokens of layer i >= k, dropped after it."""
    for i, layer in enumerate(encoder.layers):
        n = prompts.shape[2] if k <= i < k + prompts.shape[1] else 0
        if n:
            x = torch.cat([prompts[:, i - k], x], dim=1)
        x = layer(x, bias_fn(n) if bias_fn else None)
        x = x[:, n:]
    return x


@pytest.mark.parametrize("k", [0, 1, 2])
def test_trunk_then_continuation_equals_one_pass_with_prompts_from_layer_k(model, k):
    from diffprompt.training.models.grounding import causal_padding_bias

    pixels, ids, mask = _inputs(model)
    v, t = model.config.vision, model.config.text
    depth_v, depth_t = v.num_hidden_layers - k, t.num_hidden_layers - k
    vp = torch.randn(2, depth_v, 3, v.hidden_size)
    tp = torch.randn(2, depth_t, 3, t.hidden_size)
    with torch.no_grad():
        image = model.continue_image(model.image_trunk(pixels, k), k, vp)
        text = model.continue_text(model.text_trunk(ids, mask, k), ids, mask, k, tp)
        want_v = model.image_features(_reference_tower(model.vision_model.encoder, model.vision_model.embed(pixels),
                                                       vp, k))
        bias = lambda n: causal_padding_bias(mask, n, torch.float32)
        want_t = model.text_features(_reference_tower(model.text_model.encoder, model.text_model.embeddings(ids),
                                                      tp, k, bias), ids)
    assert torch.allclose(image.patch_embeds, want_v.patch_embeds, atol=1e-5)
    assert torch.allclose(text.query_embeds, want_t.query_embeds, atol=1e-5)
    if k == 0:  # no trunk: the ordinary prompted pass, exactly
        assert torch.equal(image.patch_embeds, model.encode_image(pixels, vp).patch_embeds)
        assert torch.equal(text.query_embeds, model.encode_text(ids, mask, tp).query_embeds)


def test_an_unprompted_split_pass_is_the_unprompted_pass(model):
    pixels, ids, mask = _inputs(model)
    with torch.no_grad():
        image = model.continue_image(model.image_trunk(pixels, 1), 1)
        text = model.continue_text(model.text_trunk(ids, mask, 1), ids, mask, 1)
        assert torch.equal(image.patch_embeds, model.encode_image(pixels).patch_embeds)
        assert torch.equal(text.query_embeds, model.encode_text(ids, mask).query_embeds)


def test_prompts_deeper_than_the_layers_left_are_refused(model):
    pixels, _, _ = _inputs(model)
    v = model.config.vision
    hidden = model.image_trunk(pixels, v.num_hidden_layers - 1)
    with pytest.raises(ValueError, match="exceeds the tower's 1 layers from layer 2"):
        model.continue_image(hidden, v.num_hidden_layers - 1, torch.zeros(2, 2, 3, v.hidden_size))
