"""Softmax cross-entropy: value, gradient, dtype preservation, stability."""

import numpy as np
import pytest

from nprune.gradcheck import eval_numerical_gradient, rel_error
from nprune.losses import accuracy, softmax, softmax_cross_entropy


def test_value_matches_direct_formula():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((7, 10))
    y = rng.integers(0, 10, 7)
    loss, _ = softmax_cross_entropy(logits, y)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert isinstance(loss, float)
    assert loss == pytest.approx(-np.mean(np.log(p[np.arange(7), y])), rel=1e-12)


def test_gradient_check():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((5, 4))
    y = rng.integers(0, 4, 5)
    _, d = softmax_cross_entropy(logits, y)
    num = eval_numerical_gradient(lambda z: softmax_cross_entropy(z, y)[0], logits)
    assert rel_error(d, num) < 1e-7


def test_float32_preserved_and_input_untouched():
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((6, 10)).astype(np.float32)
    copy = logits.copy()
    y = rng.integers(0, 10, 6)
    loss, d = softmax_cross_entropy(logits, y)
    assert d.dtype == np.float32 and isinstance(loss, float)
    np.testing.assert_array_equal(logits, copy)
    assert softmax(logits).dtype == np.float32


def test_stable_for_huge_logits():
    logits = np.array([[1000.0, 0.0, -1000.0], [0.0, 1000.0, 0.0]])
    loss, d = softmax_cross_entropy(logits, np.array([0, 1]))
    assert np.isfinite(loss) and loss == pytest.approx(0.0, abs=1e-12)
    assert np.all(np.isfinite(d))
    np.testing.assert_allclose(softmax(logits).sum(1), 1.0)


def test_accuracy():
    logits = np.array([[1.0, 2.0], [3.0, 0.0], [0.0, 1.0]])
    assert accuracy(logits, np.array([1, 0, 0])) == pytest.approx(2 / 3)


def test_bad_shapes():
    with pytest.raises(ValueError):
        softmax_cross_entropy(np.zeros((3, 2)), np.zeros(4, dtype=int))
