"""The oracles of nprune.reference against hand-computed values and numerical gradients: the fast
code is tested against them (test_layers, test_im2col, test_layout, test_optim), so they are
checked here on their own."""
import numpy as np
import pytest

from nprune.gradcheck import numerical_gradient, rel_error
from nprune.optim import FLUSH_BELOW, FLUSH_EVERY
from nprune.reference import (adam_step, col2im_naive, conv2d_naive_backward, conv2d_naive_forward,
                              im2col_naive, maxpool_naive_backward, maxpool_naive_forward, sgd_step)


def test_conv_forward_by_hand():
    x = np.arange(16, dtype=np.float64).reshape(1, 1, 4, 4)
    W = np.array([[[[1.0, 0.0], [0.0, -1.0]]]])                  # x[r, s] - x[r+1, s+1]
    y = conv2d_naive_forward(x, W, np.array([0.5]))
    np.testing.assert_array_equal(y, np.full((1, 1, 3, 3), -5.0 + 0.5))
    y = conv2d_naive_forward(x, W, None, stride=2, padding=1)     # (4 + 2 - 2) / 2 + 1 = 3
    xp = np.pad(x[0, 0], 1)
    want = [[xp[2 * r, 2 * s] - xp[2 * r + 1, 2 * s + 1] for s in range(3)] for r in range(3)]
    np.testing.assert_array_equal(y[0, 0], want)


@pytest.mark.parametrize("stride,padding", [(1, 0), (2, 1)])
def test_conv_backward_is_the_numerical_gradient(stride, padding):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 2, 5, 5))
    W = rng.standard_normal((3, 2, 3, 3))
    b = rng.standard_normal(3)
    dout = rng.standard_normal(conv2d_naive_forward(x, W, b, stride, padding).shape)
    dx, dW, db = conv2d_naive_backward(x, W, dout, stride, padding)
    assert rel_error(dx, numerical_gradient(lambda v: conv2d_naive_forward(v, W, b, stride, padding),
                                            x, dout)) < 1e-8
    assert rel_error(dW, numerical_gradient(lambda v: conv2d_naive_forward(x, v, b, stride, padding),
                                            W, dout)) < 1e-8
    assert rel_error(db, numerical_gradient(lambda v: conv2d_naive_forward(x, W, v, stride, padding),
                                            b, dout)) < 1e-8


def test_maxpool_by_hand_and_ties_go_to_the_first_argmax():
    x = np.array([[[[1.0, 3.0, 2.0, 2.0],
                    [3.0, 0.0, 2.0, 2.0],
                    [0.0, 0.0, 5.0, 1.0],
                    [0.0, 9.0, 1.0, 1.0]]]])
    np.testing.assert_array_equal(maxpool_naive_forward(x), [[[[3.0, 2.0], [9.0, 5.0]]]])
    dx = maxpool_naive_backward(x, np.array([[[[10.0, 20.0], [30.0, 40.0]]]]))
    want = np.zeros((4, 4))
    want[0, 1], want[0, 2], want[3, 1], want[2, 2] = 10, 20, 30, 40   # ties: first in row-major order
    np.testing.assert_array_equal(dx[0, 0], want)
    # overlapping windows (size 2, stride 1): gradients of windows sharing a maximum add up
    dx = maxpool_naive_backward(x[:, :, :2, :3], np.ones((1, 1, 1, 2)), size=2, stride=1)
    np.testing.assert_array_equal(dx[0, 0], [[0, 2, 0], [0, 0, 0]])


def test_im2col_by_hand_and_col2im_is_its_adjoint():
    x = np.arange(2 * 2 * 3 * 3, dtype=np.float64).reshape(2, 2, 3, 3)
    cols = im2col_naive(x, 2, 2)
    assert cols.shape == (2 * 2 * 2, 2 * 2 * 2)
    # row (c*kh + i)*kw + j, column (n*OH + oh)*OW + ow holds x[n, c, oh + i, ow + j]
    assert cols[(1 * 2 + 1) * 2 + 0, (1 * 2 + 0) * 2 + 1] == x[1, 1, 0 + 1, 1 + 0]
    rng = np.random.default_rng(1)
    for stride, pad in ((1, 0), (2, 1)):
        c = rng.standard_normal(im2col_naive(x, 3, 3, stride, pad).shape)
        lhs = np.vdot(im2col_naive(x, 3, 3, stride, pad), c)
        assert abs(lhs - np.vdot(x, col2im_naive(c, x.shape, 3, 3, stride, pad))) < 1e-10


