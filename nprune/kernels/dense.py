"""The sparse kernel of :class:`nprune.layers.Dense` (``y = x @ W + b``), feature-major throughout.

View the layer as ``A @ X`` with ``A = W.T`` (out, in) held as :class:`~.csr.CSR` and ``X = x.T``
(in, N) C-contiguous:

* forward ``Y = A @ X`` (one length-N axpy per survivor) into a fresh (out, N) array initialised
  with the bias, returned as ``Y.T``: an F-ordered (N, out) array. ReLU keeps that order, so the
  next sparse Dense layer reads its ``X`` without a copy; activations stay feature-major through the
  network and only a C-ordered input (the first layer's images) is transposed, into a reused buffer.
  Inference batches larger than :data:`CHUNK` run in column chunks, so the transposed input block
  and the output block stay in cache.
* ``dW`` only at the survivors (:func:`~.csr.sddmm`, multiply + GEMV on reused buffers, in blocks of
  :data:`SDDMM_BLOCK` floats), then one ``np.put`` into ``grads['W']``, whose pruned entries were
  zeroed once, at the mask change.
* ``db`` as a GEMV ``dY @ 1``; ``dX = W @ dY`` by the CSR of W (the transpose of A), or with
  ``modes={"dx": "csc"}`` by A's arrays read as CSC (no second value gather); returned F-ordered.

**Compact mode.** Inputs whose row of W is entirely pruned (dead inputs, e.g. MNIST's border pixels)
and units whose column is (dead units) are dropped, and dense GEMMs run on the live block
``Wb = W[live_in][:, live_out]`` (nc, nr), sample-major, with ``Wb`` gathered on every forward (whole
rows or columns by ``np.take``; W itself when nothing is dead): ``y[:, live_out] = x[:, live_in] @ Wb
+ b``; ``dWb = (x_l.T @ dy_l) * Mb`` (the block's mask), written back as a block into ``grads['W']``
(survivor by survivor when under a quarter of the block survives); ``dx[:, live_in] = dy_l @ Wb.T``.
It pays when pruning has removed whole units (structured masks); on IMP masks the live block is about
as sparse as W and CSR wins. Per call (samples, train, dx, input order) the kernel picks compact or
CSR with :func:`~.cost.dense_compact_pays`, unless ``modes`` forces one.
"""
from __future__ import annotations

import numpy as np

from . import cost
from .base import SparseKernel
from .csr import CSR, sddmm, survivor_rows_cols

_F32 = np.float32

#: inference batches larger than this run in column chunks of this many samples (the transposed
#: input block and the output block of a chunk stay in cache)
CHUNK = 512
#: the SDDMM gathers at most this many floats per operand per block (its buffers stay in cache)
SDDMM_BLOCK = 1 << 16


def feature_major(x) -> bool:
    """The input is feature-major: an F-ordered (N > 1, in) array, whose ``x.T`` the kernel reads
    without a copy."""
    return x.shape[0] > 1 and x.strides[0] == x.itemsize


