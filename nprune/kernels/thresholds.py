"""The thresholds table of the ``auto`` kernel choice: its format, validation, files and lookup.

A table is a JSON object::

    {"format": "nprune-kernel-thresholds/1",
     "thresholds": {layer shape: {batch class: {mode: density or null}}},
     ... (free-form provenance: "source", "command", "machine", "margin", "measurements")}

* layer shape (:func:`shape_key`): ``Dense 784x300`` (in x out), ``Conv2D 20x50x5x5 stride 1 pad 0
  input 12x12`` (C x F x kh x kw, and the input's H x W);
* batch class (:func:`batch_class`): ``1``, ``small`` (2 to 256 samples), ``large``;
* mode (:func:`mode_key`): ``train`` (a training step without dx), ``train_dx``, ``eval``; and the
  same with ``_f`` for an inner Dense layer whose input arrives *feature-major* (an F-ordered (N, in)
  array, as a sparse predecessor and the ReLU after it leave it): the kernel then skips its
  transposing copy, so it pays at higher densities. A table without an ``_f`` entry makes the layer
  follow the plain mode's threshold.

A table may also hold ``"thresholds_by_threads": {"2": {layer shape: ...}, ...}``: tables for
processes whose BLAS runs that many threads or more (:func:`blas_threads`; the largest key not above
it wins, and ``thresholds`` serves thread counts below every key). The dense GEMM speeds up with
threads and the sparse kernels do not, so the crossover moves down as threads are added: with
``--jobs 2`` on two cores each worker runs 1 thread, with ``--jobs 1`` the process runs 2.
Like the BLAS thread count itself, this changes which code runs and so the last float32 bits.

``auto`` uses a layer's sparse kernel iff the mask's density is <= the threshold of its entry; a
missing entry or null means the dense code. A table is checked once, where it enters the program
(:func:`check_thresholds`: a file read by :func:`load_thresholds`, or a dict handed to
``apply_kernel``), and is then carried as a :class:`Thresholds`, which nothing checks again.

Which table ``auto`` uses (:func:`active_thresholds`): the user's calibration
(:func:`user_thresholds_path`, written by ``python -m nprune.kernels.calibrate calibrate``) if that
file exists, else the table shipped in the package (``thresholds.json`` next to this module,
:data:`SHIPPED_THRESHOLDS`). The shipped table was measured on the development machine by
``python benchmarks/imp_thresholds.py`` on the masks of a lottery-ticket schedule, at 1 thread
(``thresholds``) and 2 (``thresholds_by_threads``), at the batch sizes a run uses (its command is
in the file); the entries a run does not use (batch 1, for instance) come from the random-mask
calibration.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..data.fsutil import cache_dir
from ..layers import Conv2D, Dense

THRESHOLDS_FORMAT = "nprune-kernel-thresholds/1"
BATCH_CLASSES = ("1", "small", "large")            # batch sizes 1, 2..256, > 256 (batch_class)
AUTO_MODES = ("train", "train_dx", "eval")          # training step without / with dx; inference
FMAJOR_MODES = tuple(m + "_f" for m in AUTO_MODES)  # the same with feature-major input
ALL_MODES = AUTO_MODES + FMAJOR_MODES
#: the file name of a table, in the user cache and in a run folder
THRESHOLDS_FILE = "kernel_thresholds.json"
#: the command that writes the user's table (named in error messages)
CALIBRATE_COMMAND = "python -m nprune.kernels.calibrate calibrate"
SHIPPED_FILE = Path(__file__).with_name("thresholds.json")


class ThresholdsError(ValueError):
    """A kernel-thresholds table that cannot be used; the message is one line naming the file."""


class Thresholds(dict):
    """A thresholds table that passed :func:`check_thresholds` (the only function that makes one)."""


def shape_key(layer, x_shape=None) -> str:
    """The table key of a layer: ``Dense 784x300`` (in x out) or ``Conv2D 20x50x5x5 stride 1 pad 0
    input 12x12`` (C x F x kh x kw, and the input's H x W when ``x_shape`` is given)."""
    if isinstance(layer, Dense):
        return f"Dense {layer.in_features}x{layer.out_features}"
    if isinstance(layer, Conv2D):
        s = (f"Conv2D {layer.in_channels}x{layer.out_channels}x{layer.kh}x{layer.kw} "
             f"stride {layer.stride} pad {layer.padding}")
        return s if x_shape is None else f"{s} input {x_shape[-2]}x{x_shape[-1]}"
    raise TypeError(f"no kernel for {type(layer).__name__}")


def batch_class(n: int) -> str:
    return "1" if n <= 1 else ("small" if n <= 256 else "large")


def mode_key(train: bool, need_dx: bool) -> str:
    return "eval" if not train else ("train_dx" if need_dx else "train")


def user_thresholds_path() -> Path:
    """Where the calibration writes and ``auto`` looks first:
    ``$XDG_CACHE_HOME/nprune/kernel_thresholds.json`` (default ``~/.cache/nprune/...``)."""
    return cache_dir() / THRESHOLDS_FILE


def blas_threads() -> int:
    """The BLAS thread count of this process as OpenBLAS sets it at start-up: the
    ``OPENBLAS_NUM_THREADS`` or ``OMP_NUM_THREADS`` variable if set, else the cores the process
    may run on."""
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        v = os.environ.get(var, "").strip()
        if v.isdigit() and int(v) > 0:
            return int(v)
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def entries(table: dict, threads: int | None = None) -> dict:
    """The {layer shape: {batch class: {mode: threshold}}} part of ``table`` for ``threads`` BLAS
    threads (default :func:`blas_threads`): the ``thresholds_by_threads`` entry with the largest key
    not above it, else ``thresholds``."""
    by = table.get("thresholds_by_threads")
    if by:
        n = blas_threads() if threads is None else threads
        keys = [int(k) for k in by if int(k) <= n]
        if keys:
            return by[str(max(keys))]
    return table.get("thresholds", {})


def _error(where, msg: str) -> ThresholdsError:
    return ThresholdsError(f"kernel thresholds file {where}: {msg}; fix or delete it, or rerun "
                           f"'{CALIBRATE_COMMAND}'")


def check_thresholds(obj, where: str) -> Thresholds:
    """Validate a thresholds table; returns it as a :class:`Thresholds` (``obj`` itself if it is
    one), or raises :class:`ThresholdsError` naming ``where``."""
    def bad(msg):
        raise _error(where, msg)
    if not isinstance(obj, dict):
        bad(f"expected a JSON object, got {type(obj).__name__}")
    if obj.get("format") != THRESHOLDS_FORMAT:
        bad(f"'format' must be {THRESHOLDS_FORMAT!r}, got {obj.get('format')!r}")
    table = obj.get("thresholds")
    if not isinstance(table, dict):
        bad("'thresholds' must be an object {layer shape: {batch class: {mode: density or null}}}")
    by = obj.get("thresholds_by_threads", {})
    if not isinstance(by, dict) or not all(isinstance(k, str) and k.isdigit() and int(k) > 0
                                           and isinstance(v, dict) for k, v in by.items()):
        bad("'thresholds_by_threads' must be an object {thread count: {layer shape: ...}}")
    for t in [table, *by.values()]:
        _check_entries(t, bad)
    return obj if isinstance(obj, Thresholds) else Thresholds(obj)


def _check_entries(table: dict, bad) -> None:
    for shape, classes in table.items():
        if not isinstance(classes, dict):
            bad(f"{shape!r}: expected an object keyed by batch class (1, small, large)")
        for c, modes in classes.items():
            if c not in BATCH_CLASSES:
                bad(f"{shape!r}: unknown batch class {c!r} (expected 1, small or large)")
            if not isinstance(modes, dict):
                bad(f"{shape!r} {c}: expected an object keyed by mode (train, train_dx, eval)")
            for m, v in modes.items():
                if m not in ALL_MODES:
                    bad(f"{shape!r} {c}: unknown mode {m!r} (expected train, train_dx or eval, "
                        f"optionally with _f)")
                if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                      or not 0.0 <= v <= 1.0):
                    bad(f"{shape!r} {c} {m}: a threshold is a density in [0, 1] or null, got {v!r}")


