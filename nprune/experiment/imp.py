"""Iterative magnitude pruning (IMP) with the reset strategies compared by the project.

One IMP trajectory for a seed and a strategy::

    W0 = init(rng_init(seed))                         saved once per seed (init.npz)
    round 0: train W0 (dense)                         shared by every strategy of the seed
    round r = 1..R:
        M_r   = prune(W_final(r-1), M_(r-1))          survivors only, so masks nest
        W_start = reset(strategy) * M_r
        W_final(r) = train(W_start, M_r)              optimiser state reset; data order rng(seed, r)

Reset strategies (what the surviving weights start from in round r) are the entries of
:data:`nprune.experiment.strategies.STRATEGIES`; adding one is adding an entry:

* ``rewind``      -- their original initial values ``W0`` (Frankle & Carbin's winning ticket);
* ``reinit``      -- a fresh draw from the same initialiser, a new draw each round (the control);
* ``finetune``    -- their trained values from round r-1, trained on at ``lr * finetune_lr_factor``
  (Han et al.'s recipe);
* ``rewind-to-K`` -- their values after K iterations of the dense run (late resetting);
* ``ticket-reinit`` -- Frankle & Carbin's random reinitialisation: round r trains the mask of the
  ``rewind`` chain's round r (the winning ticket) from a fresh draw of the initialiser;
* ``ticket-random-mask`` -- Frankle & Carbin's random pruning: the ticket's survivor count per layer
  at uniformly random positions (a new draw each round, not nested), from ``W0``.

The two ticket controls do not prune a chain of their own: round r reads the rewind chain's masks
of round r (computing the rewind rounds first where they are missing), so they test the ticket's
initial values and its mask one at a time. A chain stops at its first diverged round; a ticket
control also stops where the rewind chain diverged.

Random streams are separate and derived from ``(seed, stream, round)`` with NumPy's SeedSequence:
initialisation, data order, reinit draws and random-pruning positions. Nothing random carries from one
round to the next except through saved files, which is why a resumed run is bit-identical to an
uninterrupted one, and why every strategy of a seed sees the same data order in the same round.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .. import nets
from ..data.fsutil import CorruptFileError, atomic_write_json, remove_stale_temporaries
from ..kernels import THRESHOLDS_FILE, active_thresholds, apply_kernel, load_thresholds
from ..pruning import prune, sparsity_report
from ..training import DivergenceError, train
from .config import Recipe
from .runs import METRICS, SETTINGS, RunFolder, RunFolderError, stable_hash
from .strategies import DATA, INIT, PRUNE, check_strategy, find_strategy, stream


class IMP(RunFolder):
    """Runs, resumes and reads back the IMP trajectories of one recipe in the run folder ``run_dir``.

    ``run_dir=None`` keeps every file in memory (nothing is written). ``data`` is a Splits object
    (x_train, y_train, x_val, y_val, x_test, y_test); ``progress(event, **info)`` receives
    ``"start"``/``"eval"``/``"done"`` events; ``kernel``: dense, sparse or auto (None: dense);
    ``notice(text)`` hears of each round found unfinished that had looked finished (a file missing,
    damaged or edited), which is then computed again (None: silent).
    """

    def __init__(self, recipe: Recipe, run_dir=None, data=None, progress=None, kernel: str | None = None,
                 notice=None):
        recipe.validate()
        super().__init__(run_dir, recipe_hash=stable_hash(recipe.to_dict()), notice=notice)
        self.recipe = recipe
        self.data = data
        self.progress = progress
        self.kernel = kernel
        self._thresholds = None

    def kernel_thresholds(self, save: bool = True) -> dict | None:
        """The thresholds table of ``kernel="auto"`` (None for other kernels).

        The kernel is an execution detail, not part of the recipe (its hash): like the BLAS thread
        count it changes only the last float32 bits. What fixes auto's choices is its thresholds
        table, so the first run of a folder saves the table in use
        (:func:`nprune.kernels.active_thresholds`) as ``kernel_thresholds.json`` (atomically), and
        every later run of the folder -- a resume, more seeds or rounds -- uses the saved table,
        whatever the user's calibration says by then: a resumed run makes the same kernel choices
        and gives the same bits. ``save=False`` only reads (and validates)."""
        if self.kernel != "auto":
            return None
        if self._thresholds is None:
            path = self.dir / THRESHOLDS_FILE
            if self.in_memory:
                self._thresholds = active_thresholds()
            elif path.exists():
                self._thresholds = load_thresholds(path)
            else:
                table = active_thresholds()
                if not save:
                    return table
                atomic_write_json(path, {k: v for k, v in table.items() if k != "measurements"})
                self._thresholds = table
        return self._thresholds

    def prepare_folder(self, plan: dict) -> None:
        """Before a run: remove the temporary files of killed writers, check ``settings.json``
        against this recipe and write it with ``plan``. A folder named for this recipe
        (:meth:`Recipe.folder_name`) whose settings.json was edited or damaged gets it written
        again (``notice`` hears of it); any other folder holding another recipe is a RunFolderError."""
        if self.in_memory:
            self.write_settings(self.recipe.to_dict(), plan)
            return
        self._inside(self.dir / SETTINGS)
        if self.dir.is_dir():
            remove_stale_temporaries(self.dir)
        try:
            saved = self.settings()
            problem = None if saved is None or (isinstance(saved, dict) and saved.get("recipe") ==
                                                self.recipe.to_dict()) else "holds another recipe"
        except CorruptFileError as e:
            problem = str(e).replace(str(self.dir / SETTINGS) + ": ", "")
        if problem:
            if self.dir.name != self.recipe.folder_name():
                raise RunFolderError(f"{self.dir / SETTINGS}: {problem}; its rounds are not this "
                                     "recipe's: use another run folder")
            self._tell(f"{self.rel(self.dir / SETTINGS)} {problem}, not the recipe its folder is "
                       "named for; it is written again")
        self.write_settings(self.recipe.to_dict(), plan)

    # ----- pieces --------------------------------------------------------------------------------
    def build(self, seed: int):
        model = nets.build(self.recipe.net, stream(seed, INIT), init=self.recipe.init)
        if self.kernel is not None:
            apply_kernel(model, self.kernel, thresholds=self.kernel_thresholds())
        return model

    def init_weights(self, seed: int, model=None) -> dict:
        """The original initialisation of ``seed`` (``init.npz``, made once and checked on reading)."""
        path = self.seed_dir(seed) / "init.npz"
        w = self.load_recorded(path)
        if w is None:
            model = model or self.build(seed)
            w = model.get_weights()
            self.save_recorded(path, w)
        return w

    def rewind_weights(self, seed: int, k: int) -> dict:
        """Weights after ``k`` iterations of the dense run (cached as ``dense/rewind_<k>.npz``)."""
        path = self.seed_dir(seed) / "dense" / f"rewind_{k}.npz"
        w = self.load_recorded(path)
        if w is not None:
            return w
        model = self.build(seed)
        model.set_weights(self.init_weights(seed))
        if k > 0:
            cfg = dataclasses.replace(self.recipe.train_config(), iterations=k, eval_every=0)
            _, snaps = train(model, _NoEval(self.data), cfg, stream(seed, DATA, 0), snapshot_at=[k])
            w = snaps[k]
        else:
            w = model.get_weights()
        self.save_recorded(path, w)
        return w

    def ticket_masks(self, seed: int, r: int) -> dict:
        """The masks of round ``r`` of the ``rewind`` chain of ``seed`` (the winning ticket of that
        round), its missing rounds computed first. ChainStopped when that chain diverged before."""
        if self.is_done(seed, "rewind", r):   # read alone: the rounds before it are not needed
            last = self.metrics(seed, "rewind", r)
        else:
            last = self.run_strategy(seed, "rewind", r)[-1]
        if last["round"] != r or last["diverged"]:
            raise ChainStopped(f"the rewind chain diverged in round {last['round']}, so it has no "
                               f"ticket of round {r}")
        return self.load_arrays(self.round_dir(seed, "rewind", r) / "masks.npz", last["files"]["masks.npz"])

    def _train_round(self, seed: int, strategy: str, r: int, model, start: dict, masks: dict,
                     lr_factor: float = 1.0) -> dict:
        rd = self.round_dir(seed, strategy, r)
        self.forget(seed, strategy, r)
        if not self.in_memory and (rd / METRICS).exists():   # a round that did not check out
            (rd / METRICS).unlink()
        model.set_masks(masks)
        model.set_weights(start)
        cfg = self.recipe.train_config(lr_factor)
        report = sparsity_report(masks)
        if self.progress:
            self.progress("start", seed=seed, strategy=strategy if r else "dense", round=r,
                          density=report["total"]["percent"],
                          layers={k: v["percent"] for k, v in report.items() if k != "total"})

        def on_eval(it, total, res):
            if self.progress:
                self.progress("eval", seed=seed, strategy=strategy if r else "dense", round=r,
                              iteration=it, total=total, val_acc=res.val_acc[-1],
                              test_acc=res.test_acc[-1])
        files = {"masks.npz": self.save_arrays(rd / "masks.npz", {k: v.astype(bool) for k, v in masks.items()}),
                 "start.npz": self.save_arrays(rd / "start.npz", model.get_weights())}
        metrics = {"seed": seed, "strategy": strategy if r else "dense", "round": r,
                   "weights": report, "percent_left": report["total"]["percent"],
                   "lr": cfg.lr, "test_every": cfg.test_every, "diverged": False, "files": files,
                   "recipe_hash": self.recipe_hash}
        try:
            with np.errstate(over="ignore", invalid="ignore"):   # divergence is reported below
                res, _ = train(model, self.data, cfg, stream(seed, DATA, r), progress=on_eval)
        except DivergenceError as e:
            metrics.update(diverged=True, diverged_at=e.iteration, error=str(e))
            self.save_json(rd / "metrics.json", metrics)
            if self.progress:
                self.progress("diverged", seed=seed, strategy=strategy, round=r, error=str(e))
            return metrics
        files["final.npz"] = self.save_arrays(rd / "final.npz", model.get_weights())
        d = res.to_dict()
        seconds = d.pop("seconds")
        curves = {k: d.pop(k) for k in ("iterations", "train_loss", "val_loss", "val_acc",
                                        "test_loss", "test_acc")}
        metrics.update(d)
        metrics["curves"] = curves
        self.save_json(rd / "timing.json", {"seconds": seconds, "kernel": self.kernel or "dense"})
        self.save_json(rd / "metrics.json", metrics)   # last: marks the round finished
        self._checked[rd] = (metrics, None)
        if self.progress:
            self.progress("done", seed=seed, strategy=strategy if r else "dense", round=r,
                          metrics=metrics, seconds=seconds)
        return metrics

    def run_dense(self, seed: int) -> dict:
        """Round 0 for ``seed`` (skipped when finished)."""
        if self.is_done(seed, "dense", 0):
            return self.metrics(seed, "dense", 0)
        model = self.build(seed)
        w0 = self.init_weights(seed, model)
        masks = {n: np.ones(w0[n].shape, bool) for n in model.prunable()}
        return self._train_round(seed, "dense", 0, model, w0, masks)

    def run_strategy(self, seed: int, strategy: str, rounds: int) -> list:
        """Rounds 1..``rounds`` of one strategy (finished rounds are skipped). Needs round 0."""
        find_strategy(strategy)   # an unknown name is a ValueError before any work
        out = [self.run_dense(seed)]
        model = self.build(seed)
        rates = self.recipe.prune.param_rates(model)
        for r in range(1, rounds + 1):
            if self.is_done(seed, strategy, r):
                out.append(self.metrics(seed, strategy, r))
                if out[-1].get("diverged"):
                    break
                continue
            if out[-1].get("diverged"):
                break
            m = self._next_round(seed, strategy, r, out[-1], model, rates)
            if m is None:
                break
            out.append(m)
            if m.get("diverged"):
                break
        return out

    def run_round(self, seed: int, strategy: str, r: int) -> dict | None:
        """Round ``r`` of one strategy alone (round 0: the dense round), skipped when finished. Round
        ``r - 1`` of the chain must be finished (RunFolderError otherwise); nothing before it is
        read. Returns the round's metrics, or None when the chain stops before round ``r`` (round
        ``r - 1`` diverged, or the ticket's chain did). Gives the bits :meth:`run_strategy` gives."""
        if strategy == "dense" or r == 0:
            return self.run_dense(seed)
        if self.is_done(seed, strategy, r):
            return self.metrics(seed, strategy, r)
        prev = self.metrics(seed, strategy, r - 1)
        if prev.get("diverged"):
            return None
        model = self.build(seed)
        return self._next_round(seed, strategy, r, prev, model, self.recipe.prune.param_rates(model))

    def _next_round(self, seed: int, strategy: str, r: int, prev: dict, model, rates) -> dict | None:
        """Prune, reset and train round ``r`` after the finished round whose metrics are ``prev``;
        None when the ticket's chain stops before round ``r``."""
        spec, args = find_strategy(strategy)
        if spec.masks is not None:   # the masks come from another chain (the ticket's)
            try:
                masks = spec.masks(self, seed, r, *args)
            except ChainStopped as e:
                self._tell(f"seed {seed} {strategy} stops before round {r}: {e}")
                return None
            prev_final = None
        else:
            folder, digests = self.round_dir(seed, strategy, r - 1), prev["files"]
            prev_final = self.load_arrays(folder / "final.npz", digests["final.npz"])
            prev_masks = self.load_arrays(folder / "masks.npz", digests["masks.npz"])
            masks = prune(prev_final, prev_masks, rates, self.recipe.prune.scope,
                          rng=stream(seed, PRUNE, r))
        start, lr_factor = spec.reset(self, seed, r, prev_final, *args)
        return self._train_round(seed, strategy, r, model, start, masks, lr_factor)

    def run(self, seeds=(0,), strategies=("rewind",), rounds: int = 3) -> list[dict]:
        """Run (or resume) every round of ``strategies`` for ``seeds`` one after another, and
        return every round's metrics (the dense round 0 of each seed first). Writes
        ``settings.json`` (the recipe and this plan) first, as the command line does."""
        seeds, strategies = [int(s) for s in seeds], list(strategies)
        for name in strategies:
            check_strategy(name, self.recipe.train)
        if self.data is None:
            raise ValueError("IMP.run needs data: IMP(recipe, run_dir, data=nprune.load_data())")
        self.prepare_folder({"strategies": strategies, "rounds": int(rounds), "seeds": seeds,
                             "kernel": self.kernel})
        rows = []
        for seed in seeds:
            rows.append(self.run_dense(seed))
            for name in strategies:
                rows.extend(self.run_strategy(seed, name, rounds)[1:])
        return rows


class ChainStopped(Exception):
    """A chain cannot go on (the chain it takes its masks from diverged)."""


class _NoEval:
    """A view of a data split with empty validation and test sets (for short snapshot runs)."""

    def __init__(self, data):
        self.x_train, self.y_train = data.x_train, data.y_train
        self.x_val = self.x_test = data.x_train[:0]
        self.y_val = self.y_test = data.y_train[:0]

