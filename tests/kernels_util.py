"""Helpers shared by the tests of nprune.kernels (tests/test_kernels_*.py)."""
from __future__ import annotations

import numpy as np

from nprune.kernels.thresholds import THRESHOLDS_FORMAT


def table(entries: dict) -> dict:
    """A thresholds table from ``{shape: {class: {mode: threshold}}}``."""
    return {"format": THRESHOLDS_FORMAT, "source": "test", "thresholds": entries}


MODES = [
    None,  # default (Dense: CSR + SDDMM, dX by the CSR of W; Conv2D: cost-model choice per product)
    {"fwd": "sparse", "dx": "sparse", "dw": "sparse"},
    {"fwd": "sparse", "dx": "csc", "dw": "sparse"},       # Dense: dX by the CSC reading of A
    {"fwd": "compact", "dx": "compact", "dw": "compact"},  # dense GEMMs on the live block
]
DENSITIES = [1.0, 0.5, 0.2, 0.05, 0.01, 0.0]


def close(a, b, scale=None):
    scale = max(1.0, float(np.abs(b).max()) if b.size else 1.0) if scale is None else scale
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * scale)


def random_mask(rng, shape, d, dead_axis0=(), dead_axis1=()):
    m = rng.random(shape) < d
    m[list(dead_axis0)] = False
    if dead_axis1:
        m[:, list(dead_axis1)] = False
    return m


def run_layer(layer, x, dout, kernel):
    """One training forward and backward with ``kernel``: (y, dx, dW, db) as copies."""
    layer.kernel = kernel
    y = layer.forward(x, train=True)
    dx = layer.backward(dout)
    return (np.array(y), None if dx is None else np.array(dx),
            layer.grads["W"].copy(), layer.grads["b"].copy())


def compare(layer, x, dout, cls, modes):
    """The sparse kernel ``cls(layer, modes)`` gives the masked dense path's results."""
    ref = run_layer(layer, x, dout, None)
    got = run_layer(layer, x, dout, cls(layer, modes))
    for r, g in zip(ref, got):
        if r is None:
            assert g is None
            continue
        assert g.dtype == np.float32 and g.shape == r.shape
        close(g, r)
    # the pruned entries of the gradient are exactly zero
    m = layer.masks["W"]
    if m is not None:
        assert np.all(got[2][m == 0] == 0)
    # eval mode forward
    layer.kernel = None
    y0 = layer.forward(x, train=False)
    layer.kernel = cls(layer, modes)
    close(layer.forward(x, train=False), y0)
