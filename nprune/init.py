"""Weight initialisers.

Every initialiser takes an explicit :class:`numpy.random.Generator` ``rng`` (the global ``np.random``
state is never touched), draws in float64 with ``rng.standard_normal`` / ``rng.uniform`` and then casts
to ``dtype`` (float32 by default). Drawing in float64 makes the stream of values independent of the
target dtype: the same seed gives the same weights (up to rounding) in float32 and float64.

Fans: for a dense layer ``W`` of shape ``(in, out)`` use ``fan_in = in``, ``fan_out = out``; for a
convolution ``W`` of shape ``(F, C, kh, kw)`` use ``fan_in = C*kh*kw`` and ``fan_out = F*kh*kw``
(the Keras/Glorot convention).

Note: ``glorot_normal`` here is a *plain* (non-truncated) normal with std ``sqrt(2/(fan_in+fan_out))``.
Keras' ``glorot_normal`` uses a truncated normal (rescaled so the std matches); we deliberately keep
the untruncated distribution. ``he_normal`` is likewise a plain normal with std ``sqrt(2/fan_in)``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

__all__ = [
    "glorot_normal",
    "glorot_uniform",
    "he_normal",
    "lecun_uniform",
    "zeros",
    "INITIALIZERS",
    "get_initializer",
]


def _check(rng: np.random.Generator, fan_in, fan_out) -> None:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    if fan_in is not None and fan_in <= 0:
        raise ValueError(f"fan_in must be positive, got {fan_in}")
    if fan_out is not None and fan_out <= 0:
        raise ValueError(f"fan_out must be positive, got {fan_out}")


def glorot_normal(rng, shape, fan_in, fan_out, dtype=np.float32) -> np.ndarray:
    """Plain (untruncated) normal, mean 0, std ``sqrt(2 / (fan_in + fan_out))``."""
    _check(rng, fan_in, fan_out)
    std = np.sqrt(2.0 / (fan_in + fan_out))
    return (rng.standard_normal(shape) * std).astype(dtype, copy=False)


def glorot_uniform(rng, shape, fan_in, fan_out, dtype=np.float32) -> np.ndarray:
    """Uniform on ``[-limit, limit)`` with ``limit = sqrt(6 / (fan_in + fan_out))``."""
    _check(rng, fan_in, fan_out)
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=shape).astype(dtype, copy=False)


def he_normal(rng, shape, fan_in, fan_out=None, dtype=np.float32) -> np.ndarray:
    """Plain (untruncated) normal, mean 0, std ``sqrt(2 / fan_in)``; ``fan_out`` is ignored."""
    _check(rng, fan_in, None)
    std = np.sqrt(2.0 / fan_in)
    return (rng.standard_normal(shape) * std).astype(dtype, copy=False)


def lecun_uniform(rng, shape, fan_in, fan_out=None, dtype=np.float32) -> np.ndarray:
    """Uniform on ``[-limit, limit)`` with ``limit = sqrt(3 / fan_in)`` (variance ``1/fan_in``);
    ``fan_out`` is ignored. This is Caffe's ``xavier`` filler with its default ``variance_norm:
    FAN_IN``, the initialiser of Caffe's LeNet (``examples/mnist/lenet_train_test.prototxt``)."""
    _check(rng, fan_in, None)
    limit = np.sqrt(3.0 / fan_in)
    return rng.uniform(-limit, limit, size=shape).astype(dtype, copy=False)


def zeros(rng, shape, fan_in=None, fan_out=None, dtype=np.float32) -> np.ndarray:
    """All zeros (``rng`` is accepted for a uniform signature and not used)."""
    return np.zeros(shape, dtype=dtype)


INITIALIZERS: dict[str, Callable[..., np.ndarray]] = {
    "glorot_normal": glorot_normal,
    "glorot_uniform": glorot_uniform,
    "he_normal": he_normal,
    "lecun_uniform": lecun_uniform,
    "zeros": zeros,
}


def get_initializer(name: str) -> Callable[..., np.ndarray]:
    """Look up an initialiser by name; raise ``ValueError`` listing the known names otherwise."""
    if callable(name):
        return name
    try:
        return INITIALIZERS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown initializer {name!r}; known: {sorted(INITIALIZERS)}"
        ) from None
