"""Iterative magnitude pruning (IMP) with the reset strategies compared by the project.

One IMP trajectory for a seed and a strategy::

    W0 = init(rng_init(seed))                         saved once per seed (init.npz)
    round 0: train W0 (dense)                         shared by every strategy of the seed
    round r = 1..R:
        M_r   = prune(W_final(r-1), M_(r-1))          survivors only, so masks nest
        W_start = reset(strategy) * M_r
        W_final(r) = train(W_start, M_r)              optimiser state reset; data order rng(seed, r)

Reset strategies (what the surviving weights start from in round r):

* ``rewind``      -- their original initial values ``W0`` (Frankle & Carbin's winning ticket);
* ``reinit``      -- a fresh draw from the same initialiser, a new draw each round (the control);
* ``rewind-to-K`` -- their values after K iterations of the dense run (late resetting);
* ``finetune``    -- their trained values from round r-1, trained on at ``lr * finetune_lr_factor``
  (Han et al.'s recipe).

Random streams are separate and derived from ``(seed, stream, round)`` with NumPy's SeedSequence:
initialisation, data order, reinit draws and random-pruning positions. Nothing random carries from one
round to the next except through saved files, which is why a resumed run is bit-identical to an
uninterrupted one, and why every strategy of a seed sees the same data order in the same round.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import nets
from ..prune import SCOPES, prune, sparsity_report
from ..data.fsutil import atomic_save_npz, atomic_write_json, load_json, load_npz
from .runs import dataclass_dict, stable_hash
from ..train import DivergenceError, TrainConfig, train

# random streams
INIT, DATA, REINIT, PRUNE = 0, 1, 2, 3


def stream(seed: int, which: int, round_: int = 0) -> np.random.Generator:
    """The generator for one purpose of one seed and round."""
    return np.random.default_rng([int(seed), which, int(round_)])


BASE_STRATEGIES = ("rewind", "reinit", "finetune")
_REWIND_TO = re.compile(r"^rewind-to-(\d+)$")


def check_strategy(name: str) -> str:
    """Return ``name`` if it is a known strategy (``rewind``, ``reinit``, ``finetune`` or
    ``rewind-to-K`` with integer K >= 0), else raise ValueError."""
    if name in BASE_STRATEGIES or _REWIND_TO.match(name):
        return name
    raise ValueError(f"unknown strategy {name!r}; choose from rewind, reinit, finetune, rewind-to-K")


def rewind_iteration(name: str) -> int | None:
    m = _REWIND_TO.match(name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the numbers of one (seed, strategy, round). Hashed into the run
    folder's name. ``rates`` maps layer names to the fraction of survivors pruned per round.
    The layer kernel is not part of it (an execution detail, like the BLAS thread count; see
    :meth:`IMP.kernel_thresholds`)."""
    net: str = "lenet300"
    dataset: str = "mnist"
    init: str = "glorot_normal"
    optimizer: str = "adam"
    lr: float = 1.2e-3
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 60
    iterations: int = 2000
    eval_every: int = 100
    n_val: int = 5000
    rates: tuple = (("fc1", 0.2), ("fc2", 0.2), ("fc3", 0.1))
    scope: str = "layer"
    finetune_lr_factor: float = 0.1

    def validate(self) -> None:
        if self.net not in nets.NETS:
            raise ValueError(f"unknown net {self.net!r}; choose from {', '.join(nets.NETS)}")
        if self.scope not in SCOPES:
            raise ValueError(f"unknown pruning scope {self.scope!r}; choose from {', '.join(SCOPES)}")
        for name, r in self.rates:
            if not 0.0 < r < 1.0:
                raise ValueError(f"rate for {name} must be in (0, 1), got {r}")
        for k in ("iterations", "batch_size"):
            if getattr(self, k) <= 0:
                raise ValueError(f"{k} must be > 0, got {getattr(self, k)}")
        if self.eval_every < 0 or self.n_val < 0:
            raise ValueError("eval_every and n_val must be >= 0")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")

    def to_dict(self) -> dict:
        return dataclass_dict(self)

    def folder_name(self) -> str:
        return f"{self.net}-{stable_hash(self.to_dict())}"

    def train_config(self, lr_factor: float = 1.0) -> TrainConfig:
        return TrainConfig(optimizer=self.optimizer, lr=self.lr * lr_factor, momentum=self.momentum,
                           weight_decay=self.weight_decay, batch_size=self.batch_size,
                           iterations=self.iterations, eval_every=self.eval_every)

    def param_rates(self, model) -> dict:
        """Rates keyed by parameter name (``fc1.W``); unknown layer names are an error."""
        by_layer = dict(self.rates)
        out = {}
        for pname in model.prunable():
            layer = pname.split(".")[0]
            if layer in by_layer:
                out[pname] = by_layer.pop(layer)
        if by_layer:
            raise ValueError(f"rates name layers that {self.net} does not have: {', '.join(by_layer)}; "
                             f"its prunable layers are {', '.join(p.split('.')[0] for p in model.prunable())}")
        return out


