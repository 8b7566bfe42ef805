"""nprune.kernels.csr: the CSR structure of a mask, the products, the SDDMM, and the public
scipy.sparse path that replaces SciPy's private _sparsetools when it is missing or switched off."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse

from nprune import nets
from nprune.kernels import ConvKernelSparse, DenseKernelSparse, apply_kernel, csr, kernel_report
from nprune.layers import Conv2D, Dense

from kernels_util import MODES, random_mask, run_layer


def test_csr_structure_is_scipys_and_its_transpose():
    rng = np.random.default_rng(0)
    m = random_mask(rng, (7, 9), 0.3, dead_axis0=[2], dead_axis1=[4, 5])
    s = csr.CSR(m)
    ref = scipy.sparse.csr_matrix(m.astype(np.float32))
    assert s.nnz == ref.nnz and s.shape == (7, 9)
    np.testing.assert_array_equal(s.indptr, ref.indptr)
    np.testing.assert_array_equal(s.indices, ref.indices)
    np.testing.assert_array_equal(m[s.rows, s.cols], True)
    ref_t = scipy.sparse.csr_matrix(m.T.astype(np.float32))
    np.testing.assert_array_equal(s.indptr_t, ref_t.indptr)
    np.testing.assert_array_equal(s.indices_t, ref_t.indices)
    np.testing.assert_array_equal(s.cols[s.perm] * 7 + s.rows[s.perm],     # row-major in m.T
                                  np.flatnonzero(m.T))
    assert s.indices.dtype == s.indptr.dtype == np.int32
    rows, cols = csr.survivor_rows_cols(m)
    assert 2 not in rows and 4 not in cols and 5 not in cols


def _products(m, rng):
    s = csr.CSR(m)
    A = (rng.standard_normal(m.shape) * m).astype(np.float32)
    data = A[s.rows, s.cols]
    X = rng.standard_normal((m.shape[1], 11)).astype(np.float32)
    D = rng.standard_normal((m.shape[0], 11)).astype(np.float32)
    out = []
    R, C = m.shape
    for fn, v, arg, rows in ((s.matmul, data, X, R), (s.matmul_t, data[s.perm], D, C),
                             (s.matmul_t_csc, data, D, C)):
        y = np.ones((rows, 11), np.float32)                 # the products accumulate into out
        fn(v, arg, y)
        out.append(y)
    g = csr.sddmm(D, X, s.rows, s.cols, np.empty(s.nnz, np.float32), 5, "einsum")
    bufs = (np.empty(5 * 11, np.float32), np.empty(5 * 11, np.float32), np.ones(11, np.float32))
    g2 = csr.sddmm(D, X, s.rows, s.cols, np.empty(s.nnz, np.float32), 5, "gemv", bufs)
    return A, X, D, out, g, g2


@pytest.mark.parametrize("fast", [True, False])
def test_products_and_sddmm(fast, monkeypatch):
    monkeypatch.setattr(csr, "USE_SPARSETOOLS", fast and csr.USE_SPARSETOOLS)
    rng = np.random.default_rng(1)
    m = random_mask(rng, (13, 17), 0.25, dead_axis0=[0])
    A, X, D, (y, z, z2), g, g2 = _products(m, rng)
    np.testing.assert_allclose(y, 1 + A @ X, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(z, 1 + A.T @ D, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(z2, 1 + A.T @ D, rtol=1e-5, atol=1e-5)
    full = D @ X.T
    np.testing.assert_allclose(g, full[m], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g2, full[m], rtol=1e-5, atol=1e-5)


def test_sparsetools_passes_its_check_here():
    # the CI's SciPy has the private module with the expected signature; the check must accept it
    assert csr._probe_sparsetools() is not None
    assert csr.USE_SPARSETOOLS and csr.backend() == "scipy.sparse._sparsetools"


def _kernel_outputs(layer, cls, modes, x, dout):
    out = run_layer(layer, x, dout, cls(layer, modes))
    return out + (np.array(layer.forward(x, train=False)),)


@pytest.mark.parametrize("modes", MODES[1:3])
def test_public_scipy_path_matches_the_fast_path(modes, monkeypatch):
    """The fallback (public scipy.sparse matrices) gives the fast path's results within float32
    rounding (it adds the product to the output instead of accumulating into it, so the last bits
    may differ), for the Dense and the Conv2D kernel, and kernel_report says which path runs."""
    rng = np.random.default_rng(2)
    dense = Dense(40, 30, rng)
    dense.params["b"][:] = rng.standard_normal(30)
    dense.set_mask("W", random_mask(rng, (40, 30), 0.1, dead_axis0=[0, 1]))
    conv = Conv2D(3, 6, 3, rng, padding=1)
    conv.set_mask("W", rng.random(conv.params["W"].shape) < 0.2)
    cases = [(dense, DenseKernelSparse, rng.standard_normal((9, 40)).astype(np.float32),
              rng.standard_normal((9, 30)).astype(np.float32)),
             (conv, ConvKernelSparse, rng.standard_normal((2, 3, 7, 7)).astype(np.float32),
              rng.standard_normal((2, 6, 7, 7)).astype(np.float32))]
    for layer, cls, x, dout in cases:
        fast = _kernel_outputs(layer, cls, modes, x, dout)
        monkeypatch.setattr(csr, "USE_SPARSETOOLS", False)
        public = _kernel_outputs(layer, cls, modes, x, dout)
        monkeypatch.setattr(csr, "USE_SPARSETOOLS", True)
        for a, b in zip(public, fast):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    model = nets.build("lenet300", np.random.default_rng(0))
    apply_kernel(model, "sparse")
    assert {r["csr_products"] for r in kernel_report(model)} == {"scipy.sparse._sparsetools"}
    monkeypatch.setattr(csr, "USE_SPARSETOOLS", False)
    assert {r["csr_products"] for r in kernel_report(model)} == {"scipy.sparse (public)"}
