"""The training loop: seeded epochs, a fixed iteration budget, periodic evaluation, early-stop metric.

* Data order: each epoch is a fresh permutation of the training set drawn from the ``rng`` you pass
  (sampling *without* replacement); it is cut into batches of ``batch_size`` and the last, partial batch
  of an epoch is dropped, so every step sees exactly ``batch_size`` examples.
* Budget: exactly ``iterations`` optimiser steps, crossing epoch boundaries as needed.
* Evaluation: every ``eval_every`` steps (and after the last step) the model is evaluated on the
  validation split; losses and accuracies are kept as curves.
* Early stopping, as Frankle & Carbin measure it: the early-stop iteration is the evaluated iteration
  of minimum *validation* loss; the test accuracy reported "at early stop" is the one of the weights
  of that iteration. Selection never looks at the test set.
* Test set: evaluated only where a result reads it. Whenever the validation loss improves, the
  weights are copied into one buffer (allocated once, overwritten in place); after the last step the
  test set is evaluated on the final weights (``final_test_acc``) and on that copy
  (``early_stop_test_acc``), the same bits as evaluating it at the early-stop iteration itself. With
  ``test_every = N > 0`` (a multiple of ``eval_every``) the test set is also evaluated at every
  evaluation whose iteration is a multiple of N, for a test curve. The test curves (``test_loss``,
  ``test_acc``) hold None (JSON null) at the evaluations where the test set was not evaluated; the
  last entry (the final iteration) is always measured.
* Divergence: the round is diverged, and :class:`DivergenceError` is raised, when

  1. the training loss of a step is not finite (checked at every step, raised at once), or
  2. the mean training loss over an evaluation period (the steps since the previous evaluation)
     exceeds ``DIVERGE_FACTOR`` times the *reference* loss, ``max(loss of the first step,
     DIVERGE_MIN_REFERENCE)`` (checked at every evaluation, and after the last step).

  Rule 2 catches a run whose loss grows to ~1e20 without overflowing (Adam at a huge learning rate
  bounds each step by ``lr``). The floor on the reference keeps a round that starts almost
  memorised (finetuning: first loss ~1e-3) from being flagged for an ordinary bump.
* Step: :func:`train_step` (forward, loss, flush of tiny logit gradients, backward), then the
  optimiser's step.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from .evaluate import evaluate, evaluation_copy
from .losses import softmax_cross_entropy
from .data.datasets import iterate_minibatches
from .optim import make_optimizer

#: Entries of dL/dlogits smaller than this in magnitude are set to exactly 0 before backward. Once a
#: network has memorised its training batches (training loss ~1e-6, e.g. a rewound ticket late in a
#: long round), softmax puts ~1e-39 on the wrong classes and dL/dlogits holds float32 subnormals
#: (< 1.2e-38). x86 arithmetic on subnormals is about a hundred times slower and NumPy cannot set
#: flush-to-zero, so every backward GEMM that reads them crawls and such a step takes several times
#: as long as a normal one; the flush costs a few microseconds. It does what a CPU's flush-to-zero
#: mode would: a dropped entry changes a weight gradient by < 1e-30 times an activation or weight,
#: so it rarely changes a float32 bit of the weights.
GRAD_FLUSH_BELOW = 1e-30

#: a period's mean training loss above this many times the reference loss is divergence (rule 2)
DIVERGE_FACTOR = 10.0
#: the reference of rule 2 is at least this (nats): 10x it is far above chance level (ln 10 = 2.3
#: for ten classes), so only a run that got confidently wrong trips the rule
DIVERGE_MIN_REFERENCE = 1.0


class DivergenceError(RuntimeError):
    """Training diverged: a non-finite step loss, or a period's mean loss far above the first
    step's (see the module docstring). ``iteration`` and ``loss`` say where and what; ``rule`` is
    ``"non-finite"`` or ``"growth"``."""

    def __init__(self, iteration: int, loss: float, rule: str = "non-finite", detail: str = ""):
        what = ("non-finite training loss" if rule == "non-finite" else
                "mean training loss of the evaluation period")
        super().__init__(f"training diverged: {what} {loss} at iteration {iteration}"
                         + (f" ({detail})" if detail else ""))
        self.iteration, self.loss, self.rule = iteration, loss, rule


@dataclass(frozen=True)
class TrainConfig:
    """How to train one network once."""
    optimizer: str = "adam"
    lr: float = 1.2e-3
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 60
    iterations: int = 5000
    eval_every: int = 100
    eval_batch: int = 5000
    test_every: int = 0


@dataclass
class TrainResult:
    """Curves and summary numbers of one training run (all plain Python types, JSON-ready). The
    curves have one entry per evaluation; ``test_loss`` and ``test_acc`` are None where the test
    set was not evaluated (see ``TrainConfig.test_every``)."""
    iterations: list = field(default_factory=list)
    train_loss: list = field(default_factory=list)
    val_loss: list = field(default_factory=list)
    val_acc: list = field(default_factory=list)
    test_loss: list = field(default_factory=list)
    test_acc: list = field(default_factory=list)
    early_stop_iter: int = 0
    early_stop_val_loss: float = float("nan")
    early_stop_val_acc: float = float("nan")
    early_stop_test_acc: float = float("nan")
    final_test_acc: float = float("nan")
    final_val_acc: float = float("nan")
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def batches(n: int, batch_size: int, iterations: int, rng: np.random.Generator):
    """Yield ``iterations`` index arrays of length ``batch_size``: the epochs of
    :func:`nprune.data.datasets.iterate_minibatches` (a permutation of ``range(n)`` from ``rng`` per
    epoch, its last partial batch dropped), one after another until the budget is spent."""
    if batch_size > n:
        raise ValueError(f"batch size {batch_size} exceeds the {n} training examples")
    done = 0
    while done < iterations:
        for idx in iterate_minibatches(n, batch_size, rng):
            if done == iterations:
                return
            yield idx
            done += 1


def flush_tiny_gradients(dlogits: np.ndarray) -> None:
    """Set the entries of ``dlogits`` below :data:`GRAD_FLUSH_BELOW` in magnitude to 0, in place."""
    np.copyto(dlogits, 0, where=np.abs(dlogits) < GRAD_FLUSH_BELOW)


def train_step(model, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """One training pass: forward, mean softmax cross-entropy, :func:`flush_tiny_gradients`,
    backward (fills the model's ``grads``).

    Inputs: x (N, ...) a batch, y (N,) int labels. Returns (loss, logits (N, classes))."""
    logits = model.forward(x, train=True)
    loss, dlogits = softmax_cross_entropy(logits, y)
    flush_tiny_gradients(dlogits)
    model.backward(dlogits)
    return loss, logits


def train(model, data, cfg: TrainConfig, rng: np.random.Generator, optimizer=None,
          snapshot_at=(), progress: Callable | None = None) -> tuple[TrainResult, dict]:
    """Train ``model`` in place.

    Parameters
    ----------
    model : Sequential
    data : object with ``x_train, y_train, x_val, y_val, x_test, y_test`` arrays.
    cfg : TrainConfig
    rng : generator for the data order only.
    optimizer : an optimiser bound to ``model``; built from ``cfg`` when None. Its state is reset.
    snapshot_at : iterations after which to copy the weights (0 = before the first step).
    progress : called as ``progress(iteration, total, result)`` after each evaluation (the last
        entries of ``result.test_acc``/``test_loss`` are None where the test set was not evaluated).

    Returns
    -------
    (TrainResult, {iteration: weights})
    """
    if cfg.test_every < 0 or (cfg.test_every and cfg.eval_every and cfg.test_every % cfg.eval_every):
        raise ValueError(f"test_every must be 0 or a multiple of eval_every ({cfg.eval_every}), "
                         f"got {cfg.test_every}")
    opt = optimizer or make_optimizer(cfg.optimizer, model, cfg.lr, cfg.momentum, cfg.weight_decay)
    opt.reset()
    res = TrainResult()
    snaps: dict[int, dict] = {}
    want = set(int(s) for s in snapshot_at)
    if 0 in want:
        snaps[0] = model.get_weights()
    x, y = data.x_train, data.y_train
    # evaluated many times: held as nprune.evaluate.evaluation_copy says (same bits, maybe faster)
    x_val, x_test = data.x_val, data.x_test
    if cfg.eval_every or cfg.iterations:
        x_val = evaluation_copy(model, x_val, cfg.eval_batch)
    if cfg.test_every:
        x_test = evaluation_copy(model, x_test, cfg.eval_batch)

    def test():
        return evaluate(model, x_test, data.y_test, cfg.eval_batch)

    xb = np.empty((cfg.batch_size,) + x.shape[1:], x.dtype)
    yb = np.empty((cfg.batch_size,), y.dtype)
    t0 = time.perf_counter()
    run_loss, run_n = 0.0, 0
    reference = math.inf      # rule 2's reference loss (module docstring)
    best = math.inf
    best_w = None             # the weights of the best evaluation not tested then (one buffer)
    early_test, early_pending = math.nan, False   # pending: early stop to be tested on best_w
    it = 0
    for idx in batches(len(x), cfg.batch_size, cfg.iterations, rng):
        # mode="clip" (idx is a permutation slice, always in range): with the default "raise" NumPy
        # gathers into a temporary and copies it into ``out``.
        np.take(x, idx, axis=0, out=xb, mode="clip")
        np.take(y, idx, axis=0, out=yb, mode="clip")
        loss, _ = train_step(model, xb, yb)
        if not math.isfinite(loss):
            raise DivergenceError(it + 1, loss, "non-finite")
        if it == 0:
            reference = max(loss, DIVERGE_MIN_REFERENCE)
        opt.step()
        it += 1
        run_loss += loss
        run_n += 1
        if it in want:
            snaps[it] = model.get_weights()
        last = it == cfg.iterations
        if (cfg.eval_every and it % cfg.eval_every == 0) or last:
            mean_loss = run_loss / run_n
            if mean_loss > DIVERGE_FACTOR * reference:
                raise DivergenceError(it, mean_loss, "growth",
                                      f"> {DIVERGE_FACTOR:g} x {reference:.4g}, the reference loss "
                                      f"(the first step's, at least {DIVERGE_MIN_REFERENCE:g})")
            vl, va = evaluate(model, x_val, data.y_val, cfg.eval_batch)
            tested = last or (cfg.test_every and it % cfg.test_every == 0)
            tl, ta = test() if tested else (None, None)
            res.iterations.append(it)
            res.train_loss.append(mean_loss)
            run_loss, run_n = 0.0, 0
            res.val_loss.append(vl)
            res.val_acc.append(va)
            res.test_loss.append(tl)
            res.test_acc.append(ta)
            # no validation split: fall back to the last evaluation (documented in prepare()).
            key = vl if math.isfinite(vl) else -it
            if key < best:
                best = key
                res.early_stop_iter, res.early_stop_val_loss = it, vl
                res.early_stop_val_acc, early_test, early_pending = va, ta, not tested
                if not tested:
                    best_w = _copy_weights(model, best_w)
            if progress is not None:
                progress(it, cfg.iterations, res)
    if early_pending:
        # the early stop was not tested when it happened: evaluate the kept weights, then put the
        # final ones back (bit for bit: plain copies, no re-masking)
        final_w = _copy_weights(model)
        _load_weights(model, best_w)
        early_test = test()[1]
        _load_weights(model, final_w)
    res.early_stop_test_acc = early_test
    res.final_test_acc = res.test_acc[-1] if res.test_acc else float("nan")
    res.final_val_acc = res.val_acc[-1] if res.val_acc else float("nan")
    res.seconds = time.perf_counter() - t0
    return res, snaps


def _copy_weights(model, out: dict | None = None) -> dict:
    """Every parameter of ``model`` copied into ``out`` (arrays overwritten in place; allocated on
    the first call with ``out=None``). Returns ``out``."""
    if out is None:
        return {k: v.copy() for k, v in model.params().items()}
    for k, v in model.params().items():
        np.copyto(out[k], v)
    return out


def _load_weights(model, w: dict) -> None:
    """Copy ``w`` into the live parameters, bit for bit (pruned entries of ``w`` are already 0)."""
    for k, v in model.params().items():
        np.copyto(v, w[k])
