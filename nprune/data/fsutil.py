"""Files written whole or not at all, the loaders that match them, and the per-user cache folder.

Every writer goes to a temporary file beside the target and moves it into place with ``os.replace``,
so a reader, or a process killed half-way, sees either the old file or the complete new one. Run
folders, IDX files and kernel-threshold tables are all written this way.
"""
from __future__ import annotations

import contextlib
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


def cache_dir() -> Path:
    """The per-user cache root: ``$XDG_CACHE_HOME/nprune`` when that variable is an absolute path,
    else ``~/.cache/nprune``. Data sets and the measured kernel thresholds live below it."""
    base = os.environ.get("XDG_CACHE_HOME") or ""
    root = Path(base) if os.path.isabs(base) else Path.home() / ".cache"
    return root / "nprune"
