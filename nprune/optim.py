"""Mask-aware optimisers: SGD (momentum, weight decay) and Adam (bias-corrected).

State is kept per parameter *name* (``"fc1.W"``), so it survives nothing it should not: call
:meth:`Optimizer.reset` at each pruning round. After every update the parameter is multiplied by its
mask again, so a pruned weight is exactly zero after any number of steps, whatever momentum or Adam's
moments hold. (Backward already zeroes the pruned gradients; the re-mask is the second lock.)

All arithmetic is in place on the parameters' own dtype (float32 by default): Python-float
hyper-parameters do not upcast float32 arrays under NumPy's promotion rules.
"""
from __future__ import annotations

import math

import numpy as np


class Optimizer:
    """Base class. ``model`` is a :class:`~nprune.model.Sequential` (anything with ``params()``,
    ``grads()`` and ``masks()`` dicts keyed by name)."""

    def __init__(self, model, lr: float):
        if not lr > 0:
            raise ValueError(f"learning rate must be > 0, got {lr}")
        self.model = model
        self.lr = float(lr)
        self.state: dict[str, dict[str, np.ndarray]] = {}
        self.t = 0

    def reset(self) -> None:
        """Forget all state (momentum buffers, Adam moments, step count)."""
        self.state = {}
        self.t = 0

    def _slots(self, name: str, p: np.ndarray, keys) -> dict[str, np.ndarray]:
        s = self.state.get(name)
        if s is None:
            s = {k: np.zeros_like(p) for k in keys}
            self.state[name] = s
        return s

    def step(self) -> None:
        """Apply one update from the gradients the last backward left, then re-mask."""
        self.t += 1
        params, grads, masks = self.model.params(), self.model.grads(), self.model.masks()
        for name, p in params.items():
            self._update(name, p, grads[name])
            m = masks.get(name)
            if m is not None:
                np.multiply(p, m, out=p)

    def _update(self, name, p, g):  # pragma: no cover - abstract
        raise NotImplementedError


class SGD(Optimizer):
    """SGD with optional (heavy-ball) momentum and L2 weight decay, as in PyTorch:

    ``g <- g + wd * p``;  ``v <- mu * v + g``;  ``p <- p - lr * v``  (``v = g`` when mu = 0).
    """

    def __init__(self, model, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
        super().__init__(model, lr)
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)

    def _update(self, name, p, g):
        if self.weight_decay:
            g = g + self.weight_decay * p
        if self.momentum:
            s = self._slots(name, p, ("v",))
            v = s["v"]
            v *= self.momentum
            v += g
            g = v
        p -= self.lr * g


class Adam(Optimizer):
    """Adam (Kingma & Ba) with bias correction, written as PyTorch does it:

    ``m <- b1 m + (1-b1) g``;  ``v <- b2 v + (1-b2) g^2``;
    ``p <- p - (lr / (1-b1^t)) * m / (sqrt(v) / sqrt(1-b2^t) + eps)``.
    Weight decay, when set, is L2 added to the gradient (not AdamW).
    """

    def __init__(self, model, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(model, lr)
        self.b1, self.b2 = (float(b) for b in betas)
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)

    def _update(self, name, p, g):
        if self.weight_decay:
            g = g + self.weight_decay * p
        s = self._slots(name, p, ("m", "v", "tmp"))
        m, v, tmp = s["m"], s["v"], s["tmp"]
        b1, b2 = self.b1, self.b2
        m *= b1
        np.multiply(g, 1.0 - b1, out=tmp)
        m += tmp
        v *= b2
        np.multiply(g, g, out=tmp)
        tmp *= 1.0 - b2
        v += tmp
        bc1 = 1.0 - b1 ** self.t
        bc2 = 1.0 - b2 ** self.t
        np.sqrt(v, out=tmp)
        tmp *= 1.0 / math.sqrt(bc2)
        tmp += self.eps
        np.divide(m, tmp, out=tmp)
        tmp *= self.lr / bc1
        p -= tmp


OPTIMIZERS = {"sgd": SGD, "adam": Adam}


def make_optimizer(name: str, model, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
    """Build an optimiser by name: ``sgd`` (with ``momentum``) or ``adam``."""
    if name == "sgd":
        return SGD(model, lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return Adam(model, lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
