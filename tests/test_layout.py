"""The batch-last (C, H, W, N) memory-order path between Conv2D and MaxPool2D, against the naive oracles."""

import numpy as np
import pytest

from nprune.im2col import col2im, col2im_cnhw, col2im_hwn, conv_output_size, im2col_hwn, im2col_hwn_pool
from nprune.layers import Conv2D
from nprune.nets import fuse_conv_pool
from nprune.pooling import MaxPool2D
from nprune.reference import (col2im_naive, conv2d_naive_backward, conv2d_naive_forward, im2col_naive,
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


# ---- fused Conv2D + tiling MaxPool2D (pool-phase order) -------------------------------------------

@pytest.mark.parametrize("c,h,w,n,kh,kw,pool,s,p", [(1, 28, 28, 3, 5, 5, 2, 1, 0), (2, 13, 13, 2, 3, 3, 2, 2, 0),
                                                    (2, 10, 10, 2, 3, 3, 2, 1, 1), (3, 11, 11, 2, 3, 3, 3, 1, 0),
                                                    (1, 8, 6, 1, 1, 1, 2, 1, 0)])
def test_im2col_pool_is_a_column_permutation(c, h, w, n, kh, kw, pool, s, p):
    """Column (a*pool+b, oh2, ow2, n) of the phase-ordered columns is column (oh2*pool+a, ow2*pool+b,
    n) of im2col_hwn, exactly."""
    xt = np.random.default_rng(0).standard_normal((c, h, w, n))
    ref = im2col_hwn(xt, kh, kw, s, p)
    oh, ow = conv_output_size(h, kh, s, p), conv_output_size(w, kw, s, p)
    want = ref.reshape(-1, oh // pool, pool, ow // pool, pool, n).transpose(0, 2, 4, 1, 3, 5)
    got = im2col_hwn_pool(xt, kh, kw, pool, s, p)
    np.testing.assert_array_equal(got, want.reshape(ref.shape))


def test_im2col_pool_rejects_untiled_output():
    with pytest.raises(ValueError, match="not tiled"):
        im2col_hwn_pool(np.zeros((1, 9, 9, 1)), 3, 3, 2)      # 7x7 output, 2x2 windows


def _conv_pool_pair(dtype, ties, rng):
    from nprune.model import Sequential
    from nprune.layers import Flatten
    net = fuse_conv_pool(Sequential([("conv", Conv2D(2, 4, 3, np.random.default_rng(5), dtype=dtype)),
                                     ("pool", MaxPool2D(2)), ("flat", Flatten())]))
    conv = net.layers[0]
    conv.params["b"][...] = rng.standard_normal(4)
    if ties:
        conv.params["W"][...] = np.round(conv.params["W"] * 2)
    return net, conv


@pytest.mark.parametrize("ties", [False, True])
def test_fused_conv_pool_matches_unfused_and_naive(ties):
    """fuse_conv_pool fuses a first-layer Conv2D with the tiling MaxPool2D after it; forward values, the
    tie rule and the gradients equal the unfused pair and the naive oracles (float64, exact where the
    arithmetic is: integer-valued inputs make every product and sum exact)."""
    rng = np.random.default_rng(11)
    net, conv = _conv_pool_pair(np.float64, ties, rng)
    assert conv.pool_fuse == 2 and not conv.need_dx
    x = rng.standard_normal((3, 2, 12, 12))
    d = rng.standard_normal((3, 4 * 5 * 5))
    if ties:                                  # flat regions: many exact ties inside pool windows
        x, d = np.round(x), np.round(d * 4)
        conv.params["b"][...] = np.round(conv.params["b"])
    results = {}
    for fuse in (2, 0):
        conv.pool_fuse = fuse
        out = net.forward(x, train=True)
        net.backward(d)
        results[fuse] = (out.copy(), conv.grads["W"].copy(), conv.grads["b"].copy())
    (o1, w1, b1), (o0, w0, b0) = results[2], results[0]
    if ties:
        np.testing.assert_array_equal(o1, o0)
        np.testing.assert_array_equal(w1, w0)
    np.testing.assert_allclose(o1, o0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(w1, w0, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(b1, b0, rtol=1e-12, atol=1e-12)
    # and against the naive oracles
    h = conv2d_naive_forward(x, conv.params["W"], conv.params["b"])
    np.testing.assert_allclose(o1, maxpool_naive_forward(h).reshape(3, -1), atol=1e-10)
    dh = maxpool_naive_backward(h, d.reshape(3, 4, 5, 5))
    _, ndW, ndb = conv2d_naive_backward(x, conv.params["W"], dh)
    np.testing.assert_allclose(w1, ndW, atol=1e-10)
    np.testing.assert_allclose(b1, ndb, atol=1e-10)


def test_fused_conv_pool_float32_eval_and_train_agree():
    """float32, as trained: the fused pair gives the unfused values (the GEMM's columns are only
    permuted) in train and eval mode, and eval does not disturb the cached training batch."""
    rng = np.random.default_rng(12)
    net, conv = _conv_pool_pair(np.float32, False, rng)
    x = rng.standard_normal((4, 2, 12, 12)).astype(np.float32)
    d = rng.standard_normal((4, 100)).astype(np.float32)
    out = {}
    for fuse in (2, 0):
        conv.pool_fuse = fuse
        y_train = net.forward(x, train=True)
        y_eval = net.forward(x[::-1].copy(), train=False)      # between forward and backward
        net.backward(d)
        out[fuse] = (y_train, y_eval, conv.grads["W"].copy())
    np.testing.assert_allclose(out[2][0], out[0][0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out[2][1], out[0][1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out[2][2], out[0][2], rtol=1e-5, atol=1e-5)


def test_only_a_first_layer_conv_with_tiling_pool_is_fused():
    from nprune import nets
    m = nets.build("lenet5", np.random.default_rng(0))
    conv1, conv2 = m.layers[0], m.layers[2]
    assert conv1.pool_fuse == 2 and conv2.pool_fuse == 0          # conv2 needs dx: not fused
    from nprune.model import Sequential
    seq = fuse_conv_pool(Sequential([("c", Conv2D(1, 2, 3, np.random.default_rng(0))),
                                     ("p", MaxPool2D(2, stride=1))]))
    assert seq.layers[0].pool_fuse == 0                            # overlapping windows: not fused
    plain = Sequential([("c", Conv2D(1, 2, 3, np.random.default_rng(0))), ("p", MaxPool2D(2))])
    assert plain.layers[0].pool_fuse == 0                          # only fuse_conv_pool fuses


def test_fused_backward_refuses_a_need_dx_switched_on_after_forward():
    rng = np.random.default_rng(13)
    net, conv = _conv_pool_pair(np.float64, False, rng)
    net.forward(rng.standard_normal((2, 2, 12, 12)), train=True)
    conv.need_dx = True
    with pytest.raises(RuntimeError, match="need_dx"):
        net.backward(rng.standard_normal((2, 100)))
