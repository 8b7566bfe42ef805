"""The oracles of nprune.reference against hand-computed values and numerical gradients: the fast
code is tested against them (test_layers, test_im2col, test_layout), so they are
checked here on their own."""
import numpy as np
import pytest

from nprune.gradcheck import numerical_gradient, rel_error
from nprune.reference import (col2im_naive, conv2d_naive_backward, conv2d_naive_forward, im2col_naive,
                              maxpool_naive_backward, maxpool_naive_forward)


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
