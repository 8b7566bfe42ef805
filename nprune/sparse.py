"""Sparse execution of pruned Dense and Conv2D layers (kernels plugged into ``layer.kernel``).

A masked dense matmul does the same work at 98% sparsity as at 0%. The kernels here skip the pruned
weights. All run on SciPy's low-level ``_sparsetools.csr_matvecs`` / ``csc_matvecs`` (called directly,
on preallocated or fresh NumPy arrays, no scipy.sparse objects), which do one axpy over the contiguous
columns of the dense operand per stored nonzero -- fast when the dense operand is *feature-major*.

Dense layers (:class:`DenseKernelSparse`): view the layer as ``A @ X`` with ``A = W.T`` (out, in) and
``X = x.T`` (in, N), C-contiguous.

* forward: CSR of ``A`` times ``X``; the result (out, N) is returned as its transpose, an F-ordered
  (N, out) array. ReLU keeps the order, so the next sparse Dense reads its ``X`` without a copy:
  activations stay feature-major through the network and only the first layer's input (C-ordered
  images) is transposed (into a reused buffer; large inference batches in column chunks of ``CHUNK``).
* weight gradient only at the nonzeros (SDDMM): gather the rows of ``X`` and ``dY.T`` of each nonzero,
  multiply, reduce with a GEMV -- 4 NumPy calls per block of ``SDDMM_BLOCK`` floats -- then one
  ``np.put`` into ``grads['W']`` (its pruned entries are zeroed once, when the mask changes).
* input gradient: CSR of ``W`` (or the CSC reading of ``A``) times ``dY.T``, returned F-ordered.

Conv2D (:class:`ConvKernelSparse`): the im2col GEMM ``W.reshape(F, C*kh*kw) @ cols`` with the filter
matrix held in :class:`SparseMatrix`: dead filters and dead (channel, tap) columns are dropped
(*compaction*: a smaller dense GEMM on the live block) and/or the live block is multiplied in CSR
form; the method of each product comes from a small cost model (``COST``, :meth:`SparseMatrix.plan`).

Values are re-gathered from the weights on every forward (one ``np.take`` of nnz elements), so
optimisers may update the weights in place; index structures are rebuilt only on a mask change.

Choice per layer (:func:`apply_kernel`): ``dense`` (``layer.kernel = None``: the masked dense code in
layers.py), ``sparse`` (always the kernel) or ``auto``: per layer, per batch-size class (1, <= 256,
larger) and mode (train/eval), the first call *measures* dense vs kernel side by side on that input
and keeps the kernel only if it was faster by a clear margin (``AUTO_MARGIN``); decisions are cached
and forgotten when the mask changes (see :class:`_KernelBase`). Dense is therefore the default
everywhere the sparse path does not pay -- in practice conv layers, small layers and densities above
~5-10%. Measured crossover densities: ``benchmarks/kernels.py``.

The training-step speedup at high sparsity also needs the optimiser to skip pruned entries: see the
compact path of :mod:`nprune.optim` (on by default for masks at <= 50% density).
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

# Conv2D cost model: seconds per multiply-add / per element / per call; measured with
# ``python -m nprune.sparse --calibrate`` (used only to pick compact vs CSR per conv product).
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
# auto keeps the kernel only if its measured median time is <= AUTO_MARGIN x the dense median
# (see _KernelBase), over AUTO_REPEATS interleaved rounds of ~CAL_TARGET seconds, on <= CAL_MAX samples.
AUTO_MARGIN = 0.9
AUTO_REPEATS = 5
CAL_TARGET = 0.002
CAL_MAX = 2048
# calibration stops early once one path is CAL_CLEAR times faster than the other
CAL_CLEAR = 2.0
# Dense-kernel inference batches larger than this run in column chunks of CHUNK samples (keeps the
# transposed input block and the output block in cache); measured best on the development machine.
CHUNK = 512
# the SDDMM (dW at the nonzeros) gathers at most this many floats per operand per block
SDDMM_BLOCK = 1 << 16
# multiply+sum of the gathered rows: einsum (one fused pass) or multiply + GEMV with ones
SDDMM_EINSUM = False
# a live block is compacted along an axis only if it drops at least this fraction of that axis
MIN_DROP = 0.0

_F32 = np.float32
_DENSE = ("dense",)   # kernel cache marker: the last forward ran the dense path


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


def _batch_class(n: int) -> str:
    return "1" if n <= 1 else ("small" if n <= 256 else "large")


class _KernelBase:
    """Common logic: structure rebuild on mask change and the ``auto`` decision.

    ``auto`` (measured, not modelled): the first time a layer sees a (batch class, train, need_dx)
    combination under the current mask -- batch classes ``1``, ``small`` (<= 256) and ``large`` --
    it times the dense masked path and the kernel on that very input (at most ``CAL_MAX`` samples),
    ``AUTO_REPEATS`` interleaved rounds each (forward, plus backward on a random gradient in training
    mode; stopping early once one path is ``CAL_CLEAR`` x faster), and keeps the kernel only if its
    median is <= ``AUTO_MARGIN`` x the dense median. The
    decision is cached (``self.decisions``) and forgotten when the mask changes. Costs: a few
    milliseconds per layer and mask (tens of ms for a batch-10,000 inference), once per mask. Because dense is the
    default and the kernel must *win* a side-by-side measurement, ``auto`` is never slower than dense
    by more than the measurement noise.
    """

    def __init__(self, layer, policy: str = "sparse", modes: dict | None = None):
        if policy not in ("sparse", "auto"):
            raise ValueError(f"policy must be 'sparse' or 'auto', got {policy!r}")
        self.policy = policy
        self.forced = dict(modes) if modes else None
        self._calibrating = False
        self.decisions: dict = {}
        self._fast: dict = {}       # (n, train, need_dx) -> decision, for a cheap lookup per call
        self._last = None
        self._setup(layer)
        self.mask_changed(layer)

    def _setup(self, layer) -> None:
        pass

    # -- auto ------------------------------------------------------------------------------------
    def _decide(self, layer, x, train: bool) -> bool:
        n = x.shape[0]
        if self.policy == "sparse" or self._calibrating:
            use = True
        else:
            key = (_batch_class(n), bool(train), bool(layer.need_dx))
            d = self.decisions.get(key)
            if d is None:
                d = self.decisions[key] = self._calibrate(layer, x, train)
            use = d["use"]
            self._fast[(n, train, layer.need_dx)] = use
        self._last = (n, train, use)
        return use

    @property
    def last_plan(self) -> dict:
        """What the last forward did: samples, train, use_kernel, modes."""
        if self._last is None:
            return {}
        n, train, use = self._last
        return dict(samples=n, train=bool(train), use_kernel=bool(use), modes=self._modes_str())

    def _modes_str(self) -> str:
        return "sparse"

    def _calibrate(self, layer, x, train: bool) -> dict:
        xs = x[:CAL_MAX] if x.shape[0] > CAL_MAX else x
        saved_cache = layer._cache
        layer.kernel = None
        try:
            y = layer.forward(xs, train=False)
            rng = np.random.default_rng(0)
            # a gradient in the memory order the sparse path produces (feature-major)
            dout = np.asarray(rng.standard_normal(y.shape[::-1]), layer.dtype).T if y.ndim == 2 \
                else np.asarray(rng.standard_normal(y.shape), layer.dtype)

            def dense():
                layer.kernel = None
                layer.forward(xs, train)
                if train:
                    layer.backward(dout)

            def kern():
                layer.kernel = self
                self._calibrating = True
                try:
                    self.forward(layer, xs, train)
                    if train:
                        self.backward(layer, dout)
                finally:
                    self._calibrating = False

            arms = {"dense": dense, "kernel": kern}
            ts = {k: [] for k in arms}
            # one probe call each (also warms both paths) sets the number of calls per round
            for k in ("dense", "kernel"):
                t0 = time.perf_counter()
                arms[k]()
                ts[k].append(time.perf_counter() - t0)
            slow = max(ts["dense"][0], ts["kernel"][0])
            number = max(1, min(50, int(CAL_TARGET / max(slow, 1e-7))))
            for r in range(AUTO_REPEATS):
                # early exit: a factor CAL_CLEAR apart is not noise (saves most of the cost of
                # calibrating a dense layer, whose kernel may be 20x slower)
                if r >= 1 and (min(ts["kernel"]) > CAL_CLEAR * min(ts["dense"])
                               or min(ts["dense"]) > CAL_CLEAR * min(ts["kernel"])):
                    break
                for k in (("dense", "kernel") if r % 2 == 0 else ("kernel", "dense")):
                    f = arms[k]
                    t0 = time.perf_counter()
                    for _ in range(number):
                        f()
                    ts[k].append((time.perf_counter() - t0) / number)
            if len(ts["dense"]) > 2:           # drop the probes (cold) when rounds were run
                ts = {k: v[1:] for k, v in ts.items()}
        finally:
            layer.kernel = self
            layer._cache = saved_cache
            self._cache = None
        tk, td = float(np.median(ts["kernel"])), float(np.median(ts["dense"]))
        return {"use": tk <= AUTO_MARGIN * td, "t_kernel": tk, "t_dense": td, "samples": xs.shape[0]}

    # -- hook entry points ------------------------------------------------------------------------
    def forward(self, layer, x, train=True):
        return self._forward(layer, x, train)

    def backward(self, layer, dout):
        return self._backward(layer, dout)

    @staticmethod
    def _dense_call(layer, fn, *args):
        k = layer.kernel
        layer.kernel = None
        try:
            return fn(*args)
        finally:
            layer.kernel = k


class DenseKernelSparse(_KernelBase):
    """CSR kernel for :class:`nprune.layers.Dense` (``y = x @ W + b``), feature-major throughout.

    With ``A = W.T`` (out, in) in CSR form and ``X = x.T`` (in, N) C-contiguous:

    * forward ``Y = A @ X`` by ``csr_matvecs`` (one length-N axpy per nonzero) into a fresh (out, N)
      array initialised with the bias; returned as ``Y.T`` -- an F-ordered (N, out) array, so the next
      Dense layer (after ReLU, which keeps the order) gets its ``X`` without a copy. Only a C-ordered
      input (the first layer) is transposed, into a reused buffer. Inference batches larger than
      ``CHUNK`` run in column chunks (working set in cache).
    * ``dW`` only at the nonzeros (SDDMM), in the row-major order of W:
      ``take(X, i) * take(dY, j)`` then a GEMV with ones -- four NumPy calls on preallocated buffers,
      then one ``put`` into ``grads['W']`` (whose pruned entries were zeroed once, at mask change).
    * ``db`` as a GEMV ``dY @ 1``; ``dX = W @ dY`` (csr_matvecs on the CSR of W; or ``csc``: the CSR
      arrays of A read as CSC of A.T, no second value gather), returned F-ordered.

    Values are re-gathered from ``W`` on every forward (``np.take``, nnz elements), so optimisers may
    update ``W`` in place; the index structure is rebuilt only by :meth:`mask_changed`.
    ``modes``: ``{"dx": "csr" | "csc"}`` (other keys ignored).
    """

    def _setup(self, layer):
        self.R, self.C = layer.out_features, layer.in_features
        dx = (self.forced or {}).get("dx", "csr")
        self.dx_mode = "csc" if dx == "csc" else "csr"

    def _modes_str(self):
        return f"csr/dx-{self.dx_mode}/sddmm"

    # auto's dense branch runs the code of Dense.forward/backward inline (same operations, same
    # results) instead of re-entering the layer: at batch 1 the whole dense product takes 2-10 us and
    # every microsecond of dispatch shows.
    def forward(self, layer, x, train=True):
        if type(x) is not np.ndarray:
            x = np.asarray(x)
        if self._fast.get((x.shape[0], train, layer.need_dx)) is False:
            self._last = (x.shape[0], train, False)
            self._cache = _DENSE
            return layer.dense_forward(x, train)
        return self._forward(layer, x, train)

    def backward(self, layer, dout):
        if self._cache is _DENSE:
            return layer.dense_backward(dout)
        return self._backward(layer, dout)

    def mask_changed(self, layer) -> None:
        R, C = self.R, self.C
        m = layer.masks.get("W")
        keep = np.ones((C, R), bool) if m is None else (np.asarray(m) != 0)   # W layout (in, out)
        # CSR of A = W.T: nonzeros ordered by (out j, in i)
        jj, ii = np.nonzero(keep.T)
        self.nnz = int(jj.size)
        self.indptr = np.zeros(R + 1, np.int32)
        np.cumsum(np.bincount(jj, minlength=R), out=self.indptr[1:])
        self.indices = ii.astype(np.int32)
        self.gidx = (ii * R + jj).astype(np.intp)         # positions in W.ravel(), A-CSR order
        # CSR of W (in, out): row-major order of W
        self.gidx_t = np.flatnonzero(keep.reshape(-1))
        it, jt = np.divmod(self.gidx_t, R)
        self.i_t, self.j_t = it.astype(np.intp), jt.astype(np.intp)
        self.indptr_t = np.zeros(C + 1, np.int32)
        np.cumsum(np.bincount(it, minlength=C), out=self.indptr_t[1:])
        self.indices_t = jt.astype(np.int32)
        self.data = np.zeros(self.nnz, _F32)
        self.data_t = np.zeros(self.nnz, _F32)
        self.gnz = np.zeros(self.nnz, _F32)
        self.density = self.nnz / max(R * C, 1)
        layer.grads["W"][...] = 0                        # pruned entries stay zero from now on
        self._bufs = {}
        self._cache = None
        self.decisions = {}
        self._fast = {}

    def _buf(self, key, size):
        """A reused flat float32 buffer of at least ``size`` elements."""
        b = self._bufs.get(key)
        if b is None or b.size < size:
            b = self._bufs[key] = np.empty(max(size, 1), _F32)
        return b[:size]

    def _forward(self, layer, x, train=True):
        x = np.asarray(x)
        if x.dtype != layer.dtype:
            x = x.astype(layer.dtype)
        if x.ndim != 2 or x.shape[1] != layer.in_features:
            raise ValueError(f"Dense expects (N, {layer.in_features}), got {x.shape}")
        if not self._decide(layer, x, train):
            self._cache = _DENSE
            return self._dense_call(layer, layer.forward, x, train)
        R, C, n = self.R, self.C, x.shape[0]
        np.take(layer.params["W"].reshape(-1), self.gidx, out=self.data, mode="clip")
        b = layer.params["b"][:, None] if layer.bias else None
        yT = np.empty((R, n), _F32)
        xT = x.T
        if train or n <= CHUNK:
            if not xT.flags.c_contiguous:
                buf = self._buf("xT", C * n).reshape(C, n)
                np.copyto(buf, xT)
                xT = buf
            self._spmm(xT, yT, b, n)
            if train:
                self._cache = ("sparse", xT, n)
            return yT.T
        # large inference batch: column chunks; each chunk transposed/copied into a buffer
        xb = self._buf("xc", C * CHUNK)
        yb = self._buf("yc", R * CHUNK)
        for s in range(0, n, CHUNK):
            w = min(CHUNK, n - s)
            xc = xb[:C * w].reshape(C, w)
            np.copyto(xc, xT[:, s:s + w])
            yc = yb[:R * w].reshape(R, w)
            self._spmm(xc, yc, b, w)
            yT[:, s:s + w] = yc
        return yT.T

    def _spmm(self, xT, yT, b, n):
        if b is None:
            yT.fill(0)
        else:
            np.copyto(yT, b)
        if self.nnz:
            _st.csr_matvecs(self.R, self.C, n, self.indptr, self.indices, self.data,
                            xT.reshape(-1), yT.reshape(-1))

    def _backward(self, layer, dout):
        c = self._cache
        if c is None:
            raise RuntimeError("Dense.backward called without a preceding forward(x, train=True)")
        if c[0] == "dense":
            return self._dense_call(layer, layer.backward, dout)
        _, xT, n = c
        R, C, nnz = self.R, self.C, self.nnz
        dT = dout.T
        if not (dT.flags.c_contiguous and dT.dtype == _F32):
            buf = self._buf("dT", R * n).reshape(R, n)
            np.copyto(buf, dT)
            dT = buf
        ones = self._bufs.get("ones")
        if ones is None or ones.size != n:
            ones = self._bufs["ones"] = np.ones(n, _F32)
        if layer.bias:
            np.matmul(dT, ones, out=layer.grads["b"])
        if nnz:
            step = max(1, SDDMM_BLOCK // max(n, 1))
            ga = self._buf("ga", min(step, nnz) * n)
            gb = self._buf("gb", min(step, nnz) * n)
            for s in range(0, nnz, step):
                e = min(nnz, s + step)
                a = ga[:(e - s) * n].reshape(e - s, n)
                bb = gb[:(e - s) * n].reshape(e - s, n)
                np.take(xT, self.i_t[s:e], axis=0, out=a, mode="clip")
                np.take(dT, self.j_t[s:e], axis=0, out=bb, mode="clip")
                if SDDMM_EINSUM:
                    np.einsum("kn,kn->k", a, bb, out=self.gnz[s:e])
                else:
                    np.multiply(a, bb, out=a)
                    np.matmul(a, ones, out=self.gnz[s:e])
            np.put(layer.grads["W"].reshape(-1), self.gidx_t, self.gnz, mode="clip")
        if not layer.need_dx:
            return None
        dxT = np.zeros((C, n), _F32)
        if nnz:
            if self.dx_mode == "csc":
                _st.csc_matvecs(C, R, n, self.indptr, self.indices, self.data,
                                dT.reshape(-1), dxT.reshape(-1))
            else:
                np.take(layer.params["W"].reshape(-1), self.gidx_t, out=self.data_t, mode="clip")
                _st.csr_matvecs(C, R, n, self.indptr_t, self.indices_t, self.data_t,
                                dT.reshape(-1), dxT.reshape(-1))
        return dxT.T


class ConvKernelSparse(_KernelBase):
    """Sparse/compacted kernel for :class:`nprune.layers.Conv2D`: the im2col GEMM
    ``W.reshape(F, C*kh*kw) @ cols`` with the filter matrix compacted (dead filters and dead
    (channel, tap) columns dropped) and/or sparse. Each product's method (``compact`` GEMM on the
    live block or ``sparse`` CSR) comes from the cost model of :meth:`SparseMatrix.plan` unless
    forced by ``modes``; whether to use the kernel at all under ``auto`` is measured (see
    :class:`_KernelBase`) -- in practice conv falls back to dense except at very low densities."""

    def _setup(self, layer):
        self.sm = SparseMatrix(self._flat(layer))

    def mask_changed(self, layer) -> None:
        m = layer.masks.get("W")
        self.sm.rebuild(None if m is None else self._mask2d(layer, m))
        self.density = self.sm.density
        layer.grads["W"][...] = 0                      # pruned entries stay zero from now on
        self._plans = {}
        self._cache = None
        self.decisions = {}
        self._fast = {}

    def _modes_str(self):
        return "/".join(self._last_modes[k] for k in ("fwd", "dx", "dw")) if getattr(self, "_last_modes", None) else "?"

    def _plan(self, layer, M: int, train: bool) -> dict:
        key = (M, train, layer.need_dx)
        modes = self._plans.get(key)
        if modes is None:
            if train:
                modes, _, _ = self.sm.plan(M, layer.need_dx)
            else:
                mode, _, _ = self.sm.plan_eval(M)
                modes = {"fwd": mode, "dx": "compact", "dw": "compact"}
            if self.forced:
                modes = {**modes, **self.forced}
            self._plans[key] = modes
        self._last_modes = modes
        return modes

    def _refresh(self, layer, modes, train):
        what = {"blk" if modes["fwd"] == "compact" else "csr"}
        if train and layer.need_dx:
            what.add({"compact": "blk", "csc": "csr"}.get(modes["dx"], "csr_t"))
        self.sm.refresh(layer.params["W"], tuple(what))

    def _write_grad(self, layer, vals):
        np.put(layer.grads["W"].reshape(-1), self.sm.gidx, vals)

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
        modes = self._plan(layer, m, train)
        if not self._decide(layer, x, train):
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

    ``choice``: ``dense`` (``layer.kernel = None``), ``sparse`` (always the kernel), ``auto`` (the
    kernel measures, per layer, batch-size class, mode and mask, whether its products beat the dense
    code, and hands over to the dense code unless they do; see :class:`_KernelBase`).
    ``modes`` (tests/benchmarks) forces methods: Conv2D ``{"fwd": "compact"|"sparse", "dx":
    "compact"|"sparse"|"csc", "dw": "compact"|"sparse"}``; Dense only reads ``{"dx": "csr"|"csc"}``.
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
        out.append(dict(layer=name, density=float(k.density), decisions={
            f"{c}/{'train' if t else 'eval'}": dict(v, use=bool(v["use"]))
            for (c, t, _), v in k.decisions.items()}, **k.last_plan))
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
