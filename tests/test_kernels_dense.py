"""nprune.kernels.dense: the sparse Dense kernel (CSR and compact modes) gives the masked dense
path's results; its cost-model choice between the modes."""
from __future__ import annotations

import numpy as np
import pytest

from nprune.kernels import DenseKernelSparse
from nprune.layers import Dense

from kernels_util import DENSITIES, MODES, close, compare, random_mask, run_layer


@pytest.mark.parametrize("modes", MODES)
@pytest.mark.parametrize("d", DENSITIES)
@pytest.mark.parametrize("need_dx", [True, False])
def test_dense_matches_masked_dense(modes, d, need_dx):
    rng = np.random.default_rng(int(d * 1000) + 7)
    layer = Dense(64, 40, rng)
    layer.need_dx = need_dx
    layer.params["b"][:] = rng.standard_normal(40)
    layer.set_mask("W", random_mask(rng, (64, 40), d, dead_axis0=range(0, 10),
                                     dead_axis1=range(30, 35)))
    x = rng.standard_normal((23, 64)).astype(np.float32)
    dout = rng.standard_normal((23, 40)).astype(np.float32)
    dcopy = dout.copy()
    compare(layer, x, dout, DenseKernelSparse, modes)
    np.testing.assert_array_equal(dout, dcopy)  # dout never mutated


@pytest.mark.parametrize("modes", MODES[:2])
def test_dense_large_batch_chunked_and_forder_input(modes):
    rng = np.random.default_rng(3)
    layer = Dense(30, 20, rng)
    layer.set_mask("W", random_mask(rng, (30, 20), 0.1, dead_axis0=[0, 1]))
    x = rng.standard_normal((2500, 30)).astype(np.float32)  # > CHUNK, not a multiple of it
    dout = rng.standard_normal((2500, 20)).astype(np.float32)
    compare(layer, x, dout, DenseKernelSparse, modes)
    compare(layer, np.asfortranarray(x), np.asfortranarray(dout), DenseKernelSparse, modes)


def test_dense_unpruned_and_all_pruned():
    rng = np.random.default_rng(4)
    layer = Dense(20, 10, rng)
    x = rng.standard_normal((5, 20)).astype(np.float32)
    dout = rng.standard_normal((5, 10)).astype(np.float32)
    compare(layer, x, dout, DenseKernelSparse, None)           # mask None
    layer.set_mask("W", np.zeros((20, 10), bool))
    layer.params["b"][:] = 1.5
    layer.kernel = DenseKernelSparse(layer)
    y = layer.forward(x)
    np.testing.assert_array_equal(y, np.full((5, 10), 1.5, np.float32))
    dx = layer.backward(dout)
    assert np.all(dx == 0) and np.all(layer.grads["W"] == 0)


def test_mask_change_after_attach_rebuilds():
    rng = np.random.default_rng(5)
    layer = Dense(50, 30, rng)
    layer.kernel = DenseKernelSparse(layer, {"fwd": "sparse", "dx": "sparse", "dw": "sparse"})
    x = rng.standard_normal((7, 50)).astype(np.float32)
    dout = rng.standard_normal((7, 30)).astype(np.float32)
    for d in (0.5, 0.1, 0.02):
        mask = rng.random((50, 30)) < d
        mask[:5] = False
        layer.set_mask("W", mask)                     # kernel.mask_changed via the layer
        y, dx, gw, gb = run_layer(layer, x, dout, layer.kernel)
        w = layer.params["W"]
        close(y, x @ w + layer.params["b"])
        close(dx, dout @ w.T)
        close(gw, (x.T @ dout) * mask)
    layer.set_mask("W", None)
    y, dx, gw, gb = run_layer(layer, x, dout, layer.kernel)
    close(gw, x.T @ dout)


def test_feature_major_chain_no_copies():
    # a sparse Dense returns an F-ordered (N, out) array; ReLU keeps it; the next sparse Dense reads
    # its transpose without copying, and dx comes back F-ordered too
    rng = np.random.default_rng(12)
    l1, l2 = Dense(40, 30, rng), Dense(30, 20, rng)
    for l in (l1, l2):
        l.set_mask("W", rng.random(l.params["W"].shape) < 0.3)
        l.kernel = DenseKernelSparse(l, {"fwd": "sparse"})   # the CSR path
    x = rng.standard_normal((9, 40)).astype(np.float32)
    h = l1.forward(x)
    assert h.flags.f_contiguous and not h.flags.c_contiguous
    r = np.maximum(h, 0)
    assert r.flags.f_contiguous
    y = l2.forward(r)
    assert y.flags.f_contiguous
    assert l2.kernel._cache[1].base is r or np.shares_memory(l2.kernel._cache[1], r)
    dx = l2.backward(rng.standard_normal((9, 20)).astype(np.float32))
    assert dx.flags.f_contiguous
    w1, w2 = l1.params["W"], l2.params["W"]
    close(y, np.maximum(x @ w1 + l1.params["b"], 0) @ w2 + l2.params["b"])


