"""Which kernel each layer runs: ``dense``, ``sparse`` or ``auto`` (:func:`apply_kernel`).

* ``dense``: ``layer.kernel = None``, the masked dense code of :mod:`nprune.layers`.
* ``sparse``: the layer's sparse kernel (:class:`~.dense.DenseKernelSparse`,
  :class:`~.conv.ConvKernelSparse`) runs every call.
* ``auto``: an :class:`AutoKernel`, which runs the sparse kernel iff the mask's density is <= the
  threshold of the layer's shape, batch class and mode in a thresholds table
  (:mod:`~.thresholds`; the part of it for the process's BLAS thread count), and the layer's own
  dense code otherwise. A layer whose shape has no
  threshold at all in the table gets no kernel (the dense code, no dispatch).

``auto`` is a table lookup, not a timing: its choices depend only on the table, the shapes, the masks
and the memory order the previous layers' choices produce, so the same seed gives the same float32
bits every time, and a resumed experiment the same bits as an uninterrupted one (a run folder keeps
the table of its first run).
"""
from __future__ import annotations

import numpy as np

from ..layers import Conv2D, Dense
from . import csr
from .base import SparseKernel, plan_of
from .conv import ConvKernelSparse
from .dense import DenseKernelSparse, feature_major
from .thresholds import (AUTO_MODES, active_thresholds, as_thresholds, batch_class, entries,
                         lookup_threshold, mode_key, shape_key)

CHOICES = ("dense", "sparse", "auto")
_DENSE, _KERNEL = "dense", "kernel"      # what the last training forward ran (backward follows it)


