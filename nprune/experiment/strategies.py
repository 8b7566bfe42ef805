"""The reset strategies: what the survivors are set to before each round trains, as a registry.

Adding a strategy is one entry of :data:`STRATEGIES`. Each entry names its pattern (a regular
expression whose groups are integer arguments, e.g. K of ``rewind-to-K``), says what it does, how it
resets (a function of the IMP engine, the seed, the round and the previous round's final weights),
and where it goes in tables and plots. The random streams each purpose draws from are here too,
since a reset may draw (``reinit``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..pruning import random_like

# random streams
INIT, DATA, REINIT, PRUNE, TICKET_MASK = 0, 1, 2, 3, 4


def stream(seed: int, which: int, round_: int = 0) -> np.random.Generator:
    """The generator for one purpose of one seed and round."""
    return np.random.default_rng([int(seed), which, int(round_)])


# ---------------------------------------------------------------------------------------------------
# reset strategies

@dataclass(frozen=True)
class Strategy:
    """One reset strategy. ``pattern`` matches its names (a regular expression whose groups are its
    integer arguments, e.g. K of ``rewind-to-K``); ``reset(imp, seed, round, previous final weights,
    *args)`` returns ``(start weights, lr factor)`` for the survivors; ``order`` places it in tables
    and plots (then its arguments); ``color`` is its plot colour (None: one of the colour cycle);
    ``check(train_config, *args)`` returns what is wrong with the arguments for a recipe, or None;
    ``masks(imp, seed, round, *args)``, when given, makes the round's masks instead of the strategy's
    own IMP chain (whose previous round's final weights are then not read: ``prev`` is None)."""
    pattern: str
    about: str
    reset: Callable
    order: int
    color: str | None = None
    check: Callable | None = None
    masks: Callable | None = None


def _check_rewind_point(cfg, k: int) -> str | None:
    if k > cfg.iterations:
        return (f"rewinds to iteration {k}, beyond the {cfg.iterations} training iterations of a "
                f"round (--iterations)")
    return None


STRATEGIES = {
    "rewind": Strategy("rewind", "their original initial values (Frankle & Carbin's winning ticket)",
                       lambda imp, seed, r, prev: (imp.init_weights(seed), 1.0), 0, "tab:blue"),
    "reinit": Strategy("reinit", "a fresh draw from the same initialiser each round (the control)",
                       lambda imp, seed, r, prev: (imp.build(seed).fresh_params(stream(seed, REINIT, r)),
                                                   1.0), 1, "tab:orange"),
    "ticket-reinit": Strategy(
        "ticket-reinit", "the rewind chain's mask of the same round (the winning ticket's) with a "
        "fresh draw of the initialiser, the draw reinit makes (Frankle & Carbin's random "
        "reinitialisation control)",
        lambda imp, seed, r, prev: (imp.build(seed).fresh_params(stream(seed, REINIT, r)), 1.0), 2,
        "tab:red", masks=lambda imp, seed, r: imp.ticket_masks(seed, r)),
    "ticket-random-mask": Strategy(
        "ticket-random-mask", "the winning ticket's survivor count per layer at random positions, "
        "from the original initial values (Frankle & Carbin's random pruning control)",
        lambda imp, seed, r, prev: (imp.init_weights(seed), 1.0), 3, "tab:purple",
        masks=lambda imp, seed, r: random_like(imp.ticket_masks(seed, r), stream(seed, TICKET_MASK, r))),
    "finetune": Strategy("finetune", "their trained values, trained on at lr * finetune-lr-factor",
                         lambda imp, seed, r, prev: (prev, imp.recipe.finetune_lr_factor), 4,
                         "tab:green"),
    "rewind-to-K": Strategy(r"rewind-to-([0-9]+)", "their values after K iterations of the dense run "
                            "(e.g. rewind-to-500)",
                            lambda imp, seed, r, prev, k: (imp.rewind_weights(seed, k), 1.0), 5,
                            check=_check_rewind_point),
}


def find_strategy(name: str) -> tuple[Strategy, tuple]:
    """The strategy named ``name`` and its integer arguments; ValueError for an unknown name."""
    for spec in STRATEGIES.values():
        m = re.fullmatch(spec.pattern, name)
        if m:
            return spec, tuple(int(g) for g in m.groups())
    raise ValueError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}")


def check_strategy(name: str, train_config=None) -> str:
    """Return ``name`` if it names a strategy of :data:`STRATEGIES` whose arguments suit
    ``train_config`` (a :class:`~nprune.training.TrainConfig`, when given), else raise ValueError."""
    spec, args = find_strategy(name)
    problem = spec.check(train_config, *args) if spec.check and train_config is not None else None
    if problem:
        raise ValueError(f"{name} {problem}")
    return name


def strategy_order(name: str) -> tuple:
    """Sort key of tables and plots: the registry's order, then the arguments (rewind-to-K by K);
    names no strategy matches come last."""
    try:
        spec, args = find_strategy(name)
    except ValueError:
        return (len(STRATEGIES), name)
    return (spec.order, *args, name)


def strategy_color(name: str, i: int) -> str:
    """Plot colour of strategy ``name``, the ``i``-th line of its figure."""
    try:
        color = find_strategy(name)[0].color
    except ValueError:
        color = None
    return color or f"C{(i + 3) % 10}"
