"""The sparse kernel of :class:`nprune.layers.Conv2D`: the im2col GEMM ``W.reshape(F, C*kh*kw) @
cols`` with the filter matrix held as a :class:`SparseMatrix`.

Dead filters (rows without survivors) and dead (channel, tap) columns are dropped, and each product
(forward, dx, dW) runs either as a smaller dense GEMM on the live block (*compact*) or in CSR form on
the survivors (*sparse*), whichever :func:`~.cost.conv_modes` predicts cheaper for the call's number
of columns, unless ``modes`` forces it.
"""
from __future__ import annotations

import numpy as np

from ..im2col import col2im, im2col
from . import cost
from .base import SparseKernel
from .csr import CSR, sddmm, survivor_rows_cols

_F32 = np.float32


class SparseMatrix:
    """The pruned matrix ``A`` (R, C), a view of a weight array through ``flat`` indices.

    ``flat[r, c]`` is the position of ``A[r, c]`` in ``W.ravel()``. After :meth:`rebuild(mask)` it
    holds the live rows/columns (those with survivors), the CSR of the live block (and of its
    transpose) and the gather indices; :meth:`refresh(W)` copies the current values in (values
    only)."""

    def __init__(self, flat: np.ndarray):
        self.flat = flat
        self.R, self.C = flat.shape
        self.rebuild(None)

    def rebuild(self, mask2d: np.ndarray | None) -> None:
        R, C = self.R, self.C
        m = np.ones((R, C), bool) if mask2d is None else (np.asarray(mask2d) != 0)
        self.live_r, self.live_c = survivor_rows_cols(m)
        self.all_r = self.live_r.size == R
        self.all_c = self.live_c.size == C
        nr, nc = self.live_r.size, self.live_c.size
        self.nr, self.nc = nr, nc
        s = self.csr = CSR(m[np.ix_(self.live_r, self.live_c)])
        self.nnz = s.nnz
        self.rr, self.cc = s.rows, s.cols               # survivors of the live block, CSR order
        flat_sub = self.flat[np.ix_(self.live_r, self.live_c)]
        self.gidx = flat_sub[s.rows, s.cols].astype(np.intp)   # W.ravel() positions, CSR order
        self.blk_pos = (s.rows * nc + s.cols).astype(np.intp)  # positions in the live block
        self.blk_gidx = flat_sub.ravel().astype(np.intp)
        self.gidx_t = self.gidx[s.perm]                  # the transpose's gather index
        self.data = np.zeros(self.nnz, _F32)
        self.data_t = np.zeros(self.nnz, _F32)
        self.blk = np.zeros((nr, nc), _F32)
        self.density = self.nnz / max(R * C, 1)
        self.block_density = self.nnz / max(nr * nc, 1)

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
        if mode == "compact":
            return np.matmul(self.blk, X)
        Y = np.zeros((self.nr, X.shape[1]), _F32)
        if self.nnz:
            self.csr.matmul(self.data, X, Y)
        return Y

    def tmatmul(self, D: np.ndarray, mode: str) -> np.ndarray:
        """``A_live.T @ D`` with D (nr, M) C-contiguous -> (nc, M).

        ``sparse`` uses the CSR of the transpose; ``csc`` uses the CSR arrays of A read as the CSC
        of A.T (no second value array)."""
        if mode == "compact":
            return np.matmul(self.blk.T, D)
        Z = np.zeros((self.nc, D.shape[1]), _F32)
        if self.nnz:
            if mode == "csc":
                self.csr.matmul_t_csc(self.data, D, Z)
            else:
                self.csr.matmul_t(self.data_t, D, Z)
        return Z

    def grad_values(self, D: np.ndarray, X: np.ndarray, mode: str) -> np.ndarray:
        """``(D @ X.T)`` at the survivors (CSR order), D (nr, M), X (nc, M) -> (nnz,) float32."""
        if self.nnz == 0:
            return np.zeros(0, _F32)
        if mode == "compact":
            blk = np.matmul(D, X.T)
            return np.take(blk.reshape(-1), self.blk_pos)
        step = max(256, (1 << 18) // max(D.shape[1], 1))   # ~1 MB of gathered rows per block
        return sddmm(D, X, self.rr, self.cc, np.empty(self.nnz, _F32), step, "einsum")


class ConvKernelSparse(SparseKernel):
    """Sparse/compacted kernel of a Conv2D layer (see the module docstring).

    ``modes`` forces methods: ``{"fwd": "compact"|"sparse", "dx": "compact"|"sparse"|"csc", "dw":
    "compact"|"sparse"}`` (given keys override the cost model's choice)."""

    def _setup(self, layer):
        f = layer.out_channels
        k = layer.in_channels * layer.kh * layer.kw
        self.sm = SparseMatrix(np.arange(f * k).reshape(f, k))
        self._last_modes = None

    def mask_changed(self, layer) -> None:
        m = layer.masks.get("W")
        self.sm.rebuild(None if m is None else m.reshape(m.shape[0], -1))
        self.density = self.sm.density
        self._plans = {}
        self._reset_calls(layer)

    def modes_str(self):
        if not self._last_modes:
            return "?"
        return "/".join(self._last_modes[k] for k in ("fwd", "dx", "dw"))

    def _plan(self, layer, M: int, train: bool) -> dict:
        key = (M, train, layer.need_dx)
        modes = self._plans.get(key)
        if modes is None:
            sm = self.sm
            modes = cost.conv_modes(sm.nr, sm.nc, sm.nnz, M, train)
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

    def prepare(self, layer, x):
        return self._prepared(layer, x, 4, layer.in_channels, f"(N, {layer.in_channels}, H, W)")

    def run(self, layer, x, train=True):
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

    def backward(self, layer, dout):
        _, modes, x_shape, xl = self._cached(layer)
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
        np.put(layer.grads["W"].reshape(-1), sm.gidx, sm.grad_values(dl, xl, modes["dw"]))
        if not layer.need_dx:
            return None
        z = sm.tmatmul(dl, modes["dx"])
        if sm.all_c:
            dcols = z
        else:
            dcols = np.zeros((sm.C, z.shape[1]), _F32)
            dcols[sm.live_c] = z
        return col2im(dcols, x_shape, layer.kh, layer.kw, layer.stride, layer.padding)
