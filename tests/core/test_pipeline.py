"""The numpy pieces of the one inference pipeline: sigmoid, seeded noise, the pointer fusion."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from diffprompt.core.pipeline import fuse_pointer, initial_noise, sigmoid


def test_sigmoid_is_exact_and_never_overflows():
    x = np.linspace(-30, 30, 241)
    np.testing.assert_allclose(sigmoid(x), 1 / (1 + np.exp(-x)), rtol=1e-12, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # np.exp(1e4) would warn "overflow encountered in exp"
        extreme = sigmoid(np.array([-1e4, 1e4], dtype=np.float32))
    assert extreme.tolist() == [0.0, 1.0] and extreme.dtype == np.float32


def test_noise_depends_on_its_own_seed_only():
    a = initial_noise([1, 2], (4, 2, 2))
    b = initial_noise([2], (4, 2, 2))
    assert a.shape == (2, 4, 2, 2) and a.dtype == np.float32
    np.testing.assert_array_equal(a[1], b[0])
    assert not np.allclose(a[0], a[1])


def test_fusion_adds_the_weighted_last_map_channel_patch_by_patch():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 9)).astype(np.float32)  # 3 x 3 patches, one box each
    maps = rng.standard_normal((2, 2, 3, 3)).astype(np.float32)  # channel 0: patch scores, 1: pointer
    fused = fuse_pointer(logits, maps, 0.5)
    np.testing.assert_allclose(fused, logits + 0.5 * maps[:, 1].reshape(2, 9), rtol=1e-6)
    assert fused.dtype == np.float32
    maps[0, 1, 2, 1] = 100.0  # the pointer is sure of patch (row 2, col 1) = box 7 of image 0
    assert fuse_pointer(logits, maps, 1.0)[0].argmax() == 7
    np.testing.assert_array_equal(fuse_pointer(logits, maps, 0.0), logits)
    with pytest.raises(ValueError, match="does not match"):
        fuse_pointer(logits[:, :4], maps, 1.0)
