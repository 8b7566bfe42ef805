"""Pruning: which weights go at each round.

Every function takes the current weights and the current masks (bool, True = alive) and returns new
masks. Only survivors are candidates, so masks nest: a pruned weight never comes back.

Rounding rule: a tensor with ``n`` survivors and rate ``p`` loses exactly ``k = floor(p * n + 0.5)``
weights (round half up). Tie rule: among survivors of equal magnitude the one with the lower flat
index (C order; across tensors, the earlier tensor in layer order) is pruned first. Both make the
result a pure function of the inputs, with no dependence on sort stability.
"""
from __future__ import annotations

import math

import numpy as np


def n_to_prune(rate: float, survivors: int) -> int:
    """``floor(rate * survivors + 0.5)``: the number of weights a round removes."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"pruning rate must be in [0, 1), got {rate}")
    return int(math.floor(rate * survivors + 0.5))


def _smallest_k(values: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` smallest entries of 1-D ``values``; ties broken by lower position.

    ``argpartition`` finds the k-th smallest value ``t`` in O(n); everything below ``t`` goes, and the
    remaining places are filled by the lowest-indexed entries equal to ``t``.
    """
    if k <= 0:
        return np.zeros(0, np.intp)
    if k >= values.size:
        return np.arange(values.size)
    t = values[np.argpartition(values, k - 1)[k - 1]]
    below = np.flatnonzero(values < t)
    equal = np.flatnonzero(values == t)[: k - below.size]
    return np.sort(np.concatenate([below, equal]))


def magnitude_layerwise(weights: dict, masks: dict, rates: dict) -> dict:
    """Per tensor: remove the ``k = round(rate * survivors)`` surviving weights of smallest ``|w|``.

    weights : {name: array}; masks : {name: bool array}; rates : {name: rate} (names absent from
    ``rates`` are left as they are). Returns new bool masks (copies).
    """
    out = {}
    for name, mask in masks.items():
        new = mask.copy()
        rate = rates.get(name, 0.0)
        alive = np.flatnonzero(mask.ravel())
        k = n_to_prune(rate, alive.size)
        if k:
            mag = np.abs(weights[name].ravel()[alive])
            new.ravel()[alive[_smallest_k(mag, k)]] = False
        out[name] = new
    return out


def magnitude_global(weights: dict, masks: dict, rate: float) -> dict:
    """One threshold over the survivors of all tensors in ``masks``: remove
    ``k = round(rate * total survivors)`` weights of smallest ``|w|`` wherever they are."""
    names = list(masks)
    alive = [np.flatnonzero(masks[n].ravel()) for n in names]
    mags = np.concatenate([np.abs(weights[n].ravel()[a]) for n, a in zip(names, alive)])
    k = n_to_prune(rate, mags.size)
    chosen = _smallest_k(mags, k)
    out = {n: masks[n].copy() for n in names}
    start = 0
    for n, a in zip(names, alive):
        sel = chosen[(chosen >= start) & (chosen < start + a.size)] - start
        out[n].ravel()[a[sel]] = False
        start += a.size
    return out


def random_layerwise(masks: dict, rates: dict, rng: np.random.Generator) -> dict:
    """The random control: the same per-tensor counts as :func:`magnitude_layerwise`, at positions
    drawn uniformly (without replacement) among the survivors with ``rng``."""
    out = {}
    for name, mask in masks.items():
        new = mask.copy()
        alive = np.flatnonzero(mask.ravel())
        k = n_to_prune(rates.get(name, 0.0), alive.size)
        if k:
            new.ravel()[rng.choice(alive, size=k, replace=False)] = False
        out[name] = new
    return out


def random_like(masks: dict, rng: np.random.Generator) -> dict:
    """Masks with the same number of survivors per tensor as ``masks``, at positions drawn
    uniformly (without replacement) over the whole tensor with ``rng``: Frankle & Carbin's random
    pruning control, a random sparse network with the ticket's layer-wise sparsity."""
    out = {}
    for name, mask in masks.items():
        new = np.zeros(mask.shape, bool)
        new.ravel()[rng.choice(mask.size, size=int(np.count_nonzero(mask)), replace=False)] = True
        out[name] = new
    return out


SCOPES = ("layer", "global", "random")


def prune(weights: dict, masks: dict, rates: dict, scope: str = "layer",
          rng: np.random.Generator | None = None) -> dict:
    """Dispatch on ``scope``: ``layer`` (per-tensor magnitude), ``global`` (one magnitude threshold;
    the rate used is the survivor-weighted mean of ``rates``, so the total count removed matches the
    layer-wise schedule) or ``random`` (same counts as ``layer``, random positions; needs ``rng``)."""
    if scope == "layer":
        return magnitude_layerwise(weights, masks, rates)
    if scope == "global":
        alive = {n: int(m.sum()) for n, m in masks.items()}
        total = sum(alive.values())
        removed = sum(n_to_prune(rates.get(n, 0.0), a) for n, a in alive.items())
        return magnitude_global(weights, masks, removed / total if total else 0.0)
    if scope == "random":
        if rng is None:
            raise ValueError("random pruning needs an rng")
        return random_layerwise(masks, rates, rng)
    raise ValueError(f"unknown pruning scope {scope!r}; choose from {', '.join(SCOPES)}")


def sparsity_report(masks: dict) -> dict:
    """{name: {"left": int, "total": int, "percent": float}} plus a ``"total"`` entry."""
    rep = {}
    left_all = total_all = 0
    for name, m in masks.items():
        left, total = int(np.count_nonzero(m)), int(m.size)
        rep[name] = {"left": left, "total": total, "percent": 100.0 * left / total}
        left_all += left
        total_all += total
    rep["total"] = {"left": left_all, "total": total_all,
                    "percent": 100.0 * left_all / total_all if total_all else 0.0}
    return rep
