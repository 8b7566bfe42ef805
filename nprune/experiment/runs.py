"""Run folders: their layout, a name from a stable hash of the recipe, and finished rounds that are
checked before they are believed.

A run folder holds everything one experiment recipe produced::

    <out>/<net>-<hash>/settings.json
    <out>/<net>-<hash>/seed_<s>/init.npz  init.json        the original initialisation and its record
    <out>/<net>-<hash>/seed_<s>/dense/                     round 0 (shared by every strategy)
    <out>/<net>-<hash>/seed_<s>/<strategy>/round_<r>/      rounds 1..R
        masks.npz  start.npz  final.npz  metrics.json  timing.json

Every file is written to a temporary name and moved into place with ``os.replace``
(:mod:`nprune.data.fsutil`), and a round's ``metrics.json`` is written last: it records the recipe
hash and the SHA-256 of each of the round's array files. A round is *finished* only when its
``metrics.json`` reads as a round's metrics, names the seed, strategy and round of its folder and the
folder's recipe, and every array file it records is there with that digest (:meth:`RunFolder.check_round`).
Anything else -- a file missing, truncated, edited or unreadable -- makes the round unfinished: a run
recomputes it (saying which file and why), ``report`` names it and stops. Arrays kept outside a round
(``init.npz``, the dense rewind points ``dense/rewind_<k>.npz``) have a record of their own beside them
(``init.json``, ``rewind_<k>.json``). Rerunning the same command skips finished rounds: resume for free.

The hash covers only what changes the numbers of a given (seed, strategy, round): net, data set,
initialiser, optimiser and its settings, iterations, evaluation period, validation size, pruning rates
and scope (:meth:`nprune.experiment.config.Recipe.to_dict`). Seeds, strategies and the number of
rounds are not hashed, so a rerun with more seeds or more rounds extends the same folder.
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

import numpy as np

from ..data.fsutil import (CorruptFileError, atomic_write_bytes, atomic_write_json, load_json,
                           npz_bytes, npz_from_bytes, sha256_file)
from .strategies import find_strategy, strategy_order

SETTINGS = "settings.json"
METRICS = "metrics.json"
ROUND_FILES = ("masks.npz", "start.npz", "final.npz")   # a diverged round has no final.npz


class RunFolderError(ValueError):
    """A run folder that cannot be used as it is; the message names the file and what is wrong."""


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


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def metrics_problem(m, seed: int, strategy: str, r: int) -> str | None:
    """What is wrong with ``m`` as the metrics of round ``r`` of ``strategy`` for ``seed``, or None.
    Checks the types the tables read and that the metrics name the folder they lie in."""
    if not isinstance(m, dict):
        return f"holds a {type(m).__name__}, not a round's metrics"
    for key, ok in (("seed", _is_int), ("strategy", lambda v: isinstance(v, str)), ("round", _is_int),
                    ("percent_left", _is_num), ("lr", _is_num), ("diverged", lambda v: isinstance(v, bool)),
                    ("weights", lambda v: isinstance(v, dict) and "total" in v),
                    ("files", lambda v: isinstance(v, dict)), ("recipe_hash", lambda v: isinstance(v, str))):
        if key not in m or not ok(m[key]):
            return f"has no valid {key!r}"
    where = (seed, "dense" if r == 0 else strategy, r)
    if (m["seed"], m["strategy"], m["round"]) != where:
        return (f"says seed {m['seed']}, {m['strategy']} round {m['round']}, but lies in the folder of "
                f"seed {where[0]}, {where[1]} round {r}")
    for name, w in m["weights"].items():
        if not (isinstance(w, dict) and _is_int(w.get("left")) and _is_num(w.get("percent"))):
            return f"has no valid weights of {name}"
    if not m["diverged"]:
        for key in ("early_stop_iter", "early_stop_val_loss", "early_stop_val_acc", "early_stop_test_acc",
                    "final_val_acc", "final_test_acc"):
            if not _is_num(m.get(key)):
                return f"has no valid {key!r}"
        c = m.get("curves")
        if not (isinstance(c, dict) and all(isinstance(v, list) for v in c.values())
                and len({len(v) for v in c.values()}) <= 1
                and all(_is_num(x) for v in c.values() for x in v)):
            return "has no valid curves"
    return None


class RunFolder:
    """Paths, verified storage and finished-round bookkeeping of one run folder ``dir``.

    With ``run_dir=None`` nothing touches the disk: the same files are kept in a dict (in memory),
    under the same relative paths, so an experiment can run from Python without a folder. Every
    read and write of a round's files goes through :meth:`exists`, :meth:`save_arrays`,
    :meth:`load_arrays`, :meth:`save_json` and :meth:`load_json`. ``recipe_hash`` is the hash of
    the recipe whose rounds are finished here; ``notice(text)`` receives one line for each round
    found unfinished that had looked finished (None: silent)."""

    def __init__(self, run_dir=None, recipe_hash: str | None = None, notice=None):
        self.in_memory = run_dir is None
        self.dir = Path("." if run_dir is None else run_dir)
        self.recipe_hash = recipe_hash
        self.notice = notice
        self._files: dict = {}
        self._checked: dict = {}   # round folder -> (metrics or None, problem or None)
        self._told: set = set()    # rounds whose problem ``notice`` has heard

    def seed_dir(self, seed: int) -> Path:
        return self.dir / f"seed_{seed}"

    def round_dir(self, seed: int, strategy: str, r: int) -> Path:
        """``seed_<s>/dense`` for round 0 (whatever ``strategy``), else ``seed_<s>/<strategy>/round_<r>``."""
        if r == 0:
            return self.seed_dir(seed) / "dense"
        return self.seed_dir(seed) / strategy / f"round_{r}"

    def rel(self, path: Path) -> str:
        """``path`` as it reads inside the run folder (``seed_0/rewind/round_2/final.npz``)."""
        try:
            return str(Path(path).relative_to(self.dir))
        except ValueError:
            return str(path)

    def _inside(self, path: Path) -> None:
        """Refuse a path below a symbolic link inside the run folder: nothing is read or written
        through a link that could lead out of it."""
        if self.in_memory:
            return
        p = Path(path).parent
        while p != self.dir and self.dir in p.parents:
            if p.is_symlink():
                raise RunFolderError(f"{p}: a symbolic link inside the run folder; nprune does not "
                                     "read or write through it: remove it")
            p = p.parent

    # ----- storage: files, or a dict when in memory -------------------------------------------------
    def exists(self, path: Path) -> bool:
        if self.in_memory:
            return path in self._files
        self._inside(path)
        return path.exists()

    def save_arrays(self, path: Path, arrays: dict) -> str:
        """Save ``arrays`` as ``.npz`` at ``path``; returns the file's SHA-256."""
        data = npz_bytes(arrays)
        if self.in_memory:
            self._files[path] = data
        else:
            self._inside(path)
            atomic_write_bytes(path, data)
        return hashlib.sha256(data).hexdigest()

    def load_arrays(self, path: Path, sha256: str | None = None) -> dict:
        """The arrays of ``path``; with ``sha256``, a file of another digest is a RunFolderError."""
        if self.in_memory:
            data = self._files[path]
        else:
            self._inside(path)
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                raise RunFolderError(f"{path}: missing") from None
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            raise RunFolderError(f"{path}: its SHA-256 differs from the one recorded when it was "
                                 "written (changed or damaged)")
        try:
            return npz_from_bytes(data, path)
        except CorruptFileError as e:
            raise RunFolderError(str(e)) from None

    def save_json(self, path: Path, obj) -> None:
        if self.in_memory:
            self._files[path] = json.loads(json.dumps(obj))
        else:
            self._inside(path)
            atomic_write_json(path, obj)

    def load_json(self, path: Path):
        if self.in_memory:
            return json.loads(json.dumps(self._files[path]))
        self._inside(path)
        return load_json(path)

    def _digest(self, path: Path) -> str | None:
        if self.in_memory:
            data = self._files.get(path)
            return None if data is None else hashlib.sha256(data).hexdigest()
        return sha256_file(path) if path.is_file() else None

    # ----- arrays kept outside a round, each with a record beside it --------------------------------
    def save_recorded(self, path: Path, arrays: dict) -> None:
        """Save ``arrays`` at ``path`` and then its record ``<stem>.json`` (digest and recipe)."""
        digest = self.save_arrays(path, arrays)
        self.save_json(path.with_suffix(".json"), {"file": path.name, "sha256": digest,
                                                   "recipe_hash": self.recipe_hash})

    def load_recorded(self, path: Path) -> dict | None:
        """The arrays saved by :meth:`save_recorded`, or None when they are missing or do not match
        their record (then ``notice`` hears why, and the caller makes them again)."""
        record = path.with_suffix(".json")
        if not self.exists(path) and not self.exists(record):
            return None
        try:
            rec = self.load_json(record)
            if not (isinstance(rec, dict) and rec.get("recipe_hash") == self.recipe_hash
                    and isinstance(rec.get("sha256"), str)):
                raise RunFolderError(f"{record}: not a record of this recipe's {path.name}")
            return self.load_arrays(path, rec["sha256"])
        except (RunFolderError, CorruptFileError, FileNotFoundError) as e:
            self._tell(f"{self.rel(path)} is made again: {_short(e, self)}")
            return None

    # ----- rounds and settings ----------------------------------------------------------------------
    def check_round(self, seed: int, strategy: str, r: int) -> tuple:
        """``(metrics, None)`` for a finished round, ``(None, None)`` for a round never finished and
        ``(None, problem)`` for one whose files do not check out (see the module docstring)."""
        rd = self.round_dir(seed, strategy, r)
        if rd in self._checked:
            return self._checked[rd]
        path = rd / METRICS
        result = (None, None)
        if self.exists(path):
            result = (None, self._problem(seed, strategy, r, path))
            if result[1] is None:
                result = (self.load_json(path), None)
        self._checked[rd] = result
        return result

    def _problem(self, seed, strategy, r, path) -> str | None:
        try:
            m = self.load_json(path)
        except (CorruptFileError, OSError) as e:
            return METRICS + ": " + str(e).removeprefix(f"{path}: ")
        problem = metrics_problem(m, seed, strategy, r)
        if problem:
            return f"{METRICS} {problem}"
        if self.recipe_hash is not None and m["recipe_hash"] != self.recipe_hash:
            return f"{METRICS} is of recipe {m['recipe_hash']}, not this folder's {self.recipe_hash}"
        needed = ROUND_FILES[:2] if m["diverged"] else ROUND_FILES
        for name in needed:
            if not isinstance(m["files"].get(name), str):
                return f"{METRICS} records no digest of {name}"
        for name, digest in m["files"].items():
            got = self._digest(path.parent / name) if name in ROUND_FILES else None
            if got is None:
                return f"{name} is missing"
            if got != digest:
                return f"{name} differs from the SHA-256 in {METRICS} (changed or damaged)"
        return None

    def is_done(self, seed: int, strategy: str, r: int) -> bool:
        m, problem = self.check_round(seed, strategy, r)
        if problem and (seed, strategy if r else "dense", r) not in self._told:
            self._told.add((seed, strategy if r else "dense", r))
            self._tell(f"{self.rel(self.round_dir(seed, strategy, r))} is not finished ({problem}); "
                       "it is computed again")
        return m is not None

    def forget(self, seed: int, strategy: str, r: int) -> None:
        """Drop what :meth:`check_round` knows of a round (it is being written again)."""
        self._checked.pop(self.round_dir(seed, strategy, r), None)

    def metrics(self, seed: int, strategy: str, r: int) -> dict:
        """The saved metrics of a finished round (RunFolderError if it is not finished)."""
        m, problem = self.check_round(seed, strategy, r)
        if m is None:
            raise RunFolderError(f"{self.round_dir(seed, strategy, r)}: "
                                 + (problem or "not finished"))
        return m

    def write_settings(self, recipe: dict, plan: dict) -> None:
        """``settings.json``: the hashed recipe and the plan of the latest run (not hashed)."""
        self.save_json(self.dir / SETTINGS, {"recipe": recipe, "hash_covers": "recipe only",
                                             "last_plan": plan})

    def settings(self) -> dict | None:
        path = self.dir / SETTINGS
        return self.load_json(path) if self.exists(path) else None

    def _tell(self, text: str) -> None:
        if self.notice is not None:
            self.notice(text)


