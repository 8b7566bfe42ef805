"""Inference over whole data sets: logits, loss and accuracy of a model, computed chunk by chunk.

:func:`predict` and :func:`evaluate` cut a data set into batches of ``batch_size`` samples (at most
:data:`CONV_EVAL_BATCH` for networks with convolutions) and run every batch through the whole network
in row chunks of :func:`chunk_size` samples (:func:`chunked_logits`), so that each layer's output is
still in cache when the next layer reads it, instead of (N, width) activations streaming through
memory. Every sample's logits are computed exactly as in one unchunked ``model.forward(x,
train=False)`` (the tests check ``==``); only the ``auto`` kernels may choose differently for a chunk
of another size.

A data set that is evaluated many times (the validation and test sets of a training run) can be held
*feature-major* (:class:`FeatureMajor`, made by :func:`feature_major`), which saves a sparse first
Dense layer a transposing copy of every chunk; :func:`evaluation_copy` makes one when it pays.
"""
from __future__ import annotations

import numpy as np

from .layers import Conv2D, Dense
from .losses import softmax_cross_entropy

#: Rows per chunk of a network without convolutions when a layer may run its sparse kernel: the
#: sparse Dense kernel's own column chunk, so that a chunk goes through it without a second split.
EVAL_CHUNK = 512
#: Rows per chunk when every layer runs the dense code: BLAS prefers longer chunks than the sparse
#: kernel does, and 1,024 rows still keep the activations of LeNet-300-100 in cache.
DENSE_EVAL_CHUNK = 1024
#: Inference batches are capped at this many images when the network has convolutions: the im2col
#: columns of LeNet-5 take (25*576 + 500*64)*4 bytes = 186 kB per image, so 5,000 images would need
#: ~0.9 GB (and run slower, out of cache). The batch size changes only the last-bit rounding of the
#: GEMMs and of the loss sum, not which images are evaluated.
CONV_EVAL_BATCH = 256


