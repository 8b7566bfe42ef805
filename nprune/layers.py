"""Layers with hand-written forward and backward passes, each carrying an elementwise weight mask
(Dense, Conv2D, ReLU, Flatten here; MaxPool2D in :mod:`nprune.pooling`).

The contract every layer keeps (tests check it):

* ``params``: ``dict[str, ndarray]`` -- the layer's parameters, owned by the layer. Optimisers update
  them **in place**, so code may hold references to them.
* ``grads``: ``dict[str, ndarray]`` -- same keys and shapes, filled by :meth:`Layer.backward`.
* ``prunable``: names of the parameters that may be pruned (the weights, never the biases).
* ``masks``: ``dict[str, ndarray | None]`` with one key per prunable name. ``None`` means "not pruned";
  otherwise an array of the parameter's shape and dtype holding exactly 0.0 or 1.0.
* The mask invariant ``param[mask == 0] == 0`` holds exactly, in three places: :meth:`set_mask` zeroes
  the pruned entries, ``backward`` multiplies the weight gradient by the mask, and optimisers re-mask
  the parameter after each step. Forward therefore uses the (already zeroed) weight directly.
* ``forward(x, train=True) -> y`` caches what backward needs (only when ``train``);
  ``backward(dout) -> dx`` never modifies ``dout`` or anything else the caller holds.
* ``need_dx``: when False (the first layer with parameters of a network; Sequential does not call
  backward on the layers before it) ``backward`` may skip dx and return None.
* ``fresh_params(rng) -> dict``: a new draw of every parameter from the layer's initialiser (used at
  construction and by the ``reinit`` reset strategy); nothing is assigned.
"""

from __future__ import annotations

import numpy as np

from .im2col import col2im_hwn, conv_output_size, im2col_hwn, im2col_hwn_pool
from .init import get_initializer

__all__ = [
    "Layer",
    "Dense",
    "Conv2D",
    "ReLU",
    "Flatten",
    "mask_to_apply",
]


def mask_to_apply(mask):
    """``mask`` when multiplying by it can change something; None when it is None or keeps every
    entry. The dense round of an experiment installs masks of all ones: multiplying a weight or its
    gradient by them would cost a pass over the array every step and change nothing, so backward and
    the optimisers skip them."""
    return None if mask is None or mask.all() else mask


def _pair(v, what: str) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"{what} must be an int or a pair, got {v!r}")
        a, b = int(v[0]), int(v[1])
    else:
        a = b = int(v)
    if a <= 0 or b <= 0:
        raise ValueError(f"{what} must be positive, got {v!r}")
    return a, b