def _short(err, folder: RunFolder) -> str:
    """An error's message with the run folder's path cut from the front."""
    text = str(err)
    prefix = str(folder.dir) + "/"
    return text.replace(prefix, "")


def print_notice(text: str) -> None:
    print(f"nprune: {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------
# reading a whole folder back

_FOLDER = re.compile(r"^[a-z0-9]+-([0-9a-f]{10})$")


def folder_recipe_hash(run_dir) -> str | None:
    """The recipe hash of a run folder, from its ``settings.json``, checked against the hash in the
    folder's name (``<net>-<hash>``) when it has one (RunFolderError when they disagree). None when
    neither says (a folder filled from Python without :meth:`IMP.run`)."""
    run_dir = Path(run_dir)
    folder = RunFolder(run_dir)
    named = _FOLDER.match(run_dir.name)
    try:
        settings = folder.settings()
    except CorruptFileError as e:
        raise RunFolderError(str(e)) from None
    if settings is None:
        return named.group(1) if named else None
    if not (isinstance(settings, dict) and isinstance(settings.get("recipe"), dict)):
        raise RunFolderError(f"{run_dir / SETTINGS}: holds no recipe")
    h = stable_hash(settings["recipe"])
    if named and h != named.group(1):
        raise RunFolderError(f"{run_dir / SETTINGS}: its recipe hashes to {h}, not to the folder's "
                             f"{named.group(1)} (edited?)")
    return h


def round_folders(run_dir) -> list:
    """``(seed, strategy, round)`` of every folder that may hold a round, read from the names
    (``seed_<s>/dense``, ``seed_<s>/<strategy>/round_<r>`` with a strategy of the registry)."""
    out = []
    for sd in sorted(Path(run_dir).glob("seed_*")):
        m = re.fullmatch(r"seed_(0|[1-9][0-9]{0,9})", sd.name)
        if not m or not sd.is_dir():
            continue
        seed = int(m.group(1))
        if (sd / "dense" / METRICS).exists() or (sd / "dense").is_symlink():
            out.append((seed, "dense", 0))
        for st in sorted(p for p in sd.iterdir() if p.is_dir() and p.name != "dense"):
            try:
                find_strategy(st.name)
            except ValueError:
                continue
            for rd in st.glob("round_*"):
                rm = re.fullmatch(r"round_([1-9][0-9]{0,5})", rd.name)
                if rm and ((rd / METRICS).exists() or rd.is_symlink()):
                    out.append((seed, st.name, int(rm.group(1))))
    return out


def collect(run_dir, strict: bool = True, notice=None) -> list:
    """Every finished round's metrics in a run folder, sorted by (seed, strategy, round), each
    checked (:meth:`RunFolder.check_round`). ``strict``: a round that does not check out is a
    RunFolderError naming it; otherwise it is left out and ``notice`` hears why."""
    run_dir = Path(run_dir)
    folder = RunFolder(run_dir, folder_recipe_hash(run_dir))
    rows, bad = [], []
    for seed, strategy, r in round_folders(run_dir):
        try:
            m, problem = folder.check_round(seed, strategy, r)
        except RunFolderError as e:
            m, problem = None, _short(e, folder)
        if m is not None:
            rows.append(dict(m, **_timing(folder, seed, strategy, r, m)))
        elif problem:
            bad.append(f"{folder.rel(folder.round_dir(seed, strategy, r))}: {problem}")
    hashes = sorted({m["recipe_hash"] for m in rows})
    if len(hashes) > 1:   # only without settings.json and a hashed name; else check_round compares
        raise RunFolderError(f"{run_dir}: holds rounds of {len(hashes)} recipes ({', '.join(hashes)})")
    if bad and strict:
        more = f" (and {len(bad) - 1} more rounds)" if len(bad) > 1 else ""
        raise RunFolderError(f"{run_dir}: {bad[0]}{more}; rerun the run command to compute it again")
    for line in bad:
        if notice:
            notice(f"left out of the report: {line}")
    rows.sort(key=lambda m: (m["seed"], m["strategy"], m["round"]))
    return rows


def _timing(folder: RunFolder, seed: int, strategy: str, r: int, m: dict) -> dict:
    """``seconds`` (the round's wall time, training and evaluation), ``ms_per_iteration`` and
    ``kernel`` from the round's ``timing.json``; empty when it is missing or malformed (timings are
    not part of the results, so they are not digested; a bad one is simply not shown)."""
    try:
        t = folder.load_json(folder.round_dir(seed, strategy, r) / "timing.json")
        seconds = float(t["seconds"])
        iterations = (m.get("curves") or {}).get("iterations") or [0]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    if not (seconds >= 0 and np.isfinite(seconds)) or not iterations[-1]:
        return {}
    return {"seconds": seconds, "ms_per_iteration": 1e3 * seconds / iterations[-1],
            "kernel": t.get("kernel") if isinstance(t.get("kernel"), str) else None}


def by_strategy(rows: list) -> dict:
    """{strategy: {round: [metrics of each seed]}}; the dense round 0 joins every strategy."""
    dense = [m for m in rows if m["round"] == 0]
    strategies = sorted({m["strategy"] for m in rows if m["round"] > 0}, key=strategy_order)
    out = {}
    for s in strategies:
        d = {0: dense} if dense else {}
        for m in rows:
            if m["strategy"] == s and m["round"] > 0:
                d.setdefault(m["round"], []).append(m)
        out[s] = d
    if not strategies and dense:
        out["dense"] = {0: dense}
    return out


def strategy_labels(groups: dict, seeds: list) -> dict:
    """{strategy: its label in tables and legends}: the strategy's name, with its own seeds when
    its pruned rounds cover fewer than the run's ``seeds`` (``ticket-reinit (seed 0)``), so that
    a mean over one seed is not read as a mean over all of them."""
    names = {}
    for s, by_round in groups.items():
        own = sorted({m["seed"] for r, ms in by_round.items() if r > 0 for m in ms})
        names[s] = s
        if own and len(own) < len(seeds):
            names[s] = f"{s} (seed{'s' if len(own) > 1 else ''} {', '.join(map(str, own))})"
    return names