def test_sgd_step_by_hand():
    w = np.array([1.0, 2.0, -3.0], np.float32)
    g = np.array([0.5, -1.0, 0.0], np.float32)
    state = {}
    sgd_step(w, g, state, lr=0.1, t=1, momentum=0.9, weight_decay=0.01, mask=np.array([1, 1, 0], np.float32))
    v1 = g + 0.01 * np.array([1.0, 2.0, -3.0], np.float32)
    np.testing.assert_array_equal(state["velocity"], v1)
    np.testing.assert_allclose(w, [1.0 - 0.1 * v1[0], 2.0 - 0.1 * v1[1], 0.0], rtol=1e-7)
    assert w[2] == 0.0 and w.dtype == np.float32                  # the mask zeroes the pruned weight
    w0 = w.copy()
    sgd_step(w, g, state, lr=0.1, t=2, momentum=0.9, weight_decay=0.01)
    np.testing.assert_allclose(state["velocity"], 0.9 * v1 + g + 0.01 * w0, rtol=1e-6)
    plain, s = np.array([1.0], np.float32), {}
    sgd_step(plain, np.array([2.0], np.float32), s, lr=0.5, t=1)  # no momentum: no state
    assert plain[0] == 0.0 and s == {}


def test_adam_step_by_hand():
    w = np.array([1.0, -1.0], np.float64)
    g = np.array([0.1, -0.3])
    state = {}
    adam_step(w, g, state, lr=0.01, b1=0.9, b2=0.999, eps=1e-8, t=1)
    # first step: m_hat = g, v_hat = g^2, update = lr * g / (|g| + eps)
    np.testing.assert_allclose(w, [1.0, -1.0] - 0.01 * g / (np.abs(g) + 1e-8), rtol=1e-12)
    np.testing.assert_allclose(state["m"], 0.1 * g, rtol=1e-12)
    np.testing.assert_allclose(state["v"], 0.001 * g * g, rtol=1e-12)
    w1, g2 = w.copy(), np.array([0.2, 0.0])
    adam_step(w, g2, state, lr=0.01, b1=0.9, b2=0.999, eps=1e-8, t=2, weight_decay=0.5,
              mask=np.array([1.0, 0.0]))
    gd = g2 + 0.5 * w1
    m = 0.9 * 0.1 * g + 0.1 * gd
    v = 0.999 * 0.001 * g * g + 0.001 * gd * gd
    want = w1 - 0.01 * (m / (1 - 0.9 ** 2)) / (np.sqrt(v / (1 - 0.999 ** 2)) + 1e-8)
    np.testing.assert_allclose(w, [want[0], 0.0], rtol=1e-12)


def test_tiny_state_is_flushed_every_flush_every_steps():
    """Velocity and moments below the flush bound become exactly 0 at every FLUSH_EVERY-th step
    only (Adam's bound applies to m / (1-b1) and v / (1-b2), as nprune.optim stores them)."""
    bound = FLUSH_BELOW
    for t in (FLUSH_EVERY - 1, FLUSH_EVERY):
        s = {"velocity": np.array([bound, 1.0])}
        sgd_step(np.zeros(2), np.zeros(2), s, lr=0.1, t=t, momentum=0.5)
        assert (s["velocity"][0] == 0) == (t == FLUSH_EVERY) and s["velocity"][1] == 0.5
        for f, flushed in ((1.5, False), (0.5, t == FLUSH_EVERY)):     # after the step: f * bound
            s = {"m": np.array([f * 0.1 * bound / 0.9, 1.0]), "v": np.array([f * 0.001 * bound / 0.999, 1.0])}
            adam_step(np.zeros(2), np.zeros(2), s, 0.1, 0.9, 0.999, 1e-8, t)
            assert (s["m"][0] == 0) == (s["v"][0] == 0) == flushed and s["m"][1] == 0.9