class Layer:
    """Base class: no parameters; subclasses fill ``params``/``grads``/``masks``/``prunable``.

    Attributes: ``name`` (set by the model, default None), ``params``, ``grads`` (buffers reused
    across steps: ``backward`` overwrites them in place, so copy them if you need to keep a step's
    gradient), ``masks``, ``prunable``, ``need_dx`` (default True), ``dtype``.
    """

    def __init__(self, dtype=np.float32):
        self.name: str | None = None
        self.dtype = np.dtype(dtype)
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}
        self.masks: dict[str, np.ndarray | None] = {}
        self._mask_seen: dict = {}   # name -> (mask object, mask_to_apply(mask)), see _mask_to_apply
        self.prunable: tuple[str, ...] = ()
        self.need_dx: bool = True
        self._cache = None
        # Optional accelerated implementation (see nprune.kernels). When set, Dense and Conv2D hand
        # forward/backward to ``kernel.forward(layer, x, train)`` / ``kernel.backward(layer, dout)``
        # and set_mask calls ``kernel.mask_changed(layer)``. None = the dense code below.
        self.kernel = None

    # -- forward / backward -------------------------------------------------------------------
    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:  # pragma: no cover
        """Inputs: x (N, ...). Returns y (N, ...); caches what backward needs when ``train``."""
        raise NotImplementedError

    def backward(self, dout: np.ndarray) -> np.ndarray | None:  # pragma: no cover
        """Inputs: dout (the shape of y). Fills ``grads``; returns dx (the shape of x), or None
        when ``need_dx`` is False."""
        raise NotImplementedError

    def _get_cache(self):
        if self._cache is None:
            raise RuntimeError(
                f"{type(self).__name__}.backward called without a preceding forward(x, train=True)"
            )
        return self._cache

    # -- parameters and masks -----------------------------------------------------------------
    def _init_params(self, rng: np.random.Generator) -> None:
        """Draw the parameters and allocate zeroed gradient buffers and empty masks."""
        self.params = {k: np.ascontiguousarray(v) for k, v in self.fresh_params(rng).items()}
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.masks = {k: None for k in self.prunable}

    def fresh_params(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """A new draw of every parameter (nothing is assigned). Parameterless layers: ``{}``."""
        return {}

    def reset_parameters(self, rng: np.random.Generator) -> None:
        """Redraw every parameter *in place* (``[...] =``; references stay valid), then re-mask."""
        fresh = self.fresh_params(rng)
        for k, v in fresh.items():
            self.params[k][...] = v
        for k, m in self.masks.items():
            if m is not None:
                self.params[k][m == 0] = 0

    def set_mask(self, name: str, mask) -> None:
        """Set (or with ``mask=None`` clear) the mask of prunable parameter ``name``.

        ``mask`` may be bool or numeric (numeric entries must be exactly 0 or 1) with the
        parameter's shape. It is stored as a fresh 0/1 array of the parameter's dtype and the pruned
        entries of the parameter are set to exactly 0 in place.
        """
        if name not in self.prunable:
            raise KeyError(f"{name!r} is not a prunable parameter of {type(self).__name__} "
                           f"(prunable: {list(self.prunable)})")
        if mask is None:
            self.masks[name] = None
            if self.kernel is not None:
                self.kernel.mask_changed(self)
            return
        p = self.params[name]
        m = np.asarray(mask)
        if m.shape != p.shape:
            raise ValueError(f"mask for {name!r} has shape {m.shape}, expected {p.shape}")
        if m.dtype == np.bool_:
            keep = m
        else:
            keep = m != 0
            if not np.all(keep | (m == 0)) or not np.all(m[keep] == 1):
                raise ValueError(f"numeric mask for {name!r} must contain only 0 and 1")
        self.masks[name] = keep.astype(p.dtype)
        p[~keep] = 0
        if self.kernel is not None:
            self.kernel.mask_changed(self)

    def n_weights(self) -> int:
        """Number of entries in the prunable parameters (weights), pruned or not."""
        return int(sum(self.params[k].size for k in self.prunable))

    def _mask_to_apply(self, name: str):
        """:func:`mask_to_apply` of ``masks[name]``, decided once per mask object (masks are
        replaced, never edited in place, so a new object is a new decision)."""
        m = self.masks.get(name)
        seen = self._mask_seen.get(name)
        if seen is None or seen[0] is not m:
            seen = self._mask_seen[name] = (m, mask_to_apply(m))
        return seen[1]

    def _mask_grad(self, name: str) -> None:
        """``grads[name] *= masks[name]``, skipped where the mask prunes nothing."""
        m = self._mask_to_apply(name)
        if m is not None:
            self.grads[name] *= m

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class Dense(Layer):
    """Fully connected layer ``y = x @ W + b`` with ``W`` (in, out) and ``b`` (out,)."""

    def __init__(self, in_features: int, out_features: int, rng: np.random.Generator,
                 init: str = "glorot_normal", bias: bool = True, dtype=np.float32):
        super().__init__(dtype)
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.init = init
        self._init_fn = get_initializer(init)
        self.bias = bool(bias)
        self.prunable = ("W",)
        self._init_params(rng)

    def fresh_params(self, rng):
        shape = (self.in_features, self.out_features)
        p = {"W": self._init_fn(rng, shape, self.in_features, self.out_features, dtype=self.dtype)}
        if self.bias:
            p["b"] = np.zeros(self.out_features, dtype=self.dtype)
        return p

    def forward(self, x, train=True):
        """Inputs: x (N, in). Returns y (N, out) in the layer dtype. Caches x when ``train``."""
        if self.kernel is not None:
            return self.kernel.forward(self, x, train)
        return self.dense_forward(x, train)

    def dense_forward(self, x, train=True):
        """The dense code of :meth:`forward` (what runs without a kernel; kernels fall back on it).

        Inputs: x (N, in), any float dtype (cast to the layer's). Returns y = x @ W + b (N, out).
        Caches x when ``train``."""
        x = np.asarray(x)
        if x.dtype != self.dtype:
            x = x.astype(self.dtype)
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"Dense expects (N, {self.in_features}), got {x.shape}")
        y = np.matmul(x, self.params["W"])
        if self.bias:
            y += self.params["b"]
        if train:
            self._cache = x
        return y

    def backward(self, dout):
        """Inputs: dout (N, out). Fills grads W (in, out) (masked) and b (out,).

        Returns dx (N, in), or None when ``need_dx`` is False.
        """
        if self.kernel is not None:
            return self.kernel.backward(self, dout)
        return self.dense_backward(dout)

    def dense_backward(self, dout):
        """The dense code of :meth:`backward`. Inputs: dout (N, out). Fills grads W = x.T @ dout
        (in, out), times the mask, and b (out,). Returns dx = dout @ W.T (N, in), or None when
        ``need_dx`` is False."""
        x = self._get_cache()
        np.matmul(x.T, dout, out=self.grads["W"])
        self._mask_grad("W")
        if self.bias:
            np.sum(dout, axis=0, out=self.grads["b"])
        if not self.need_dx:
            return None
        return np.matmul(dout, self.params["W"].T)

    def __repr__(self):
        return f"Dense({self.in_features}, {self.out_features}, name={self.name!r})"


