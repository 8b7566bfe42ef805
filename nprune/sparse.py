"""Sparse execution of pruned Dense and Conv2D layers (kernels plugged into ``layer.kernel``).

A masked dense matmul does the same work at 98% sparsity as at 0%. The kernels here hold each pruned
weight matrix in two forms, both rebuilt only when the mask changes and refreshed (values only, one
``np.take`` per form) before every forward:

* **compaction**: rows/columns of the weight matrix that are entirely pruned (dead input pixels, dead
  hidden units, dead filters, dead input channel taps) are dropped, so a smaller dense BLAS GEMM runs
  on the live block ``W[live_in][:, live_out]``;
* **sparse**: the live block in CSR form (and the CSR of its transpose), multiplied with SciPy's
  low-level ``_sparsetools.csr_matvecs`` on preallocated outputs (no per-call scipy object).

Every product picks its method independently:

* forward   ``Y = A @ X``           -- ``compact`` (GEMM on the live block) or ``sparse`` (CSR);
* input-grad ``dX = A^T @ dY``      -- ``compact`` or ``sparse`` (CSR of A^T, or CSC-of-A);
* weight-grad ``dA = dY @ X^T`` restricted to the nonzeros -- ``compact`` (GEMM on the live block,
  then gather the nonzeros) or ``sparse`` (a sampled dense-dense product: per nonzero (r, c) the dot
  product of row r of dY and row c of X, chunked). A full dense dW is never formed in either case.

Matrix layout: each layer is viewed as ``A @ X`` with ``X`` row-major (features, samples):

* Dense: ``A = W.T`` (out, in), ``X = x.T`` (in, N). The kernel returns ``y`` as the transposed view of
  a C-contiguous (out, N) result, i.e. an F-ordered (N, out) array; the next sparse Dense layer (after
  an elementwise ReLU, which keeps the order) then gets its ``x.T`` without a copy.
* Conv2D: ``A = W.reshape(F, C*kh*kw)``, ``X = im2col(x)`` (C*kh*kw, N*OH*OW) -- already the layout.

Gradients land in ``layer.grads`` as full-shape arrays: the entries at pruned positions are zeroed once
(when the structure is built) and only the nonzero positions are written afterwards.

Choice per layer (:func:`apply_kernel`): ``dense`` (``layer.kernel = None``: the masked dense code in
layers.py), ``sparse`` (always the kernel, with the cheapest predicted method per product), ``auto``
(the kernel only where the cost model predicts a clear win over dense, else dense; re-decided whenever
the mask changes, and per batch size).

Cost model constants (``COST``) were measured on the development machine (2 cores, AVX-512, OpenBLAS
with 2 threads, SciPy 1.17) with ``python -m nprune.sparse --calibrate``; :func:`calibrate` re-measures
them in-process.
"""
from __future__ import annotations

import time

import numpy as np
from scipy.sparse import _sparsetools as _st

from .im2col import col2im, im2col
from .layers import Conv2D, Dense

__all__ = [
    "DenseKernelSparse",
    "ConvKernelSparse",
    "SparseMatrix",
    "apply_kernel",
    "kernel_report",
    "calibrate",
    "COST",
    "AUTO_MARGIN",
]

# Seconds per multiply-add / per element / per call; measured with ``python -m nprune.sparse --calibrate``.
COST = {
    "gemm_fma": 8.7e-12,      # BLAS sgemm, 2 threads, per multiply-add (large enough matrices)
    "gemm_call": 4.0e-6,      # fixed cost of one np.matmul call (+ Python around it)
    "spmm_fma": 1.26e-10,     # csr_matvecs, per stored nonzero per column of X
    "spmm_call": 8.0e-6,      # fixed cost of one csr_matvecs call (+ output zeroing)
    "sddmm_fma": 5.7e-10,     # sampled product (gather + multiply + sum), per nonzero per sample
    "sddmm_call": 2.0e-5,
    "copy_elem": 5.8e-10,     # gather/transposing copy, per element
    "copy_call": 3.0e-6,
}
# auto attaches the kernel only if it is predicted at most AUTO_MARGIN times the dense cost.
AUTO_MARGIN = 0.8
# ... and then keeps it only if the median of AUTO_TRIALS timed calls is <= AUTO_VERIFY x dense.
AUTO_TRIALS = 3
AUTO_VERIFY = 0.95
# Dense layers process at most this many samples per sparse call (larger batches are chunked, which
# keeps the transposed blocks in cache and avoids one huge transposing copy).
CHUNK = 1024
# a live block is compacted along an axis only if it drops at least this fraction of that axis
MIN_DROP = 0.0

