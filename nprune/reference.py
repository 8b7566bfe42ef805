"""Slow, obvious reference implementations ("oracles") that the fast code is tested against.

Each function here is written for clarity only: explicit loops and index arithmetic for the
convolution, max pooling and im2col/col2im, and the textbook update rule for SGD and Adam, applied
to one parameter array at a time. Nothing in the package calls them; the tests hold the fast
implementations to them (:mod:`nprune.layers`, :mod:`nprune.im2col`, :mod:`nprune.optim`).

The optimiser steps follow the semantics of :mod:`nprune.optim` exactly, which the fast optimisers
reach by other means (in-place chunks, a compact path over the survivors, folded constants):

* weight decay is L2 added to the gradient (``g + weight_decay * w``), as in PyTorch (not AdamW);
* the gradient of a pruned entry is already 0 (backward masks it), so the state of a pruned entry
  stays 0, and after the update ``w *= mask`` makes every pruned weight exactly 0;
* every ``FLUSH_EVERY``-th step, state entries too small to matter are set to 0 (see
  :data:`nprune.optim.FLUSH_BELOW`), so that they never decay into float32 subnormals.
"""
from __future__ import annotations

import numpy as np

from .im2col import conv_output_size
from .optim import FLUSH_BELOW, FLUSH_EVERY

__all__ = [
    "conv2d_naive_forward",
    "conv2d_naive_backward",
    "maxpool_naive_forward",
    "maxpool_naive_backward",
    "im2col_naive",
    "col2im_naive",
    "sgd_step",
    "adam_step",
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


# ----------------------------------------------------------------------------------------------
# Optimiser steps: one parameter array, the textbook formulas.
# ----------------------------------------------------------------------------------------------

def _flush(a, below):
    """Entries of ``a`` with ``|a| < below`` set to 0, in place."""
    a[np.abs(a) < below] = 0


def sgd_step(w, g, state, lr, t, momentum=0.0, weight_decay=0.0, mask=None):
    """One SGD step with heavy-ball momentum and L2 weight decay (PyTorch's form), in place::

        g = g + weight_decay * w
        velocity = momentum * velocity + g        (no velocity without momentum: v = g)
        w -= lr * velocity
        w *= mask

    Inputs:
    - w: parameter array, updated in place.
    - g: its gradient, same shape (pruned entries 0, as backward leaves them).
    - state: dict holding ``state["velocity"]`` (created on the first step with momentum).
    - lr, momentum, weight_decay: floats.
    - t: the number of this step (1, 2, ...); every ``FLUSH_EVERY``-th step sets velocity entries
      below ``FLUSH_BELOW`` in magnitude to 0.
    - mask: 0/1 array of w's shape (1 keeps, 0 prunes), or None.

    Returns w.
    """
    if weight_decay:
        g = g + weight_decay * w
    if momentum:
        g = state["velocity"] = momentum * state.get("velocity", 0.0) + g
    w -= lr * g
    if mask is not None:
        w *= mask
    if momentum and t % FLUSH_EVERY == 0:
        _flush(state["velocity"], FLUSH_BELOW)
    return w


def adam_step(w, g, state, lr, b1, b2, eps, t, weight_decay=0.0, mask=None):
    """One Adam step with bias correction (Kingma & Ba), L2 weight decay added to the gradient,
    in place::

        g = g + weight_decay * w
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        w -= lr * m_hat / (sqrt(v_hat) + eps)
        w *= mask

    Inputs (w, g, mask as in :func:`sgd_step`):
    - state: dict holding the moments ``state["m"]`` and ``state["v"]`` (created on the first step).
    - lr, b1, b2, eps, weight_decay: floats.
    - t: the number of this step (1, 2, ...), for the bias correction. Every ``FLUSH_EVERY``-th
      step sets tiny moment entries to 0: those with ``|m| / (1 - b1) < FLUSH_BELOW`` (likewise v
      with b2), the bound :class:`nprune.optim.Adam` applies to the moments it stores, which are
      ``m / (1 - b1)`` and ``v / (1 - b2)``.

    Returns w.
    """
    if weight_decay:
        g = g + weight_decay * w
    m = state["m"] = b1 * state.get("m", 0.0) + (1 - b1) * g
    v = state["v"] = b2 * state.get("v", 0.0) + (1 - b2) * g * g
    m_hat = m / (1 - b1 ** t)
    v_hat = v / (1 - b2 ** t)
    w -= lr * m_hat / (np.sqrt(v_hat) + eps)
    if mask is not None:
        w *= mask
    if t % FLUSH_EVERY == 0:
        _flush(m, (1 - b1) * FLUSH_BELOW)
        _flush(v, (1 - b2) * FLUSH_BELOW)
    return w
