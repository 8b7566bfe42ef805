"""Initialisers: shapes, dtypes, statistics, determinism, registry."""

import numpy as np
import pytest

from nprune.init import (INITIALIZERS, get_initializer, glorot_normal, glorot_uniform, he_normal,
                         lecun_uniform, zeros)


@pytest.mark.parametrize("name", sorted(INITIALIZERS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_shape_and_dtype(name, dtype):
    fn = get_initializer(name)
    w = fn(np.random.default_rng(0), (5, 3, 2, 2), 12, 20, dtype=dtype)
    assert w.shape == (5, 3, 2, 2) and w.dtype == dtype


def test_glorot_normal_std():
    w = glorot_normal(np.random.default_rng(0), (784, 300), 784, 300)
    assert abs(w.mean()) < 0.003
    assert w.std() == pytest.approx(np.sqrt(2 / (784 + 300)), rel=0.02)


def test_glorot_uniform_std_and_bounds():
    w = glorot_uniform(np.random.default_rng(0), (784, 300), 784, 300)
    limit = np.sqrt(6 / (784 + 300))
    assert np.abs(w).max() <= limit
    assert w.std() == pytest.approx(limit / np.sqrt(3), rel=0.02)


def test_lecun_uniform_bounds_and_std():
    # Caffe's xavier filler (variance_norm FAN_IN): U(-sqrt(3/fan_in), sqrt(3/fan_in)), var 1/fan_in
    w = lecun_uniform(np.random.default_rng(0), (50, 20, 5, 5), 500, 1250)
    limit = np.sqrt(3 / 500)
    assert np.abs(w).max() <= limit
    assert w.std() == pytest.approx(np.sqrt(1 / 500), rel=0.03)


def test_he_normal_std():
    w = he_normal(np.random.default_rng(0), (500, 50), 500)
    assert w.std() == pytest.approx(np.sqrt(2 / 500), rel=0.03)


def test_conv_fans():
    # Conv convention: fan_in = C*kh*kw, fan_out = F*kh*kw.
    f, c, k = 50, 20, 5
    w = glorot_normal(np.random.default_rng(0), (f, c, k, k), c * k * k, f * k * k)
    assert w.std() == pytest.approx(np.sqrt(2 / ((c + f) * k * k)), rel=0.03)


def test_zeros():
    assert not zeros(np.random.default_rng(0), (3, 4)).any()


def test_determinism_and_dtype_independence():
    a = glorot_normal(np.random.default_rng(42), (30, 20), 30, 20)
    b = glorot_normal(np.random.default_rng(42), (30, 20), 30, 20)
    c = glorot_normal(np.random.default_rng(43), (30, 20), 30, 20)
    d = glorot_normal(np.random.default_rng(42), (30, 20), 30, 20, dtype=np.float64)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(a, d.astype(np.float32))


def test_global_state_untouched():
    np.random.seed(0)
    before = np.random.get_state()[1].copy()
    glorot_normal(np.random.default_rng(1), (10, 10), 10, 10)
    np.testing.assert_array_equal(before, np.random.get_state()[1])


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown initializer"):
        get_initializer("nope")
    assert get_initializer("he_normal") is he_normal
    with pytest.raises(TypeError):
        glorot_normal(np.random, (2, 2), 2, 2)
