"""What the sparse kernels share: the calls a layer makes on its ``kernel`` attribute.

A Dense or Conv2D layer whose ``kernel`` is set hands ``forward(x, train)`` to
``kernel.forward(layer, x, train)``, ``backward(dout)`` to ``kernel.backward(layer, dout)``, and
tells it about a new mask by ``kernel.mask_changed(layer)``. A kernel keeps no weight values between
calls (it gathers them from the layer's parameters on every forward), only index structures rebuilt
on a mask change, so optimisers may update the weights in place.
"""
from __future__ import annotations

import numpy as np


class SparseKernel:
    """Base of the sparse kernels: the layer's products computed on the survivors only.

    Subclasses define ``_setup(layer)`` (once), ``mask_changed(layer)``, ``prepare(layer, x)``
    (the input as an array of the layer's dtype, shape-checked), ``run(layer, x, train)`` (the
    forward on a prepared input), ``backward(layer, dout)`` and ``modes_str()``.

    ``modes`` forces methods that the cost model would otherwise choose (tests, benchmarks); see the
    subclasses for the keys they read."""

    policy = "sparse"
    #: a sparse kernel never hands a call to the dense code (see :class:`~.dispatch.AutoKernel`)
    all_dense = False

    def __init__(self, layer, modes: dict | None = None):
        self.forced = dict(modes) if modes else None
        self._last = None
        self._cache = None
        self._setup(layer)
        self.mask_changed(layer)

    def _setup(self, layer) -> None:
        pass

    def _reset_calls(self, layer) -> None:
        """After a mask change: the pruned entries of the weight gradient become zero once (the
        kernels write only the survivors' entries); nothing of the previous structure is cached."""
        layer.grads["W"][...] = 0
        self._cache = None
        self._last = None

    def forward(self, layer, x, train=True):
        x = self.prepare(layer, x)
        self._last = (x.shape[0], train, True)
        return self.run(layer, x, train)

    @staticmethod
    def _prepared(layer, x, ndim: int, size: int, expect: str) -> np.ndarray:
        x = np.asarray(x)
        if x.dtype != layer.dtype:
            x = x.astype(layer.dtype)
        if x.ndim != ndim or x.shape[1] != size:
            raise ValueError(f"{type(layer).__name__} expects {expect}, got {x.shape}")
        return x

    def _cached(self, layer):
        if self._cache is None:
            raise RuntimeError(f"{type(layer).__name__}.backward called without a preceding "
                               "forward(x, train=True)")
        return self._cache

    def modes_str(self) -> str:  # pragma: no cover - every subclass defines it
        return "sparse"

    @property
    def last_plan(self) -> dict:
        """What the last forward did: samples, train, use_kernel, modes (methods per product)."""
        return plan_of(self._last, self)


def plan_of(last, kernel) -> dict:
    """The ``last_plan`` dict of a forward recorded as ``(samples, train, used the kernel)``."""
    if last is None:
        return {}
    n, train, use = last
    return dict(samples=n, train=bool(train), use_kernel=bool(use), modes=kernel.modes_str())
