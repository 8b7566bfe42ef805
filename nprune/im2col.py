"""im2col / col2im: a convolution as one GEMM over unfolded image patches.

Column layout of :func:`im2col` / :func:`col2im` (images NCHW):

    cols.shape == (C * kh * kw, N * OH * OW)

* row index    ``r = (c * kh + i) * kw + j``  -- channel-major, then filter row ``i``, filter column
  ``j``; this is exactly the flattening of a weight ``W`` of shape ``(F, C, kh, kw)`` into
  ``W.reshape(F, -1)``, so a convolution is the single GEMM ``W.reshape(F, -1) @ cols``;
* column index ``q = (n * OH + oh) * OW + ow`` -- image, then output row, then output column.

``cols[r, q] = x_padded[n, c, oh * stride + i, ow * stride + j]``.

Both :func:`im2col` and :func:`col2im` loop over the ``kh * kw`` filter offsets only; each step copies
(or adds) one strided slice of the image of shape ``(C, N, OH, OW)``, which is contiguous in the
column buffer. col2im is the adjoint (transpose) of im2col: ``<im2col(x), c> == <x, col2im(c)>``.

Conv2D itself uses the batch-last variants :func:`im2col_hwn` / :func:`col2im_hwn` (images stored
(C, H, W, N), columns (C*kh*kw, OH*OW*N)); see their docstrings for why. The slow oracles these are
tested against are :func:`nprune.reference.im2col_naive` and :func:`nprune.reference.col2im_naive`.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "conv_output_size",
    "im2col",
    "col2im",
    "col2im_cnhw",
    "im2col_hwn",
    "col2im_hwn",
    "im2col_hwn_pool",
]


def conv_output_size(n: int, k: int, stride: int = 1, pad: int = 0) -> int:
    """Output length ``(n + 2*pad - k) // stride + 1`` of a convolution/pooling along one axis.

    Raises ``ValueError`` if the window does not tile exactly (``(n + 2*pad - k) % stride != 0``) or
    the result would be ``<= 0``.
    """
    if stride <= 0:
        raise ValueError(f"stride must be positive, got {stride}")
    if pad < 0:
        raise ValueError(f"padding must be non-negative, got {pad}")
    span = n + 2 * pad - k
    if span < 0:
        raise ValueError(
            f"kernel size {k} is larger than the padded input ({n} + 2*{pad} = {n + 2 * pad})"
        )
    if span % stride != 0:
        raise ValueError(
            f"(input {n} + 2*pad {pad} - kernel {k}) = {span} is not divisible by stride {stride}"
        )
    return span // stride + 1


def _output_hw(h: int, w: int, kh: int, kw: int, stride: int, pad: int) -> tuple[int, int]:
    """(OH, OW) of a ``kh x kw`` window sliding over an ``h x w`` image (see :func:`conv_output_size`)."""
    return conv_output_size(h, kh, stride, pad), conv_output_size(w, kw, stride, pad)


def _buffer(out: np.ndarray | None, shape: tuple, dtype) -> np.ndarray:
    """``out`` checked to have ``shape`` and ``dtype``, or a new uninitialised array when None."""
    if out is None:
        return np.empty(shape, dtype=dtype)
    if out.shape != shape or out.dtype != dtype:
        raise ValueError(f"out buffer has shape {out.shape}/{out.dtype}, expected {shape}/{dtype}")
    return out


def _check_cols(cols: np.ndarray, shape: tuple) -> None:
    if cols.shape != shape:
        raise ValueError(f"cols has shape {cols.shape}, expected {shape}")


def _offsets(kh: int, kw: int, oh: int, ow: int, stride: int):
    """Yield ``(i, j, rs, cs)`` for every filter offset (i, j) in row-major order: the slices of
    the padded image's H and W axes that the (OH, OW) output positions read at that offset."""
    hs, ws = stride * (oh - 1) + 1, stride * (ow - 1) + 1
    for i in range(kh):
        for j in range(kw):
            yield i, j, slice(i, i + hs, stride), slice(j, j + ws, stride)


def _padded_cnhw(x: np.ndarray, pad: int) -> np.ndarray:
    """``x`` (N, C, H, W) as a (C, N, H+2p, W+2p) array (a transposed view when ``pad == 0``)."""
    xt = x.transpose(1, 0, 2, 3)
    if pad == 0:
        return xt
    n, c, h, w = x.shape
    xp = np.zeros((c, n, h + 2 * pad, w + 2 * pad), dtype=x.dtype)
    xp[:, :, pad:pad + h, pad:pad + w] = xt
    return xp


