"""im2col / col2im against naive oracles, adjointness and output-size validation."""

import numpy as np
import pytest

from nprune.im2col import col2im, conv_output_size, im2col
from nprune.reference import col2im_naive, im2col_naive

CASES = [  # (N, C, H, W, kh, kw, stride, pad)
    (2, 1, 6, 6, 3, 3, 1, 0),
    (2, 3, 7, 7, 3, 3, 2, 0),
    (2, 3, 5, 5, 3, 3, 1, 1),
    (2, 2, 5, 7, 3, 3, 2, 1),
    (1, 3, 4, 4, 5, 5, 1, 2),
    (2, 2, 6, 5, 3, 2, 1, 0),
    (3, 2, 9, 8, 3, 2, 2, 1),
    (2, 4, 12, 12, 5, 5, 1, 0),
]


@pytest.mark.parametrize("n,c,h,w,kh,kw,s,p", CASES)
def test_im2col_matches_naive(n, c, h, w, kh, kw, s, p):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, c, h, w))
    cols = im2col(x, kh, kw, s, p)
    oh, ow = conv_output_size(h, kh, s, p), conv_output_size(w, kw, s, p)
    assert cols.shape == (c * kh * kw, n * oh * ow)
    np.testing.assert_array_equal(cols, im2col_naive(x, kh, kw, s, p))


@pytest.mark.parametrize("n,c,h,w,kh,kw,s,p", CASES)
def test_col2im_matches_naive_and_is_adjoint(n, c, h, w, kh, kw, s, p):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, c, h, w))
    oh, ow = conv_output_size(h, kh, s, p), conv_output_size(w, kw, s, p)
    cols = rng.standard_normal((c * kh * kw, n * oh * ow))
    dx = col2im(cols, x.shape, kh, kw, s, p)
    assert dx.shape == x.shape and dx.flags.c_contiguous
    np.testing.assert_allclose(dx, col2im_naive(cols, x.shape, kh, kw, s, p), rtol=1e-12, atol=1e-12)
    lhs = np.vdot(im2col(x, kh, kw, s, p), cols)
    rhs = np.vdot(x, dx)
    assert abs(lhs - rhs) <= 1e-10 * max(1.0, abs(lhs))


def test_im2col_preserves_float32_and_out_buffer():
    x = np.random.default_rng(2).standard_normal((2, 3, 6, 6)).astype(np.float32)
    buf = np.empty((27, 2 * 16), dtype=np.float32)
    cols = im2col(x, 3, 3, 1, 0, out=buf)
    assert cols is buf and cols.dtype == np.float32
    assert col2im(cols, x.shape, 3, 3).dtype == np.float32
    with pytest.raises(ValueError):
        im2col(x, 3, 3, 1, 0, out=np.empty((27, 5), dtype=np.float32))


def test_conv_output_size():
    assert conv_output_size(28, 5, 1, 0) == 24
    assert conv_output_size(28, 5, 1, 2) == 28
    assert conv_output_size(7, 3, 2, 0) == 3
    with pytest.raises(ValueError, match="divisible"):
        conv_output_size(8, 3, 2, 0)
    with pytest.raises(ValueError, match="larger"):
        conv_output_size(3, 5, 1, 0)
    with pytest.raises(ValueError):
        conv_output_size(8, 3, 0, 0)
