"""Numerical gradient checking (central differences), CS231n style.

Use float64 inputs: with ``h = 1e-5`` central differences have truncation error ``O(h^2)`` and
rounding error ``O(eps / h)``, which at float64 gives ~1e-10 relative accuracy (float32 would give
only ~1e-2).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

__all__ = ["numerical_gradient", "eval_numerical_gradient", "rel_error"]


def numerical_gradient(f: Callable[[np.ndarray], np.ndarray], x: np.ndarray, df: np.ndarray,
                       h: float = 1e-5) -> np.ndarray:
    """Numerical gradient of the scalar ``sum(f(x) * df)`` w.r.t. ``x``.

    ``f`` is called with ``x`` itself (modified in place one entry at a time, then restored), so
    ``f`` may close over ``x`` (e.g. a layer parameter). ``df`` is the upstream gradient, same shape
    as ``f(x)``. Returns an array of ``x``'s shape.
    """
    grad = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"], op_flags=[["readwrite"]])
    while not it.finished:
        ix = it.multi_index
        old = x[ix]
        x[ix] = old + h
        pos = np.array(f(x), copy=True)
        x[ix] = old - h
        neg = np.array(f(x), copy=True)
        x[ix] = old
        grad[ix] = np.sum((pos - neg) * df) / (2 * h)
        it.iternext()
    return grad


def eval_numerical_gradient(f: Callable[[np.ndarray], float], x: np.ndarray,
                            h: float = 1e-5) -> np.ndarray:
    """Numerical gradient of a scalar function ``f`` at ``x`` (``x`` modified in place, restored):
    :func:`numerical_gradient` with the upstream gradient 1."""
    return numerical_gradient(lambda z: np.asarray(f(z), dtype=np.float64), x, np.float64(1.0), h)


def rel_error(a: np.ndarray, b: np.ndarray, floor: float = 1e-8) -> float:
    """Max elementwise relative error ``|a - b| / max(floor, |a| + |b|)`` as a Python float.

    The floor keeps entries where both are (near) zero -- e.g. masked weights -- from giving 0/0.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b) / np.maximum(floor, np.abs(a) + np.abs(b))))
