"""Run folders: their layout, a name from a stable hash of the recipe, and reading finished rounds back.

A run folder holds everything one experiment recipe produced::

    <out>/<net>-<hash>/settings.json
    <out>/<net>-<hash>/seed_<s>/init.npz                  the original initialisation
    <out>/<net>-<hash>/seed_<s>/dense/                    round 0 (shared by every strategy)
    <out>/<net>-<hash>/seed_<s>/<strategy>/round_<r>/     rounds 1..R
        masks.npz  start.npz  final.npz  metrics.json  timing.json

A round is finished when its ``metrics.json`` exists; it is written last, and every file is written to
a temporary name and moved into place with ``os.replace`` (:mod:`nprune.data.fsutil`), so a kill at
any moment leaves either a finished round or no round. Rerunning the same command skips finished
rounds: resume for free.

The hash covers only what changes the numbers of a given (seed, strategy, round): net, data set,
initialiser, optimiser and its settings, iterations, evaluation period, validation size, pruning rates
and scope (:meth:`nprune.experiment.config.Recipe.to_dict`). Seeds, strategies and the number of
rounds are not hashed, so a rerun with more seeds or more rounds extends the same folder.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ..data.fsutil import atomic_save_npz, atomic_write_json, load_json, load_npz
from .strategies import strategy_order

SETTINGS = "settings.json"
METRICS = "metrics.json"


def stable_hash(obj, n: int = 10) -> str:
    """First ``n`` hex digits of the SHA-256 of ``obj``'s canonical JSON (sorted keys, no spaces)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def json_ready(v):
    """``v`` with every tuple turned into a list, recursively, as JSON would give it back."""
    if isinstance(v, (list, tuple)):
        return [json_ready(x) for x in v]
    if isinstance(v, dict):
        return {k: json_ready(x) for k, x in v.items()}
    return v


class RunFolder:
    """Paths and finished-round bookkeeping of one run folder ``dir``.

    With ``run_dir=None`` nothing touches the disk: the same files are kept in a dict (in memory),
    under the same relative paths, so an experiment can run from Python without a folder. Every
    read and write of a round's files goes through :meth:`exists`, :meth:`save_arrays`,
    :meth:`load_arrays`, :meth:`save_json` and :meth:`load_json`."""

    def __init__(self, run_dir=None):
        self.in_memory = run_dir is None
        self.dir = Path("." if run_dir is None else run_dir)
        self._files: dict = {}

    def seed_dir(self, seed: int) -> Path:
        return self.dir / f"seed_{seed}"

    def round_dir(self, seed: int, strategy: str, r: int) -> Path:
        """``seed_<s>/dense`` for round 0 (whatever ``strategy``), else ``seed_<s>/<strategy>/round_<r>``."""
        if r == 0:
            return self.seed_dir(seed) / "dense"
        return self.seed_dir(seed) / strategy / f"round_{r}"

    # ----- storage: files, or a dict when in memory -------------------------------------------------
    def exists(self, path: Path) -> bool:
        return path in self._files if self.in_memory else path.exists()

    def save_arrays(self, path: Path, arrays: dict) -> None:
        if self.in_memory:
            self._files[path] = {k: np.array(v) for k, v in arrays.items()}
        else:
            atomic_save_npz(path, arrays)

    def load_arrays(self, path: Path) -> dict:
        if self.in_memory:
            return {k: v.copy() for k, v in self._files[path].items()}
        return load_npz(path)

    def save_json(self, path: Path, obj) -> None:
        if self.in_memory:
            self._files[path] = json.loads(json.dumps(obj))
        else:
            atomic_write_json(path, obj)

    def load_json(self, path: Path):
        return json.loads(json.dumps(self._files[path])) if self.in_memory else load_json(path)

    # ----- rounds and settings ----------------------------------------------------------------------
    def is_done(self, seed: int, strategy: str, r: int) -> bool:
        return self.exists(self.round_dir(seed, strategy, r) / METRICS)

    def metrics(self, seed: int, strategy: str, r: int) -> dict:
        """The saved metrics of a finished round."""
        return self.load_json(self.round_dir(seed, strategy, r) / METRICS)

    def write_settings(self, recipe: dict, plan: dict) -> None:
        """``settings.json``: the hashed recipe and the plan of the latest run (not hashed)."""
        self.save_json(self.dir / SETTINGS, {"recipe": recipe, "hash_covers": "recipe only",
                                             "last_plan": plan})

    def settings(self) -> dict | None:
        path = self.dir / SETTINGS
        return self.load_json(path) if self.exists(path) else None


def collect(run_dir) -> list:
    """Every finished round's metrics in a run folder, sorted by (seed, strategy, round)."""
    run_dir = Path(run_dir)
    rows = []
    for p in sorted(run_dir.glob(f"seed_*/dense/{METRICS}")) + \
            sorted(run_dir.glob(f"seed_*/*/round_*/{METRICS}")):
        rows.append(load_json(p))
    rows.sort(key=lambda m: (m["seed"], m["strategy"], m["round"]))
    return rows


def by_strategy(rows: list) -> dict:
    """{strategy: {round: [metrics of each seed]}}; the dense round 0 joins every strategy."""
    dense = [m for m in rows if m["round"] == 0]
    strategies = sorted({m["strategy"] for m in rows if m["round"] > 0}, key=strategy_order)
    out = {}
    for s in strategies:
        d = {0: dense}
        for m in rows:
            if m["strategy"] == s and m["round"] > 0:
                d.setdefault(m["round"], []).append(m)
        out[s] = d
    if not strategies and dense:
        out["dense"] = {0: dense}
    return out
