"""The numpy pieces of the one inference pipeline: sigmoid and seeded noise."""

from __future__ import annotations

import warnings

import numpy as np

from diffprompt.core.pipeline import initial_noise, sigmoid


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