class FeatureMajor:
    """A data set held *feature-major*, in blocks, for repeated inference (evaluation).

    ``x`` (N, ...) is copied once into blocks of ``block`` samples (restarting at every multiple of
    ``period`` when given, so that the blocks are exactly the row chunks :func:`evaluate` runs on
    batches of ``period``); block ``i`` is a C-contiguous (D, b_i) array (D = features per sample),
    i.e. the transpose of the (b_i, D) rows. A block is handed to the network as ``block.T``
    reshaped to (b_i, ...): the same values as ``x[s:s + b_i]``, as an F-ordered view. A sparse
    first Dense layer wants exactly this layout (``X = x.T``, C-contiguous) and skips the transposing
    copy it makes of every C-ordered chunk; a dense layer's GEMM reads either layout at the same
    speed and gives the same bits.
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


# ----- chunk sizes ---------------------------------------------------------------------------------

def _may_run_sparse(layer) -> bool:
    """The layer has a kernel that is not routed to the dense code at every batch size and mode
    (a kernel says so with ``all_dense``)."""
    k = getattr(layer, "kernel", None)
    return k is not None and not getattr(k, "all_dense", False)


def _has_conv(model) -> bool:
    return any(isinstance(l, Conv2D) for l in model.layers)


def chunk_size(model) -> int:
    """Rows per chunk of :func:`chunked_logits`: :data:`CONV_EVAL_BATCH` for a network with
    convolutions, else :data:`EVAL_CHUNK` when a layer may run its sparse kernel, else
    :data:`DENSE_EVAL_CHUNK`."""
    if _has_conv(model):
        return CONV_EVAL_BATCH
    return EVAL_CHUNK if any(_may_run_sparse(l) for l in model.layers) else DENSE_EVAL_CHUNK


def eval_batch(model, batch_size: int) -> int:
    """The batch size :func:`predict` and :func:`evaluate` use: ``batch_size``, at most
    :data:`CONV_EVAL_BATCH` for a network with convolutions."""
    if _has_conv(model):
        return max(1, min(int(batch_size), CONV_EVAL_BATCH))
    return max(1, int(batch_size))


# ----- logits, loss, accuracy ----------------------------------------------------------------------

def _stacked(n: int, pieces) -> np.ndarray | None:
    """The (start, rows) pieces written into one (n, ...) array (None when there are none)."""
    out = None
    for s, y in pieces:
        if out is None:
            out = np.empty((n,) + y.shape[1:], y.dtype)
        out[s:s + len(y)] = y
    return out


def chunked_logits(model, x: np.ndarray) -> np.ndarray:
    """Inputs: x (N, ...), a batch the model takes. Returns the logits (N, classes) of
    ``model.forward(x, train=False)``, computed on row chunks of :func:`chunk_size` samples and
    stacked; nothing is cached for backward."""
    n, chunk = len(x), chunk_size(model)
    if n > chunk:
        return _stacked(n, ((s, model.forward(x[s:s + chunk], train=False))
                            for s in range(0, n, chunk)))
    return model.forward(x, train=False)


def _logits_fm(model, x: FeatureMajor) -> np.ndarray | None:
    return _stacked(len(x), ((s, chunked_logits(model, v)) for s, v in x.batches()))


def predict(model, x, batch_size: int = 2000) -> np.ndarray:
    """Inputs: x (N, ...), an array or a :class:`FeatureMajor`. Returns the logits (N, classes),
    computed in batches of :func:`eval_batch` samples ((0, 0) when x is empty)."""
    if isinstance(x, FeatureMajor):
        out = _logits_fm(model, x)
        return np.zeros((0, 0), np.float32) if out is None else out
    bs = eval_batch(model, batch_size)
    outs = [chunked_logits(model, x[i:i + bs]) for i in range(0, len(x), bs)]
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def evaluate(model, x, y: np.ndarray, batch_size: int = 2000) -> tuple[float, float]:
    """Inputs: x (N, ...), an array or a :class:`FeatureMajor`; y (N,) int labels.
    Returns (mean cross-entropy loss, accuracy), both NaN when N = 0.

    The loss is ``sum_batches(mean_loss_b * n_b) / n`` accumulated in float64 over batches of
    :func:`eval_batch` samples (the batch size only changes the rounding of that sum, not which
    images are evaluated). From a :class:`FeatureMajor` copy the logits are computed block by block
    and the loss summed over the same batches, so the result is the same to the last bit."""
    if len(x) == 0:
        return float("nan"), float("nan")
    bs = eval_batch(model, batch_size)
    fm = _logits_fm(model, x) if isinstance(x, FeatureMajor) else None
    total, correct = 0.0, 0
    for i in range(0, len(x), bs):
        logits = chunked_logits(model, x[i:i + bs]) if fm is None else fm[i:i + bs]
        yb = y[i:i + bs]
        loss, _ = softmax_cross_entropy(logits, yb)
        total += loss * len(yb)
        correct += int((logits.argmax(1) == yb).sum())
    return total / len(x), correct / len(x)


# ----- feature-major evaluation sets ---------------------------------------------------------------

def wants_feature_major(model) -> bool:
    """True when evaluating from a :class:`FeatureMajor` copy saves work: no convolutions, and
    the first layer with parameters is a Dense layer whose kernel may run sparse (a dense GEMM
    reads both layouts at the same speed, so there is nothing to gain otherwise)."""
    if _has_conv(model):
        return False
    first = next((l for l in model.layers if l.params), None)
    return isinstance(first, Dense) and _may_run_sparse(first)


def feature_major(model, x: np.ndarray, batch_size: int = 2000) -> FeatureMajor:
    """``x`` (N, ...) as a :class:`FeatureMajor` copy whose blocks are the row chunks that
    ``evaluate(model, x, y, batch_size)`` and ``predict(model, x, batch_size)`` would run, so both
    give the same bits from it (the ``auto`` kernels decide per chunk size)."""
    bs = eval_batch(model, batch_size)
    return FeatureMajor(x, min(chunk_size(model), bs), period=bs)


def evaluation_copy(model, x: np.ndarray, batch_size: int):
    """How to hold a data set ``x`` that will be evaluated many times with ``batch_size``: as a
    :func:`feature_major` copy when :func:`wants_feature_major`, else ``x`` itself. Both give the
    same logits and losses to the last bit."""
    if len(x) and wants_feature_major(model):
        return feature_major(model, x, batch_size)
    return x