def test_dense_compact_mode_drops_dead_units_and_inputs():
    """Compaction: a mask that kills whole units (columns of W) and inputs (rows) leaves a live
    block; the compact mode runs dense GEMMs on it. Dead units output exactly their bias, dead inputs
    get exactly zero gradient, pruned weights exactly zero gradient; the rest matches dense."""
    rng = np.random.default_rng(21)
    layer = Dense(50, 40, rng)
    layer.params["b"][:] = rng.standard_normal(40)
    m = rng.random((50, 40)) < 0.7
    dead_in, dead_out = [0, 1, 2, 17, 49], [3, 4, 30, 31, 32, 39]
    m[dead_in] = False
    m[:, dead_out] = False
    layer.set_mask("W", m)
    x = rng.standard_normal((33, 50)).astype(np.float32)
    dout = rng.standard_normal((33, 40)).astype(np.float32)
    k = DenseKernelSparse(layer, {"fwd": "compact"})
    assert (k.nc, k.nr) == (45, 34) and not k.all_c and not k.all_r
    compare(layer, x, dout, DenseKernelSparse, {"fwd": "compact"})
    layer.kernel = k
    y = layer.forward(x)
    assert k.last_plan["modes"] == "compact"
    np.testing.assert_array_equal(y[:, dead_out], np.broadcast_to(layer.params["b"][dead_out], (33, 6)))
    dx = layer.backward(dout)
    assert np.all(dx[:, dead_in] == 0) and np.all(layer.grads["W"][~m] == 0)


def test_dense_kernel_picks_compact_for_structured_masks_and_csr_for_sparse_ones():
    """The cost model (COST): a live block that is dense (whole units pruned, the rest kept) runs
    compact; an IMP-like 2% mask, whose live block is as sparse as W, runs CSR."""
    rng = np.random.default_rng(22)
    layer = Dense(784, 300, rng)
    m = np.zeros((784, 300), bool)
    m[100:700, :120] = True                       # 40% of the units, 600 of the inputs, all kept
    layer.set_mask("W", m)
    k = DenseKernelSparse(layer)
    assert (k.nc, k.nr) == (600, 120)
    for n, train in ((60, True), (60, False), (10_000, False)):
        assert k._compact_pays(n, train, False, False), (n, train)
    layer.set_mask("W", rng.random((784, 300)) < 0.02)
    k = DenseKernelSparse(layer)
    for n, train in ((60, True), (60, False), (10_000, False)):
        assert not k._compact_pays(n, train, False, False), (n, train)
    # forced modes win over the cost model
    assert DenseKernelSparse(layer, {"fwd": "compact"})._compact_pays(60, True, False, False)
    layer.set_mask("W", m)
    assert not DenseKernelSparse(layer, {"dx": "csc"})._compact_pays(60, True, False, False)


def test_dense_kernel_gemm_cost_follows_blas_threads(monkeypatch):
    """The GEMM is the only multi-threaded primitive of the cost model, so its cost depends on the
    BLAS thread count. An IMP mask at 4.4% with 37 dead units and 97 dead inputs (the shape of a
    rewound LeNet-300-100 ticket's fc1 at round 14) trains CSR at 1 and at 2 threads: its live block
    is 77% of W, and compact's GEMMs and gathers on it cost more than the CSR products
    (benchmarks/dense_compaction.py)."""
    from nprune.kernels import cost
    rng = np.random.default_rng(14)
    layer = Dense(784, 300, rng)
    m = np.zeros((784, 300), bool)
    m[:687, :263] = rng.random((687, 263)) < 10344 / (687 * 263)
    m[:687, 0] = m[0, :263] = True                 # every row and column of the block is live
    layer.set_mask("W", m)
    per_fma = {}
    for threads in ("1", "2", "4"):
        monkeypatch.setenv("OPENBLAS_NUM_THREADS", threads)
        per_fma[threads] = cost.gemm(1000, 1000) - cost.gemm(1)
        k = DenseKernelSparse(layer)
        assert (k.nc, k.nr) == (687, 263)
        assert not k._compact_pays(60, True, False, False), threads
    assert per_fma["1"] > 1.5 * per_fma["2"] and per_fma["2"] == per_fma["4"]


@pytest.mark.parametrize("dead", ["none", "inputs", "units", "both"])
@pytest.mark.parametrize("d", [1.0, 0.6, 0.1])
def test_dense_compact_mode_every_block_shape(dead, d):
    """The compact mode's block is W itself (nothing dead), whole rows (dead inputs only), whole
    columns (dead units only) or both; its dW is written as a block or, for a sparse block, entry by
    entry. Every case matches the masked dense path."""
    rng = np.random.default_rng(int(d * 10) + len(dead))
    layer = Dense(48, 36, rng)
    layer.params["b"][:] = rng.standard_normal(36)
    m = rng.random((48, 36)) < d
    m[:, 0] = m[0] = True                                  # nothing dead unless asked
    if dead in ("inputs", "both"):
        m[[3, 9, 40]] = False
    if dead in ("units", "both"):
        m[:, [5, 6, 35]] = False
    layer.set_mask("W", m)
    k = DenseKernelSparse(layer, {"fwd": "compact"})
    assert k.all_c == (dead in ("none", "units")) and k.all_r == (dead in ("none", "inputs"))
    assert (k.blk is None) == (dead == "none")
    x = rng.standard_normal((21, 48)).astype(np.float32)
    dout = rng.standard_normal((21, 36)).astype(np.float32)
    compare(layer, x, dout, DenseKernelSparse, {"fwd": "compact"})
    layer.need_dx = False
    compare(layer, x, dout, DenseKernelSparse, {"fwd": "compact"})
