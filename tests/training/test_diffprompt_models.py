"""Stage 1-3 models: Mask-VAE helpers, the DiT, the DDIM prompt sampler, prompt learners, the pipeline."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch

from diffprompt.core.images import mask_from_input_frame, mask_to_input_frame
from diffprompt.training.models.diffprompt import DiffPromptPipeline, foundation_conditions, weights_fingerprint
from diffprompt.training.models.grounding import GROUNDING_PRESETS, GroundingModel
from diffprompt.training.models.mask_vae import MaskVAE, build_mask_vae, decode_latents, encode_masks, mask_iou
from diffprompt.training.models.pretrained import CheckpointError
from diffprompt.training.models.prompt_dit import PROMPT_DIT_PRESETS, PromptDiT, PromptDiTConfig, referred_patch
from diffprompt.training.models.prompt_learners import (
    LEARNERS,
    MASK_INPUTS,
    METHODS,
    LearnerConfig,
    PromptLearner,
    prompted_forward,
    register,
    standardize_masks,
)
from diffprompt.training.models.prompt_sampler import (
    initial_noise,
    kept_outputs,
    make_scheduler,
    output_noise_levels,
    sample_prompt_latents,
)

# ----------------------------------------------------------------------------- masks and VAE


@pytest.mark.parametrize("mode", ["pad", "stretch"])
def test_mask_frame_round_trip(mode):
    mask = np.zeros((60, 100), dtype=bool)
    mask[10:40, 20:70] = True
    small = mask_to_input_frame(mask, 32, mode)
    assert small.shape == (32, 32) and small.dtype == bool
    back = mask_from_input_frame(small.astype(np.float32), 100, 60, mode)
    assert back.shape == (60, 100)
    inter, union = (back & mask).sum(), (back | mask).sum()
    assert inter / union > 0.85
    if mode == "pad":  # the padded bottom of the square stays empty
        assert not small[20:].any()


def test_mask_iou_cases():
    a = torch.zeros(3, 4, 4, dtype=torch.bool)
    b = a.clone()
    a[0, :2] = True
    b[0, :1] = True  # half of a
    a[1, 0, 0] = True  # disjoint from b[1]
    b[1, 3, 3] = True
    # sample 2: both empty -> 1
    assert mask_iou(a, b).tolist() == pytest.approx([0.5, 0.0, 1.0])


def test_mask_vae_shapes_and_save_load(tmp_path):
    vae = build_mask_vae("baby").eval()
    masks = torch.zeros(2, 16, 16, dtype=torch.bool)
    masks[0, 4:10, 4:10] = True
    z = encode_masks(vae, masks)
    assert z.shape == (2, 4, 8, 8)
    logits = decode_latents(vae, z)
    assert logits.shape == (2, 1, 16, 16)
    vae.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "model.safetensors"}
    again = MaskVAE.from_pretrained(tmp_path)
    torch.testing.assert_close(decode_latents(again, z), logits)


# ----------------------------------------------------------------------------- sampler


def test_kept_outputs_follow_the_paper_at_25_steps():
    sched = make_scheduler()
    # every 2nd output counting back from the final x0; the shallowest layer gets x0
    assert kept_outputs(sched, 25, 9) == [24, 22, 20, 18, 16, 14, 12, 10, 8]


@pytest.mark.parametrize("steps", [1, 5, 10, 50])
def test_kept_outputs_at_other_step_counts_are_valid_and_clean_first(steps):
    sched = make_scheduler()
    keep = kept_outputs(sched, steps, 9)
    assert all(0 <= k < steps for k in keep)
    assert keep[0] == steps - 1  # the final x0 always goes to the first layer
    levels = output_noise_levels(sched, steps)[keep]
    assert np.all(np.diff(levels) >= 0)  # deeper layers never get a cleaner latent


def test_kept_outputs_rejects_nonsense():
    with pytest.raises(ValueError, match="steps"):
        kept_outputs(make_scheduler(), 0, 3)


def test_initial_noise_is_per_seed():
    a = initial_noise([1, 2], (4, 2, 2))
    b = initial_noise([2], (4, 2, 2))
    assert a.dtype == np.float32 and a.shape == (2, 4, 2, 2)
    np.testing.assert_array_equal(a[1], b[0])  # independent of the batch it is drawn in
    assert not np.array_equal(a[0], a[1])


class _OracleDiT(torch.nn.Module):
    """Predicts the exact noise of a known x0: DDIM must then land on x0 for any step count."""

    def __init__(self, x0, sched):
        super().__init__()
        self.x0, self.sched = x0, sched
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.config = argparse.Namespace(latent_channels=x0.shape[1], latent_size=x0.shape[-1])

    def prepare_conditions(self, **conditions):  # the sampler's interface (PromptDiT)
        return conditions

    def denoise(self, x, t, prepared):
        a = self.sched.alphas_cumprod[t.long()].view(-1, 1, 1, 1)
        return (x - a.sqrt() * self.x0) / (1 - a).sqrt()


@pytest.mark.parametrize("steps", [25, 5])
def test_ddim_with_an_oracle_denoiser_returns_x0(steps):
    sched = make_scheduler()
    x0 = torch.randn(3, 4, 8, 8)
    kept = sample_prompt_latents(_OracleDiT(x0, sched), sched, {}, [0, 1, 2], steps, depth=3)
    assert kept.shape == (3, 3, 4, 8, 8)
    torch.testing.assert_close(kept[:, 0], x0, atol=1e-4, rtol=1e-4)
    assert (kept[:, 2] - x0).abs().mean() > (kept[:, 0] - x0).abs().mean()  # deeper = noisier


# ----------------------------------------------------------------------------- DiT


def _dit(conditioning: str, context_layers: int = 0) -> PromptDiT:
    torch.manual_seed(0)
    dit = PromptDiT(PromptDiTConfig(conditioning=conditioning, latent_size=8, image_embed_dim=32, text_embed_dim=32,
                                    image_token_dim=32, text_token_dim=32, image_grid=8, context_layers=context_layers,
                                    **PROMPT_DIT_PRESETS["baby"]))
    for p in dit.parameters():  # leave the zero-init so outputs depend on inputs
        p.data.add_(torch.randn_like(p) * 0.05)
    return dit.eval()


def _cond(B: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, 16)
    mask[:, 10:] = 0
    return {"image_embed": torch.randn(B, 32, generator=g), "text_embed": torch.randn(B, 32, generator=g),
            "image_tokens": torch.randn(B, 65, 32, generator=g), "text_tokens": torch.randn(B, 16, 32, generator=g),
            "text_mask": mask, "patch_scores": torch.randn(B, 64, generator=g)}


def test_dit_starts_as_zero_predictor():
    dit = PromptDiT(PromptDiTConfig(conditioning="tokens", image_embed_dim=32, text_embed_dim=32, image_token_dim=32,
                                    text_token_dim=32, **PROMPT_DIT_PRESETS["baby"]))
    out = dit(torch.randn(2, 4, 8, 8), torch.tensor([3, 50]), **_cond(2))
    assert out.shape == (2, 4, 8, 8) and out.abs().max() == 0  # adaLN-Zero + zero output layer


@pytest.mark.parametrize("conditioning,context_layers", [("pooled", 0), ("tokens", 0), ("tokens", 2)])
def test_dit_batch_equals_single(conditioning, context_layers):
    dit = _dit(conditioning, context_layers)
    x, t, cond = torch.randn(3, 4, 8, 8), torch.tensor([1, 40, 99]), _cond(3)
    with torch.no_grad():
        full = dit(x, t, **cond)
        for i in range(3):
            one = dit(x[i: i + 1], t[i: i + 1], **{k: v[i: i + 1] for k, v in cond.items()})
            torch.testing.assert_close(one[0], full[i], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("context_layers", [0, 2])
def test_dit_token_conditioning_ignores_padding_and_needs_tokens(context_layers):
    dit = _dit("tokens", context_layers)
    x, t, cond = torch.randn(1, 4, 8, 8), torch.tensor([10]), _cond(1)
    with torch.no_grad():
        ref = dit(x, t, **cond)
        cond["text_tokens"][:, 12] += 5.0  # a padding position
        torch.testing.assert_close(dit(x, t, **cond), ref)
        cond["text_tokens"][:, 2] += 5.0  # a real token
        assert not torch.allclose(dit(x, t, **cond), ref)
        ref = dit(x, t, **cond)
        cond["patch_scores"][:, 5] += 3.0  # the foundation's score map is an input too
        assert not torch.allclose(dit(x, t, **cond), ref)
        with pytest.raises(ValueError, match="image_tokens"):
            dit(x, t, image_embed=cond["image_embed"], text_embed=cond["text_embed"])


@pytest.mark.parametrize("conditioning,context_layers", [("pooled", 0), ("tokens", 0), ("tokens", 2)])
def test_dit_forward_is_prepare_then_denoise(conditioning, context_layers):
    """The sampler computes the condition part once (prepare_conditions) and calls denoise per
    step; the exported denoiser graph calls forward. Both must give the same output."""
    dit = _dit(conditioning, context_layers)
    x, t, cond = torch.randn(2, 4, 8, 8), torch.tensor([3, 77]), _cond(2)
    if conditioning == "pooled":
        cond = {k: cond[k] for k in ("image_embed", "text_embed")}
    with torch.no_grad():
        torch.testing.assert_close(dit.denoise(x, t, dit.prepare_conditions(**cond)), dit(x, t, **cond))


def test_pointer_head_scores_every_patch_and_ignores_the_noisy_latents():
    dit = _dit("tokens", context_layers=2)
    cond = _cond(2)
    with torch.no_grad():
        out, logits = dit(torch.randn(2, 4, 8, 8), torch.tensor([3, 77]), **cond, return_pointer=True)
        _, again = dit(torch.randn(2, 4, 8, 8), torch.tensor([50, 1]), **cond, return_pointer=True)
    assert out.shape == (2, 4, 8, 8) and logits.shape == (2, 64)
    torch.testing.assert_close(logits, again)  # a function of the conditions only
    with pytest.raises(ValueError, match="context_layers"):
        _dit("tokens")(torch.randn(1, 4, 8, 8), torch.tensor([3]), **_cond(1), return_pointer=True)
    with pytest.raises(ValueError, match="context_layers needs conditioning='tokens'"):
        PromptDiT(PromptDiTConfig(conditioning="pooled", context_layers=1))


def test_pointer_head_learns_to_find_the_referred_patch():
    """The pointer's cross-entropy alone trains the context layers to pick the patch whose image
    token carries a marker feature, which random weights do at chance (1/64)."""
    torch.manual_seed(0)
    dit = PromptDiT(PromptDiTConfig(conditioning="tokens", latent_size=8, image_embed_dim=32, text_embed_dim=32,
                                    image_token_dim=32, text_token_dim=32, image_grid=8, context_layers=2,
                                    **PROMPT_DIT_PRESETS["baby"]))
    opt = torch.optim.AdamW(dit.parameters(), lr=3e-3)

    def batch(seed):
        cond = _cond(32, seed)
        target = torch.randint(0, 64, (32,), generator=torch.Generator().manual_seed(seed))
        cond["image_tokens"][torch.arange(32), 1 + target, 0] += 4.0
        return cond, target

    x, t = torch.zeros(32, 4, 8, 8), torch.zeros(32, dtype=torch.long)
    for step in range(150):
        cond, target = batch(step)
        _, logits = dit(x, t, **cond, return_pointer=True)
        loss = torch.nn.functional.cross_entropy(logits, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    cond, target = batch(10_000)
    with torch.no_grad():
        _, logits = dit(x, t, **cond, return_pointer=True)
    assert (logits.argmax(1) == target).float().mean() > 0.8


def test_referred_patch_is_the_cell_of_the_mask_centroid():
    masks = torch.zeros(3, 32, 32, dtype=torch.bool)
    masks[0, 0:4, 0:4] = True  # top-left cell of an 8x8 grid
    masks[1, 28:32, 20:24] = True  # row 7, column 5
    masks[2, 10:14, 2:30] = True  # a wide bar: centroid x 16 -> column 4, y 12 -> row 3
    assert referred_patch(masks, 8).tolist() == [0, 7 * 8 + 5, 3 * 8 + 4]
    assert referred_patch(masks, 4).tolist() == [0, 3 * 4 + 2, 1 * 4 + 2]


def test_dit_rejects_unknown_conditioning():
    with pytest.raises(ValueError, match="conditioning"):
        PromptDiT(PromptDiTConfig(conditioning="cross"))


# ----------------------------------------------------------------------------- learners


def _foundation() -> GroundingModel:
    torch.manual_seed(0)
    return GroundingModel(GROUNDING_PRESETS["baby"](vocab_size=40)).eval()


def test_each_method_gives_prompts_of_the_right_shape():
    f = _foundation()  # 1 image layer, 1 text layer
    masks = torch.randn(2, 1, 1, 32, 32)
    expected = {"diffprompt": (True, True), "vpt": (True, False), "coop": (False, True), "maple": (True, True),
                "clip_adapter": (False, False), "linear_probe": (False, False)}
    for method in METHODS:
        learner = PromptLearner.for_foundation(f, method)
        v, t = learner.prompts(2, masks if learner.needs_masks else None)
        assert (v is not None, t is not None) == expected[method], method
        if v is not None:
            assert v.shape == (2, 1, 8, 32)
        if t is not None:
            assert t.shape == (2, 1, 8, 32)


OWN_PARAMETERS = {  # each method's trainable modules, and nothing else
    "diffprompt": {"vision_adapter", "text_adapter", "vision_global", "text_global"},
    "vpt": {"vision_prompts"}, "coop": {"text_prompts"}, "maple": {"text_prompts", "couplers"},
    "clip_adapter": {"patch_adapter", "query_adapter"}, "linear_probe": {"class_head", "box_head"},
}


@pytest.mark.parametrize("method", METHODS)
def test_each_method_is_a_registered_class_with_only_its_own_parameters(method):
    learner = PromptLearner.for_foundation(_foundation(), method)
    assert type(learner) is LEARNERS[method] and learner.method == learner.config.method == method
    assert {name.split(".")[0] for name, _ in learner.named_parameters()} == OWN_PARAMETERS[method]


def test_a_new_method_is_one_registered_class(tmp_path):
    """Registering a class is all a method needs: built from its name, saved, loaded back as itself."""

    @register("text_bias")
    class TextBias(PromptLearner):
        towers = ("text",)

        def __init__(self, config):
            super().__init__(config)
            self.bias = torch.nn.Parameter(torch.zeros(self.text_depth, config.length, config.text_width))

        def prompts(self, batch_size, masks=None):
            return None, self.bias[None].expand(batch_size, *self.bias.shape)

    try:
        learner = PromptLearner.for_foundation(_foundation(), "text_bias", length=2)
        learner.bias.data.fill_(0.5)
        learner.save_pretrained(tmp_path)
        again = PromptLearner.from_pretrained(tmp_path)
        assert isinstance(again, TextBias) and torch.equal(again.bias, learner.bias)
        _, text = again.prompts(3)
        assert text.shape == (3, 1, 2, 32)
    finally:
        del LEARNERS["text_bias"]


def test_prompt_depth_is_capped_by_each_tower():
    cfg = GROUNDING_PRESETS["embedded"](vocab_size=40)
    learner = PromptLearner.from_config(LearnerConfig(method="diffprompt", vision_layers=cfg.vision.num_hidden_layers,
                                                      text_layers=cfg.text.num_hidden_layers, depth=9))
    assert (learner.vision_depth, learner.text_depth, learner.mask_layers) == (6, 3, 6)
    vpt = PromptLearner.from_config(LearnerConfig(method="vpt", depth=3))
    assert (vpt.vision_depth, vpt.text_depth, vpt.mask_layers) == (3, 0, 0)


def test_diffprompt_prompts_stay_with_their_sample():
    """The official code mixes per-sample prompts across the batch (repeat instead of repeat_interleave)."""
    learner = PromptLearner.for_foundation(_foundation(), "diffprompt")
    masks = torch.randn(3, 1, 1, 32, 32)
    v, t = learner.prompts(3, masks)
    changed = masks.clone()
    changed[1] = torch.randn(1, 1, 32, 32)
    v2, t2 = learner.prompts(3, changed)
    torch.testing.assert_close(v2[0], v[0])
    torch.testing.assert_close(v2[2], v[2])
    torch.testing.assert_close(t2[0], t[0])
    assert not torch.allclose(v2[1], v[1])


def test_diffprompt_needs_masks_and_an_even_length():
    learner = PromptLearner.for_foundation(_foundation(), "diffprompt")
    with pytest.raises(ValueError, match="masks"):
        learner.prompts(2, None)
    with pytest.raises(ValueError, match="even"):
        PromptLearner.from_config(LearnerConfig(method="diffprompt", length=7))
    with pytest.raises(ValueError, match="method"):
        PromptLearner.from_config(LearnerConfig(method="nope"))


def _blob_masks(centres: list[tuple[int, int]], size: int = 32) -> torch.Tensor:
    """(B, 1, size, size) decoded-mask-like logits: -1 background, +1 on a 5x5 blob per centre."""
    masks = -torch.ones(len(centres), 1, size, size)
    for i, (row, col) in enumerate(centres):
        masks[i, 0, row - 2: row + 3, col - 2: col + 3] = 1.0
    return masks


def test_standardized_masks_have_zero_mean_and_unit_variance_per_mask():
    masks = torch.cat([_blob_masks([(8, 8)]) * 0.3 - 2.0, torch.randn(1, 1, 32, 32) * 5, -torch.ones(1, 1, 32, 32)])
    z = standardize_masks(masks)
    torch.testing.assert_close(z.mean((2, 3)), torch.zeros(3, 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(z[:2].pow(2).mean((2, 3)), torch.ones(2, 1), atol=0.03, rtol=0)  # eps 1e-3 vs std 0.09
    assert torch.equal(z[2], torch.zeros_like(z[2]))  # a flat mask carries nothing, and stays finite


def test_standardized_adapter_reads_where_the_mask_is_not_its_logit_scale():
    """The default adapter input: a blob's place moves the generated tokens, the decoder's logit scale does not."""
    torch.manual_seed(0)
    learner = PromptLearner.for_foundation(_foundation(), "diffprompt").eval()
    assert learner.config.mask_input == "standardize"
    tanh = PromptLearner.for_foundation(_foundation(), "diffprompt", mask_input="tanh").eval()
    tanh.load_state_dict(learner.state_dict())  # same weights, other input
    blob, moved = _blob_masks([(8, 8)]), _blob_masks([(24, 20)])
    change = lambda adapter, other: ((adapter(other) - adapter(blob)).norm() / adapter(blob).norm()).item()  # noqa: E731
    with torch.no_grad():
        assert change(learner.vision_adapter, 3.0 * blob + 0.5) < 0.01
        assert change(learner.text_adapter, 3.0 * blob + 0.5) < 0.01
        assert change(learner.vision_adapter, moved) > 0.5
        assert change(tanh.vision_adapter, 3.0 * blob + 0.5) > 0.05  # tanh: the scale leaks into the tokens


def test_mask_input_is_checked():
    assert MASK_INPUTS == ("standardize", "tanh")
    with pytest.raises(ValueError, match="mask_input"):
        PromptLearner.from_config(LearnerConfig(method="diffprompt", mask_input="sigmoid"))


@pytest.mark.parametrize("method", METHODS)
def test_learner_save_load_round_trip(method, tmp_path):
    f = _foundation()
    kw = {"mask_input": "tanh"} if method == "diffprompt" else {}  # a non-default setting survives the trip
    learner = PromptLearner.for_foundation(f, method, **kw).eval()
    for p in learner.parameters():
        p.data.add_(torch.randn_like(p) * 0.1)
    learner.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "model.safetensors"}
    assert json.loads((tmp_path / "config.json").read_text())["method"] == method
    again = PromptLearner.from_pretrained(tmp_path)
    assert type(again) is LEARNERS[method] and again.config == learner.config
    pixels, ids = torch.randn(2, 3, 128, 128), torch.tensor([[5, 6, 39, 0], [7, 39, 0, 0]])
    mask = (ids > 0).long()
    masks = torch.randn(2, 1, 1, 32, 32) if learner.needs_masks else None
    with torch.no_grad():
        a = prompted_forward(f, learner, pixels, ids, mask, masks)
        b = prompted_forward(f, again, pixels, ids, mask, masks)
    torch.testing.assert_close(a.logits, b.logits)
    torch.testing.assert_close(a.pred_boxes, b.pred_boxes)
    assert a.logits.shape == (2, f.config.num_patches, 1)


def test_linear_probe_starts_equal_to_the_foundation():
    f = _foundation()
    learner = PromptLearner.for_foundation(f, "linear_probe")
    pixels, ids = torch.randn(1, 3, 128, 128), torch.tensor([[5, 39]])
    with torch.no_grad():
        a = prompted_forward(f, learner, pixels, ids, torch.ones_like(ids))
        b = prompted_forward(f, None, pixels, ids, torch.ones_like(ids))
    torch.testing.assert_close(a.logits, b.logits)


# ----------------------------------------------------------------------------- pipeline


@pytest.fixture(scope="module")
def tiny_pipeline(tiny_pipeline_dir):
    """A randomly initialised pipeline saved to disk and loaded back."""
    return DiffPromptPipeline.from_pretrained(tiny_pipeline_dir, steps=5)


def _inputs(pipeline, n=3):
    tok = pipeline.tokenizer
    ids, mask = tok(["the red circle", "the second star from the left", "the square left of the blue circle"][:n])
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 128, 128, generator=g), torch.from_numpy(ids), torch.from_numpy(mask)


def test_pipeline_refuses_a_learner_saved_before_mask_input(tiny_pipeline_dir, tmp_path):
    """Such a learner read tanh of its masks: loading it with today's default would change it silently."""
    import json
    import shutil

    old = tmp_path / "old"
    shutil.copytree(tiny_pipeline_dir, old)
    for name in ("foundation", "vae", "dit"):  # pipeline.json points one level up
        (tmp_path / name).symlink_to(tiny_pipeline_dir.parent / name)
    cfg = json.loads((old / "config.json").read_text())
    del cfg["mask_input"]
    (old / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="mask_input"):
        DiffPromptPipeline.from_pretrained(old)
    cfg["mask_input"] = "tanh"
    (old / "config.json").write_text(json.dumps(cfg))
    assert DiffPromptPipeline.from_pretrained(old).learner.config.mask_input == "tanh"


