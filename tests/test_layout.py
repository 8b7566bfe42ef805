"""The batch-last (C, H, W, N) memory-order path between Conv2D and MaxPool2D, against the naive oracles."""

import numpy as np
import pytest

from nprune.im2col import (col2im, col2im_cnhw, col2im_hwn, col2im_naive, conv_output_size,
                           im2col_hwn, im2col_naive)
from nprune.layers import (Conv2D, MaxPool2D, conv2d_naive_backward, conv2d_naive_forward,
                           maxpool_naive_backward, maxpool_naive_forward)


@pytest.mark.parametrize("ties", [False, True])
def test_conv_pool_conv_chain_matches_naive(ties):
    rng = np.random.default_rng(7)
    c1 = Conv2D(2, 4, 3, rng, dtype=np.float64)
    p1 = MaxPool2D(2)
    c2 = Conv2D(4, 3, 3, rng, dtype=np.float64)
    c1.params["b"][...] = rng.standard_normal(4)
    x = rng.standard_normal((3, 2, 12, 12))
    if ties:
        x = np.round(x)
        c1.params["W"][...] = np.round(c1.params["W"] * 2)
    h1 = c1.forward(x)
    assert not h1.flags.c_contiguous and h1.transpose(1, 2, 3, 0).flags.c_contiguous  # CHWN memory
    np.testing.assert_allclose(h1, conv2d_naive_forward(x, c1.params["W"], c1.params["b"]), atol=1e-10)
    h2 = p1.forward(h1)
    assert h2.transpose(1, 2, 3, 0).flags.c_contiguous
    np.testing.assert_array_equal(h2, maxpool_naive_forward(np.ascontiguousarray(h1)))
    h3 = c2.forward(h2)
    np.testing.assert_allclose(h3, conv2d_naive_forward(np.ascontiguousarray(h2), c2.params["W"],
                                                        c2.params["b"]), atol=1e-10)
    d3 = rng.standard_normal(h3.shape)  # C-ordered dout (as after Flatten)
    d2 = c2.backward(d3)
    nd2, ndW2, _ = conv2d_naive_backward(np.ascontiguousarray(h2), c2.params["W"], d3)
    np.testing.assert_allclose(d2, nd2, atol=1e-10)
    np.testing.assert_allclose(c2.grads["W"], ndW2, atol=1e-10)
    d1 = p1.backward(d2)
    np.testing.assert_allclose(d1, maxpool_naive_backward(np.ascontiguousarray(h1), d2), atol=1e-12)
    # pooling backward with a C-ordered dout on CNHW-ordered x/y gives the same
    np.testing.assert_array_equal(p1.backward(np.ascontiguousarray(d2)), d1)
    d0 = c1.backward(d1)
    nd0, ndW1, ndb1 = conv2d_naive_backward(x, c1.params["W"], np.ascontiguousarray(d1))
    np.testing.assert_allclose(d0, nd0, atol=1e-10)
    np.testing.assert_allclose(c1.grads["W"], ndW1, atol=1e-10)
    np.testing.assert_allclose(c1.grads["b"], ndb1, atol=1e-10)


def test_col2im_cnhw_is_col2im_transposed():
    rng = np.random.default_rng(3)
    for pad in (0, 1):
        cols = rng.standard_normal((2 * 9, 2 * 5 * 5)).astype(np.float32)
        a = col2im_cnhw(cols, (2, 2, 7 - 2 * pad, 7 - 2 * pad), 3, 3, 1, pad)
        b = col2im(cols, (2, 2, 7 - 2 * pad, 7 - 2 * pad), 3, 3, 1, pad)
        assert a.flags.c_contiguous and a.dtype == np.float32
        np.testing.assert_array_equal(a.transpose(1, 0, 2, 3), b)


@pytest.mark.parametrize("n,c,h,w,kh,kw,s,p", [(2, 1, 6, 6, 3, 3, 1, 0), (2, 3, 7, 7, 3, 3, 2, 0),
                                               (2, 3, 5, 5, 3, 3, 1, 1), (3, 2, 9, 8, 3, 2, 2, 1),
                                               (2, 4, 12, 12, 5, 5, 1, 0)])
def test_hwn_im2col_col2im_match_naive(n, c, h, w, kh, kw, s, p):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((n, c, h, w))
    oh, ow = conv_output_size(h, kh, s, p), conv_output_size(w, kw, s, p)
    k = c * kh * kw
    to_hwn = lambda cols: cols.reshape(k, n, oh, ow).transpose(0, 2, 3, 1).reshape(k, -1)
    got = im2col_hwn(x.transpose(1, 2, 3, 0), kh, kw, s, p)
    np.testing.assert_array_equal(got, to_hwn(im2col_naive(x, kh, kw, s, p)))
    cols = rng.standard_normal(got.shape)
    dxt = col2im_hwn(cols, (c, h, w, n), kh, kw, s, p)
    assert dxt.flags.c_contiguous
    back = cols.reshape(k, oh, ow, n).transpose(0, 3, 1, 2).reshape(k, -1)
    np.testing.assert_allclose(dxt.transpose(3, 0, 1, 2), col2im_naive(back, x.shape, kh, kw, s, p),
                               rtol=1e-12, atol=1e-12)
    assert abs(np.vdot(got, cols) - np.vdot(x.transpose(1, 2, 3, 0), dxt)) < 1e-9  # adjoint
