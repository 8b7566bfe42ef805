"""The Python API: build a net, train it, prune it, rewind it, and run whole IMP experiments.

Everything here is a thin, checked layer over the modules that hold the math and the engine
(:mod:`nprune.nets`, :mod:`nprune.training`, :mod:`nprune.pruning`, :mod:`nprune.experiment.imp`);
``nprune/__init__.py`` exports these names. Layers and masks are named as the model names them: a
layer name (``"fc1"``) stands for its prunable weight, a parameter name (``"fc1.W"``) for itself.
"""
from __future__ import annotations

import dataclasses
import numbers

import numpy as np

from . import nets
from .data.datasets import Splits, load_dataset, prepare
from .experiment.config import preset_recipe
from .experiment.imp import IMP
from .kernels import apply_kernel
from .model import Sequential
from .pruning import SCOPES, prune as _prune_masks, sparsity_report
from .training import TrainConfig, TrainResult, train as _train


def load_data(dataset: str = "mnist", data_dir=None, n_val: int = 5000, seed: int = 0,
              download: bool = True) -> Splits:
    """The train / validation / test splits of ``dataset`` ("mnist" or "fashion-mnist") as float32
    images scaled to [0, 1]. The files are found as the command line finds them: ``data_dir``,
    ``$NPRUNE_DATA_DIR``, the user cache, system folders; else downloaded into the cache and
    verified (``download=False`` forbids that). ``n_val`` training images, drawn with ``seed``, are
    held out for validation (the early stop)."""
    return prepare(load_dataset(dataset, data_dir=data_dir, download=download), n_val=n_val, seed=seed)


def build(net: str = "lenet300", seed: int | np.random.Generator = 0, init: str = "glorot_normal",
          kernel: str = "dense") -> Sequential:
    """A new ``net`` ("lenet300" or "lenet5") with weights drawn from ``init``. ``seed`` is an int
    or a ``np.random.Generator``; ``kernel`` is how its layers compute: "dense", "sparse" or "auto"."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    model = nets.build(net, rng, init=init)
    if kernel != "dense":
        apply_kernel(model, kernel)
    return model


def train(model: Sequential, data: Splits, iterations: int = 2000, seed: int = 0,
          **settings) -> TrainResult:
    """Train ``model`` in place for ``iterations`` steps and return its curves and early stop.

    ``settings`` are :class:`~nprune.training.TrainConfig` fields (``optimizer``, ``lr``,
    ``momentum``, ``weight_decay``, ``batch_size``, ``eval_every``, ``eval_batch``); ``seed`` fixes
    the order of the training batches. Pruned weights stay exactly zero."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(settings) - names)
    if unknown:
        raise TypeError(f"unknown training setting(s) {', '.join(unknown)}; "
                        f"known: {', '.join(sorted(names - {'iterations'}))}")
    cfg = TrainConfig(**{**settings, "iterations": iterations})
    result, _ = _train(model, data, cfg, np.random.default_rng(seed))
    return result


def _rates_by_parameter(model: Sequential, rates) -> dict[str, float]:
    if isinstance(rates, numbers.Real):
        return {name: float(rates) for name in model.prunable()}
    out: dict[str, float] = {}
    for name, r in dict(rates).items():
        pname = model.prunable_name(name)
        if pname in out:
            raise ValueError(f"two rates for {pname} ({name!r} names it again)")
        out[pname] = float(r)
    return out


def prune(model: Sequential, rates, scope: str = "layer",
          rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """Prune ``model`` in place by weight magnitude and return its new masks (bool, True keeps).

    ``rates``: one fraction for every prunable layer, or ``{name: fraction}`` by layer name
    (``"fc1"``) or parameter name (``"fc1.W"``); each named tensor loses ``round(rate *
    survivors)`` of its survivors (the weights its mask still keeps), so masks nest round after
    round. ``scope``: "layer" (per tensor), "global" (one magnitude threshold over all named
    tensors) or "random" (the same counts at random positions; needs ``rng``). An unknown name is
    a ValueError that lists the valid ones."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; choose from {', '.join(SCOPES)}")
    by_param = _rates_by_parameter(model, rates)
    masks = model.bool_masks()
    named = {n: m for n, m in masks.items() if n in by_param}   # global: a threshold over these only
    masks.update(_prune_masks(model.get_weights(), named, by_param, scope, rng=rng))
    model.set_masks(masks)
    return masks


def rewind(model: Sequential, weights: dict[str, np.ndarray]) -> None:
    """Reset ``model``'s weights to ``weights`` (e.g. the initialisation saved with
    ``model.get_weights()`` before training), keeping its masks: pruned weights stay zero."""
    model.set_weights(weights)


def density(model: Sequential) -> float:
    """Fraction of the prunable weights the masks keep (1.0 for an unpruned net)."""
    return sparsity_report(model.bool_masks())["total"]["percent"] / 100.0


def recipe(net: str = "lenet300", preset: str = "default", **settings):
    """An IMP recipe (:class:`~nprune.experiment.config.Recipe`) for ``net``: the preset's
    settings for that net, with ``settings`` (flat names, as the command line's flags:
    ``iterations``, ``lr``, ``eval_every``, ``rates``, ``scope``, ...) winning. Checked."""
    return preset_recipe(preset, net, overrides=settings)[0]


def imp(recipe, data: Splits | None = None, run_dir=None, kernel: str = "dense") -> IMP:
    """The IMP engine for ``recipe``: ``imp(...).run(seeds, strategies, rounds)`` trains the dense
    round 0 and every pruning round, and returns each round's metrics. With ``run_dir`` it writes
    (and resumes) a run folder exactly as ``python -m nprune.experiment`` does; without, it keeps
    everything in memory. ``data`` defaults to :func:`load_data` of the recipe's data set."""
    if data is None:
        data = load_data(recipe.dataset, n_val=recipe.n_val)
    return IMP(recipe, run_dir, data=data, kernel=kernel)
