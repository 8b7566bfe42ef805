"""CSR structure of a pruned matrix and the products the sparse kernels run on it.

:class:`CSR` is the one place that turns a 2-D mask (1 keeps, 0 prunes) into compressed sparse row
indices, with those of the transpose. It holds indices only: the values (the survivors of a weight
array) are gathered by the kernels into their own arrays, in the orders given here, so an optimiser
may update the weights in place between calls.

Products (float32, dense operands C-contiguous with the samples along the last axis):

* :meth:`CSR.matmul` ``out += A @ X``; :meth:`CSR.matmul_t` ``out += A.T @ D`` with the CSR of the
  transpose; :meth:`CSR.matmul_t_csc` the same product from A's own CSR arrays read as the CSC of
  ``A.T`` (no second value array).
* :func:`sddmm`: the sampled dense-dense product, ``(D @ X.T)`` at the survivors only (the weight
  gradient of a pruned layer).

The CSR products run SciPy's compiled ``scipy.sparse._sparsetools.csr_matvecs`` / ``csc_matvecs``
directly on NumPy arrays: one axpy over a contiguous row of ``X`` per stored value, accumulated into
``out`` in place, with no sparse-matrix object built per call. That module is private to SciPy, so
it is checked when this module is imported (present, and right on a tiny case); if the check fails,
or a caller sets :data:`USE_SPARSETOOLS` to False, the products go through the public
``scipy.sparse`` matrices instead. The public path computes the product separately and then adds it
to ``out``, so its float32 results may differ from the fast path's in the last bits.
:func:`backend` names the path in use.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse

_F32 = np.float32


def _probe_sparsetools():
    """SciPy's ``_sparsetools`` module if it has the two products this module calls and they give
    the right answer on a 2 x 3 matrix, else None."""
    try:
        from scipy.sparse import _sparsetools as st
        indptr = np.array([0, 2, 3], np.int32)             # A = [[1, 0, 2], [0, 3, 0]]
        indices = np.array([0, 2, 1], np.int32)
        data = np.array([1, 2, 3], _F32)
        x = np.arange(6, dtype=_F32).reshape(3, 2)
        y = np.zeros((2, 2), _F32)
        st.csr_matvecs(2, 3, 2, indptr, indices, data, x.reshape(-1), y.reshape(-1))
        d = np.arange(4, dtype=_F32).reshape(2, 2)
        z = np.zeros((3, 2), _F32)
        st.csc_matvecs(3, 2, 2, indptr, indices, data, d.reshape(-1), z.reshape(-1))
        a = np.array([[1, 0, 2], [0, 3, 0]], _F32)
        if np.array_equal(y, a @ x) and np.array_equal(z, a.T @ d):
            return st
    except Exception:                                       # missing, renamed, other signature
        pass
    return None


_ST = _probe_sparsetools()
#: the CSR products run on ``scipy.sparse._sparsetools`` (True) or the public scipy.sparse matrices
#: (False). True only if the import-time check passed; set it to False to force the public path.
USE_SPARSETOOLS = _ST is not None


def backend() -> str:
    """Which implementation the CSR products use now."""
    return "scipy.sparse._sparsetools" if USE_SPARSETOOLS else "scipy.sparse (public)"


def survivor_rows_cols(mask2d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the rows and of the columns of a 2-D mask that hold at least one survivor."""
    return np.flatnonzero(mask2d.any(axis=1)), np.flatnonzero(mask2d.any(axis=0))