_F32 = np.float32


class SparseMatrix:
    """The pruned matrix ``A`` (R, C), a view of a weight array through ``flat`` indices.

    ``flat[r, c]`` is the position of ``A[r, c]`` in ``W.ravel()``. After :meth:`rebuild(mask)` it
    holds the live rows/columns, the CSR of the live block (and of its transpose) and the gather
    indices; :meth:`refresh(W)` copies the current values in (values only)."""

    def __init__(self, flat: np.ndarray):
        self.flat = flat
        self.R, self.C = flat.shape
        self.rebuild(None)

    def rebuild(self, mask2d: np.ndarray | None) -> None:
        R, C = self.R, self.C
        m = np.ones((R, C), bool) if mask2d is None else (np.asarray(mask2d) != 0)
        rows_alive = m.any(axis=1)
        cols_alive = m.any(axis=0)
        self.live_r = np.flatnonzero(rows_alive)
        self.live_c = np.flatnonzero(cols_alive)
        self.all_r = self.live_r.size == R
        self.all_c = self.live_c.size == C
        nr, nc = self.live_r.size, self.live_c.size
        self.nr, self.nc = nr, nc
        sub = m[np.ix_(self.live_r, self.live_c)]
        rr, cc = np.nonzero(sub)                       # row-major: CSR order of the live block
        self.nnz = int(rr.size)
        self.rr = rr.astype(np.intp)
        self.cc = cc.astype(np.intp)
        idx_t = np.int32
        self.indptr = np.zeros(nr + 1, idx_t)
        np.cumsum(np.bincount(rr, minlength=nr), out=self.indptr[1:])
        self.indices = cc.astype(idx_t)
        flat_sub = self.flat[np.ix_(self.live_r, self.live_c)]
        self.gidx = flat_sub[rr, cc].astype(np.intp)   # W.ravel() positions of the nonzeros, CSR order
        self.blk_pos = (rr * nc + cc).astype(np.intp)  # positions of the nonzeros in the live block
        self.blk_gidx = flat_sub.ravel().astype(np.intp)
        # CSR of the transpose (live block (nc, nr)), with its own gather index.
        perm = np.lexsort((rr, cc))
        self.indptr_t = np.zeros(nc + 1, idx_t)
        np.cumsum(np.bincount(cc, minlength=nc), out=self.indptr_t[1:])
        self.indices_t = rr[perm].astype(idx_t)
        self.gidx_t = self.gidx[perm]
        self.data = np.zeros(self.nnz, _F32)
        self.data_t = np.zeros(self.nnz, _F32)
        self.blk = np.zeros((nr, nc), _F32)
        self.density = self.nnz / max(R * C, 1)
        self.block_density = self.nnz / max(nr * nc, 1)
        self._have = set()

    # -- values ------------------------------------------------------------------------------
    def refresh(self, W: np.ndarray, what=("csr",)) -> None:
        """Copy the current weight values into the structures named in ``what``
        (``csr``, ``csr_t``, ``blk``). Never rebuilds any index."""
        wf = W.reshape(-1)
        if "csr" in what:
            np.take(wf, self.gidx, out=self.data)
        if "csr_t" in what:
            np.take(wf, self.gidx_t, out=self.data_t)
        if "blk" in what:
            np.take(wf, self.blk_gidx, out=self.blk.reshape(-1))

    # -- products on the live block (all row-major, float32) ----------------------------------
    def matmul(self, X: np.ndarray, mode: str) -> np.ndarray:
        """``A_live @ X`` with X (nc, M) C-contiguous -> (nr, M)."""
        M = X.shape[1]
        if mode == "compact":
            return np.matmul(self.blk, X)
        Y = np.zeros((self.nr, M), _F32)
        if self.nnz:
            _st.csr_matvecs(self.nr, self.nc, M, self.indptr, self.indices, self.data,
                            X.reshape(-1), Y.reshape(-1))
        return Y

    def tmatmul(self, D: np.ndarray, mode: str) -> np.ndarray:
        """``A_live.T @ D`` with D (nr, M) C-contiguous -> (nc, M).

        ``sparse`` uses the CSR of the transpose; ``csc`` uses the CSR arrays of A read as the CSC
        of A.T (no second value array)."""
        M = D.shape[1]
        if mode == "compact":
            return np.matmul(self.blk.T, D)
        Z = np.zeros((self.nc, M), _F32)
        if self.nnz:
            if mode == "csc":
                _st.csc_matvecs(self.nc, self.nr, M, self.indptr, self.indices, self.data,
                                D.reshape(-1), Z.reshape(-1))
            else:
                _st.csr_matvecs(self.nc, self.nr, M, self.indptr_t, self.indices_t, self.data_t,
                                D.reshape(-1), Z.reshape(-1))
        return Z

    def grad_values(self, D: np.ndarray, X: np.ndarray, mode: str) -> np.ndarray:
        """``(D @ X.T)`` at the nonzeros (CSR order), D (nr, M), X (nc, M) -> (nnz,) float32."""
        if self.nnz == 0:
            return np.zeros(0, _F32)
        if mode == "compact":
            blk = np.matmul(D, X.T)
            return np.take(blk.reshape(-1), self.blk_pos)
        out = np.empty(self.nnz, _F32)
        M = D.shape[1]
        step = max(256, (1 << 18) // max(M, 1))        # ~1 MB of gathered rows per chunk
        for s in range(0, self.nnz, step):
            e = min(s + step, self.nnz)
            a = np.take(D, self.rr[s:e], axis=0)
            b = np.take(X, self.cc[s:e], axis=0)
            np.einsum("km,km->k", a, b, out=out[s:e])
        return out

    # -- cost model ----------------------------------------------------------------------------
    def plan(self, M: int, need_dx: bool, dense_extra: float = 0.0) -> tuple[dict, float, float]:
        """Cheapest predicted method per product for M samples/columns.

        Returns (modes, predicted kernel seconds, predicted dense seconds) for a training step
        (forward + backward); ``dense_extra`` is dense-path work the kernel avoids (e.g. the mask
        multiply of the gradient)."""
        c = COST
        R, C, nr, nc, nnz = self.R, self.C, self.nr, self.nc, self.nnz
        gemm = lambda k: c["gemm_fma"] * k * M + c["gemm_call"]
        spmm = lambda: c["spmm_fma"] * nnz * M + c["spmm_call"]
        copy = lambda n: c["copy_elem"] * n + c["copy_call"]
        # forward
        f_c = gemm(nr * nc) + copy(nr * nc)
        f_s = spmm()
        b_c = gemm(nr * nc)
        b_s = spmm()
        g_c = gemm(nr * nc) + copy(nnz)
        g_s = c["sddmm_fma"] * nnz * M + c["sddmm_call"]
        modes = {
            "fwd": "compact" if f_c <= f_s else "sparse",
            "dx": "compact" if b_c <= b_s else "sparse",
            "dw": "compact" if g_c <= g_s else "sparse",
        }
        k = min(f_c, f_s) + min(g_c, g_s) + (min(b_c, b_s) if need_dx else 0.0)
        d = 2 * gemm(R * C) + (gemm(R * C) if need_dx else 0.0) + dense_extra
        return modes, k, d

    def plan_eval(self, M: int) -> tuple[str, float, float]:
        c = COST
        f_c = c["gemm_fma"] * self.nr * self.nc * M + c["gemm_call"] + c["copy_elem"] * self.nr * self.nc
        f_s = c["spmm_fma"] * self.nnz * M + c["spmm_call"]
        d = c["gemm_fma"] * self.R * self.C * M + c["gemm_call"]
        return ("compact" if f_c <= f_s else "sparse"), min(f_c, f_s), d


class _KernelBase:
    """Common logic: structure rebuild on mask change, per-batch-size plans, forced modes."""

    def __init__(self, layer, policy: str = "sparse", modes: dict | None = None):
        if policy not in ("sparse", "auto"):
            raise ValueError(f"policy must be 'sparse' or 'auto', got {policy!r}")
        self.policy = policy
        self.forced = dict(modes) if modes else None   # e.g. {"fwd": "sparse", "dx": "csc", ...}
        self.sm = SparseMatrix(self._flat(layer))
        self.mask_changed(layer)

    def mask_changed(self, layer) -> None:
        m = layer.masks.get("W")
        self.sm.rebuild(None if m is None else self._mask2d(layer, m))
        layer.grads["W"][...] = 0                      # pruned entries stay zero from now on
        self._plans = {}
        self._trials = {}
        self._timing = None
        self._cache = None
        self.last_plan = {}

    def _plan(self, layer, M: int, train: bool):
        key = (M, train, layer.need_dx)
        p = self._plans.get(key)
        if p is None:
            if train:
                modes, k, d = self.sm.plan(M, layer.need_dx, dense_extra=self._mask_cost())
            else:
                mode, k, d = self.sm.plan_eval(M)
                modes = {"fwd": mode, "dx": "compact", "dw": "compact"}
            if self.forced:
                modes = {**modes, **self.forced}
            use = self.policy == "sparse" or k <= AUTO_MARGIN * d
            p = [use, modes, k, d]
            self._plans[key] = p
            if use and self.policy == "auto":
                self._trials[key] = {"kernel": [], "dense": []}
        trial = self._trials.get(key)
        if trial is not None:
            # auto verifies a predicted win on the machine: the first calls alternate kernel/dense
            # (both give the same results), timed from forward to the end of backward.
            arm = "kernel" if len(trial["kernel"]) <= len(trial["dense"]) else "dense"
            self._timing = (key, arm, time.perf_counter())
            if min(len(trial["kernel"]), len(trial["dense"])) >= AUTO_TRIALS:
                tk, td = np.median(trial["kernel"]), np.median(trial["dense"])
                p[0] = bool(tk <= AUTO_VERIFY * td)
                self.verified = getattr(self, "verified", {})
                self.verified[key] = (float(tk), float(td))
                del self._trials[key]
                self._timing = None
            else:
                self._update_last(M, train, p)
                return (arm == "kernel"), p[1], p[2], p[3]
        self._update_last(M, train, p)
        return tuple(p)

    def _update_last(self, M, train, p):
        self.last_plan = dict(samples=M, train=train, use_kernel=bool(p[0]), modes=p[1],
                              predicted_kernel_s=p[2], predicted_dense_s=p[3])

    def _stop_timer(self, train_end: bool) -> None:
        t = getattr(self, "_timing", None)
        if t is None:
            return
        key, arm, t0 = t
        if key[1] and not train_end:      # training plan: wait for the backward
            return
        tr = self._trials.get(key)
        if tr is not None:
            tr[arm].append(time.perf_counter() - t0)
        self._timing = None

    def forward(self, layer, x, train=True):
        y = self._forward(layer, x, train)
        if not train:
            self._stop_timer(False)
        return y

    def backward(self, layer, dout):
        dx = self._backward(layer, dout)
        self._stop_timer(True)
        return dx

    def _mask_cost(self) -> float:
        return COST["copy_elem"] * self.sm.R * self.sm.C

    def _refresh(self, layer, modes, train):
        what = []
        what.append("blk" if modes["fwd"] == "compact" else "csr")
        if train and layer.need_dx:
            if modes["dx"] == "compact":
                what.append("blk")
            elif modes["dx"] == "csc":
                what.append("csr")
            else:
                what.append("csr_t")
        self.sm.refresh(layer.params["W"], tuple(set(what)))

    def _write_grad(self, layer, vals):
        np.put(layer.grads["W"].reshape(-1), self.sm.gidx, vals)


def _flat_dense(layer):
    # A = W.T: A[o, i] is W[i, o] at flat position i * out + o
    return np.arange(layer.in_features * layer.out_features).reshape(
        layer.in_features, layer.out_features).T.copy()


class DenseKernelSparse(_KernelBase):
    """Sparse/compacted kernel for :class:`nprune.layers.Dense` (``y = x @ W + b``)."""

    _flat = staticmethod(_flat_dense)

    @staticmethod
    def _mask2d(layer, m):
        return m.T

    @staticmethod
    def _dense_forward(layer, x, train):
        k = layer.kernel
        layer.kernel = None
        try:
            return layer.forward(x, train)
        finally:
            layer.kernel = k

    def _forward(self, layer, x, train=True):
        x = np.asarray(x)
        if x.dtype != layer.dtype:
            x = x.astype(layer.dtype)
        if x.ndim != 2 or x.shape[1] != layer.in_features:
            raise ValueError(f"Dense expects (N, {layer.in_features}), got {x.shape}")
        n = x.shape[0]
        use, modes, _, _ = self._plan(layer, min(n, CHUNK), train)
        if not use:
            self._cache = ("dense",)
            return self._dense_forward(layer, x, train)
        sm = self.sm
        self._refresh(layer, modes, train)
        b = layer.params.get("b") if layer.bias else None
        if n <= CHUNK:
            xt = self._gather_xt(x)
            yt = self._fwd_block(xt, modes["fwd"], b)
            if train:
                self._cache = ("sparse", modes, xt, n)
            return yt.T
        y = np.empty((n, layer.out_features), layer.dtype)
        for s in range(0, n, CHUNK):
            xb = x[s:s + CHUNK]
            y[s:s + CHUNK] = self._fwd_block(self._gather_xt(xb), modes["fwd"], b).T
        if train:
            self._cache = ("sparse", modes, None, x)
        return y

    def _gather_xt(self, x):
        sm = self.sm
        xt = x.T
        if not sm.all_c:
            if xt.flags.c_contiguous:
                return np.take(xt, sm.live_c, axis=0)
            return np.ascontiguousarray(np.take(x, sm.live_c, axis=1).T)
        return np.ascontiguousarray(xt)

    def _fwd_block(self, xt, mode, b):
        sm = self.sm
        yl = sm.matmul(xt, mode)
        if sm.all_r:
            yt = yl
        else:
            yt = np.zeros((sm.R, xt.shape[1]), _F32)
            yt[sm.live_r] = yl
        if b is not None:
            yt += b[:, None]
        return yt

    def _backward(self, layer, dout):
        c = self._cache
        if c is None:
            raise RuntimeError("Dense.backward called without a preceding forward(x, train=True)")
        if c[0] == "dense":
            k = layer.kernel
            layer.kernel = None
            try:
                return layer.backward(dout)
            finally:
                layer.kernel = k
        _, modes, xt, n = c
        if xt is None:                                   # large batch: rebuild the columns once
            xt, n = self._gather_xt(n), n.shape[0]
        sm = self.sm
        dt = dout.T
        if sm.all_r:
            dtl = np.ascontiguousarray(dt)
        elif dt.flags.c_contiguous:
            dtl = np.take(dt, sm.live_r, axis=0)
        else:
            dtl = np.ascontiguousarray(np.take(dout, sm.live_r, axis=1).T)
        if layer.bias:
            np.sum(dout, axis=0, out=layer.grads["b"])
        self._write_grad(layer, sm.grad_values(dtl, xt, modes["dw"]))
        if not layer.need_dx:
            return None
        z = sm.tmatmul(dtl, modes["dx"])
        if sm.all_c:
            return z.T
        dxt = np.zeros((sm.C, n), _F32)
        dxt[sm.live_c] = z
        return dxt.T


class ConvKernelSparse(_KernelBase):
    """Sparse/compacted kernel for :class:`nprune.layers.Conv2D`: the im2col GEMM
    ``W.reshape(F, C*kh*kw) @ cols`` with the filter matrix compacted (dead filters and dead
    (channel, tap) columns dropped) and/or sparse."""

    @staticmethod
    def _flat(layer):
        f = layer.out_channels
        k = layer.in_channels * layer.kh * layer.kw
        return np.arange(f * k).reshape(f, k)

    @staticmethod
    def _mask2d(layer, m):
        return m.reshape(m.shape[0], -1)

    def _forward(self, layer, x, train=True):
        x = np.asarray(x)
        if x.dtype != layer.dtype:
            x = x.astype(layer.dtype)
        if x.ndim != 4 or x.shape[1] != layer.in_channels:
            raise ValueError(f"Conv2D expects (N, {layer.in_channels}, H, W), got {x.shape}")
        n, f, oh, ow = layer.output_shape(x.shape)
        m = n * oh * ow
        use, modes, _, _ = self._plan(layer, m, train)
        if not use:
            self._cache = ("dense",)
            k = layer.kernel
            layer.kernel = None
            try:
                return layer.forward(x, train)
            finally:
                layer.kernel = k
        sm = self.sm
        self._refresh(layer, modes, train)
        cols = im2col(x, layer.kh, layer.kw, layer.stride, layer.padding)
        xl = cols if sm.all_c else np.take(cols, sm.live_c, axis=0)
        yl = sm.matmul(xl, modes["fwd"])
        y = np.empty((n, f, oh, ow), layer.dtype)
        if sm.all_r:
            ysrc = yl.reshape(f, n, oh, ow).transpose(1, 0, 2, 3)
            if layer.bias:
                np.add(ysrc, layer.params["b"][:, None, None], out=y)
            else:
                y[...] = ysrc
        else:
            yv = y.transpose(1, 0, 2, 3)                  # (F, N, OH, OW) view
            yv[...] = (layer.params["b"][:, None, None, None] if layer.bias else 0)
            yv[sm.live_r] += yl.reshape(sm.nr, n, oh, ow)
        if train:
            self._cache = ("sparse", modes, x.shape, xl)
        return y

    def _backward(self, layer, dout):
        c = self._cache
        if c is None:
            raise RuntimeError("Conv2D.backward called without a preceding forward(x, train=True)")
        if c[0] == "dense":
            k = layer.kernel
            layer.kernel = None
            try:
                return layer.backward(dout)
            finally:
                layer.kernel = k
        _, modes, x_shape, xl = c
        sm = self.sm
        f = layer.out_channels
        n = dout.shape[0]
        dsrc = dout.transpose(1, 0, 2, 3)                # (F, N, OH, OW)
        mcols = n * dout.shape[2] * dout.shape[3]
        if sm.all_r:
            dl = np.ascontiguousarray(dsrc).reshape(f, mcols)
        else:
            dl = np.ascontiguousarray(dsrc[sm.live_r]).reshape(sm.nr, mcols)
        if layer.bias:
            np.sum(dsrc, axis=(1, 2, 3), out=layer.grads["b"])
        self._write_grad(layer, sm.grad_values(dl, xl, modes["dw"]))
        if not layer.need_dx:
            return None
        z = sm.tmatmul(dl, modes["dx"])
        if sm.all_c:
            dcols = z
        else:
            dcols = np.zeros((sm.C, z.shape[1]), _F32)
            dcols[sm.live_c] = z
        return col2im(dcols, x_shape, layer.kh, layer.kw, layer.stride, layer.padding)


def _kernel_for(layer, policy, modes=None):
    if isinstance(layer, Dense):
        return DenseKernelSparse(layer, policy, modes)
    if isinstance(layer, Conv2D):
        return ConvKernelSparse(layer, policy, modes)
    return None


def apply_kernel(model, choice: str = "auto", modes: dict | None = None) -> None:
    """Set the kernel of every Dense/Conv2D layer of ``model``.

    ``choice``: ``dense`` (``layer.kernel = None``), ``sparse`` (always the sparse/compacted kernel,
    with the cheapest predicted method per product), ``auto`` (the kernel decides per layer, per batch
    size and per mask whether to run the sparse/compacted products or hand over to the dense code).
    ``modes`` (tests/benchmarks) forces methods: ``{"fwd": "compact"|"sparse", "dx":
    "compact"|"sparse"|"csc", "dw": "compact"|"sparse"}``.
    A layer without a mask is also given the kernel (``sparse``: compact == dense GEMM there).
    """
    if choice not in ("dense", "sparse", "auto"):
        raise ValueError(f"kernel choice must be dense, sparse or auto, got {choice!r}")
    for layer in model.layers:
        if not isinstance(layer, (Dense, Conv2D)):
            continue
        if choice == "dense":
            layer.kernel = None
        else:
            layer.kernel = _kernel_for(layer, choice, modes)


def kernel_report(model) -> list[dict]:
    """Per kernel-carrying layer: density, live rows/cols of ``A`` and the plan of its last forward
    (use_kernel, methods per product, predicted kernel vs dense seconds)."""
    out = []
    for name, layer in zip(model.names, model.layers):
        k = getattr(layer, "kernel", None)
        if not isinstance(k, _KernelBase):
            continue
        sm = k.sm
        out.append(dict(layer=name, density=sm.density, live_rows=sm.nr, rows=sm.R,
                        live_cols=sm.nc, cols=sm.C, **getattr(k, "last_plan", {})))
    return out


# ------------------------------------------------------------------------------------------------
# Calibration
# ------------------------------------------------------------------------------------------------

def _median_time(fn, repeat=7, number=20):
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        ts.append((time.perf_counter() - t0) / number)
    return float(np.median(ts))


def calibrate(verbose: bool = False) -> dict:
    """Measure the cost-model constants on this machine (a few seconds). Returns a COST-like dict;
    does not change ``COST`` (assign it yourself: ``nprune.sparse.COST.update(calibrate())``)."""
    rng = np.random.default_rng(0)
    R, C, M = 300, 784, 60
    A = rng.standard_normal((R, C)).astype(_F32)
    X = rng.standard_normal((C, M)).astype(_F32)
    small = rng.standard_normal((8, 8)).astype(_F32)
    t_big = _median_time(lambda: np.matmul(A, X))
    t_small = _median_time(lambda: np.matmul(small, small), number=200)
    res = {"gemm_call": t_small, "gemm_fma": max(t_big - t_small, 1e-9) / (R * C * M)}
    sm = SparseMatrix(np.arange(R * C).reshape(R, C))
    pts = []
    for d in (0.2, 0.05):
        mask = rng.random((R, C)) < d
        sm.rebuild(mask)
        sm.refresh(A, ("csr",))
        t = _median_time(lambda: sm.matmul(X, "sparse"))
        pts.append((sm.nnz * M, t))
        D = rng.standard_normal((R, M)).astype(_F32)
        tg = _median_time(lambda: sm.grad_values(D, X, "sparse"), number=5)
        pts_g = (sm.nnz * M, tg)
    (n1, t1), (n2, t2) = pts
    res["spmm_fma"] = max((t1 - t2) / (n1 - n2), 1e-12)
    res["spmm_call"] = max(t2 - res["spmm_fma"] * n2, 1e-6)
    res["sddmm_fma"] = pts_g[1] / pts_g[0]
    res["sddmm_call"] = COST["sddmm_call"]
    big = rng.standard_normal((2000, 784)).astype(_F32)
    tc = _median_time(lambda: np.ascontiguousarray(big.T), number=5)
    res["copy_elem"] = tc / big.size
    res["copy_call"] = COST["copy_call"]
    if verbose:
        for k, v in res.items():
            print(f"    {k!r}: {v:.3g},")
    return res


if __name__ == "__main__":  # pragma: no cover
    import argparse
    ap = argparse.ArgumentParser(description="nprune.sparse utilities")
    ap.add_argument("--calibrate", action="store_true", help="measure the COST constants")
    a = ap.parse_args()
    if a.calibrate:
        calibrate(verbose=True)
