"""Files written whole or not at all, the loaders that match them, and the per-user cache folder.

Every writer goes to a temporary file beside the target and moves it into place with ``os.replace``,
so a reader, or a process killed half-way, sees either the old file or the complete new one. Run
folders, IDX files and kernel-threshold tables are all written this way.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np


@contextlib.contextmanager
def atomic_open(path):
    """Open a temporary file beside ``path`` for binary writing; on a clean exit it is flushed,
    fsynced and moved onto ``path`` with ``os.replace``; on any error it is removed. A reader (or
    a process killed half-way) therefore sees either the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the writer's pid in the name lets remove_stale_temporaries tell a dead writer's leftovers
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and not e.filename and e.errno:
            # a failed write (disk full, file size limit) names no file: name the target
            raise OSError(e.errno, e.strerror, str(path)) from None
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


class CorruptFileError(ValueError):
    """A file that cannot be read as what it should be; the message names the file."""


def npz_bytes(arrays: dict, compress: bool = True) -> bytes:
    """The ``.npz`` of ``arrays`` as ``np.savez(_compressed)`` writes it (never pickles), but with
    every entry dated 1980-01-01, so equal arrays give equal bytes (and equal SHA-256 digests)."""
    buf = io.BytesIO()
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(buf, "w", compression=method) as zf:
        for name, a in arrays.items():
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = method
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(a), allow_pickle=False)
    return buf.getvalue()


def atomic_save_npz(path, arrays: dict, compress: bool = True) -> str:
    """Save a dict of arrays as ``.npz`` (:func:`npz_bytes`) atomically; returns its SHA-256."""
    data = npz_bytes(arrays, compress)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def npz_from_bytes(data: bytes, name) -> dict:
    """The arrays of an ``.npz`` held in ``data`` (read from the file ``name``), with
    ``allow_pickle=False``; a damaged or foreign file is a :class:`CorruptFileError` naming it."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        # NumPy's own message for a non-npz file advises allow_pickle=True: never repeat it
        why = "unknown format" if "pickle" in str(e) else (str(e).splitlines() or ["damaged"])[0][:80]
        raise CorruptFileError(f"{name}: not a readable .npz file ({why})") from None


def load_npz(path) -> dict:
    """Load an ``.npz`` into a dict, with ``allow_pickle=False`` (:func:`npz_from_bytes`)."""
    return npz_from_bytes(Path(path).read_bytes(), path)


#: JSON files nprune reads are small (a round's metrics.json with its curves is well below this).
MAX_JSON_BYTES = 64 << 20


def load_json(path):
    """The JSON value in ``path``; malformed, too large, too deeply nested or non-UTF-8 content is
    a :class:`CorruptFileError` naming the file."""
    path = Path(path)
    if path.stat().st_size > MAX_JSON_BYTES:
        raise CorruptFileError(f"{path}: too large for a JSON file of nprune ({path.stat().st_size} bytes)")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except json.JSONDecodeError as e:
        raise CorruptFileError(f"{path}: not valid JSON ({e.msg}, line {e.lineno} column {e.colno})") from None
    except UnicodeDecodeError:
        raise CorruptFileError(f"{path}: not valid JSON (not UTF-8 text)") from None
    except RecursionError:
        raise CorruptFileError(f"{path}: not valid JSON for nprune (nested too deeply)") from None


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_TMP = re.compile(r"^\..+\.(\d+)\.[A-Za-z0-9_]+\.tmp$")


def remove_stale_temporaries(folder) -> list:
    """Remove the temporary files :func:`atomic_open` left below ``folder`` when its writer was
    killed: those whose writer's pid no longer runs (or that carry no pid). Symbolic links are
    neither followed nor removed. Returns the removed paths."""
    removed = []
    for root, dirs, files in os.walk(folder):
        for name in files:
            if not (name.startswith(".") and name.endswith(".tmp")):
                continue
            m = _TMP.match(name)
            if m and _alive(int(m.group(1))):
                continue
            p = Path(root) / name
            if not p.is_symlink():
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def cache_dir() -> Path:
    """The per-user cache root: ``$XDG_CACHE_HOME/nprune`` when that variable is an absolute path,
    else ``~/.cache/nprune``. Data sets and the measured kernel thresholds live below it."""
    base = os.environ.get("XDG_CACHE_HOME") or ""
    root = Path(base) if os.path.isabs(base) else Path.home() / ".cache"
    return root / "nprune"
