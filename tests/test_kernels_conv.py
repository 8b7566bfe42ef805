"""nprune.kernels.conv: the sparse Conv2D kernel gives the masked dense path's results; the
SparseMatrix structure."""
from __future__ import annotations

import numpy as np
import pytest

from nprune.kernels import ConvKernelSparse, SparseMatrix
from nprune.layers import Conv2D

from kernels_util import MODES, compare


@pytest.mark.parametrize("modes", MODES)
@pytest.mark.parametrize("d", [1.0, 0.3, 0.05, 0.0])
def test_conv_matches_masked_dense(modes, d):
    rng = np.random.default_rng(int(d * 100) + 11)
    layer = Conv2D(3, 8, 3, rng, padding=1)
    layer.params["b"][:] = rng.standard_normal(8)
    m = rng.random(layer.params["W"].shape) < d
    m[[1, 5]] = False          # dead filters
    m[:, 2] = False            # dead input channel
    layer.set_mask("W", m)
    x = rng.standard_normal((4, 3, 9, 9)).astype(np.float32)
    dout = rng.standard_normal((4, 8, 9, 9)).astype(np.float32)
    compare(layer, x, dout, ConvKernelSparse, modes)
    layer.need_dx = False
    compare(layer, x, dout, ConvKernelSparse, modes)


def test_sparse_matrix_structure():
    flat = np.arange(12).reshape(3, 4)
    sm = SparseMatrix(flat)
    m = np.array([[1, 0, 0, 1], [0, 0, 0, 0], [0, 0, 1, 1]], bool)
    sm.rebuild(m)
    assert list(sm.live_r) == [0, 2] and list(sm.live_c) == [0, 2, 3]
    assert sm.nnz == 4 and sorted(sm.gidx) == [0, 3, 10, 11]
    W = np.arange(12, dtype=np.float32) * m.ravel()
    sm.refresh(W, ("csr", "csr_t", "blk"))
    np.testing.assert_array_equal(np.sort(sm.data), [0, 3, 10, 11])
    np.testing.assert_array_equal(sm.blk, W.reshape(3, 4)[np.ix_([0, 2], [0, 2, 3])])
