"""Layer tests: float64 gradient checks, fast kernels vs naive oracles, the mask contract, dtypes."""

import numpy as np
import pytest

from nprune.gradcheck import numerical_gradient, rel_error
from nprune.layers import Conv2D, Dense, Flatten, ReLU
from nprune.pooling import MaxPool2D
from nprune.reference import (conv2d_naive_backward, conv2d_naive_forward, maxpool_naive_backward,
                              maxpool_naive_forward)

F64 = np.float64
TOL = 1e-7


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def _randomise_bias(layer, rng):
    if "b" in layer.params:
        layer.params["b"][...] = rng.standard_normal(layer.params["b"].shape)


def check_layer_grads(layer, x, rng, mask=False):
    """Gradient-check dx and every parameter of ``layer`` at ``x`` with a random upstream grad."""
    _randomise_bias(layer, rng)
    if mask:
        for name in layer.prunable:
            layer.set_mask(name, rng.random(layer.params[name].shape) < 0.6)
    y = layer.forward(x)
    dout = rng.standard_normal(y.shape)
    dout_copy = dout.copy()
    dx = layer.backward(dout)
    np.testing.assert_array_equal(dout, dout_copy)  # backward never mutates dout
    grads = {k: v.copy() for k, v in layer.grads.items()}

    num_dx = numerical_gradient(lambda xx: layer.forward(xx, train=False), x, dout)
    assert rel_error(dx, num_dx) < TOL
    for name, p in layer.params.items():
        num = numerical_gradient(lambda _: layer.forward(x, train=False), p, dout)
        m = layer.masks.get(name)
        if m is not None:
            assert np.all(grads[name][m == 0] == 0)  # masked gradient entries exactly zero
            num = num * m
        assert rel_error(grads[name], num) < TOL, name
    return dx, grads


def _conv_size(out, k, s, p):
    return (out - 1) * s + k - 2 * p


CONV_CASES = [
    (c, (kh, kw), s, p)
    for c in (1, 3)
    for (kh, kw) in ((3, 3), (5, 5), (3, 2))
    for s in (1, 2)
    for p in (0, 1, 2)
]


def _conv_input(rng, c, kh, kw, s, p):
    oh = 3 if s == 1 else 3
    h = max(_conv_size(oh, kh, s, p), 1)
    w = max(_conv_size(oh + 1, kw, s, p), 1)
    while (h + 2 * p - kh) % s or h + 2 * p < kh:
        h += 1
    while (w + 2 * p - kw) % s or w + 2 * p < kw:
        w += 1
    return rng.standard_normal((2, c, h, w))


# ------------------------------------------------------------------ gradient checks (float64)
@pytest.mark.parametrize("mask", [False, True])
def test_dense_gradcheck(rng, mask):
    layer = Dense(6, 4, rng, dtype=F64)
    check_layer_grads(layer, rng.standard_normal((3, 6)), rng, mask=mask)


@pytest.mark.parametrize("c,k,s,p", CONV_CASES)
def test_conv_gradcheck(rng, c, k, s, p):
    layer = Conv2D(c, 2, k, rng, stride=s, padding=p, dtype=F64)
    x = _conv_input(rng, c, *k, s, p)
    check_layer_grads(layer, x, rng, mask=(s == 2 and p == 1))


def test_conv_gradcheck_masked(rng):
    layer = Conv2D(3, 4, 3, rng, padding=1, dtype=F64)
    check_layer_grads(layer, rng.standard_normal((2, 3, 5, 5)), rng, mask=True)


POOL_CASES = [  # (H, W, size, stride)
    (4, 6, 2, 2),   # tiling
    (6, 6, 3, 3),   # tiling, size 3
    (5, 7, 2, 2),   # non-divisible (floor mode)
    (7, 7, 3, 2),   # overlapping
    (5, 6, 2, 1),   # overlapping, stride 1
]


def _distinct(rng, shape):
    """Distinct values spaced 1/size apart (>> the finite-difference step): no ties."""
    n = int(np.prod(shape))
    return rng.permutation(n).reshape(shape).astype(F64) / n


@pytest.mark.parametrize("h,w,size,stride", POOL_CASES)
def test_maxpool_gradcheck(rng, h, w, size, stride):
    check_layer_grads(MaxPool2D(size, stride), _distinct(rng, (2, 3, h, w)), rng)