class AutoKernel:
    """The ``auto`` choice for one layer: its sparse kernel (``self.kernel``) or its dense code, per
    call, by the thresholds table (``self.table``).

    The first time a layer sees a (batch class, train, need_dx, input) combination under the current
    mask, it looks up the threshold of its shape (conv: with the input's H x W), batch class and mode
    (an inner Dense layer with feature-major input: the ``_f`` mode) and compares the mask's density
    with it (:meth:`_lookup`). The decision is cached (``decisions``; per input shape in a faster
    dict) and forgotten when the mask changes.

    On a mask change a Dense layer also works out which modes can never use the kernel at the new
    density (every threshold of its shape below it): those calls go straight to the dense code,
    without a lookup. ``all_dense``: every call (the evaluation code reads this to treat the layer as
    dense); ``dense_modes``: ``"all"``, ``"eval"``, ``"train"`` or None."""

    policy = "auto"

    def __init__(self, layer, thresholds: dict | None = None, modes: dict | None = None):
        self.table = active_thresholds() if thresholds is None else as_thresholds(thresholds)
        self.kernel = sparse_kernel(layer, modes)
        self._is_dense = isinstance(layer, Dense)
        self._reset(layer)

    @property
    def density(self) -> float:
        return self.kernel.density

    def mask_changed(self, layer) -> None:
        self.kernel.mask_changed(layer)
        self._reset(layer)

    def _reset(self, layer) -> None:
        self.decisions: dict = {}
        self._fast_t: dict = {}          # training calls, one need_dx: key -> (n, train, use)
        self._fast_e: dict = {}          # inference calls
        self._fast_dx = None
        self._last = None
        self._cache = None
        self.dense_modes = self._dense_modes(layer)
        self.all_dense = self.dense_modes == "all"
        self._train_dense = self.dense_modes in ("all", "train")
        self._eval_dense = self.dense_modes in ("all", "eval")

    def _dense_modes(self, layer):
        """The modes in which no threshold of the layer's shape reaches its density (Dense only):
        ``"all"``, ``"eval"``, ``"train"`` (both training modes) or None."""
        if not self._is_dense:
            return None
        classes = list(entries(self.table).get(shape_key(layer), {}).values())

        def never(modes):
            return all(m.get(k) is None or self.density > m[k]
                       for m in classes for k in modes + tuple(k + "_f" for k in modes))
        if never(AUTO_MODES):
            return "all"
        if never(("eval",)):
            return "eval"
        if never(("train", "train_dx")):
            return "train"
        return None

    # -- the layer's calls -------------------------------------------------------------------------
    def forward(self, layer, x, train=True):
        if train:
            if self._train_dense:
                self._cache = _DENSE
                return layer.dense_forward(x, train)
            fast = self._fast_t
        else:
            if self._eval_dense:
                return layer.dense_forward(x, train)
            fast = self._fast_e
        try:
            if self._is_dense:
                n = x.shape[0]          # _fast_key, inlined: at batch 1 every 100 ns shows
                t = fast[-n if (n > 1 and x.strides[0] == x.itemsize) else n]
            else:
                t = fast[x.shape]
        except (KeyError, AttributeError):   # not cached yet, or x is not an array (a list)
            return self._forward(layer, x, train)
        if t[2] or (train and layer.need_dx != self._fast_dx):
            return self._forward(layer, x, train)
        self._last = t
        if train:
            self._cache = _DENSE
        return layer.dense_forward(x, train)

    def backward(self, layer, dout):
        if self._cache is _KERNEL:
            return self.kernel.backward(layer, dout)
        return layer.dense_backward(dout)

    def _forward(self, layer, x, train):
        x = self.kernel.prepare(layer, x)
        use = self._decide(layer, x, train)
        if train:
            self._cache = _KERNEL if use else _DENSE
        if use:
            return self.kernel.run(layer, x, train)
        return layer.dense_forward(x, train)

    # -- the decision ------------------------------------------------------------------------------
    def _fast_key(self, x):
        if self._is_dense:
            return -x.shape[0] if feature_major(x) else x.shape[0]
        return x.shape

    def _input_key(self, x) -> tuple:
        """The part of the decision key that depends on the input beyond its batch size: ``("F",)``
        for a feature-major Dense input, the input's (H, W) for a conv layer."""
        if self._is_dense:
            return ("F",) if feature_major(x) else ()
        return tuple(x.shape[2:])

    def _decide(self, layer, x, train: bool) -> bool:
        n = x.shape[0]
        key = (batch_class(n), bool(train), bool(layer.need_dx)) + self._input_key(x)
        d = self.decisions.get(key)
        if d is None:
            d = self.decisions[key] = self._lookup(layer, x, train)
        use = d["use"]
        if train:                        # the training entries are for one need_dx
            if layer.need_dx != self._fast_dx:
                self._fast_t, self._fast_dx = {}, layer.need_dx
            self._fast_t[self._fast_key(x)] = (n, True, use)
        else:
            self._fast_e[self._fast_key(x)] = (n, False, use)
        self._last = (n, train, use)
        return use

    def _lookup(self, layer, x, train: bool) -> dict:
        shape = shape_key(layer, x.shape)
        cls, mode = batch_class(x.shape[0]), mode_key(train, layer.need_dx)
        if self._input_key(x) == ("F",):
            mode += "_f"
        thr = lookup_threshold(self.table, shape, cls, mode)
        return {"use": thr is not None and self.density <= thr, "threshold": thr,
                "density": float(self.density), "shape": shape, "batch_class": cls, "mode": mode}

    @property
    def last_plan(self) -> dict:
        """What the last forward through the lookup did: samples, train, use_kernel, modes."""
        return plan_of(self._last, self.kernel)


def sparse_kernel(layer, modes: dict | None = None):
    """The sparse kernel of a Dense or Conv2D layer (None for other layers)."""
    if isinstance(layer, Dense):
        return DenseKernelSparse(layer, modes)
    if isinstance(layer, Conv2D):
        return ConvKernelSparse(layer, modes)
    return None


def _may_use_kernel(table: dict, layer) -> bool:
    """False when the table never uses the kernel for this layer's shape (any batch, mode, input)."""
    key = shape_key(layer)
    for shape, classes in entries(table).items():
        if shape == key or (isinstance(layer, Conv2D) and shape.startswith(key + " input ")):
            if any(v is not None for modes in classes.values() for v in modes.values()):
                return True
    return False


