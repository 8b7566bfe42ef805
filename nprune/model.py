"""Sequential model: a list of named layers, with every parameter, gradient and mask reachable by a
dotted name such as ``"fc1.W"``.

Forward is ``x -> layer_1 -> ... -> layer_L -> logits``; backward runs the layers in reverse, starting
from ``dL/dlogits``. The first layer is told it need not compute ``dL/dx`` (nothing upstream wants it),
which saves a GEMM per step.

Flat buffers: when every parameter has one dtype, all parameters (weights and biases, in layer
order) are views of one contiguous 1-D array, :attr:`Sequential.flat_params`, and their gradients
views of another, :attr:`Sequential.flat_grads`, at the same offsets (:attr:`Sequential.flat_layout`).
The layers see ordinary arrays; an optimiser can update the whole model in a few long passes over
the flat arrays (:mod:`nprune.optim`) instead of one short pass per parameter.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from .losses import softmax_cross_entropy


class Sequential:
    """A chain of layers.

    Parameters
    ----------
    layers : iterable of ``(name, layer)`` pairs. Names must be unique and contain no dot.
    """

    def __init__(self, layers: Iterable[tuple[str, object]]):
        self.layers: list = []
        self.names: list[str] = []
        for name, layer in layers:
            if "." in name or name in self.names:
                raise ValueError(f"bad or repeated layer name {name!r}")
            layer.name = name
            self.layers.append(layer)
            self.names.append(name)
        # Nothing upstream of the first layer that has parameters wants dL/dx: that layer skips its dx
        # GEMM and backward stops there (a leading Flatten needs no gradient either).
        self._first_param = next((i for i, l in enumerate(self.layers) if l.params), 0)
        if self.layers:
            self.layers[self._first_param].need_dx = False
        self._flatten()
        self._cache_views()

    def _flatten(self) -> None:
        """Move every parameter and gradient into the flat buffers (see the module docstring):
        ``flat_params`` (P,), ``flat_grads`` (P,) and ``flat_layout`` {name: (start, end)}. With
        parameters of several dtypes nothing moves and the three are None."""
        self.flat_params = self.flat_grads = self.flat_layout = None
        owned = [(f"{n}.{k}", l, k) for n, l in zip(self.names, self.layers) for k in l.params]
        dtypes = {l.params[k].dtype for _, l, k in owned}
        if len(dtypes) != 1:
            return
        layout, off = {}, 0
        for name, l, k in owned:
            layout[name] = (off, off + l.params[k].size)
            off += l.params[k].size
        dtype = dtypes.pop()
        fp, fg = np.empty(off, dtype), np.empty(off, dtype)
        for name, l, k in owned:
            a, b = layout[name]
            for d, flat in ((l.params, fp), (l.grads, fg)):
                view = flat[a:b].reshape(d[k].shape)
                view[...] = d[k]
                d[k] = view
        self.flat_params, self.flat_grads, self.flat_layout = fp, fg, layout

    def unflatten(self) -> "Sequential":
        """Move every parameter and gradient out of the flat buffers into an array of its own (the
        optimisers then take their per-parameter path: the reference the flat path is held to, in
        tests and benchmarks). Returns the model."""
        for layer in self.layers:
            layer.params = {k: v.copy() for k, v in layer.params.items()}
            layer.grads = {k: v.copy() for k, v in layer.grads.items()}
        self.flat_params = self.flat_grads = self.flat_layout = None
        self._cache_views()
        return self

    # ----- names -------------------------------------------------------------------------------
    def _cache_views(self) -> None:
        self._params = {f"{n}.{k}": v for n, l in zip(self.names, self.layers) for k, v in l.params.items()}
        self._owner = {f"{n}.{k}": (l, k) for n, l in zip(self.names, self.layers) for k in l.params}

    def params(self) -> dict[str, np.ndarray]:
        """``{"layer.param": array}``: the live arrays (optimisers update them in place)."""
        return self._params

    def grads(self) -> dict[str, np.ndarray]:
        """``{"layer.param": gradient}`` as left by the last :meth:`backward`."""
        return {f"{n}.{k}": v for n, l in zip(self.names, self.layers) for k, v in l.grads.items()}

    def prunable(self) -> list[str]:
        """Names of the prunable weights, in layer order (biases are not prunable)."""
        return [f"{n}.{k}" for n, l in zip(self.names, self.layers) for k in l.prunable]

    def masks(self) -> dict[str, np.ndarray | None]:
        """``{"layer.W": mask or None}`` for every prunable weight (None = not pruned)."""
        return {f"{n}.{k}": l.masks.get(k) for n, l in zip(self.names, self.layers) for k in l.prunable}

    def prunable_name(self, name: str) -> str:
        """The prunable weight ``name`` stands for: a parameter name (``"fc1.W"``) itself, a layer
        name (``"fc1"``) its one prunable weight. Anything else is a ValueError listing both kinds."""
        names = self.prunable()
        if name in names:
            return name
        of_layer = [p for p in names if p.split(".")[0] == name]
        if len(of_layer) == 1:
            return of_layer[0]
        if of_layer:
            raise ValueError(f"layer {name!r} has several prunable weights; use one of {', '.join(of_layer)}")
        layers = dict.fromkeys(p.split(".")[0] for p in names)
        raise ValueError(f"{name!r} names no prunable weight; use a layer name ({', '.join(layers)}) "
                         f"or a parameter name ({', '.join(names)})")

    def set_masks(self, masks: dict) -> None:
        """Install masks (bool or 0/1 arrays; 1 keeps, 0 prunes; None removes the mask) by layer or
        parameter name (:meth:`prunable_name`); zeroes the pruned weights. Every name is checked
        before any mask is installed."""
        resolved: dict = {}
        for name, mask in masks.items():
            pname = self.prunable_name(name)
            if pname in resolved:
                raise ValueError(f"two masks for {pname} ({name!r} names it again)")
            resolved[pname] = mask
        for pname, mask in resolved.items():
            layer, key = self._owner[pname]
            layer.set_mask(key, mask)

    def bool_masks(self) -> dict[str, np.ndarray]:
        """Every prunable weight's mask as a bool array (all True where the weight is unpruned)."""
        out = {}
        for name, mask in self.masks().items():
            out[name] = np.ones(self._params[name].shape, bool) if mask is None else mask != 0
        return out

    def n_weights(self) -> int:
        """Number of prunable weights (pruned ones included)."""
        return int(sum(self._params[n].size for n in self.prunable()))

    # ----- state -------------------------------------------------------------------------------
    def get_weights(self) -> dict[str, np.ndarray]:
        """A copy of every parameter, by name."""
        return {k: v.copy() for k, v in self._params.items()}

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        """Copy values into the live arrays (references stay valid), then re-apply the masks so that
        pruned weights are exactly zero whatever ``weights`` holds."""
        for name, value in weights.items():
            p = self._params[name]
            if value.shape != p.shape:
                raise ValueError(f"{name}: shape {value.shape} does not match {p.shape}")
            p[...] = value
        self.apply_masks()

    def apply_masks(self) -> None:
        """Zero every pruned weight (``W *= M``)."""
        for layer in self.layers:
            for key, mask in layer.masks.items():
                if mask is not None:
                    np.multiply(layer.params[key], mask, out=layer.params[key])

    def fresh_params(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """A new draw of every parameter from each layer's own initialiser (nothing is assigned)."""
        out = {}
        for n, layer in zip(self.names, self.layers):
            for k, v in layer.fresh_params(rng).items():
                out[f"{n}.{k}"] = v
        return out

    # ----- passes ------------------------------------------------------------------------------
    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        """Inputs: x, a batch shaped as the first layer expects, e.g. (N, 1, 28, 28).
        Returns logits (N, classes). With ``train`` every layer caches what backward needs.
        (Inference on a whole data set: :mod:`nprune.evaluate`.)"""
        for layer in self.layers:
            x = layer.forward(x, train)
        return x

    def backward(self, dlogits: np.ndarray) -> None:
        """Inputs: dlogits, ``dL/dlogits`` (N, classes). Fills every layer's ``grads``; returns
        nothing (the layers before the first one with parameters are not visited)."""
        d = dlogits
        for layer in reversed(self.layers[self._first_param:]):
            d = layer.backward(d)

    def loss_and_grads(self, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        """Forward, mean softmax cross-entropy, backward: the plain gradient of the loss (gradient
        checks use it; the training step, :func:`nprune.training.train_step`, adds a flush of tiny
        gradients). Inputs: x (N, ...), y (N,) int labels. Returns (loss, logits (N, classes))."""
        logits = self.forward(x, train=True)
        loss, dlogits = softmax_cross_entropy(logits, y)
        self.backward(dlogits)
        return loss, logits

    def summary(self) -> str:
        """One line per layer: name, type, parameter shapes, weights left."""
        lines = []
        for n, l in zip(self.names, self.layers):
            shapes = ", ".join(f"{k}{tuple(v.shape)}" for k, v in l.params.items())
            lines.append(f"{n:8s} {type(l).__name__:10s} {shapes}")
        return "\n".join(lines)