class PoolPhase:
    """A Conv2D output handed straight to the tiling MaxPool2D after it (see ``Conv2D.pool_fuse``).

    ``y`` is the GEMM result (F, s*s, OH2*OW2*N) in pool-phase order (:func:`im2col_hwn_pool`): block
    ``k = a*s + b`` holds the window members at offset (a, b) of every ``s x s`` window. ``shape`` is
    the (N, F, OH, OW) shape of the convolution's output; ``size`` is ``s``. Only MaxPool2D reads it."""

    __slots__ = ("y", "shape", "size", "dtype")

    def __init__(self, y, shape, size):
        self.y, self.shape, self.size, self.dtype = y, tuple(shape), int(size), y.dtype


class PoolPhaseGrad:
    """The gradient MaxPool2D returns for a :class:`PoolPhase` input: ``dy`` (F, s*s, OH2*OW2*N) in
    the same pool-phase order, read by the Conv2D that made the PoolPhase."""

    __slots__ = ("dy",)

    def __init__(self, dy):
        self.dy = dy


class Conv2D(Layer):
    """2-D convolution (cross-correlation, as in torch) on NCHW input.

    ``W`` has shape (F, C, kh, kw) (torch's layout) and ``b`` (F,). Implementation: im2col into the
    layout (C*kh*kw, OH*OW*N) (see :func:`nprune.im2col.im2col_hwn`) followed by one GEMM
    ``W.reshape(F, -1) @ cols`` -> (F, OH*OW*N), to which the bias is added in place.

    Memory order ("batch-last"): the columns are built by :func:`~nprune.im2col.im2col_hwn` from the
    input viewed as (C, H, W, N), so the GEMM result (F, OH*OW*N) *is* the output in (F, OH, OW, N)
    memory order. forward returns it as the view ``ymat.reshape(F, OH, OW, N).transpose(3, 0, 1, 2)``:
    an (N, F, OH, OW) array (all indexing is NCHW, as everywhere) that is not C-contiguous -- no
    transpose copy is made. MaxPool2D keeps whatever memory order it gets, so the next Conv2D's
    input is already (C, H, W, N) in memory and im2col reads it directly; in backward a gradient in
    that order is used by the GEMMs without a copy, and dx is returned the same way (a view of a
    (C, H, W, N) array). Batch-last makes every im2col/col2im/pool copy run over contiguous rows of
    ``W*N`` values instead of ``W`` (8 for conv2 of LeNet-5), and saves the transposing copies a
    batch-first layout needs between layers. Call ``np.ascontiguousarray`` if C order is needed.
    In training mode the columns are kept for backward (in a buffer reused across steps).

    Fused pooling (``pool_fuse = s``, set by :func:`nprune.nets.fuse_conv_pool` when a MaxPool2D with
    size = stride = s follows and the layer needs no dx, i.e. conv1 of LeNet-5): the columns are built
    in pool-phase order (:func:`~nprune.im2col.im2col_hwn_pool`) and forward returns a
    :class:`PoolPhase` instead of an array; the MaxPool2D then pools over s*s contiguous blocks
    and its backward returns a :class:`PoolPhaseGrad`, used here as ``dout``. Same values as the
    unfused pair (the GEMM's columns are only permuted; tests check it), without the strided
    per-window passes that cost most of the pool's time. Set ``pool_fuse = 0`` to switch it off.
    """

    #: pool size of a fused MaxPool2D that follows (0: not fused); see the class docstring
    pool_fuse: int = 0

    def __init__(self, in_channels: int, out_channels: int, kernel_size, rng: np.random.Generator,
                 stride: int = 1, padding: int = 0, init: str = "glorot_normal", bias: bool = True,
                 dtype=np.float32):
        super().__init__(dtype)
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.kh, self.kw = _pair(kernel_size, "kernel_size")
        self.stride = int(stride)
        self.padding = int(padding)
        if self.stride <= 0 or self.padding < 0:
            raise ValueError(f"need stride > 0 and padding >= 0, got {stride}, {padding}")
        self.init = init
        self._init_fn = get_initializer(init)
        self.bias = bool(bias)
        self.prunable = ("W",)
        self._bufs: dict[str, np.ndarray] = {}
        self._init_params(rng)

    def fresh_params(self, rng):
        f, c, kh, kw = self.out_channels, self.in_channels, self.kh, self.kw
        p = {"W": self._init_fn(rng, (f, c, kh, kw), c * kh * kw, f * kh * kw, dtype=self.dtype)}
        if self.bias:
            p["b"] = np.zeros(f, dtype=self.dtype)
        return p

    def output_shape(self, x_shape):
        n, c, h, w = x_shape
        return (n, self.out_channels, conv_output_size(h, self.kh, self.stride, self.padding),
                conv_output_size(w, self.kw, self.stride, self.padding))

    def _buf(self, key, shape):
        b = self._bufs.get(key)
        if b is None or b.shape != shape:
            b = np.empty(shape, dtype=self.dtype)
            self._bufs[key] = b
        return b

    def forward(self, x, train=True):
        """Inputs: x (N, C, H, W), any memory order. Returns y (N, F, OH, OW), layer dtype, in
        (F, OH, OW, N) memory order (see the class docstring), with
        ``OH = (H + 2*padding - kh) // stride + 1`` (must divide exactly, else ValueError).
        Caches the im2col columns (C*kh*kw, OH*OW*N) when ``train``.
        """
        if self.kernel is not None:
            return self.kernel.forward(self, x, train)
        return self.dense_forward(x, train)

    def dense_forward(self, x, train=True):
        """The masked dense forward (the default kernel; also what nprune.kernels falls back to)."""
        x = np.asarray(x)
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"Conv2D expects (N, {self.in_channels}, H, W), got {x.shape}")
        n, f, oh, ow = self.output_shape(x.shape)
        k = self.in_channels * self.kh * self.kw
        m = n * oh * ow
        # (C, H, W, N): a free view when x came from Conv2D/MaxPool2D, else one small copy (the
        # input images: N*C*H*W values, 25x fewer than the columns for a 5x5 filter).
        xt = np.ascontiguousarray(x.transpose(1, 2, 3, 0), dtype=self.dtype)
        s = self.pool_fuse
        fuse = s > 1 and not self.need_dx and oh % s == 0 and ow % s == 0
        # In eval mode use a fresh buffer so a cached training batch is never overwritten.
        buf = self._buf("cols", (k, m)) if train else None
        if fuse:
            cols = im2col_hwn_pool(xt, self.kh, self.kw, s, self.stride, self.padding, out=buf)
        else:
            cols = im2col_hwn(xt, self.kh, self.kw, self.stride, self.padding, out=buf)
        ymat = np.matmul(self.params["W"].reshape(f, k), cols)  # (F, OH*OW*N), fresh: the output
        if self.bias:
            ymat += self.params["b"][:, None]
        if train:
            self._cache = (xt.shape, cols)
        if fuse:
            return PoolPhase(ymat.reshape(f, s * s, m // (s * s)), (n, f, oh, ow), s)
        return ymat.reshape(f, oh, ow, n).transpose(3, 0, 1, 2)

    def backward(self, dout):
        """Inputs: dout (N, F, OH, OW), any memory order ((F, OH, OW, N) order avoids a copy).
        Fills grads W (F, C, kh, kw) (masked) and b (F,).

        Returns dx (N, C, H, W) in (C, H, W, N) memory order, or None when ``need_dx`` is False.
        """
        if self.kernel is not None:
            return self.kernel.backward(self, dout)
        return self.dense_backward(dout)

    def dense_backward(self, dout):
        """The masked dense backward (the default kernel; also what nprune.kernels falls back to)."""
        xt_shape, cols = self._get_cache()
        f = self.out_channels
        k, m = cols.shape
        if isinstance(dout, PoolPhaseGrad):  # fused pooling: columns and dout both in phase order
            if self.need_dx:   # forward fused only with need_dx False; no phase-order col2im exists
                raise RuntimeError(f"{self!r}: need_dx was switched on between a fused forward and "
                                   "backward; run forward again")
            dt = dout.dy
        else:
            dt = dout.transpose(1, 2, 3, 0)  # (F, OH, OW, N)
        if dt.flags.c_contiguous and dt.dtype == self.dtype:
            dmat = dt.reshape(f, m)  # a view; only read below
        else:
            dmat = self._buf("fm", (f, m))
            dmat.reshape(dt.shape)[...] = dt
        # dW = dout_mat @ cols^T, computed as (cols @ dout_mat^T)^T: OpenBLAS runs this orientation
        # ~20-25% faster on the LeNet-5 shapes (long K = OH*OW*N, small F and C*kh*kw).
        gwt = np.matmul(cols, dmat.T, out=self._buf("gWt", (k, f)))
        self.grads["W"].reshape(f, k)[...] = gwt.T
        self._mask_grad("W")
        if self.bias:  # db = row sums of dout_mat, as a GEMV (4x faster than np.sum here)
            ones = self._bufs.get("ones")
            if ones is None or ones.shape != (m,):
                ones = self._bufs["ones"] = np.ones(m, dtype=self.dtype)
            np.matmul(dmat, ones, out=self.grads["b"])
        if not self.need_dx:
            return None
        wmat = self.params["W"].reshape(f, k)
        dcols = np.matmul(wmat.T, dmat, out=self._buf("dcols", (k, m)))
        dxt = col2im_hwn(dcols, xt_shape, self.kh, self.kw, self.stride, self.padding)
        return dxt.transpose(3, 0, 1, 2)

    def __repr__(self):
        return (f"Conv2D({self.in_channels}, {self.out_channels}, ({self.kh}, {self.kw}), "
                f"stride={self.stride}, padding={self.padding}, name={self.name!r})")


class ReLU(Layer):
    """Elementwise ``max(x, 0)``; the gradient at exactly 0 is taken as 0."""

    def forward(self, x, train=True):
        """Inputs: x of any shape. Returns y = max(x, 0), same shape and dtype.
        Caches the boolean mask ``x > 0`` when ``train``."""
        x = np.asarray(x)
        y = np.maximum(x, 0)
        if train:
            self._cache = x > 0
        return y

    def backward(self, dout):
        """Inputs: dout (same shape as x). Returns dx = dout * (x > 0) (a new array)."""
        pos = self._get_cache()
        return np.multiply(dout, pos, dtype=dout.dtype)


class Flatten(Layer):
    """(N, C, H, W) (or any (N, ...)) -> (N, C*H*W) in C order."""

    def forward(self, x, train=True):
        """Inputs: x (N, ...). Returns y (N, prod(...)) (a view when x is contiguous).
        Caches x's shape when ``train``."""
        x = np.asarray(x)
        if train:
            self._cache = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dout):
        """Inputs: dout (N, D). Returns dx reshaped to the cached input shape (a view of dout)."""
        return dout.reshape(self._get_cache())