def im2col(x: np.ndarray, kh: int, kw: int, stride: int = 1, pad: int = 0,
           out: np.ndarray | None = None) -> np.ndarray:
    """Unfold image patches into columns.

    Inputs:
    - x: (N, C, H, W) images.
    - kh, kw: filter height and width; stride, pad: applied to both spatial axes (zero padding).
    - out: optional preallocated buffer of shape (C*kh*kw, N*OH*OW) and x's dtype to fill.

    Returns cols: (C*kh*kw, N*OH*OW), x's dtype, in the layout described in the module docstring.
    """
    n, c, h, w = x.shape
    oh, ow = _output_hw(h, w, kh, kw, stride, pad)
    out = _buffer(out, (c * kh * kw, n * oh * ow), x.dtype)
    xp = _padded_cnhw(x, pad)
    cols6 = out.reshape(c, kh, kw, n, oh, ow)
    for i, j, rs, cs in _offsets(kh, kw, oh, ow, stride):
        cols6[:, i, j] = xp[:, :, rs, cs]
    return out


def col2im(cols: np.ndarray, x_shape: tuple, kh: int, kw: int, stride: int = 1,
           pad: int = 0) -> np.ndarray:
    """Fold columns back into an image, summing overlapping contributions (adjoint of im2col).

    Inputs:
    - cols: (C*kh*kw, N*OH*OW) in the im2col layout (e.g. the gradient w.r.t. the columns).
    - x_shape: (N, C, H, W) of the original (unpadded) input.

    Returns dx: (N, C, H, W) contiguous, cols' dtype. Implemented as a loop over the ``kh*kw``
    filter offsets adding strided slices (no ``np.add.at``).
    """
    n, c, h, w = x_shape
    dxc = col2im_cnhw(cols, x_shape, kh, kw, stride, pad)
    dx = np.empty((n, c, h, w), dtype=cols.dtype)
    dx[...] = dxc.transpose(1, 0, 2, 3)
    return dx


def col2im_cnhw(cols: np.ndarray, x_shape: tuple, kh: int, kw: int, stride: int = 1,
                pad: int = 0) -> np.ndarray:
    """:func:`col2im` without the final transpose: returns dx as a contiguous (C, N, H, W) array.

    ``col2im_cnhw(...).transpose(1, 0, 2, 3)`` equals ``col2im(...)`` exactly. Inputs as :func:`col2im`.
    """
    n, c, h, w = x_shape
    oh, ow = _output_hw(h, w, kh, kw, stride, pad)
    _check_cols(cols, (c * kh * kw, n * oh * ow))
    cols6 = cols.reshape(c, kh, kw, n, oh, ow)
    dxp = np.zeros((c, n, h + 2 * pad, w + 2 * pad), dtype=cols.dtype)
    for i, j, rs, cs in _offsets(kh, kw, oh, ow, stride):
        dxp[:, :, rs, cs] += cols6[:, i, j]
    if pad == 0:
        return dxp
    return np.ascontiguousarray(dxp[:, :, pad:pad + h, pad:pad + w])


# ----------------------------------------------------------------------------------------------
# "Batch-last" layout used by Conv2D: images stored as (C, H, W, N), columns as (C*kh*kw, OH*OW*N).
# ----------------------------------------------------------------------------------------------

def im2col_hwn(xt: np.ndarray, kh: int, kw: int, stride: int = 1, pad: int = 0,
               out: np.ndarray | None = None) -> np.ndarray:
    """im2col for images stored batch-last.

    Inputs:
    - xt: (C, H, W, N) images (e.g. ``x.transpose(1, 2, 3, 0)`` of an NCHW batch; contiguous is fastest).
    - kh, kw, stride, pad: as :func:`im2col`.
    - out: optional (C*kh*kw, OH*OW*N) buffer of xt's dtype.

    Returns cols (C*kh*kw, OH*OW*N) with row index ``(c*kh + i)*kw + j`` (as :func:`im2col`, so
    ``W.reshape(F, -1) @ cols`` is the convolution) and column index ``q = (oh*OW + ow)*N + n``:
    ``cols[r, q] = x_padded[n, c, oh*stride + i, ow*stride + j]``.

    Why batch-last: for a filter offset (i, j) the source ``xt[:, i:i+OH, j:j+OW, :]`` has rows of
    ``OW*N`` contiguous values (stride 1), so each of the ``kh*kw`` copies runs long inner loops
    (the batch-first layout has inner loops of only OW values: 8 for conv2 of LeNet-5).
    """
    c, h, w, n = xt.shape
    oh, ow = _output_hw(h, w, kh, kw, stride, pad)
    out = _buffer(out, (c * kh * kw, oh * ow * n), xt.dtype)
    if pad:
        xp = np.zeros((c, h + 2 * pad, w + 2 * pad, n), dtype=xt.dtype)
        xp[:, pad:pad + h, pad:pad + w] = xt
    else:
        xp = xt
    cols6 = out.reshape(c, kh, kw, oh, ow, n)
    for i, j, rs, cs in _offsets(kh, kw, oh, ow, stride):
        cols6[:, i, j] = xp[:, rs, cs]
    return out