def _indptr(lines: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros(n + 1, np.int32)
    np.cumsum(np.bincount(lines, minlength=n), out=out[1:])
    return out


class CSR:
    """The CSR index structure of the survivors of a 2-D mask ``(R, C)``, and of its transpose.

    Survivor ``k`` (row-major order, the CSR order) sits at ``(rows[k], cols[k])``. ``indptr`` /
    ``indices`` (int32) are the CSR arrays of the matrix; ``indptr_t`` / ``indices_t`` those of its
    transpose, whose ``k``-th stored value is survivor ``perm[k]`` (so a value array in CSR order
    ``v`` reads ``v[perm]`` in the transpose's order)."""

    def __init__(self, mask2d: np.ndarray):
        self.shape = R, C = mask2d.shape
        rows, cols = np.nonzero(mask2d)
        self.nnz = int(rows.size)
        self.rows = rows.astype(np.intp)
        self.cols = cols.astype(np.intp)
        self.indptr = _indptr(rows, R)
        self.indices = cols.astype(np.int32)
        self.perm = np.lexsort((rows, cols))
        self.indptr_t = _indptr(cols, C)
        self.indices_t = rows[self.perm].astype(np.int32)

    def matmul(self, data: np.ndarray, X: np.ndarray, out: np.ndarray) -> None:
        """``out += A @ X``: ``data`` the values in CSR order, X (C, M), out (R, M)."""
        R, C = self.shape
        _spmm("csr", R, C, self.indptr, self.indices, data, X, out)

    def matmul_t(self, data_t: np.ndarray, D: np.ndarray, out: np.ndarray) -> None:
        """``out += A.T @ D`` by the CSR of the transpose: ``data_t`` the values in its order
        (``perm``), D (R, M), out (C, M)."""
        R, C = self.shape
        _spmm("csr", C, R, self.indptr_t, self.indices_t, data_t, D, out)

    def matmul_t_csc(self, data: np.ndarray, D: np.ndarray, out: np.ndarray) -> None:
        """``out += A.T @ D`` from A's CSR arrays read as the CSC of ``A.T`` (values in CSR order)."""
        R, C = self.shape
        _spmm("csc", C, R, self.indptr, self.indices, data, D, out)


def _spmm(fmt: str, n_rows: int, n_cols: int, indptr, indices, data, X, out) -> None:
    """``out += M @ X`` for the (n_rows, n_cols) matrix M given by its ``fmt`` ("csr" or "csc")
    arrays; X and out C-contiguous float32."""
    if USE_SPARSETOOLS:
        fn = _ST.csr_matvecs if fmt == "csr" else _ST.csc_matvecs
        fn(n_rows, n_cols, X.shape[1], indptr, indices, data, X.reshape(-1), out.reshape(-1))
    else:
        cls = scipy.sparse.csr_matrix if fmt == "csr" else scipy.sparse.csc_matrix
        out += cls((data, indices, indptr), shape=(n_rows, n_cols)) @ X


def sddmm(P: np.ndarray, Q: np.ndarray, p_rows: np.ndarray, q_rows: np.ndarray, out: np.ndarray,
          block: int, reduce: str = "gemv", bufs=None) -> np.ndarray:
    """``out[k] = P[p_rows[k]] . Q[q_rows[k]]`` for every k: the entries of ``P @ Q.T`` at the
    survivors, P (rows_P, M) and Q (rows_Q, M) float32 C-contiguous, out (nnz,) float32.

    Per block of ``block`` survivors: gather the rows of P and of Q, multiply, reduce along M.
    ``reduce``: ``"gemv"`` multiplies in place and reduces with a GEMV against ones (into the two
    reused buffers ``bufs = (a, b, ones)``, each of at least block * M floats and ones of M);
    ``"einsum"`` reduces with one fused ``np.einsum`` on fresh gathers. The two round differently in
    the last bits; each kernel always uses the same one, so its results are reproducible."""
    nnz, m = out.size, P.shape[1]
    for s in range(0, nnz, block):
        e = min(nnz, s + block)
        if reduce == "einsum":
            a = np.take(P, p_rows[s:e], axis=0)
            b = np.take(Q, q_rows[s:e], axis=0)
            np.einsum("km,km->k", a, b, out=out[s:e])
            continue
        ga, gb, ones = bufs
        a = ga[:(e - s) * m].reshape(e - s, m)
        b = gb[:(e - s) * m].reshape(e - s, m)
        np.take(P, p_rows[s:e], axis=0, out=a, mode="clip")
        np.take(Q, q_rows[s:e], axis=0, out=b, mode="clip")
        np.multiply(a, b, out=a)
        np.matmul(a, ones, out=out[s:e])
    return out
