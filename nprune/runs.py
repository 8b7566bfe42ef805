"""Run folders: settings as a frozen dataclass, a folder named by a stable hash of them, atomic writes.

A run folder holds everything one experiment recipe produced::

    <out>/<net>-<hash>/settings.json
    <out>/<net>-<hash>/seed_<s>/init.npz                  the original initialisation
    <out>/<net>-<hash>/seed_<s>/dense/                    round 0 (shared by every strategy)
    <out>/<net>-<hash>/seed_<s>/<strategy>/round_<r>/     rounds 1..R
        masks.npz  start.npz  final.npz  metrics.json  timing.json

A round is finished when its ``metrics.json`` exists; it is written last, and every file is written to
a temporary name and moved into place with ``os.replace``, so a kill at any moment leaves either a
finished round or no round. Rerunning the same command skips finished rounds: resume for free.

The hash covers only what changes the numbers of a given (seed, strategy, round): net, data set,
initialiser, optimiser and its settings, iterations, evaluation period, validation size, pruning rates
and scope. Seeds, strategies and the number of rounds are not hashed, so a rerun with more seeds or
more rounds extends the same folder.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np


@contextlib.contextmanager
def atomic_open(path):
    """Open a temporary file beside ``path`` for binary writing; on a clean exit it is flushed,
    fsynced and moved onto ``path`` with ``os.replace``; on any error it is removed. A reader (or
    a process killed half-way) therefore sees either the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_open`)."""
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj) -> None:
    """JSON with sorted keys and a fixed layout, so equal data gives equal bytes."""
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True, allow_nan=True) + "\n")


def atomic_save_npz(path, arrays: dict, compress: bool = True) -> None:
    """Save a dict of arrays as ``.npz`` (never pickles) atomically."""
    with atomic_open(path) as f:
        (np.savez_compressed if compress else np.savez)(f, **arrays)


def load_npz(path) -> dict:
    """Load an ``.npz`` into a dict, with ``allow_pickle=False``."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def load_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def stable_hash(obj, n: int = 10) -> str:
    """First ``n`` hex digits of the SHA-256 of ``obj``'s canonical JSON."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def dataclass_dict(dc) -> dict:
    """``dataclasses.asdict`` with tuples turned into lists (JSON-stable)."""
    def fix(v):
        if isinstance(v, (list, tuple)):
            return [fix(x) for x in v]
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        return v
    return {k: fix(v) for k, v in dataclasses.asdict(dc).items()}