def col2im_hwn(cols: np.ndarray, xt_shape: tuple, kh: int, kw: int, stride: int = 1,
               pad: int = 0) -> np.ndarray:
    """Adjoint of :func:`im2col_hwn`: fold (C*kh*kw, OH*OW*N) columns into dx of shape
    ``xt_shape = (C, H, W, N)`` (contiguous, cols' dtype), summing overlaps filter offset by filter
    offset in row-major (i, j) order. Each addition's inner loop is a contiguous run of OW*N values.
    """
    c, h, w, n = xt_shape
    oh, ow = _output_hw(h, w, kh, kw, stride, pad)
    _check_cols(cols, (c * kh * kw, oh * ow * n))
    cols6 = cols.reshape(c, kh, kw, oh, ow, n)
    dxp = np.zeros((c, h + 2 * pad, w + 2 * pad, n), dtype=cols.dtype)
    for i, j, rs, cs in _offsets(kh, kw, oh, ow, stride):
        dxp[:, rs, cs] += cols6[:, i, j]
    if pad == 0:
        return dxp
    return np.ascontiguousarray(dxp[:, pad:pad + h, pad:pad + w])


def im2col_hwn_pool(xt: np.ndarray, kh: int, kw: int, pool: int, stride: int = 1, pad: int = 0,
                    out: np.ndarray | None = None) -> np.ndarray:
    """:func:`im2col_hwn` with the columns in *pool-phase order*, for a convolution whose output
    goes straight into a ``pool x pool`` max-pool with stride ``pool`` (windows that tile it).

    Inputs: as :func:`im2col_hwn`, plus ``pool`` (the output's OH and OW must be multiples of it).

    Returns cols (C*kh*kw, pool*pool*OH2*OW2*N) with ``OH2 = OH // pool``, ``OW2 = OW // pool``. Rows
    are as in :func:`im2col_hwn`; column ``q = ((a*pool + b)*OH2 + oh2)*OW2*N + ow2*N + n`` holds
    the patch of output position ``(oh, ow) = (oh2*pool + a, ow2*pool + b)``:
    ``cols[r, q] = x_padded[n, c, oh*stride + i, ow*stride + j]``. The columns are those of
    :func:`im2col_hwn`, permuted so that the ``pool*pool`` members (a, b) of every pooling window sit
    in ``pool*pool`` separate contiguous blocks: after the GEMM ``W @ cols`` -> (F, pool*pool,
    OH2*OW2*N), the max-pool is an element-wise maximum of those blocks, each a long contiguous run
    (in the (F, OH, OW, N) order a window member is a run of only N values).

    Implementation: one space-to-depth copy of the padded input with factor ``S = pool*stride``
    (``xs[rh, rw, c, h2, w2, n] = x_padded[n, c, S*h2 + rh, S*w2 + rw]``), after which every
    (filter offset, window member) pair is one block copy whose rows are OW2*N contiguous values:
    input row ``(oh2*pool + a)*stride + i = (oh2 + uh)*S + rh`` with ``(uh, rh) = divmod(a*stride + i, S)``.
    """
    c, h, w, n = xt.shape
    oh, ow = _output_hw(h, w, kh, kw, stride, pad)
    if pool <= 0 or oh % pool or ow % pool:
        raise ValueError(f"conv output {oh}x{ow} is not tiled by {pool}x{pool} pooling windows")
    oh2, ow2 = oh // pool, ow // pool
    out = _buffer(out, (c * kh * kw, pool * pool * oh2 * ow2 * n), xt.dtype)
    S = pool * stride
    hs, ws = -(-(h + 2 * pad) // S), -(-(w + 2 * pad) // S)
    if pad == 0 and h == hs * S and w == ws * S:
        xp = xt                      # nothing to pad (conv1 of LeNet-5: 28 = 14 * 2)
    else:
        xp = np.zeros((c, hs * S, ws * S, n), dtype=xt.dtype)
        xp[:, pad:pad + h, pad:pad + w] = xt
    xs = np.ascontiguousarray(xp.reshape(c, hs, S, ws, S, n).transpose(2, 4, 0, 1, 3, 5))
    cols8 = out.reshape(c, kh, kw, pool, pool, oh2, ow2, n)
    for i in range(kh):
        for a in range(pool):
            uh, rh = divmod(a * stride + i, S)
            for j in range(kw):
                for b in range(pool):
                    uw, rw = divmod(b * stride + j, S)
                    cols8[:, i, j, a, b] = xs[rh, rw, :, uh:uh + oh2, uw:uw + ow2]
    return out