def as_thresholds(obj) -> Thresholds:
    """``obj`` if it is already a checked table, else :func:`check_thresholds` of it (named by its
    ``source`` entry)."""
    if isinstance(obj, Thresholds):
        return obj
    where = obj.get("source", "(given table)") if isinstance(obj, dict) else "(given table)"
    return check_thresholds(obj, where)


def load_thresholds(path, source: str | None = None) -> Thresholds:
    """Read and check a thresholds JSON file (:class:`ThresholdsError` if it is unusable).
    ``source``: set the table's ``source`` entry to this."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise _error(path, "not UTF-8 text") from None
    except OSError as e:
        raise ThresholdsError(f"kernel thresholds file {path}: cannot read it "
                              f"({e.strerror or e})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise _error(path, f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    table = check_thresholds(obj, str(path))
    if source is not None:
        table["source"] = source
    return table


#: the table shipped in the package (source ``shipped``)
SHIPPED_THRESHOLDS = load_thresholds(SHIPPED_FILE)
_ACTIVE: dict = {}


def active_thresholds() -> Thresholds:
    """The table ``auto`` uses unless given one: the user's calibration
    (:func:`user_thresholds_path`) if that file exists, else :data:`SHIPPED_THRESHOLDS`. The
    returned table has a ``source`` entry (the file, or ``shipped``). Re-read when the file
    changes."""
    p = user_thresholds_path()
    try:
        st = p.stat()
    except FileNotFoundError:
        return SHIPPED_THRESHOLDS
    except OSError as e:
        raise ThresholdsError(f"kernel thresholds file {p}: cannot read it "
                              f"({e.strerror or e})") from None
    key = (str(p), st.st_mtime_ns, st.st_size)
    if _ACTIVE.get("key") != key:
        _ACTIVE["table"] = load_thresholds(p, source=str(p))
        _ACTIVE["key"] = key
    return _ACTIVE["table"]


def lookup_threshold(table: dict, shape: str, batch_class: str, mode: str):
    """The largest density at which ``auto`` uses the kernel (None: never). A feature-major mode
    (``eval_f`` ...) missing from the table falls back to its plain mode (``eval``)."""
    modes = entries(table).get(shape, {}).get(batch_class, {})
    if mode.endswith("_f") and mode not in modes:
        mode = mode[:-2]
    return modes.get(mode)


def format_thresholds(table: dict) -> str:
    """The table as text: one line per layer shape, ``class: train/train_dx/eval`` thresholds, and
    a second line with the feature-major (``_f``) thresholds where the table has them."""
    lines = [f"source: {table.get('source', '?')} (per batch class: train/train_dx/eval)"]
    by = table.get("thresholds_by_threads") or {}
    parts = [("", table["thresholds"])]
    if by:
        low = min(int(k) for k in by)
        parts = [(f"BLAS threads below {low}:" if low > 2 else "1 BLAS thread:", table["thresholds"])]
        parts += [(f"{k} BLAS threads or more:", by[k]) for k in sorted(by, key=int)]
    for title, t in parts:
        if title:
            lines.append(title)
        lines += _format_entries(t)
    return "\n".join(lines)


def _format_entries(table: dict) -> list:
    lines = []
    for shape, classes in table.items():
        for label, ms in ((shape, AUTO_MODES), ("  feature-major input", FMAJOR_MODES)):
            if not any(m in classes.get(c, {}) for c in BATCH_CLASSES for m in ms):
                continue
            cells = []
            for c in BATCH_CLASSES:
                modes = classes.get(c, {})
                cells.append(f"{c}: " + "/".join("-" if modes.get(m) is None else f"{modes[m]:g}"
                                                 for m in ms))
            lines.append(f"  {label:44s} " + "  ".join(cells))
    return lines
