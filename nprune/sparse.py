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
layers.py), ``sparse`` (always the kernel) or ``auto``. ``auto`` is a table lookup, not a timing:
each layer uses the kernel iff its mask's density (nonzeros / size, computed when the mask changes)
is <= the *threshold* stored for its shape (:func:`shape_key`: ``Dense 784x300``, ``Conv2D
20x50x5x5 stride 1 pad 0 input 12x12``), batch class (``1``, ``small`` <= 256, ``large``) and mode
(``train`` without dx, ``train_dx``, ``eval``); shapes or entries not in the table (or null) run
dense, and a layer whose shape has no threshold at all gets no kernel. An inner Dense layer whose
input arrives feature-major (F-ordered, as a sparse predecessor leaves it, or LeNet-5's flattened
batch-last activations) looks up the ``_f`` variant of its mode (``eval_f`` ...), measured with such
input, since the kernel then skips its transposing copy; a table without it uses the plain mode.
The choice therefore depends only on the table, the shapes, the masks and the memory order the
previous layers' choices produce -- the same seed gives the same bits every time, and a
resumed experiment the same bits as an uninterrupted one (:meth:`nprune.lottery.IMP.kernel_thresholds`
keeps the table of a run folder's first run in the folder).

The thresholds are measured once per machine: ``python -m nprune.sparse --calibrate`` times the
kernel and the dense path side by side on every layer shape of :mod:`nprune.nets` at a grid of
random-mask densities (``CAL_DENSITIES``), batch sizes (``CAL_BATCHES``) and 1 and all BLAS threads
(:func:`measure_thresholds`); an entry's threshold is the highest density below which the kernel is
at least 10% faster (``AUTO_MARGIN``) everywhere, so that ``auto`` is never measurably slower than
dense. It writes ``$XDG_CACHE_HOME/nprune/kernel_thresholds.json`` (default ``~/.cache/nprune/``),
which ``auto`` then uses instead of :data:`SHIPPED_THRESHOLDS` (measured on the development
machine, see there); ``--show`` prints the table in use. A malformed file raises
:class:`ThresholdsError` (one line naming the file). Measured crossovers per layer and batch:
``benchmarks/kernels.py``.

The training-step speedup at high sparsity also needs the optimiser to skip pruned entries: see the
compact path of :mod:`nprune.optim` (on by default for masks at <= 50% density).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
from scipy.sparse import _sparsetools as _st

from .im2col import col2im, im2col
from .layers import Conv2D, Dense

__all__ = [
    "DenseKernelSparse",
    "ConvKernelSparse",
    "SparseMatrix",
    "apply_kernel",
    "auto_kernel",
    "kernel_report",
    "calibrate",
    "calibrate_thresholds",
    "measure_thresholds",
    "active_thresholds",
    "load_thresholds",
    "check_thresholds",
    "user_thresholds_path",
    "shape_key",
    "ThresholdsError",
    "SHIPPED_THRESHOLDS",
    "COST",
    "AUTO_MARGIN",
]

# Conv2D cost model: seconds per multiply-add / per element / per call; measured with
# ``python -m nprune.sparse --cost-model`` (used only to pick compact vs CSR per conv product).
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
# Threshold calibration (measure_thresholds): the kernel must take <= AUTO_MARGIN x the dense time
# (paired median ratio and best times over CAL_REPEATS interleaved blocks of ~CAL_TARGET seconds)
# at a density, and at every lower density of CAL_DENSITIES, for that density to be the threshold.
AUTO_MARGIN = 0.9
CAL_REPEATS = 7
CAL_TARGET = 0.003
CAL_DENSITIES = (0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.035, 0.04, 0.045, 0.05, 0.06,
                 0.07, 0.085, 0.1, 0.12, 0.15, 0.2, 0.3, 0.5, 1.0)
# batch sizes measured per batch class (the class's threshold is the minimum over them); conv layers
# are measured at a smaller 'large' batch (their im2col columns grow 25x faster than the input)
CAL_BATCHES = {"1": (1,), "small": (16, 64, 256), "large": (1024, 4096)}
CAL_BATCHES_CONV = {"1": (1,), "small": (16, 64, 256), "large": (512,)}
# Dense-kernel inference batches larger than this run in column chunks of CHUNK samples (keeps the
# transposed input block and the output block in cache); measured best on the development machine.
CHUNK = 512
# the SDDMM (dW at the nonzeros) gathers at most this many floats per operand per block
SDDMM_BLOCK = 1 << 16
# multiply+sum of the gathered rows: einsum (one fused pass) or multiply + GEMV with ones
SDDMM_EINSUM = False
# a live block is compacted along an axis only if it drops at least this fraction of that axis
MIN_DROP = 0.0
# the Dense kernel's compact mode is chosen only where the cost model predicts it at most this
# fraction of CSR's cost: the model underestimates the gathers around compact's GEMMs (fc1 of
# LeNet-300-100, batch 60, 1 thread: predicted 417 us at any density, measured ~520 us; CSR at 4%
# predicted 451 us, measured ~470 us)
COMPACT_MARGIN = 0.8

_F32 = np.float32
_DENSE = ("dense",)   # kernel cache marker: the last forward ran the dense path


def _live(keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the rows and of the columns of a 2-D mask that keep at least one entry."""
    return np.flatnonzero(keep.any(axis=1)), np.flatnonzero(keep.any(axis=0))


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
        self.live_r, self.live_c = _live(m)
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


# ------------------------------------------------------------------------------------------------
# auto: per-layer thresholds (measured once per machine, looked up at run time)
# ------------------------------------------------------------------------------------------------

THRESHOLDS_FORMAT = "nprune-kernel-thresholds/1"
BATCH_CLASSES = ("1", "small", "large")            # batch sizes 1, 2..256, > 256 (_batch_class)
AUTO_MODES = ("train", "train_dx", "eval")          # training step without / with dx; inference
# The same three modes for an inner Dense layer whose input arrives *feature-major* (an F-ordered
# (N, in) array, as a sparse predecessor and the ReLU after it leave it): the kernel then reads
# ``x.T`` without a transposing copy, so it pays at higher densities. Optional in a table: without
# an ``_f`` entry the layer follows the plain mode's threshold (measured on C-ordered input).
FMAJOR_MODES = tuple(m + "_f" for m in AUTO_MODES)
ALL_MODES = AUTO_MODES + FMAJOR_MODES
THRESHOLDS_FILE = "kernel_thresholds.json"


class ThresholdsError(ValueError):
    """A kernel-thresholds table that cannot be used; the message is one line naming the file."""


def shape_key(layer, x_shape=None) -> str:
    """The table key of a layer: ``Dense 784x300`` (in x out) or ``Conv2D 20x50x5x5 stride 1 pad 0
    input 12x12`` (C x F x kh x kw, and the input's H x W when ``x_shape`` is given)."""
    if isinstance(layer, Dense):
        return f"Dense {layer.in_features}x{layer.out_features}"
    if isinstance(layer, Conv2D):
        s = (f"Conv2D {layer.in_channels}x{layer.out_channels}x{layer.kh}x{layer.kw} "
             f"stride {layer.stride} pad {layer.padding}")
        return s if x_shape is None else f"{s} input {x_shape[-2]}x{x_shape[-1]}"
    raise TypeError(f"no kernel for {type(layer).__name__}")


def mode_key(train: bool, need_dx: bool) -> str:
    return "eval" if not train else ("train_dx" if need_dx else "train")


def user_thresholds_path() -> Path:
    """Where ``python -m nprune.sparse --calibrate`` writes and ``auto`` looks first:
    ``$XDG_CACHE_HOME/nprune/kernel_thresholds.json`` (default ``~/.cache/nprune/...``; the same
    cache root as :func:`nprune.datasets.cache_dir`)."""
    base = os.environ.get("XDG_CACHE_HOME") or ""
    root = Path(base) if os.path.isabs(base) else Path.home() / ".cache"
    return root / "nprune" / THRESHOLDS_FILE


def check_thresholds(obj, where: str) -> dict:
    """Validate a thresholds table (``{"format": ..., "thresholds": {shape: {batch class: {mode:
    density or null}}}, ...}``); returns it, or raises :class:`ThresholdsError` naming ``where``."""
    def bad(msg):
        raise ThresholdsError(f"kernel thresholds file {where}: {msg}; fix or delete it, or rerun "
                              f"'python -m nprune.sparse --calibrate'")
    if not isinstance(obj, dict):
        bad(f"expected a JSON object, got {type(obj).__name__}")
    if obj.get("format") != THRESHOLDS_FORMAT:
        bad(f"'format' must be {THRESHOLDS_FORMAT!r}, got {obj.get('format')!r}")
    table = obj.get("thresholds")
    if not isinstance(table, dict):
        bad("'thresholds' must be an object {layer shape: {batch class: {mode: density or null}}}")
    for shape, classes in table.items():
        if not isinstance(classes, dict):
            bad(f"{shape!r}: expected an object keyed by batch class (1, small, large)")
        for c, modes in classes.items():
            if c not in BATCH_CLASSES:
                bad(f"{shape!r}: unknown batch class {c!r} (expected 1, small or large)")
            if not isinstance(modes, dict):
                bad(f"{shape!r} {c}: expected an object keyed by mode (train, train_dx, eval)")
            for m, v in modes.items():
                if m not in ALL_MODES:
                    bad(f"{shape!r} {c}: unknown mode {m!r} (expected train, train_dx or eval, "
                        f"optionally with _f)")
                if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                      or not 0.0 <= v <= 1.0):
                    bad(f"{shape!r} {c} {m}: a threshold is a density in [0, 1] or null, got {v!r}")
    return obj


def load_thresholds(path) -> dict:
    """Read and validate a thresholds JSON file (:class:`ThresholdsError` if it is unusable)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ThresholdsError(f"kernel thresholds file {path}: not UTF-8 text; fix or delete it, or "
                              f"rerun 'python -m nprune.sparse --calibrate'") from None
    except OSError as e:
        raise ThresholdsError(f"kernel thresholds file {path}: cannot read it "
                              f"({e.strerror or e})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ThresholdsError(f"kernel thresholds file {path}: not valid JSON ({e.msg} at line "
                              f"{e.lineno} column {e.colno}); fix or delete it, or rerun "
                              f"'python -m nprune.sparse --calibrate'") from None
    return check_thresholds(obj, str(path))


_ACTIVE: dict = {}


def active_thresholds() -> dict:
    """The table ``auto`` uses unless given one: the user's calibration
    (:func:`user_thresholds_path`) if that file exists, else :data:`SHIPPED_THRESHOLDS`. The
    returned dict has a ``source`` entry (the file, or ``shipped``). Re-read when the file changes."""
    p = user_thresholds_path()
    try:
        st = p.stat()
    except FileNotFoundError:
        return SHIPPED_THRESHOLDS
    except OSError as e:
        raise ThresholdsError(f"kernel thresholds file {p}: cannot read it "
                              f"({e.strerror or e})") from None
    key = (str(p), st.st_mtime_ns, st.st_size)
    if _ACTIVE.get("key") != key:
        _ACTIVE["table"] = dict(load_thresholds(p), source=str(p))
        _ACTIVE["key"] = key
    return _ACTIVE["table"]


def lookup_threshold(table: dict, shape: str, batch_class: str, mode: str):
    """The largest density at which ``auto`` uses the kernel (None: never). A feature-major mode
    (``eval_f`` ...) missing from the table falls back to its plain mode (``eval``)."""
    modes = table.get("thresholds", {}).get(shape, {}).get(batch_class, {})
    if mode.endswith("_f") and mode not in modes:
        mode = mode[:-2]
    return modes.get(mode)


def _may_use_kernel(table: dict, layer) -> bool:
    """False when the table never uses the kernel for this layer's shape (any batch, mode, input)."""
    key = shape_key(layer)
    for shape, classes in table.get("thresholds", {}).items():
        if shape == key or (isinstance(layer, Conv2D) and shape.startswith(key + " input ")):
            if any(v is not None for modes in classes.values() for v in modes.values()):
                return True
    return False


# The shipped thresholds, measured on the development machine -- Intel Xeon (AVX-512), 2 cores,
# OpenBLAS 0.3.31, NumPy 2.4.6, SciPy 1.17.1, Python 3.11.7, shared with other jobs (load average
# 5.4-5.6 on the 2 cores) -- by ``python -m nprune.sparse --calibrate --runs 2`` (6.7 min; the
# entry-wise minimum of two measurements). Per layer shape and batch class: the thresholds of
# (train, train_dx, eval); None = never the kernel.
_SHIPPED = {
    "Dense 784x300": {"1": (0.12, 0.1, 0.01), "small": (0.03, 0.025, 0.04),
                      "large": (None, 0.002, 0.045)},
    "Dense 300x100": {"1": (0.12, 0.085, None), "small": (0.01, 0.035, 0.02),
                      "large": (0.03, 0.015, 0.01)},
    "Dense 100x10": {"1": (None, None, None), "small": (None, None, None),
                     "large": (0.002, 0.005, None)},
    "Dense 800x500": {"1": (0.12, 0.1, 0.015), "small": (0.03, 0.025, 0.04),
                      "large": (None, 0.005, 0.025)},
    "Dense 500x10": {"1": (0.002, None, None), "small": (None, None, None),
                     "large": (None, 0.002, None)},
    "Conv2D 1x20x5x5 stride 1 pad 0 input 28x28": {
        "1": (None, None, None), "small": (0.005, 0.01, 0.002), "large": (0.01, 0.01, 0.002)},
    "Conv2D 20x50x5x5 stride 1 pad 0 input 12x12": {
        "1": (0.02, 0.005, 0.035), "small": (None, None, 0.002), "large": (None, None, None)},
}
# The feature-major (``_f``) entries of the inner Dense shapes: measured later (2026-11-26) on the
# same machine, quiet (load ~1), by ``measure_thresholds(specs=<inner Dense layers>,
# modes=FMAJOR_MODES)`` twice (seeds 0 and 1), entry-wise minimum; 71 s. ``--calibrate`` measures
# them together with the plain modes.
_SHIPPED_F = {
    "Dense 300x100": {"1": (0.12, 0.1, None), "small": (0.015, 0.035, 0.035),
                      "large": (0.02, 0.02, 0.035)},
    "Dense 100x10": {"1": (None, None, None), "small": (None, None, None),
                     "large": (0.1, 0.085, 0.06)},
    "Dense 800x500": {"1": (0.12, 0.1, 0.015), "small": (0.02, 0.025, 0.045),
                      "large": (0.015, 0.015, 0.03)},
    "Dense 500x10": {"1": (None, None, None), "small": (None, None, None),
                     "large": (0.085, 0.07, None)},
}
SHIPPED_THRESHOLDS = {
    "format": THRESHOLDS_FORMAT,
    "source": "shipped",
    "command": "python -m nprune.sparse --calibrate --runs 2",
    "machine": "Intel Xeon (AVX-512), 2 cores, OpenBLAS 0.3.31, NumPy 2.4.6, SciPy 1.17.1, "
               "shared (load ~5.5)",
    "margin": 0.9,
    "thresholds": {shape: {c: dict(zip(AUTO_MODES, v), **dict(zip(FMAJOR_MODES, _SHIPPED_F.get(
        shape, {}).get(c, ())))) for c, v in classes.items()} for shape, classes in _SHIPPED.items()},
}


class _KernelBase:
    """Common logic: structure rebuild on mask change and the ``auto`` decision.

    ``auto`` (looked up, not timed): the first time a layer sees a (batch class, train, need_dx)
    combination under the current mask -- batch classes ``1``, ``small`` (<= 256) and ``large`` --
    it looks up the threshold of its shape (:func:`shape_key`; conv with the input's H x W), batch
    class and mode (:func:`mode_key`) in the thresholds table and uses the kernel iff the mask's
    density (nonzeros / size, computed when the mask changes) is <= that threshold; a missing entry
    or null means dense. The decision is cached (``self.decisions``) and forgotten when the mask
    changes. The choice depends only on the table, the shapes and the mask, never on timing, so a
    run and its resumption (with the same table) make the same choices and the same float32 bits.
    Where auto runs dense it costs one dict lookup per call (~0.2 us: a few % of a batch-1
    inference of a small Dense layer, nothing measurable elsewhere), and nothing at all when the
    density is above every threshold of the shape (:meth:`_route`).
    """

    def __init__(self, layer, policy: str = "sparse", modes: dict | None = None,
                 thresholds: dict | None = None):
        if policy not in ("sparse", "auto"):
            raise ValueError(f"policy must be 'sparse' or 'auto', got {policy!r}")
        self.policy = policy
        self.forced = dict(modes) if modes else None
        self.table = (thresholds if thresholds is not None else active_thresholds()) \
            if policy == "auto" else None
        self.decisions: dict = {}
        self._reset_fast()
        self._last = None
        self._setup(layer)
        self.mask_changed(layer)

    def _setup(self, layer) -> None:
        pass

    def _reset_fast(self) -> None:
        self._fast_t: dict = {}
        self._fast_e: dict = {}
        self._fast_dx = None

    @staticmethod
    def _fast_key(x):
        return x.shape[0]

    def _input_key(self, x) -> tuple:
        return ()

    def _route(self, layer) -> None:
        """``auto`` on a Dense layer: skip the per-call lookup where the table cannot choose the
        kernel at this density. Above every threshold of the shape (any batch class and mode),
        ``forward``/``backward`` become the plain dense functions (instance attributes shadowing
        the methods): exactly the dense code, no dispatch at all (``all_dense``). Above every
        eval (or every training) threshold only, ``forward`` becomes a small function that sends
        that mode straight to the dense code (``dense_modes``). On small layers at batch 1 the
        ~0.2 us of a lookup would be 5-10% of the work. Redone on every mask change."""
        self.__dict__.pop("forward", None)
        self.__dict__.pop("backward", None)
        self.all_dense, self.dense_modes = False, None
        if self.policy != "auto" or not isinstance(layer, Dense):
            return
        classes = list(self.table.get("thresholds", {}).get(shape_key(layer), {}).values())

        def never(modes):
            return all(m.get(k) is None or self.density > m[k]
                       for m in classes for k in modes + tuple(k + "_f" for k in modes))
        dense_fwd = type(layer).dense_forward
        if never(AUTO_MODES):
            self.all_dense, self.dense_modes = True, "all"
            self.forward = dense_fwd
            self.backward = type(layer).dense_backward
            return
        lookup_fwd = type(self).forward.__get__(self)
        if never(("eval",)):
            self.dense_modes = "eval"

            def forward(layer, x, train=True):
                if train:
                    return lookup_fwd(layer, x, train)
                return dense_fwd(layer, x, train)     # no cache: backward follows a train forward
            self.forward = forward
        elif never(("train", "train_dx")):
            self.dense_modes = "train"

            def forward(layer, x, train=True):
                if not train:
                    return lookup_fwd(layer, x, train)
                self._cache = _DENSE
                return dense_fwd(layer, x, train)
            self.forward = forward

    # -- auto ------------------------------------------------------------------------------------
    def _decide(self, layer, x, train: bool) -> bool:
        n = x.shape[0]
        if self.policy == "sparse":
            use = True
        else:
            key = (_batch_class(n), bool(train), bool(layer.need_dx)) + self._input_key(x)
            d = self.decisions.get(key)
            if d is None:
                d = self.decisions[key] = self._lookup(layer, x, train)
            use = d["use"]
            # the fast path's cache: (samples or input shape) -> (n, train, use), per train/eval; the
            # train entries are for one need_dx (cleared when it changes)
            if train:
                if layer.need_dx != self._fast_dx:
                    self._fast_t, self._fast_dx = {}, layer.need_dx
                self._fast_t[self._fast_key(x)] = (n, True, use)
            else:
                self._fast_e[self._fast_key(x)] = (n, False, use)
        self._last = (n, train, use)
        return use

    def _lookup(self, layer, x, train: bool) -> dict:
        shape = shape_key(layer, x.shape)
        cls, mode = _batch_class(x.shape[0]), mode_key(train, layer.need_dx)
        if self._input_key(x) == ("F",):
            mode += "_f"
        thr = lookup_threshold(self.table, shape, cls, mode)
        return {"use": thr is not None and self.density <= thr, "threshold": thr,
                "density": float(self.density), "shape": shape, "batch_class": cls, "mode": mode}

    @property
    def last_plan(self) -> dict:
        """What the last forward did: samples, train, use_kernel, modes."""
        if self._last is None:
            return {}
        n, train, use = self._last
        return dict(samples=n, train=bool(train), use_kernel=bool(use), modes=self._modes_str())

    def _modes_str(self) -> str:
        return "sparse"

    # -- hook entry points ------------------------------------------------------------------------
    def forward(self, layer, x, train=True):
        """The layer's forward: straight to the dense code when the cached decision for this input
        (``_fast_key``) and mode says dense, else :meth:`_forward` (decision, kernel)."""
        try:
            t = (self._fast_t if train else self._fast_e)[self._fast_key(x)]
        except (KeyError, AttributeError):
            return self._forward(layer, x, train)
        if t[2] or (train and layer.need_dx != self._fast_dx):
            return self._forward(layer, x, train)
        self._last = t
        self._cache = _DENSE
        return self._dense_call(layer, layer.forward, x, train)

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

    **Compaction.** Inputs whose row of W is entirely pruned (dead inputs, e.g. MNIST's border
    pixels) and outputs whose column is (dead units) are dropped: the *compact* mode runs dense GEMMs
    on the live block ``Wb = W[live_in][:, live_out]`` (nc, nr), sample-major, with ``Wb`` gathered
    from ``W`` on every forward (whole rows / columns by ``np.take``; ``W`` itself when nothing is
    dead): ``y[:, live_out] = x[:, live_in] @ Wb + b``; ``dWb = (x_l.T @ dy_l) * Mb`` (the block's
    mask), written back as a block into ``grads['W']`` (entry by entry when under a quarter of the
    block is kept); ``dx[:, live_in] = dy_l @ Wb.T``. It pays when the live block is dense, i.e. when
    pruning has removed whole units (structured masks); on IMP masks the live block is about as
    sparse as W and CSR wins. Per call (samples, train, dx, input order) the kernel picks compact or
    CSR with the cost model :data:`COST` (:meth:`_compact_pays`), or as forced by ``modes``.

    Values are re-gathered from ``W`` on every forward (``np.take``, nnz elements), so optimisers may
    update ``W`` in place; the index structure is rebuilt only by :meth:`mask_changed`.
    ``modes``: ``{"dx": "csr" | "csc"}`` forces the CSR path's dX product; ``{"fwd": "compact"}``
    (or all three of fwd/dx/dw ``"compact"``) forces the compact mode, ``{"fwd": "sparse"}`` the
    CSR mode; without ``fwd`` the cost model chooses.
    """

    def _setup(self, layer):
        self.R, self.C = layer.out_features, layer.in_features
        f = self.forced or {}
        dx = f.get("dx", "csr")
        self.dx_mode = "csc" if dx == "csc" else "csr"
        self.force_compact = {"compact": True, "sparse": False}.get(f.get("fwd"))
        if self.force_compact is None and dx in ("csr", "csc") and "dx" in f:
            self.force_compact = False          # a CSR dX mode was asked for: the CSR path
        self._compact_plans = {}
        self._last_compact = False

    def _modes_str(self):
        if self._last_compact:
            return "compact"
        return f"csr/dx-{self.dx_mode}/sddmm"

    def _compact_pays(self, n: int, train: bool, need_dx: bool, fmajor: bool) -> bool:
        """Compact or CSR for a call on ``n`` samples, by the cost model :data:`COST` (forced modes
        first). Compact costs its GEMMs on the live block plus the block gather, the input gather and
        the output/dx assembly; CSR its products plus the input's transposing copy (none for
        feature-major input)."""
        if self.force_compact is not None:
            return self.force_compact
        key = (n, train, need_dx, fmajor)
        use = self._compact_plans.get(key)
        if use is None:
            c = COST
            blk = self.nr * self.nc
            gemm = c["gemm_fma"] * blk * n + c["gemm_call"]
            copy = lambda k: c["copy_elem"] * k + c["copy_call"]
            whole = self.all_c and self.all_r             # nothing dead: the block is W itself
            comp = (gemm + (0.0 if whole else copy(blk)) + (0.0 if self.all_c else copy(n * self.nc))
                    + (0.0 if self.all_r else copy(n * self.R)))
            csr = c["spmm_fma"] * self.nnz * n + c["spmm_call"] + (0.0 if fmajor else copy(n * self.C))
            if train:
                comp += (gemm + copy(2 * self.nnz if self.blk_by_entry and not whole else blk)
                         + (0.0 if self.all_r else copy(n * self.nr)))
                csr += c["sddmm_fma"] * self.nnz * n + c["sddmm_call"]
                if need_dx:
                    comp += gemm + copy(n * self.C)
                    csr += c["spmm_fma"] * self.nnz * n + c["spmm_call"]
            use = self._compact_plans[key] = bool(self.nnz) and comp < COMPACT_MARGIN * csr
        return use

    @staticmethod
    def _fmajor(x) -> bool:
        """The input is feature-major: an F-ordered (N > 1, in) array, whose ``x.T`` the kernel
        reads without a copy (the ``_f`` modes of the thresholds table)."""
        return x.shape[0] > 1 and x.strides[0] == x.itemsize

    def _input_key(self, x) -> tuple:
        return ("F",) if self._fmajor(x) else ()

    @staticmethod
    def _fast_key(x):
        n = x.shape[0]
        return -n if (n > 1 and x.strides[0] == x.itemsize) else n

    # The base class's forward, specialised: the batch size inlined as the key and the dense code
    # called directly (no kernel swap) -- at batch 1 a small dense product takes 2-10 us and every
    # 100 ns of dispatch shows.
    def forward(self, layer, x, train=True):
        try:
            n = x.shape[0]                   # the fast key (_fast_key), inlined
            t = (self._fast_t if train else self._fast_e)[
                -n if (n > 1 and x.strides[0] == x.itemsize) else n]
        except (KeyError, AttributeError):   # not cached yet, or x is not an array (a list)
            return self._forward(layer, x, train)
        if t[2] or (train and layer.need_dx != self._fast_dx):
            return self._forward(layer, x, train)
        self._last = t
        self._cache = _DENSE
        return layer.dense_forward(x, train)

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
        # compaction: the live block Wb = W[live_c][:, live_r] (nc, nr) and, in the order of gidx_t
        # (row-major of W), the positions of the kept weights inside it
        self.live_c, self.live_r = _live(keep)           # inputs, outputs (units) with a kept weight
        self.nc, self.nr = self.live_c.size, self.live_r.size
        self.all_c, self.all_r = self.nc == C, self.nr == R
        # the block's 0/1 mask (its dW is multiplied by it, then written back as a block)
        if m is not None and self.all_c and self.all_r:
            self.blk_mask = m                            # the layer's own 0/1 mask (not copied)
        else:
            mb = keep if self.all_c else keep[self.live_c]
            self.blk_mask = (mb if self.all_r else mb[:, self.live_r]).astype(_F32)
        self.blk = None if (self.all_c and self.all_r) else np.zeros((self.nc, self.nr), _F32)
        # a sparse block (fewer than a quarter of it kept) writes its dW entry by entry instead
        self.blk_by_entry = 4 * self.nnz < self.nc * self.nr
        self.blk_pos_t = (np.searchsorted(self.live_c, it) * self.nr
                          + np.searchsorted(self.live_r, jt)).astype(np.intp)
        self._compact_plans = {}
        layer.grads["W"][...] = 0                        # pruned entries stay zero from now on
        self._bufs = {}
        self._cache = None
        self.decisions = {}
        self._reset_fast()
        self._last = None
        self._route(layer)

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
        self._last_compact = self._compact_pays(n, train, train and layer.need_dx, self._fmajor(x))
        if self._last_compact:
            return self._forward_compact(layer, x, train)
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

    def _forward_compact(self, layer, x, train):
        """The compact mode's forward (see the class docstring): sample-major GEMM on the live block."""
        n = x.shape[0]
        blk = self._gather_block(layer.params["W"])
        xl = x if self.all_c else np.take(x, self.live_c, axis=1)
        yl = np.matmul(xl, blk)
        if self.all_r:
            y = yl
            if layer.bias:
                y += layer.params["b"]
        else:
            y = np.empty((n, self.R), _F32)
            y[...] = layer.params["b"] if layer.bias else 0
            y[:, self.live_r] += yl
        if train:
            self._cache = ("compact", xl, n)
        return y

    def _gather_block(self, W):
        """The live block ``W[live_in][:, live_out]`` (W itself when nothing is dead): whole rows
        when only inputs are dead, whole columns when only units are."""
        if self.blk is None:
            return W
        if self.all_r:
            np.take(W, self.live_c, axis=0, out=self.blk, mode="clip")
        elif self.all_c:
            np.take(W, self.live_r, axis=1, out=self.blk, mode="clip")
        else:
            np.take(np.take(W, self.live_c, axis=0, mode="clip"), self.live_r, axis=1,
                    out=self.blk, mode="clip")
        return self.blk

    def _backward_compact(self, layer, dout, xl):
        dl = dout if self.all_r else np.take(dout, self.live_r, axis=1)
        if layer.bias:
            np.sum(dout, axis=0, out=layer.grads["b"])
        gW = layer.grads["W"]
        if self.nnz:
            if self.blk is None:                           # nothing dead: the block is W itself
                np.matmul(xl.T, dl, out=gW)
                gW *= self.blk_mask
            else:
                gb = np.matmul(xl.T, dl)                   # (nc, nr): dW on the live block
                if self.blk_by_entry:                      # the kept entries only
                    np.take(gb.reshape(-1), self.blk_pos_t, out=self.gnz, mode="clip")
                    np.put(gW.reshape(-1), self.gidx_t, self.gnz, mode="clip")
                else:                                      # the whole block, pruned entries 0
                    gb *= self.blk_mask
                    if self.all_r:
                        gW[self.live_c] = gb               # whole rows of W
                    elif self.all_c:
                        gW[:, self.live_r] = gb
                    else:
                        gW[np.ix_(self.live_c, self.live_r)] = gb
        if not layer.need_dx:
            return None
        dxl = np.matmul(dl, layer.params["W"].T if self.blk is None else self.blk.T)
        if self.all_c:
            return dxl
        dx = np.zeros((dout.shape[0], self.C), _F32)
        dx[:, self.live_c] = dxl
        return dx

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
        if c[0] == "compact":
            return self._backward_compact(layer, dout, c[1])
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
    forced by ``modes``; whether to use the kernel at all under ``auto`` is looked up in the
    thresholds table (see :class:`_KernelBase`) -- in practice conv runs dense except at very low
    densities."""

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
        self._reset_fast()
        self._last = None
        self._route(layer)

    def _modes_str(self):
        return "/".join(self._last_modes[k] for k in ("fwd", "dx", "dw")) if getattr(self, "_last_modes", None) else "?"

    def _input_key(self, x) -> tuple:
        return tuple(x.shape[2:])        # the table's conv keys include the input's H x W

    @staticmethod
    def _fast_key(x):
        return x.shape

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
        if not self._decide(layer, x, train):
            self._cache = _DENSE
            return self._dense_call(layer, layer.forward, x, train)
        n, f, oh, ow = layer.output_shape(x.shape)
        modes = self._plan(layer, n * oh * ow, train)
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
            return self._dense_call(layer, layer.backward, dout)
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


def _kernel_for(layer, policy, modes=None, thresholds=None):
    if isinstance(layer, Dense):
        return DenseKernelSparse(layer, policy, modes, thresholds)
    if isinstance(layer, Conv2D):
        return ConvKernelSparse(layer, policy, modes, thresholds)
    return None


def apply_kernel(model, choice: str = "auto", modes: dict | None = None,
                 thresholds: dict | None = None) -> None:
    """Set the kernel of every Dense/Conv2D layer of ``model``.

    ``choice``: ``dense`` (``layer.kernel = None``), ``sparse`` (always the kernel), ``auto`` (the
    kernel is used iff the layer's mask density is <= the threshold for its shape, batch class and
    mode in ``thresholds`` -- a table as written by ``python -m nprune.sparse --calibrate``; default
    :func:`active_thresholds` -- else the dense code runs; see :class:`_KernelBase`). Under ``auto``
    a layer whose shape has no threshold at all gets no kernel (exactly the dense code, no dispatch).
    ``modes`` (tests/benchmarks) forces methods: Conv2D ``{"fwd": "compact"|"sparse", "dx":
    "compact"|"sparse"|"csc", "dw": "compact"|"sparse"}``; Dense only reads ``{"dx": "csr"|"csc"}``.
    A layer without a mask is also given the kernel (``sparse``: compact == dense GEMM there).
    """
    if choice not in ("dense", "sparse", "auto"):
        raise ValueError(f"kernel choice must be dense, sparse or auto, got {choice!r}")
    table = None
    if choice == "auto":
        table = active_thresholds() if thresholds is None else \
            check_thresholds(thresholds, thresholds.get("source", "(given table)")
                             if isinstance(thresholds, dict) else "(given table)")
    for layer in model.layers:
        if not isinstance(layer, (Dense, Conv2D)):
            continue
        if choice == "dense":
            layer.kernel = None
        elif choice == "auto":
            layer.kernel = auto_kernel(layer, table, modes)
        else:
            layer.kernel = _kernel_for(layer, choice, modes)


def auto_kernel(layer, thresholds: dict | None = None, modes: dict | None = None):
    """What ``auto`` attaches to ``layer``: an ``auto`` kernel following ``thresholds`` (default
    :func:`active_thresholds`), or None (the dense code, no dispatch at all) when the table has no
    threshold for the layer's shape in any batch class or mode."""
    table = active_thresholds() if thresholds is None else thresholds
    return _kernel_for(layer, "auto", modes, table) if _may_use_kernel(table, layer) else None


def kernel_report(model) -> list[dict]:
    """Per Dense/Conv2D layer: ``kernel`` (dense / sparse / auto), mask density, the ``auto``
    decisions so far (``"small/train_dx": {"use", "threshold", "density", "shape", ...}``),
    ``dense_everywhere`` (auto, Dense: the density is above every threshold of the shape, so the
    plain dense code runs, undecorated), ``dense_without_lookup`` (auto, Dense: the modes -- all,
    eval or train -- sent to the dense code without a lookup, hence without a decision or plan
    entry) and the plan of its last forward through the lookup (samples, train, use_kernel,
    methods per product)."""
    out = []
    for name, layer in zip(model.names, model.layers):
        if not isinstance(layer, (Dense, Conv2D)):
            continue
        k = getattr(layer, "kernel", None)
        if not isinstance(k, _KernelBase):
            m = layer.masks.get("W")
            out.append(dict(layer=name, kernel="dense", use_kernel=False, decisions={},
                            density=1.0 if m is None else float(np.count_nonzero(m) / m.size)))
            continue
        out.append(dict(dict(layer=name, kernel=k.policy, density=float(k.density),
                             dense_everywhere=bool(getattr(k, "all_dense", False)),
                             dense_without_lookup=getattr(k, "dense_modes", None),
                             use_kernel=False, decisions={
            f"{key[0]}/{mode_key(key[1], key[2])}" + ("" if len(key) == 3 else
                                                       " input " + "x".join(map(str, key[3:]))):
            dict(v, use=bool(v["use"])) for key, v in k.decisions.items()}), **k.last_plan))
    return out


# ------------------------------------------------------------------------------------------------
# Calibration: the auto thresholds (python -m nprune.sparse --calibrate) and the conv cost model
# ------------------------------------------------------------------------------------------------

def calibration_layers(net_names=None) -> list[dict]:
    """Every distinct Dense/Conv2D layer (by :func:`shape_key`, with its input size) of the networks
    of :mod:`nprune.nets`: ``{"key", "net", "name", "layer", "in_shape", "first"}`` (``first``: the
    network's first parametrised layer, which gets the images in C order and needs no dx)."""
    from . import nets
    out, seen = [], set()
    for net in (net_names or nets.NETS):
        model = nets.build(net, np.random.default_rng(0))
        x = np.zeros((1, 1, 28, 28), _F32)
        first = True
        for name, layer in zip(model.names, model.layers):
            if isinstance(layer, (Dense, Conv2D)):
                key = shape_key(layer, x.shape)
                if key not in seen:
                    seen.add(key)
                    out.append(dict(key=key, net=net, name=name, layer=layer,
                                    in_shape=tuple(x.shape[1:]), first=first))
                first = False
            x = layer.forward(x, train=False)
    return out


def _blas_threads():
    """([thread counts to measure], threadpool_limits or None): 1 and all cores when threadpoolctl
    is importable (the threshold must hold for --jobs 1 and --jobs N alike), else the current."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return [None], None
    n = os.cpu_count() or 1
    return ([1, n] if n > 1 else [1]), threadpool_limits


def _cal_inputs(layer, spec, n, rng):
    """Input and upstream gradient in the memory order the layer sees inside its network: C-ordered
    images for a first layer; batch-last (C, H, W, N) for an inner conv; C order for an inner Dense
    (the order a dense predecessor produces; a sparse predecessor's F order only helps the kernel)."""
    shape = (n,) + tuple(spec["in_shape"])
    if isinstance(layer, Conv2D):
        if spec["first"]:
            x = rng.random(shape, dtype=_F32)
        else:
            x = rng.random(shape[1:] + (n,), dtype=_F32).transpose(3, 0, 1, 2)
        _, f, oh, ow = layer.output_shape(shape)
        dout = rng.standard_normal((f, oh, ow, n), dtype=_F32).transpose(3, 0, 1, 2)
    else:
        x = rng.random(shape, dtype=_F32)
        dout = rng.standard_normal((n, layer.out_features), dtype=_F32)
    return x, dout


def _time_pair(layer, kernel, x, dout, train, threads, limits, repeats) -> dict:
    """{threads: {"kernel": s/call, "dense": s/call, "ratio": r}} for a forward (plus backward when
    ``train``): ``repeats`` rounds, each a block of ~CAL_TARGET seconds of either path back to back
    (order alternating); times are the fastest block's, ``ratio`` the median over rounds of kernel
    block / dense block of the same round -- both robust to other jobs stealing the CPU. Stops early
    once the two are a factor 2 apart in every round."""
    import contextlib

    def run(k):
        layer.kernel = k
        layer.forward(x, train)
        if train:
            layer.backward(dout)

    out = {}
    try:
        for t in threads:
            ctx = limits(limits=t, user_api="blas") if (limits and t) else contextlib.nullcontext()
            with ctx:
                arms = (("dense", None), ("kernel", kernel))
                probe = {}
                for name, k in arms:
                    run(k)                          # warm-up (buffers, caches)
                    t0 = time.perf_counter()
                    run(k)
                    probe[name] = time.perf_counter() - t0
                number = max(1, min(200, int(CAL_TARGET / max(max(probe.values()), 1e-7))))
                ts = {"dense": [], "kernel": []}
                for r in range(repeats):
                    for name, k in (arms if r % 2 == 0 else arms[::-1]):
                        t0 = time.perf_counter()
                        for _ in range(number):
                            run(k)
                        ts[name].append((time.perf_counter() - t0) / number)
                    if r >= 2 and (max(ts["kernel"]) < 0.5 * min(ts["dense"])
                                   or min(ts["kernel"]) > 2.0 * max(ts["dense"])):
                        break
                ratios = np.array(ts["kernel"]) / np.array(ts["dense"])
                out[t] = {"kernel": float(min(ts["kernel"])), "dense": float(min(ts["dense"])),
                          "ratio": float(np.median(ratios))}
    finally:
        layer.kernel = None
    return out


def _passes(res: dict) -> bool:
    """The kernel is clearly faster: by AUTO_MARGIN in the paired ratio and in the best times, at
    every thread count measured."""
    return all(v["ratio"] <= AUTO_MARGIN and v["kernel"] <= AUTO_MARGIN * v["dense"]
               for v in res.values())


def _cal_modes(spec, modes=None) -> tuple:
    """The modes calibrated for a layer: the feature-major ``_f`` modes only for inner Dense layers
    (a first layer gets C-ordered images; conv layers are batch-last throughout)."""
    inner_dense = isinstance(spec["layer"], Dense) and not spec["first"]
    out = ALL_MODES if inner_dense else AUTO_MODES
    return tuple(m for m in out if modes is None or m in modes)


def measure_thresholds(specs=None, densities=CAL_DENSITIES, batches=None, repeats=CAL_REPEATS,
                       verbose=False, seed=0, modes=None) -> tuple[dict, list]:
    """Measure the ``auto`` thresholds on this machine. Returns (thresholds, measurements).

    For each layer shape (:func:`calibration_layers`), batch class and mode, at each batch size of
    the class (``CAL_BATCHES``; conv ``CAL_BATCHES_CONV``) the densities of ``densities`` are tried in
    increasing order on a random mask: the kernel (``sparse``, as auto runs it) and the dense masked
    path are timed side by side (:func:`_time_pair`) at 1 BLAS thread and at all cores, and the scan
    stops at the first density where the kernel is not <= AUTO_MARGIN x dense at every thread count.
    The threshold is the last density that passed (None if none did), minimised over the class's
    batch sizes. Random masks are the kernels' worst case at a given density (IMP masks kill whole
    rows and columns, which only helps the kernel), so the thresholds err on the dense side.
    Inner Dense layers are also measured with feature-major (F-ordered) input, the ``_f`` modes
    (:data:`FMAJOR_MODES`; the upstream gradient stays C-ordered, as a dense successor returns it,
    the kernel's worse case). ``modes``: measure only these modes."""
    threads, limits = _blas_threads()
    rng = np.random.default_rng(seed)
    table, meas = {}, []
    for spec in (calibration_layers() if specs is None else specs):
        layer, key = spec["layer"], spec["key"]
        layer.kernel = None
        need_dx0 = layer.need_dx
        cls_batches = batches or (CAL_BATCHES_CONV if isinstance(layer, Conv2D) else CAL_BATCHES)
        table[key] = {}
        for cls in BATCH_CLASSES:
            table[key][cls] = {}
            for mode in _cal_modes(spec, modes):
                base = mode[:-2] if mode.endswith("_f") else mode
                train = base != "eval"
                layer.need_dx = base == "train_dx" if train else not spec["first"]
                thr, per = 1.0, {}
                for n in cls_batches[cls]:
                    x, dout = _cal_inputs(layer, spec, n, rng)
                    if mode != base:   # feature-major input, as a sparse predecessor leaves it; the
                        x = np.asfortranarray(x)   # upstream gradient stays C-ordered (worse case)
                    best = None
                    for d in densities:
                        if d > thr:
                            break
                        layer.set_mask("W", rng.random(layer.params["W"].shape) < d)
                        k = _kernel_for(layer, "sparse")
                        res = _time_pair(layer, k, x, dout, train, threads, limits, repeats)
                        ok = _passes(res)
                        if not ok:                  # a failure is confirmed by a second measurement
                            meas.append({"shape": key, "batch_class": cls, "mode": mode,
                                         "batch": n, "density": d, "pass": ok, "retried": True,
                                         "times": {str(t): v for t, v in res.items()}})
                            res = _time_pair(layer, k, x, dout, train, threads, limits, repeats)
                            ok = _passes(res)
                        meas.append({"shape": key, "batch_class": cls, "mode": mode, "batch": n,
                                     "density": d, "pass": ok,
                                     "times": {str(t): v for t, v in res.items()}})
                        if not ok:
                            break
                        best = d
                    per[n] = best
                    if best is None:
                        thr = None
                        break
                    thr = min(thr, best)
                table[key][cls][mode] = thr
                if verbose:
                    print(f"  {key:44s} {cls:5s} {mode:8s} " + " ".join(
                        f"b{n}:{'-' if b is None else f'{b:g}'}" for n, b in per.items())
                        + f"  => {'never' if thr is None else f'{thr:g}'}", flush=True)
        layer.set_mask("W", None)
        layer.need_dx = need_dx0
    return table, meas


def _machine() -> dict:
    import platform
    import scipy
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "scipy": scipy.__version__}
    try:
        from threadpoolctl import threadpool_info
        pools = [p for p in threadpool_info() if p.get("user_api") == "blas"]
        if pools:
            info["blas"] = f"{pools[0].get('internal_api')} {pools[0].get('version')}"
            info["blas_threads_default"] = pools[0].get("num_threads")
    except ImportError:
        pass
    if hasattr(os, "getloadavg"):
        info["load_avg_at_start"] = [round(v, 2) for v in os.getloadavg()]
    return info


def _min_merge(a: dict, b: dict) -> dict:
    """Entry-wise the more conservative of two threshold tables (None = never wins)."""
    out = {}
    for shape in a.keys() | b.keys():
        out[shape] = {}
        for c in BATCH_CLASSES:
            ma, mb = a.get(shape, {}).get(c, {}), b.get(shape, {}).get(c, {})
            out[shape][c] = {m: (None if ma.get(m) is None or mb.get(m) is None
                                 else min(ma[m], mb[m])) for m in ALL_MODES if m in ma or m in mb}
    return out


def calibrate_thresholds(path=None, quick: bool = False, runs: int = 1,
                         verbose: bool = True) -> Path:
    """Measure the ``auto`` thresholds (:func:`measure_thresholds`, ``runs`` times, keeping the
    smallest threshold of each entry; a few minutes per run) and write them as JSON to ``path``
    (default :func:`user_thresholds_path`, which ``auto`` then uses). Returns the path."""
    from .data.fsutil import atomic_write_json
    path = Path(path) if path is not None else user_thresholds_path()
    machine = _machine()
    t0 = time.perf_counter()
    kw = dict(repeats=5) if quick else {}
    table, meas = None, []
    for r in range(max(1, runs)):
        if verbose and runs > 1:
            print(f"run {r + 1} of {runs}", flush=True)
        t, m = measure_thresholds(verbose=verbose, seed=r, **kw)
        table = t if table is None else _min_merge(table, t)
        meas += [dict(x, run=r) for x in m]
    if hasattr(os, "getloadavg"):
        machine["load_avg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    obj = {"format": THRESHOLDS_FORMAT, "machine": machine,
           "command": "python -m nprune.sparse --calibrate" + (" --quick" if quick else "")
           + (f" --runs {runs}" if runs > 1 else ""),
           "margin": AUTO_MARGIN, "densities": list(CAL_DENSITIES),
           "batches": {"dense": CAL_BATCHES, "conv": CAL_BATCHES_CONV},
           "seconds": round(time.perf_counter() - t0, 1), "thresholds": table, "measurements": meas}
    check_thresholds(obj, str(path))
    atomic_write_json(path, obj)
    return path


def format_thresholds(table: dict) -> str:
    """The table as text: one line per layer shape, ``class: train/train_dx/eval`` thresholds, and
    a second line with the feature-major (``_f``) thresholds where the table has them."""
    lines = [f"source: {table.get('source', '?')} (per batch class: train/train_dx/eval)"]
    for shape, classes in table["thresholds"].items():
        for label, ms in ((shape, AUTO_MODES), ("  feature-major input", FMAJOR_MODES)):
            if not any(m in classes.get(c, {}) for c in BATCH_CLASSES for m in ms):
                continue
            cells = []
            for c in BATCH_CLASSES:
                modes = classes.get(c, {})
                cells.append(f"{c}: " + "/".join("-" if modes.get(m) is None else f"{modes[m]:g}"
                                                 for m in ms))
            lines.append(f"  {label:44s} " + "  ".join(cells))
    return "\n".join(lines)


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


def main(argv=None) -> int:
    import argparse
    import sys
    ap = argparse.ArgumentParser(
        prog="python -m nprune.sparse",
        description="Kernel thresholds of --kernel auto: --calibrate measures them on this machine "
                    f"(a few minutes) and writes them to {user_thresholds_path()} (or --out), which "
                    "auto then uses instead of the shipped table; --show prints the table in use.")
    ap.add_argument("--calibrate", action="store_true", help="measure the auto thresholds")
    ap.add_argument("--out", help="write the thresholds here instead of the user cache")
    ap.add_argument("--quick", action="store_true", help="fewer repeats (noisier, faster)")
    ap.add_argument("--runs", type=int, default=1,
                    help="measure this many times and keep the smallest threshold of each entry "
                         "(noisy machines)")
    ap.add_argument("--show", action="store_true", help="print the thresholds auto uses now")
    ap.add_argument("--cost-model", action="store_true",
                    help="measure and print the conv cost-model constants (COST)")
    a = ap.parse_args(argv)
    try:
        if a.calibrate:
            p = calibrate_thresholds(a.out, quick=a.quick, runs=a.runs, verbose=True)
            print(format_thresholds(dict(load_thresholds(p), source=str(p))))
            print(f"wrote {p}")
        if a.show:
            print(format_thresholds(active_thresholds()))
        if a.cost_model:
            calibrate(verbose=True)
        if not (a.calibrate or a.show or a.cost_model):
            ap.print_help()
    except ThresholdsError as e:
        print(f"nprune: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