def auto_kernel(layer, thresholds: dict | None = None, modes: dict | None = None):
    """What ``auto`` attaches to ``layer``: an :class:`AutoKernel` following ``thresholds`` (default
    :func:`~.thresholds.active_thresholds`), or None (the dense code, no dispatch at all) when the
    table has no threshold for the layer's shape in any batch class or mode."""
    table = active_thresholds() if thresholds is None else as_thresholds(thresholds)
    return AutoKernel(layer, table, modes) if _may_use_kernel(table, layer) else None


def make_kernel(layer, choice: str, modes: dict | None = None, thresholds: dict | None = None):
    """The kernel object of ``choice`` for one layer: None (``dense``), its sparse kernel
    (``sparse``) or an :class:`AutoKernel` (``auto``, attached whatever the table holds)."""
    if choice == "dense":
        return None
    if choice == "auto":
        return AutoKernel(layer, thresholds, modes)
    return sparse_kernel(layer, modes)


def apply_kernel(model, choice: str = "auto", thresholds: dict | None = None,
                 modes: dict | None = None) -> None:
    """Set the kernel of every Dense/Conv2D layer of ``model``: ``dense``, ``sparse`` or ``auto``
    (see the module docstring).

    ``thresholds``: the table ``auto`` follows (default :func:`~.thresholds.active_thresholds`: the
    user's calibration if there is one, else the shipped table); a dict is checked here, once.
    ``modes`` (tests, benchmarks) forces the sparse kernels' methods: Conv2D ``{"fwd":
    "compact"|"sparse", "dx": "compact"|"sparse"|"csc", "dw": "compact"|"sparse"}``; Dense reads
    ``{"fwd": "compact"|"sparse", "dx": "csr"|"csc"}``. A layer without a mask gets its kernel too.
    """
    if choice not in CHOICES:
        raise ValueError(f"kernel choice must be dense, sparse or auto, got {choice!r}")
    table = None
    if choice == "auto":
        table = active_thresholds() if thresholds is None else as_thresholds(thresholds)
    for layer in model.layers:
        if not isinstance(layer, (Dense, Conv2D)):
            continue
        if choice == "auto":
            layer.kernel = auto_kernel(layer, table, modes)
        else:
            layer.kernel = make_kernel(layer, choice, modes)


def kernel_report(model) -> list[dict]:
    """Per Dense/Conv2D layer: ``kernel`` (dense / sparse / auto), mask density, the ``auto``
    decisions so far (``"small/train_dx": {"use", "threshold", "density", "shape", ...}``),
    ``dense_everywhere`` (auto, Dense: the density is above every threshold of the shape, so every
    call runs the dense code), ``dense_without_lookup`` (auto, Dense: the modes -- all, eval or train
    -- sent to the dense code without a lookup, hence without a decision or plan entry), the plan of
    its last forward through the lookup (samples, train, use_kernel, methods per product) and
    ``csr_products`` (which implementation runs the CSR products, :func:`~.csr.backend`)."""
    out = []
    for name, layer in zip(model.names, model.layers):
        if not isinstance(layer, (Dense, Conv2D)):
            continue
        k = getattr(layer, "kernel", None)
        if not isinstance(k, (SparseKernel, AutoKernel)):
            m = layer.masks.get("W")
            out.append(dict(layer=name, kernel="dense", use_kernel=False, decisions={},
                            density=1.0 if m is None else float(np.count_nonzero(m) / m.size)))
            continue
        decisions = {
            f"{key[0]}/{mode_key(key[1], key[2])}" + ("" if len(key) == 3 else
                                                       " input " + "x".join(map(str, key[3:]))):
            dict(v, use=bool(v["use"])) for key, v in getattr(k, "decisions", {}).items()}
        out.append({**dict(layer=name, kernel=k.policy, density=float(k.density),
                           dense_everywhere=bool(k.all_dense),
                           dense_without_lookup=getattr(k, "dense_modes", None),
                           use_kernel=False, decisions=decisions, csr_products=csr.backend()),
                    **k.last_plan})
    return out