def test_relu_gradcheck(rng):
    x = rng.standard_normal((3, 2, 4, 4))
    x = np.sign(x) * (0.1 + np.abs(x))  # keep away from the kink
    check_layer_grads(ReLU(), x, rng)


def test_flatten_gradcheck(rng):
    x = rng.standard_normal((2, 3, 4, 5))
    dx, _ = check_layer_grads(Flatten(), x, rng)
    assert dx.shape == x.shape
    np.testing.assert_array_equal(Flatten().forward(x), x.reshape(2, 60))


# ------------------------------------------------------------------ fast == naive oracles
@pytest.mark.parametrize("c,k,s,p", CONV_CASES)
def test_conv_fast_matches_naive(rng, c, k, s, p):
    layer = Conv2D(c, 3, k, rng, stride=s, padding=p, dtype=F64)
    _randomise_bias(layer, rng)
    x = _conv_input(rng, c, *k, s, p)
    W, b = layer.params["W"], layer.params["b"]
    y = layer.forward(x)
    np.testing.assert_allclose(y, conv2d_naive_forward(x, W, b, s, p), rtol=1e-10, atol=1e-10)
    dout = rng.standard_normal(y.shape)
    dx = layer.backward(dout)
    ndx, ndW, ndb = conv2d_naive_backward(x, W, dout, s, p)
    np.testing.assert_allclose(dx, ndx, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(layer.grads["W"], ndW, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(layer.grads["b"], ndb, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("h,w,size,stride", POOL_CASES + [(24, 24, 2, 2)])
@pytest.mark.parametrize("ties", [False, True])
def test_maxpool_fast_matches_naive(rng, h, w, size, stride, ties):
    if ties:  # many exact ties (as after a ReLU): gradient must go to the first argmax only
        x = np.maximum(rng.integers(-3, 3, (2, 3, h, w)), 0).astype(F64)
    else:
        x = _distinct(rng, (2, 3, h, w))
    layer = MaxPool2D(size, stride)
    y = layer.forward(x)
    np.testing.assert_array_equal(y, maxpool_naive_forward(x, size, stride))
    dout = rng.standard_normal(y.shape)
    dx = layer.backward(dout)
    np.testing.assert_allclose(dx, maxpool_naive_backward(x, dout, size, stride),
                               rtol=1e-12, atol=1e-12)
    if stride >= size:  # tiling: exactly one routed position per window
        assert np.count_nonzero(dx) == np.count_nonzero(dout)


# ------------------------------------------------------------------ masks and parameters
def test_set_mask_zeroes_exactly_and_accepts_bool(rng):
    layer = Dense(10, 8, rng)
    W = layer.params["W"]
    keep = rng.random(W.shape) < 0.5
    layer.set_mask("W", keep)
    assert layer.masks["W"].dtype == W.dtype
    assert set(np.unique(layer.masks["W"])) <= {0.0, 1.0}
    assert np.all(W[~keep] == 0) and np.all(W[keep] != 0)
    assert layer.params["W"] is W  # in place
    # numeric masks too
    layer2 = Conv2D(2, 3, 3, rng)
    m = (rng.random(layer2.params["W"].shape) < 0.3).astype(np.float64)
    layer2.set_mask("W", m)
    assert np.all(layer2.params["W"][m == 0] == 0)
    layer2.set_mask("W", None)
    assert layer2.masks["W"] is None


def test_set_mask_validation(rng):
    layer = Dense(4, 3, rng)
    with pytest.raises(ValueError):
        layer.set_mask("W", np.ones((3, 4), bool))
    with pytest.raises(ValueError):
        layer.set_mask("W", np.full((4, 3), 0.5))
    with pytest.raises(KeyError):
        layer.set_mask("b", np.ones(3, bool))
    assert layer.prunable == ("W",) and set(layer.masks) == {"W"}


def test_masked_grad_float32(rng):
    layer = Conv2D(3, 4, 3, rng)
    keep = rng.random(layer.params["W"].shape) < 0.5
    layer.set_mask("W", keep)
    y = layer.forward(rng.standard_normal((2, 3, 6, 6)).astype(np.float32))
    layer.backward(np.ones_like(y))
    assert np.all(layer.grads["W"][~keep] == 0)


@pytest.mark.parametrize("make", [
    lambda r, d: Dense(7, 5, r, dtype=d),
    lambda r, d: Conv2D(3, 4, (3, 2), r, dtype=d),
])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fresh_params_and_reset(rng, make, dtype):
    layer = make(rng, dtype)
    a = layer.fresh_params(rng)
    b = layer.fresh_params(rng)
    for k, p in layer.params.items():
        assert a[k].shape == p.shape and a[k].dtype == dtype == p.dtype
    assert not np.array_equal(a["W"], b["W"])
    assert not np.any(a["b"])
    # fresh_params assigns nothing
    W = layer.params["W"]
    before = W.copy()
    layer.fresh_params(rng)
    np.testing.assert_array_equal(W, before)
    # reset_parameters: in place, same draw as fresh_params with the same rng state, re-masked
    keep = rng.random(W.shape) < 0.5
    layer.set_mask("W", keep)
    expect = layer.fresh_params(np.random.default_rng(7))["W"] * keep
    layer.reset_parameters(np.random.default_rng(7))
    assert layer.params["W"] is W
    np.testing.assert_array_equal(W, expect)
    assert np.all(W[~keep] == 0)
    assert layer.n_weights() == W.size


def test_same_seed_same_layer():
    a = Conv2D(2, 3, 3, np.random.default_rng(5))
    b = Conv2D(2, 3, 3, np.random.default_rng(5))
    np.testing.assert_array_equal(a.params["W"], b.params["W"])


# ------------------------------------------------------------------ dtypes, caching, need_dx
def _all_layers(rng, dtype=np.float32):
    return [
        (Dense(12, 5, rng, dtype=dtype), (4, 12)),
        (Conv2D(2, 3, 3, rng, stride=2, padding=1, dtype=dtype), (2, 2, 7, 7)),
        (MaxPool2D(2), (2, 3, 6, 6)),
        (MaxPool2D(3, 2), (2, 3, 7, 7)),
        (ReLU(), (2, 3, 4, 4)),
        (Flatten(), (2, 3, 4, 4)),
    ]


def test_float32_no_upcast(rng):
    for layer, shape in _all_layers(rng):
        x = rng.standard_normal(shape).astype(np.float32)
        y = layer.forward(x)
        assert y.dtype == np.float32, layer
        dx = layer.backward(np.ones_like(y))
        assert dx.dtype == np.float32, layer
        for g in layer.grads.values():
            assert g.dtype == np.float32


def test_backward_does_not_mutate_dout(rng):
    for layer, shape in _all_layers(rng):
        y = layer.forward(rng.standard_normal(shape).astype(np.float32))
        dout = rng.standard_normal(y.shape).astype(np.float32)
        copy = dout.copy()
        layer.backward(dout)
        np.testing.assert_array_equal(dout, copy)


def test_eval_forward_without_cache(rng):
    for layer, shape in _all_layers(rng):
        x = rng.standard_normal(shape).astype(np.float32)
        y_eval = layer.forward(x, train=False)
        with pytest.raises(RuntimeError):
            layer.backward(np.ones_like(y_eval))
        np.testing.assert_array_equal(y_eval, layer.forward(x, train=True))


def test_eval_forward_between_train_and_backward(rng):
    # An evaluation pass on another batch must not corrupt what backward uses.
    layer = Conv2D(2, 3, 3, rng, dtype=F64)
    x = rng.standard_normal((2, 2, 6, 6))
    y = layer.forward(x)
    dout = rng.standard_normal(y.shape)
    dx_ref = layer.backward(dout).copy()
    gW_ref = layer.grads["W"].copy()
    layer.forward(x)
    layer.forward(rng.standard_normal((2, 2, 6, 6)), train=False)
    dx = layer.backward(dout)
    np.testing.assert_array_equal(dx, dx_ref)
    np.testing.assert_array_equal(layer.grads["W"], gW_ref)


def test_need_dx_false(rng):
    for layer, shape in _all_layers(rng)[:2]:
        layer.need_dx = False
        y = layer.forward(rng.standard_normal(shape).astype(np.float32))
        assert layer.backward(np.ones_like(y)) is None
        assert np.any(layer.grads["W"])


def test_conv_shape_errors(rng):
    layer = Conv2D(1, 2, 3, rng, stride=2)
    with pytest.raises(ValueError):
        layer.forward(np.zeros((1, 1, 6, 6), np.float32))
    with pytest.raises(ValueError):
        layer.forward(np.zeros((1, 2, 7, 7), np.float32))
