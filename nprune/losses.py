"""Softmax cross-entropy loss and helpers. The dtype of ``logits`` is preserved (no float64 upcast)."""

from __future__ import annotations

import numpy as np

__all__ = ["softmax", "softmax_cross_entropy", "accuracy"]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of ``logits`` (N, K) -> probabilities (N, K), same dtype, max-subtracted."""
    z = logits - logits.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def softmax_cross_entropy(logits: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean softmax cross-entropy over the batch.

    Inputs:
    - logits: (N, K) float array of class scores.
    - y: (N,) integer labels in ``[0, K)``.

    Returns a tuple of:
    - loss: Python float, ``-mean_i log softmax(logits)[i, y_i]``.
    - dlogits: (N, K) gradient of the loss w.r.t. ``logits``, same dtype as ``logits``
      (``(softmax - onehot(y)) / N``).
    """
    logits = np.asarray(logits)
    y = np.asarray(y)
    if logits.ndim != 2:
        raise ValueError(f"logits must be 2-D (N, K), got shape {logits.shape}")
    n = logits.shape[0]
    if y.shape != (n,):
        raise ValueError(f"y must have shape ({n},), got {y.shape}")
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted)
    sums = probs.sum(axis=1, keepdims=True)
    rows = np.arange(n)
    # log p_y = shifted_y - log(sum exp(shifted)); sums >= 1 so the log is safe.
    loss = -float(np.mean(shifted[rows, y] - np.log(sums[:, 0])))
    probs /= sums
    dlogits = probs
    dlogits[rows, y] -= 1
    dlogits /= n
    return loss, dlogits


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    """Fraction of rows whose argmax equals the label (Python float)."""
    return float(np.mean(np.argmax(logits, axis=1) == np.asarray(y)))