class DenseKernelSparse(SparseKernel):
    """CSR and compact kernel of a Dense layer (see the module docstring).

    ``modes``: ``{"dx": "csr" | "csc"}`` forces the CSR path's dX product; ``{"fwd": "compact"}``
    (or all three of fwd/dx/dw ``"compact"``) forces the compact mode, ``{"fwd": "sparse"}`` the CSR
    mode; without ``fwd`` the cost model chooses. Other keys are ignored."""

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

    def modes_str(self):
        if self._last_compact:
            return "compact"
        return f"csr/dx-{self.dx_mode}/sddmm"

    def _compact_pays(self, n: int, train: bool, need_dx: bool, fmajor: bool) -> bool:
        """Compact (True) or CSR for a call on ``n`` samples: the forced mode, else the cost model
        (remembered per call shape until the mask changes)."""
        if self.force_compact is not None:
            return self.force_compact
        key = (n, train, need_dx, fmajor)
        use = self._compact_plans.get(key)
        if use is None:
            use = self._compact_plans[key] = cost.dense_compact_pays(
                (self.R, self.C), (self.nr, self.nc), self.nnz, n, train, need_dx, fmajor,
                self.blk_by_entry)
        return use

    def mask_changed(self, layer) -> None:
        R, C = self.R, self.C
        m = layer.masks.get("W")
        bool_mask = np.ones((C, R), bool) if m is None else (np.asarray(m) != 0)   # (in, out)
        # A = W.T: survivors ordered by (unit j, input i); its transpose is W's CSR, row-major in W
        s = self.csr = CSR(bool_mask.T)
        self.nnz = s.nnz
        self.gidx = s.cols * R + s.rows                  # positions in W.ravel(), A's CSR order
        self.gidx_t = self.gidx[s.perm]                  # ... in W's row-major order
        self.i_t, self.j_t = s.cols[s.perm], s.rows[s.perm]
        self.data = np.zeros(self.nnz, _F32)
        self.data_t = np.zeros(self.nnz, _F32)
        self.gnz = np.zeros(self.nnz, _F32)
        self.density = self.nnz / max(R * C, 1)
        # compaction: the live block Wb = W[live_c][:, live_r] (nc, nr) and, in the order of gidx_t,
        # the positions of the survivors inside it
        self.live_c, self.live_r = survivor_rows_cols(bool_mask)   # inputs, units with survivors
        self.nc, self.nr = self.live_c.size, self.live_r.size
        self.all_c, self.all_r = self.nc == C, self.nr == R
        # the block's 0/1 mask (its dW is multiplied by it, then written back as a block)
        if m is not None and self.all_c and self.all_r:
            self.blk_mask = m                            # the layer's own 0/1 mask (not copied)
        else:
            mb = bool_mask if self.all_c else bool_mask[self.live_c]
            self.blk_mask = (mb if self.all_r else mb[:, self.live_r]).astype(_F32)
        self.blk = None if (self.all_c and self.all_r) else np.zeros((self.nc, self.nr), _F32)
        # a sparse block (under a quarter of it survives) writes its dW survivor by survivor
        self.blk_by_entry = 4 * self.nnz < self.nc * self.nr
        self.blk_pos_t = (np.searchsorted(self.live_c, self.i_t) * self.nr
                          + np.searchsorted(self.live_r, self.j_t)).astype(np.intp)
        self._compact_plans = {}
        self._bufs = {}
        self._reset_calls(layer)

    def _buf(self, key, size):
        """A reused flat float32 buffer of at least ``size`` elements."""
        b = self._bufs.get(key)
        if b is None or b.size < size:
            b = self._bufs[key] = np.empty(max(size, 1), _F32)
        return b[:size]

    def prepare(self, layer, x):
        return self._prepared(layer, x, 2, layer.in_features, f"(N, {layer.in_features})")

    def run(self, layer, x, train=True):
        R, C, n = self.R, self.C, x.shape[0]
        self._last_compact = self._compact_pays(n, train, train and layer.need_dx, feature_major(x))
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
            self._spmm(xT, yT, b)
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
            self._spmm(xc, yc, b)
            yT[:, s:s + w] = yc
        return yT.T

    def _spmm(self, xT, yT, b):
        if b is None:
            yT.fill(0)
        else:
            np.copyto(yT, b)
        if self.nnz:
            self.csr.matmul(self.data, xT, yT)

    def _forward_compact(self, layer, x, train):
        """The compact mode's forward: a sample-major GEMM on the live block."""
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

    def backward(self, layer, dout):
        c = self._cached(layer)
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
            bufs = (self._buf("ga", min(step, nnz) * n), self._buf("gb", min(step, nnz) * n), ones)
            sddmm(xT, dT, self.i_t, self.j_t, self.gnz, step, "gemv", bufs)
            np.put(layer.grads["W"].reshape(-1), self.gidx_t, self.gnz, mode="clip")
        if not layer.need_dx:
            return None
        dxT = np.zeros((C, n), _F32)
        if nnz:
            if self.dx_mode == "csc":
                self.csr.matmul_t_csc(self.data, dT, dxT)
            else:
                np.take(layer.params["W"].reshape(-1), self.gidx_t, out=self.data_t, mode="clip")
                self.csr.matmul_t(self.data_t, dT, dxT)
        return dxT.T

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
                if self.blk_by_entry:                      # the survivors only
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
