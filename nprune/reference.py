"""Slow, obvious reference implementations ("oracles") that the fast code is tested against.

Each function here is written for clarity only: explicit loops and index arithmetic for the
convolution, max pooling and im2col/col2im. Nothing in the package calls them; the tests hold the
fast implementations to them (:mod:`nprune.layers`, :mod:`nprune.im2col`).
"""
from __future__ import annotations

import numpy as np

from .im2col import conv_output_size

__all__ = [
    "conv2d_naive_forward",
    "conv2d_naive_backward",
    "maxpool_naive_forward",
    "maxpool_naive_backward",
    "im2col_naive",
    "col2im_naive",
]


# ----------------------------------------------------------------------------------------------
# Convolution and max pooling: one output position at a time.
# ----------------------------------------------------------------------------------------------

def conv2d_naive_forward(x, W, b, stride=1, padding=0):
    """Convolution (cross-correlation, as in torch), one output value at a time.

    Inputs:
    - x: (N, C, H, W) images.
    - W: (F, C, kh, kw) filters; b: (F,) biases or None.
    - stride, padding: applied to both spatial axes (zero padding).

    Returns y: (N, F, OH, OW) with ``OH = (H + 2*padding - kh) // stride + 1`` (likewise OW).
    """
    n, c, h, w = x.shape
    f, _, kh, kw = W.shape
    oh = conv_output_size(h, kh, stride, padding)
    ow = conv_output_size(w, kw, stride, padding)
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    y = np.zeros((n, f, oh, ow), dtype=np.result_type(x, W))
    for i in range(n):
        for k in range(f):
            for r in range(oh):
                for s in range(ow):
                    win = xp[i, :, r * stride:r * stride + kh, s * stride:s * stride + kw]
                    y[i, k, r, s] = np.sum(win * W[k]) + (0 if b is None else b[k])
    return y


def conv2d_naive_backward(x, W, dout, stride=1, padding=0):
    """Backward of :func:`conv2d_naive_forward`, one output value at a time.

    Inputs:
    - x: (N, C, H, W) the forward input; W: (F, C, kh, kw) the filters.
    - dout: (N, F, OH, OW) upstream gradient.
    - stride, padding: as in the forward.

    Returns (dx (N, C, H, W), dW (F, C, kh, kw), db (F,)).
    """
    n, c, h, w = x.shape
    f, _, kh, kw = W.shape
    _, _, oh, ow = dout.shape
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    dxp = np.zeros_like(xp, dtype=np.result_type(x, W, dout))
    dW = np.zeros_like(W, dtype=dxp.dtype)
    for i in range(n):
        for k in range(f):
            for r in range(oh):
                for s in range(ow):
                    rs = slice(r * stride, r * stride + kh)
                    cs = slice(s * stride, s * stride + kw)
                    dW[k] += dout[i, k, r, s] * xp[i, :, rs, cs]
                    dxp[i, :, rs, cs] += dout[i, k, r, s] * W[k]
    db = dout.sum(axis=(0, 2, 3))
    dx = dxp[:, :, padding:padding + h, padding:padding + w].copy()
    return dx, dW, db


def maxpool_naive_forward(x, size=2, stride=None):
    """Max pooling (floor mode: windows that do not fit are dropped), one window at a time.

    Inputs:
    - x: (N, C, H, W).
    - size: window side; stride: step between windows (default ``size``).

    Returns y: (N, C, OH, OW) with ``OH = (H - size) // stride + 1`` (likewise OW).
    """
    stride = size if stride is None else stride
    n, c, h, w = x.shape
    oh, ow = (h - size) // stride + 1, (w - size) // stride + 1
    y = np.zeros((n, c, oh, ow), dtype=x.dtype)
    for i in range(n):
        for k in range(c):
            for r in range(oh):
                for s in range(ow):
                    y[i, k, r, s] = x[i, k, r * stride:r * stride + size,
                                      s * stride:s * stride + size].max()
    return y


def maxpool_naive_backward(x, dout, size=2, stride=None):
    """Backward of :func:`maxpool_naive_forward`: each window's gradient goes to its first
    (row-major) argmax; overlapping windows add up.

    Inputs:
    - x: (N, C, H, W) the forward input.
    - dout: (N, C, OH, OW) upstream gradient.
    - size, stride: as in the forward.

    Returns dx: (N, C, H, W).
    """
    stride = size if stride is None else stride
    n, c, oh, ow = dout.shape
    dx = np.zeros(x.shape, dtype=np.result_type(x, dout))
    for i in range(n):
        for k in range(c):
            for r in range(oh):
                for s in range(ow):
                    win = x[i, k, r * stride:r * stride + size, s * stride:s * stride + size]
                    a, bb = np.unravel_index(np.argmax(win), win.shape)
                    dx[i, k, r * stride + a, s * stride + bb] += dout[i, k, r, s]
    return dx


# ----------------------------------------------------------------------------------------------
# im2col / col2im by explicit index arithmetic (the layout of nprune.im2col.im2col).
# ----------------------------------------------------------------------------------------------

def _naive_indices(x_shape, kh, kw, stride, pad):
    """Index arrays into the padded (N, C, H+2p, W+2p) image for every (row, column) of the columns,
    shaped (C, kh, kw, N, OH, OW), and the columns' shape (C*kh*kw, N*OH*OW)."""
    n, c, h, w = x_shape
    oh = conv_output_size(h, kh, stride, pad)
    ow = conv_output_size(w, kw, stride, pad)
    cc, ii, jj, nn, oo, pp = np.meshgrid(np.arange(c), np.arange(kh), np.arange(kw), np.arange(n),
                                         np.arange(oh), np.arange(ow), indexing="ij")
    rows = (nn, cc, oo * stride + ii, pp * stride + jj)
    return rows, (c * kh * kw, n * oh * ow)


def im2col_naive(x, kh, kw, stride=1, pad=0):
    """Image patches as columns, by fancy indexing into the padded image.

    Inputs: x (N, C, H, W); kh, kw: filter size; stride, pad: on both spatial axes.

    Returns cols (C*kh*kw, N*OH*OW): ``cols[(c*kh + i)*kw + j, (n*OH + oh)*OW + ow] =
    x_padded[n, c, oh*stride + i, ow*stride + j]``.
    """
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    idx, shape = _naive_indices(x.shape, kh, kw, stride, pad)
    return xp[idx].reshape(shape)


def col2im_naive(cols, x_shape, kh, kw, stride=1, pad=0):
    """The adjoint of :func:`im2col_naive`: every column entry added (``np.add.at``) back to the
    image position it came from.

    Inputs: cols (C*kh*kw, N*OH*OW); x_shape (N, C, H, W) of the unpadded image; kh, kw, stride, pad
    as :func:`im2col_naive`.

    Returns dx (N, C, H, W), cols' dtype.
    """
    n, c, h, w = x_shape
    xp = np.zeros((n, c, h + 2 * pad, w + 2 * pad), dtype=cols.dtype)
    idx, shape = _naive_indices(x_shape, kh, kw, stride, pad)
    np.add.at(xp, idx, cols.reshape(c, kh, kw, n, *idx[0].shape[-2:]))
    return xp[:, :, pad:pad + h, pad:pad + w].copy()