def test_pipeline_same_seed_same_result(tiny_pipeline):
    pixels, ids, mask = _inputs(tiny_pipeline)
    a, ma = tiny_pipeline(pixels, ids, mask, [1, 2, 3])
    b, mb = tiny_pipeline(pixels, ids, mask, [1, 2, 3])
    assert torch.equal(a.logits, b.logits) and torch.equal(a.pred_boxes, b.pred_boxes) and torch.equal(ma, mb)
    c, mc = tiny_pipeline(pixels, ids, mask, [7, 2, 3])
    assert not torch.equal(mc[0], ma[0])  # another seed, another sample
    torch.testing.assert_close(mc[1:], ma[1:])


def test_pipeline_batch_equals_one_by_one(tiny_pipeline):
    pixels, ids, mask = _inputs(tiny_pipeline)
    full, masks = tiny_pipeline(pixels, ids, mask, [11, 12, 13])
    assert masks.shape == (3, 1, 1, 16, 16)
    for i in range(3):
        one, m1 = tiny_pipeline(pixels[i: i + 1], ids[i: i + 1], mask[i: i + 1], [11 + i])
        torch.testing.assert_close(one.logits[0], full.logits[i], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(one.pred_boxes[0], full.pred_boxes[i], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(m1[0], masks[i], atol=1e-4, rtol=1e-4)


def test_conditions_come_from_the_unprompted_foundation(tiny_pipeline):
    pixels, ids, mask = _inputs(tiny_pipeline, 2)
    cond = foundation_conditions(tiny_pipeline.foundation, pixels, ids, mask)
    image = tiny_pipeline.foundation.encode_image(pixels)
    torch.testing.assert_close(cond["image_embed"], image.pooled)
    torch.testing.assert_close(cond["image_tokens"], image.tokens)
    assert set(foundation_conditions(tiny_pipeline.foundation, pixels, ids, mask, tokens=False)) == {
        "image_embed", "text_embed"}


def test_a_pipeline_directory_holds_its_parts_and_moves_as_one(tiny_pipeline_dir, tmp_path):
    """write_pipeline_file links the foundation, Mask-VAE and DiT into the directory: move it, it still loads."""
    import shutil

    from diffprompt.training.models.diffprompt import PIPELINE_FILE, write_pipeline_file

    parts = tiny_pipeline_dir.parent
    first = tmp_path / "first"
    first.mkdir()
    for name in ("config.json", "model.safetensors"):  # the learner
        shutil.copy(tiny_pipeline_dir / name, first / name)
    write_pipeline_file(first, parts / "foundation", parts / "vae", parts / "dit")
    spec = json.loads((first / PIPELINE_FILE).read_text())
    assert spec == {"foundation": "foundation", "mask_vae": "mask_vae", "prompt_dit": "prompt_dit"}
    weights = first / "foundation" / "model.safetensors"
    assert weights.stat().st_ino == (parts / "foundation" / "model.safetensors").stat().st_ino  # linked, not copied
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(str(first), moved)
    pipe = DiffPromptPipeline.from_pretrained(moved, steps=5)
    assert pipe.dit is not None and pipe.vae is not None
    write_pipeline_file(moved, moved / "foundation", moved / "mask_vae", moved / "prompt_dit")  # rewriting in place
    assert DiffPromptPipeline.from_pretrained(moved, steps=5).learner is not None


def test_pointer_fusion_adds_the_weighted_pointer_map_to_the_prompted_logits(tiny_pipeline, fused_pipeline_dir):
    fused = DiffPromptPipeline.from_pretrained(fused_pipeline_dir, steps=5)
    assert fused.pointer_weight == 1.5
    pixels, ids, mask = _inputs(tiny_pipeline)
    plain, masks = tiny_pipeline(pixels, ids, mask, [1, 2, 3])
    out, fused_masks = fused(pixels, ids, mask, [1, 2, 3])
    torch.testing.assert_close(fused_masks, masks)  # the fusion changes scores, not what the prompts see
    torch.testing.assert_close(out.pred_boxes, plain.pred_boxes)
    cond = foundation_conditions(tiny_pipeline.foundation, pixels, ids, mask)
    log_p = torch.log_softmax(tiny_pipeline.dit.prepare_conditions(**cond)["pointer_logits"], -1)
    relative = log_p + math.log(log_p.shape[1])  # relative to uniform: 0 where the pointer has no opinion
    torch.testing.assert_close(fused.pointer_map(cond), relative, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits[..., 0], plain.logits[..., 0] + 1.5 * relative, atol=1e-4, rtol=1e-4)


def test_pointer_ranking_ranks_the_foundations_boxes_by_the_pointer(tiny_pipeline, tiny_pipeline_dir):
    root = tiny_pipeline_dir.parent
    ranking = DiffPromptPipeline.pointer_ranking(root / "foundation", root / "dit")
    assert ranking.learner is None and ranking.vae is None
    pixels, ids, mask = _inputs(tiny_pipeline)
    out, masks = ranking(pixels, ids, mask, [0, 0, 0])
    assert masks is None
    base = tiny_pipeline.foundation(pixels, ids, mask)
    torch.testing.assert_close(out.pred_boxes, base.pred_boxes)  # the foundation's own boxes
    cond = foundation_conditions(tiny_pipeline.foundation, pixels, ids, mask)
    pointer = tiny_pipeline.dit.prepare_conditions(**cond)["pointer_logits"]
    top = lambda x: x.argsort(-1, descending=True)[:, :3]
    assert torch.equal(top(out.logits[..., 0]), top(pointer))
    again, _ = ranking(pixels, ids, mask, [5, 6, 7])  # no noise anywhere: the seed changes nothing
    assert torch.equal(again.logits, out.logits)


def test_pointer_weight_is_checked_and_changes_the_fingerprint(tiny_pipeline_dir, fused_pipeline_dir, tmp_path):
    import json
    import shutil

    assert weights_fingerprint(fused_pipeline_dir) != weights_fingerprint(tiny_pipeline_dir)
    bad = tiny_pipeline_dir.with_name("diffprompt_bad_weight")
    shutil.copytree(tiny_pipeline_dir, bad, dirs_exist_ok=True)
    spec = json.loads((bad / "pipeline.json").read_text())
    (bad / "pipeline.json").write_text(json.dumps({**spec, "pointer_weight": -1}))
    with pytest.raises(CheckpointError, match="pointer_weight"):
        DiffPromptPipeline.from_pretrained(bad)