def default_rates(net: str, rate: float) -> tuple:
    """Frankle & Carbin's schedule from one number ``p``: hidden fully connected layers lose ``p``
    per round; the output layer and convolutional layers lose ``p / 2`` (20/20/10 for LeNet-300-100,
    10/10/20/10 for LeNet-5 at p = 0.2)."""
    model = nets.build(net, np.random.default_rng(0))
    layers = [p.split(".")[0] for p in model.prunable()]
    out = []
    for i, name in enumerate(layers):
        is_output = i == len(layers) - 1
        is_conv = name.startswith("conv")
        out.append((name, rate / 2 if (is_output or is_conv) else rate))
    return tuple(out)


class IMP:
    """Runs, resumes and reads back the IMP trajectories of one recipe in ``run_dir``.

    ``data`` is a Splits object (x_train, y_train, x_val, y_val, x_test, y_test);
    ``progress(event, **info)`` receives ``"start"``/``"eval"``/``"done"`` events.
    """

    def __init__(self, recipe: Recipe, run_dir, data=None, progress=None, kernel: str | None = None):
        recipe.validate()
        self.recipe = recipe
        self.dir = Path(run_dir)
        self.data = data
        self.progress = progress
        self.kernel = kernel
        self._thresholds = None

    def kernel_thresholds(self, save: bool = True) -> dict | None:
        """The thresholds table of ``kernel="auto"`` (None for other kernels).

        The kernel is an execution detail, not part of the recipe (its hash): like the BLAS thread
        count it changes only the last float32 bits. What fixes auto's choices is its thresholds
        table, so the first run of a folder saves the table in use
        (:func:`nprune.sparse.active_thresholds`) as ``kernel_thresholds.json`` (atomically), and
        every later run of the folder -- a resume, more seeds or rounds -- uses the saved table,
        whatever the user's calibration says by then: a resumed run makes the same kernel choices
        and gives the same bits. ``save=False`` only reads (and validates)."""
        if self.kernel != "auto":
            return None
        if self._thresholds is None:
            from ..sparse import THRESHOLDS_FILE, active_thresholds, load_thresholds
            path = self.dir / THRESHOLDS_FILE
            if path.exists():
                self._thresholds = load_thresholds(path)
            else:
                table = active_thresholds()
                if not save:
                    return table
                atomic_write_json(path, {k: v for k, v in table.items() if k != "measurements"})
                self._thresholds = load_thresholds(path)
        return self._thresholds

    # ----- paths ---------------------------------------------------------------------------------
    def seed_dir(self, seed: int) -> Path:
        return self.dir / f"seed_{seed}"

    def round_dir(self, seed: int, strategy: str, r: int) -> Path:
        if r == 0:
            return self.seed_dir(seed) / "dense"
        return self.seed_dir(seed) / strategy / f"round_{r}"

    def is_done(self, seed: int, strategy: str, r: int) -> bool:
        return (self.round_dir(seed, strategy, r) / "metrics.json").exists()

    # ----- pieces --------------------------------------------------------------------------------
    def build(self, seed: int):
        model = nets.build(self.recipe.net, stream(seed, INIT), init=self.recipe.init)
        if self.kernel is not None and hasattr(model, "set_kernel"):
            model.set_kernel(self.kernel, thresholds=self.kernel_thresholds())
        return model

    def init_weights(self, seed: int, model=None) -> dict:
        path = self.seed_dir(seed) / "init.npz"
        if path.exists():
            return load_npz(path)
        model = model or self.build(seed)
        w = model.get_weights()
        atomic_save_npz(path, w)
        return w

    def rewind_weights(self, seed: int, k: int) -> dict:
        """Weights after ``k`` iterations of the dense run (cached as ``dense/rewind_<k>.npz``)."""
        path = self.seed_dir(seed) / "dense" / f"rewind_{k}.npz"
        if path.exists():
            return load_npz(path)
        model = self.build(seed)
        model.set_weights(self.init_weights(seed))
        if k > 0:
            cfg = dataclasses.replace(self.recipe.train_config(), iterations=k, eval_every=0)
            _, snaps = train(model, _NoEval(self.data), cfg, stream(seed, DATA, 0), snapshot_at=[k])
            w = snaps[k]
        else:
            w = model.get_weights()
        atomic_save_npz(path, w)
        return w

    def _train_round(self, seed: int, strategy: str, r: int, model, start: dict, masks: dict,
                     lr_factor: float = 1.0) -> dict:
        rd = self.round_dir(seed, strategy, r)
        model.set_masks(masks)
        model.set_weights(start)
        cfg = self.recipe.train_config(lr_factor)
        report = sparsity_report(masks)
        if self.progress:
            self.progress("start", seed=seed, strategy=strategy if r else "dense", round=r,
                          left=report["total"]["percent"],
                          layers={k: v["percent"] for k, v in report.items() if k != "total"})

        def on_eval(it, total, res):
            if self.progress:
                self.progress("eval", seed=seed, strategy=strategy if r else "dense", round=r,
                              iteration=it, total=total, val_acc=res.val_acc[-1],
                              test_acc=res.test_acc[-1])
        metrics = {"seed": seed, "strategy": strategy if r else "dense", "round": r,
                   "weights": report, "percent_left": report["total"]["percent"],
                   "lr": cfg.lr, "diverged": False}
        atomic_save_npz(rd / "masks.npz", {k: v.astype(bool) for k, v in masks.items()})
        atomic_save_npz(rd / "start.npz", model.get_weights())
        try:
            with np.errstate(over="ignore", invalid="ignore"):   # divergence is reported below
                res, _ = train(model, self.data, cfg, stream(seed, DATA, r), progress=on_eval)
        except DivergenceError as e:
            metrics.update(diverged=True, diverged_at=e.iteration, error=str(e))
            atomic_write_json(rd / "metrics.json", metrics)
            if self.progress:
                self.progress("diverged", seed=seed, strategy=strategy, round=r, error=str(e))
            return metrics
        atomic_save_npz(rd / "final.npz", model.get_weights())
        d = res.to_dict()
        seconds = d.pop("seconds")
        curves = {k: d.pop(k) for k in ("iterations", "train_loss", "val_loss", "val_acc",
                                        "test_loss", "test_acc")}
        metrics.update(d)
        metrics["curves"] = curves
        atomic_write_json(rd / "timing.json", {"seconds": seconds})
        atomic_write_json(rd / "metrics.json", metrics)   # last: marks the round finished
        if self.progress:
            self.progress("done", seed=seed, strategy=strategy if r else "dense", round=r,
                          metrics=metrics, seconds=seconds)
        return metrics

    def run_dense(self, seed: int) -> dict:
        """Round 0 for ``seed`` (skipped when finished)."""
        if self.is_done(seed, "dense", 0):
            return load_json(self.round_dir(seed, "dense", 0) / "metrics.json")
        model = self.build(seed)
        w0 = self.init_weights(seed, model)
        masks = {n: np.ones(w0[n].shape, bool) for n in model.prunable()}
        return self._train_round(seed, "dense", 0, model, w0, masks)

    def run_strategy(self, seed: int, strategy: str, rounds: int) -> list:
        """Rounds 1..``rounds`` of one strategy (finished rounds are skipped). Needs round 0."""
        check_strategy(strategy)
        out = [self.run_dense(seed)]
        model = self.build(seed)
        rates = self.recipe.param_rates(model)
        for r in range(1, rounds + 1):
            rd = self.round_dir(seed, strategy, r)
            if self.is_done(seed, strategy, r):
                out.append(load_json(rd / "metrics.json"))
                if out[-1].get("diverged"):
                    break
                continue
            prev = self.round_dir(seed, strategy, r - 1)
            if out[-1].get("diverged") or not (prev / "final.npz").exists():
                break
            prev_final = load_npz(prev / "final.npz")
            prev_masks = load_npz(prev / "masks.npz")
            masks = prune(prev_final, prev_masks, rates, self.recipe.scope, rng=stream(seed, PRUNE, r))
            lr_factor = 1.0
            k = rewind_iteration(strategy)
            if strategy == "rewind":
                start = self.init_weights(seed)
            elif strategy == "reinit":
                start = self.build(seed).fresh_params(stream(seed, REINIT, r))
            elif strategy == "finetune":
                start, lr_factor = prev_final, self.recipe.finetune_lr_factor
            else:
                start = self.rewind_weights(seed, k)
            out.append(self._train_round(seed, strategy, r, model, start, masks, lr_factor))
            if out[-1].get("diverged"):
                break
        return out


class _NoEval:
    """A view of a data split with empty validation and test sets (for short snapshot runs)."""

    def __init__(self, data):
        self.x_train, self.y_train = data.x_train, data.y_train
        self.x_val = self.x_test = data.x_train[:0]
        self.y_val = self.y_test = data.y_train[:0]


def collect(run_dir) -> list:
    """Every finished round's metrics in a run folder, sorted by (seed, strategy, round)."""
    run_dir = Path(run_dir)
    rows = []
    for p in sorted(run_dir.glob("seed_*/dense/metrics.json")) + \
            sorted(run_dir.glob("seed_*/*/round_*/metrics.json")):
        rows.append(load_json(p))
    rows.sort(key=lambda m: (m["seed"], m["strategy"], m["round"]))
    return rows
