"""Sequential model: a list of named layers, with every parameter, gradient and mask reachable by a
dotted name such as ``"fc1.W"``.

Forward is ``x -> layer_1 -> ... -> layer_L -> logits``; backward runs the layers in reverse, starting
from ``dL/dlogits``. The first layer is told it need not compute ``dL/dx`` (nothing upstream wants it),
which saves a GEMM per step.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from .layers import Conv2D, Dense, MaxPool2D
from .losses import softmax_cross_entropy


#: Subnormal gradients. Once a network has memorised its training batches (a rewound ticket late in
#: a 50,000-iteration round: training loss ~1e-6), softmax puts ~1e-39 on the wrong classes, and
#: dL/dlogits holds float32 subnormals (< 1.2e-38). x86 arithmetic on subnormals is ~100x slower,
#: and NumPy cannot set flush-to-zero, so every GEMM of the backward pass that reads them crawls:
#: LeNet-300-100 at the end of rewind round 14 of the lth run, 1 BLAS thread, 2.64 ms per step
#: against 0.80 ms for the reinit net of the same round (fc2 backward 945 vs 78 us, fc1 backward
#: 1,100 vs 242 us). Entries below this bound are therefore set to exactly 0 before backward
#: (~3 us a step); with the bound, that step takes 0.82 ms. A dropped entry changes a weight
#: gradient by < 1e-30 times an activation or weight, so this is what a CPU's flush-to-zero mode
#: would do, and it rarely changes a float32 bit: re-running rewind rounds 12-18 of the full lth run
#: with it gave byte-identical weights for seed 0; seed 1's round 12 moved in the last bits (final
#: test accuracy 98.03 -> 98.04%), and its later rounds by seed noise from there. The default run's
#: files are byte-identical.
GRAD_FLUSH_BELOW = 1e-30


class FeatureMajor:
    """A data set held *feature-major*, in blocks, for repeated inference (evaluation).

    ``x`` (N, ...) is copied once into blocks of ``block`` samples (restarting at every multiple of
    ``period`` when given, so that the blocks are exactly the row chunks :meth:`Sequential.forward`
    runs on batches of ``period``); block ``i`` is a C-contiguous (D, b_i) array (D = features per
    sample), i.e. the transpose of the (b_i, D) rows. A block is
    handed to the network as ``block.T`` reshaped to (b_i, ...): the same values as
    ``x[s:s + b_i]``, as an F-ordered view. A sparse first Dense layer wants exactly this layout
    (``X = x.T``, C-contiguous; see :class:`nprune.sparse.DenseKernelSparse`) and skips the
    transposing copy it makes of every C-ordered chunk; a dense layer's GEMM reads either layout at
    the same speed and gives the same bits. The training loop holds its validation and test sets
    this way when :meth:`Sequential.wants_feature_major` says so: made once per training run,
    evaluated hundreds of times.
    """

    def __init__(self, x: np.ndarray, block: int, period: int | None = None):
        x = np.asarray(x)
        if x.ndim < 2:
            raise ValueError(f"FeatureMajor expects (N, ...) samples, got shape {x.shape}")
        self.block = max(1, int(block))
        self.n = len(x)
        self.period = max(1, self.n if period is None else int(period))
        self.sample_shape = x.shape[1:]
        self.dtype = x.dtype
        d = int(np.prod(self.sample_shape, dtype=np.int64))
        starts = [s for p in range(0, self.n, self.period)
                  for s in range(p, min(p + self.period, self.n), self.block)]
        ends = starts[1:] + [self.n]
        self.blocks = [np.ascontiguousarray(x[s:e].reshape(-1, d).T) for s, e in zip(starts, ends)]

    def __len__(self) -> int:
        return self.n

    def batches(self):
        """Yield ``(start, view)``: each block as (b_i, ...) samples (an F-ordered view, no copy)."""
        s = 0
        for blk in self.blocks:
            b = blk.shape[1]
            yield s, blk.T.reshape((b,) + self.sample_shape)
            s += b

    def to_array(self) -> np.ndarray:
        """The samples as one C-ordered (N, ...) array (a copy)."""
        out = np.empty((self.n,) + self.sample_shape, self.dtype)
        for s, v in self.batches():
            out[s:s + len(v)] = v
        return out


def _may_run_sparse(layer) -> bool:
    """The layer has a kernel that is not routed to the dense code at every batch size and mode."""
    k = getattr(layer, "kernel", None)
    return k is not None and not getattr(k, "all_dense", False)


def _stacked(n: int, pieces) -> np.ndarray | None:
    """The (start, rows) pieces written into one (n, ...) array (None when there are none)."""
    out = None
    for s, y in pieces:
        if out is None:
            out = np.empty((n,) + y.shape[1:], y.dtype)
        out[s:s + len(y)] = y
    return out


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
        # A Conv2D that needs no dx followed by a tiling MaxPool2D runs fused (Conv2D.pool_fuse).
        for a, b in zip(self.layers, self.layers[1:]):
            if isinstance(a, Conv2D) and isinstance(b, MaxPool2D) and b.stride == b.size > 1 \
                    and not a.need_dx:
                a.pool_fuse = b.size
        self._cache_views()

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

    def set_masks(self, masks: dict) -> None:
        """Install masks (bool or 0/1 arrays, or None) by name; zeroes the pruned weights."""
        for name, mask in masks.items():
            layer, key = self._owner[name]
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
        """x: a batch shaped as the first layer expects -> logits (N, classes).

        Inference (``train=False``) on more samples than :meth:`_chunk_size` (:attr:`eval_chunk`,
        :attr:`dense_eval_chunk` or :attr:`conv_eval_batch`) runs the whole network on row chunks of
        that size and stacks the logits, so every layer's output stays in cache for the next one
        instead of streaming (N, width) activations through memory. Each sample's logits are
        computed exactly as without chunks (the tests check ``==``)."""
        if not train:
            n, chunk = len(x), self._chunk_size()
            if n > chunk:
                return _stacked(n, ((s, self._forward(x[s:s + chunk], False))
                                    for s in range(0, n, chunk)))
        return self._forward(x, train)

    def _forward(self, x, train):
        for layer in self.layers:
            x = layer.forward(x, train)
        return x

    #: inference chunk (rows per pass through the whole network) of nets without convolutions when
    #: a layer may run its sparse kernel; conv nets use :attr:`conv_eval_batch`. 512 = the sparse
    #: Dense kernel's own column chunk (``nprune.sparse.CHUNK``), so a chunk goes through it without
    #: a second split. LeNet-300-100 at 1.9% of weights, batch 10,000, 1 BLAS thread: 18 -> 13 ms.
    eval_chunk = 512
    #: the same when every layer runs dense (BLAS prefers longer chunks). LeNet-300-100's
    #: ``evaluate`` of 15,000 images in batches of 5,000, two runs: 3-6% faster than unchunked at 1
    #: BLAS thread (61.4 -> 59.6 ms), within 2% at 2 threads (33.4 vs 34.0 ms); 512-row chunks
    #: were 4-5% slower than unchunked at 2 threads.
    dense_eval_chunk = 1024

    def _chunk_size(self) -> int:
        if self._has_conv():
            return self.conv_eval_batch
        sparse = any(_may_run_sparse(l) for l in self.layers)
        return self.eval_chunk if sparse else self.dense_eval_chunk

    def _has_conv(self) -> bool:
        return any(isinstance(l, Conv2D) for l in self.layers)

    def backward(self, dlogits: np.ndarray) -> None:
        """Back-propagate ``dL/dlogits`` (N, classes); fills every layer's ``grads``."""
        d = dlogits
        for layer in reversed(self.layers[self._first_param:]):
            d = layer.backward(d)

    def loss_and_grads(self, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        """One training pass: forward, mean softmax cross-entropy, backward. Returns (loss, logits).

        Entries of ``dL/dlogits`` smaller than :data:`GRAD_FLUSH_BELOW` in magnitude are set to 0
        before backward (see there)."""
        logits = self.forward(x, train=True)
        loss, dlogits = softmax_cross_entropy(logits, y)
        np.copyto(dlogits, 0, where=np.abs(dlogits) < GRAD_FLUSH_BELOW)
        self.backward(dlogits)
        return loss, logits

    # Inference batches are capped at this many images when the net has convolutions: the im2col
    # columns of LeNet-5 take (25*576 + 500*64)*4 bytes = 186 kB per image, so 5000 images would
    # need ~0.9 GB (and run slower, out of cache). The same images are evaluated whatever the batch
    # size (only last-bit rounding of the GEMMs and of the loss sum can differ).
    conv_eval_batch = 256

    def _eval_batch(self, batch_size: int) -> int:
        if self._has_conv():
            return max(1, min(int(batch_size), self.conv_eval_batch))
        return max(1, int(batch_size))

    def wants_feature_major(self) -> bool:
        """True when evaluating from a :class:`FeatureMajor` copy saves work: no convolutions, and
        the first layer with parameters is a Dense layer whose kernel may run sparse (a dense GEMM
        reads both layouts at the same speed, so there is nothing to gain otherwise)."""
        if self._has_conv() or not self.layers:
            return False
        first = self.layers[self._first_param]
        return isinstance(first, Dense) and _may_run_sparse(first)

    def feature_major(self, x: np.ndarray, batch_size: int = 2000) -> FeatureMajor:
        """``x`` as a :class:`FeatureMajor` copy whose blocks are the row chunks that
        ``evaluate(x, y, batch_size)`` and ``predict(x, batch_size)`` would run, so both give the
        same bits from it (the ``auto`` kernels decide per chunk size)."""
        bs = self._eval_batch(batch_size)
        return FeatureMajor(x, min(self._chunk_size(), bs), period=bs)

    def _logits_fm(self, x: FeatureMajor) -> np.ndarray | None:
        return _stacked(len(x), ((s, self.forward(v, train=False)) for s, v in x.batches()))

    def predict(self, x: np.ndarray, batch_size: int = 2000) -> np.ndarray:
        """Logits for ``x`` (an array or a :class:`FeatureMajor`) computed in batches, without
        caching anything for backward."""
        if isinstance(x, FeatureMajor):
            out = self._logits_fm(x)
            return np.zeros((0, 0), np.float32) if out is None else out
        bs = self._eval_batch(batch_size)
        outs = [self.forward(x[i:i + bs], train=False) for i in range(0, len(x), bs)]
        return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)

    def evaluate(self, x: np.ndarray, y: np.ndarray, batch_size: int = 2000) -> tuple[float, float]:
        """(mean cross-entropy loss, accuracy) on a data set.

        The loss is ``sum_batches(mean_loss_b * n_b) / n`` accumulated in float64 (the batch size
        only changes the rounding of that sum, not which images are evaluated). ``x`` may be a
        :class:`FeatureMajor` copy: the logits are then computed block by block and the loss summed
        over the same batches, so the result is the same to the last bit."""
        if len(x) == 0:
            return float("nan"), float("nan")
        bs = self._eval_batch(batch_size)
        fm = self._logits_fm(x) if isinstance(x, FeatureMajor) else None
        total, correct = 0.0, 0
        for i in range(0, len(x), bs):
            logits = self.forward(x[i:i + bs], train=False) if fm is None else fm[i:i + bs]
            yb = y[i:i + bs]
            loss, _ = softmax_cross_entropy(logits, yb)
            total += loss * len(yb)
            correct += int((logits.argmax(1) == yb).sum())
        return total / len(x), correct / len(x)

    def summary(self) -> str:
        """One line per layer: name, type, parameter shapes, weights left."""
        lines = []
        for n, l in zip(self.names, self.layers):
            shapes = ", ".join(f"{k}{tuple(v.shape)}" for k, v in l.params.items())
            lines.append(f"{n:8s} {type(l).__name__:10s} {shapes}")
        return "\n".join(lines)
