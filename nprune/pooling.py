"""Max pooling (:class:`MaxPool2D`), including the fused path that pools a Conv2D's output straight
from the GEMM's pool-phase order (:class:`~nprune.layers.PoolPhase`)."""

from __future__ import annotations

import numpy as np

from .layers import Layer, PoolPhase, PoolPhaseGrad

__all__ = ["MaxPool2D"]


class MaxPool2D(Layer):
    """Max pooling over ``size x size`` windows with ``stride`` (default ``size``), no padding.

    Output size ``OH = (H - size) // stride + 1`` (floor, like torch's ``ceil_mode=False``; trailing
    rows/columns that do not fill a window are ignored).

    Implementation: a loop over the ``size*size`` window offsets, each a strided slice of shape
    (N, C, OH, OW), combined with ``np.maximum``: a few long element-wise passes, where reshaping to
    (N, C, H/s, s, W/s, s) and reducing over two axes runs NumPy's much slower strided reduction. It
    handles tiling and overlapping windows.

    Ties: the gradient of each window goes to exactly ONE position, the first maximum in row-major
    order within the window (as torch does, and :func:`nprune.reference.maxpool_naive_backward`).
    """

    def __init__(self, size: int = 2, stride: int | None = None):
        super().__init__()
        self.size = int(size)
        self.stride = self.size if stride is None else int(stride)
        if self.size <= 0 or self.stride <= 0:
            raise ValueError(f"size and stride must be positive, got {size}, {stride}")

    def output_shape(self, x_shape):
        n, c, h, w = x_shape
        if h < self.size or w < self.size:
            raise ValueError(f"pool size {self.size} larger than input {h}x{w}")
        return (n, c, (h - self.size) // self.stride + 1, (w - self.size) // self.stride + 1)

    def _slice(self, di, dj, oh, ow):
        s = self.stride
        return (slice(None), slice(None), slice(di, di + s * (oh - 1) + 1, s),
                slice(dj, dj + s * (ow - 1) + 1, s))

    def forward(self, x, train=True):
        """Inputs: x (N, C, H, W). Returns y (N, C, OH, OW), x's dtype and memory order.
        Caches x and y when ``train``. A :class:`PoolPhase` input (fused Conv2D) is pooled over its
        contiguous phase blocks, with the same result and tie rule."""
        if isinstance(x, PoolPhase):
            return self._forward_phase(x, train)
        x = np.asarray(x)
        if x.ndim != 4:
            raise ValueError(f"MaxPool2D expects (N, C, H, W), got {x.shape}")
        n, c, oh, ow = self.output_shape(x.shape)
        offsets = [(di, dj) for di in range(self.size) for dj in range(self.size)]
        first = x[self._slice(0, 0, oh, ow)]
        y = np.empty_like(first)  # order "K": keeps x's memory order
        if len(offsets) == 1:
            y[...] = first
        else:
            np.maximum(first, x[self._slice(*offsets[1], oh, ow)], out=y)
        for di, dj in offsets[2:]:
            np.maximum(y, x[self._slice(di, dj, oh, ow)], out=y)
        if train:
            self._cache = (x, y)
        return y

    def backward(self, dout):
        """Inputs: dout (N, C, OH, OW). Returns dx (N, C, H, W) in x's memory order: dout routed
        to the first argmax of each window.

        One pass per window offset (row-major): ``hit = (x_offset == y) & remaining`` picks the
        windows whose first maximum sits at this offset, ``dx_offset = dout * hit``, and
        ``remaining ^= hit`` retires them (exact ties, e.g. flat background regions, are common).
        All temporaries are allocated in y's memory order so every ufunc runs over contiguous rows.
        """
        x, y = self._get_cache()
        if isinstance(x, PoolPhase):
            return self._backward_phase(x, y, dout)
        oh, ow = y.shape[2:]
        dtype = np.result_type(x.dtype, dout.dtype)
        n, c, h, w = x.shape
        tiling = self.stride >= self.size  # slices of different offsets never overlap
        exact_cover = self.stride == self.size and h == oh * self.size and w == ow * self.size
        # x's memory order; when the windows tile x exactly every entry is written below.
        dx = np.empty_like(x, dtype=dtype) if exact_cover else np.zeros_like(x, dtype=dtype)
        if dout.strides != y.strides:  # bring dout to y's memory order once (output-sized copy)
            d = np.empty_like(y, dtype=dout.dtype)  # order "K": keeps y's memory order
            d[...] = dout
            dout = d
        remaining = np.ones_like(y, dtype=bool)
        hit = np.empty_like(y, dtype=bool)
        tmp = None if tiling else np.empty_like(y, dtype=dx.dtype)
        for di in range(self.size):
            for dj in range(self.size):
                sl = self._slice(di, dj, oh, ow)
                np.equal(x[sl], y, out=hit)
                hit &= remaining
                if tiling:
                    np.multiply(dout, hit, out=dx[sl])
                else:
                    np.multiply(dout, hit, out=tmp)
                    dx[sl] += tmp
                remaining ^= hit
        return dx

    def _forward_phase(self, x: PoolPhase, train: bool):
        """Max over the s*s contiguous blocks of ``x.y`` (F, s*s, M2) -> (N, C, OH2, OW2) in
        (C, OH2, OW2, N) memory order, as the unfused path returns it."""
        if x.size != self.size or self.stride != self.size:
            raise ValueError(f"{self!r} got a PoolPhase for {x.size}x{x.size} windows")
        n, c, oh, ow = x.shape
        oh2, ow2 = oh // self.size, ow // self.size
        blocks = x.y
        p = np.empty((c, oh2 * ow2 * n), dtype=blocks.dtype)
        np.maximum(blocks[:, 0], blocks[:, 1], out=p)
        for k in range(2, blocks.shape[1]):
            np.maximum(p, blocks[:, k], out=p)
        if train:
            self._cache = (x, p)
        return p.reshape(c, oh2, ow2, n).transpose(3, 0, 1, 2)

    def _backward_phase(self, x: PoolPhase, p, dout):
        """dout (N, C, OH2, OW2) -> :class:`PoolPhaseGrad` (C, s*s, M2): each window's gradient to its
        first maximum in row-major window order (block order k = a*s + b), as in :meth:`backward`."""
        c = p.shape[0]
        dt = dout.transpose(1, 2, 3, 0)                       # (C, OH2, OW2, N)
        if not (dt.flags.c_contiguous and dt.dtype == p.dtype):
            dt = np.ascontiguousarray(dt, dtype=p.dtype)
        d = dt.reshape(c, -1)
        blocks = x.y
        dy = np.empty_like(blocks)
        remaining = np.ones(p.shape, dtype=bool)
        hit = np.empty(p.shape, dtype=bool)
        last = blocks.shape[1] - 1
        for k in range(last + 1):
            np.equal(blocks[:, k], p, out=hit)
            hit &= remaining
            np.multiply(d, hit, out=dy[:, k])
            if k < last:
                remaining ^= hit
        return PoolPhaseGrad(dy)

    def __repr__(self):
        return f"MaxPool2D(size={self.size}, stride={self.stride}, name={self.name!r})"
