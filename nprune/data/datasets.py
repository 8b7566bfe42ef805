"""Find, download, verify, load and split the MNIST-style datasets (MNIST, Fashion-MNIST).

Where the files come from (:func:`find_data_dir`), first match wins:

1. ``data_dir`` passed by the caller (the CLI's ``--data-dir``);
2. the environment variable ``NPRUNE_DATA_DIR``;
3. the per-user cache ``$XDG_CACHE_HOME/nprune/<name>`` (default ``~/.cache/nprune/<name>``);
4. the dataset's system folders (e.g. ``/usr/share/datasets/fashion-mnist/`` from Debian's
   ``dataset-fashion-mnist`` package);
5. a download from the dataset's public mirrors into the per-user cache (if ``download=True``;
   see :mod:`.download`).

A folder given by 1 or 2 may hold the four files itself or in a ``<name>/`` subfolder (so one
``NPRUNE_DATA_DIR`` can serve several datasets). When a folder given by 1 or 2 lacks files, that is
an error: nothing is downloaded into a folder the user chose (unless it is the cache folder) and the
search does not silently fall through to other places. Each file may be stored raw or gzipped
(``train-images-idx3-ubyte`` or ``train-images-idx3-ubyte.gz``; the raw one is preferred when both
exist).

Every problem reaches callers as :class:`DataError` with a one-line message; the CLI catches
``DataError`` only (IDX parse errors are re-raised as ``DataError`` with the same message).
"""
from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from . import checks, download as _download, fsutil
from .download import DOWNLOAD_TIMEOUT, MAX_DOWNLOAD_BYTES  # noqa: F401  (public names kept here)
from .idx import IDXError

__all__ = [
    "DataError",
    "DatasetSpec",
    "DATASETS",
    "ENV_VAR",
    "FILE_NAMES",
    "cache_dir",
    "find_data_dir",
    "load_dataset",
    "clear_cache",
    "split_validation",
    "prepare",
    "Splits",
    "iterate_minibatches",
]

#: Environment variable naming a folder that holds the dataset files (or ``<name>/`` subfolders).
ENV_VAR = "NPRUNE_DATA_DIR"

#: Role -> standard IDX file name (without ``.gz``).
FILE_NAMES: dict[str, str] = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


class DataError(RuntimeError):
    """A dataset cannot be found, downloaded, verified or loaded; ``str(err)`` is one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


@dataclass(frozen=True)
class DatasetSpec:
    """Everything needed to locate and check one dataset.

    ``sha256`` maps file name (without ``.gz``) to the SHA-256 of the decompressed payload, or is
    ``None`` when no hashes are known (then only shapes/counts are verified). ``mirrors`` are base
    URLs to which ``<file name>.gz`` is appended.
    """

    name: str
    sha256: dict[str, str] | None
    mirrors: tuple[str, ...]
    system_dirs: tuple[str, ...] = ()
    n_train: int = 60000
    n_test: int = 10000
    image_shape: tuple[int, int] = (28, 28)
    n_classes: int = 10
    files: dict[str, str] = field(default_factory=lambda: dict(FILE_NAMES))

    def expected_shape(self, role: str) -> tuple[int, ...]:
        """Canonical shape of the array in role ``x_train``/``y_train``/``x_test``/``y_test``."""
        n = self.n_train if role.endswith("train") else self.n_test
        return (n, *self.image_shape) if role.startswith("x") else (n,)


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        name="mnist",
        # SHA-256 of the decompressed canonical files.
        sha256={
            "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        },
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ),
    ),
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist",
        # The project publishes MD5s of its .gz files only. These SHA-256 values of the decompressed
        # payloads were computed from Debian's dataset-fashion-mnist package (upstream git 55506a9,
        # installed in the system folder below) with `zcat FILE.gz | sha256sum`.
        sha256={
            "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        },
        # The project's own copy in its git repository, served over https (its S3 website mirror is
        # plain http only).
        mirrors=("https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",),
        system_dirs=("/usr/share/datasets/fashion-mnist/",),
    ),
}


def _spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except (KeyError, TypeError):
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}") from None


def cache_dir(name: str) -> Path:
    """Per-user cache folder of dataset ``name``: ``<nprune cache>/<name>`` (see :func:`fsutil.cache_dir`)."""
    return fsutil.cache_dir() / name


# --------------------------------------------------------------------------------------------
# locating files


def _locate(folder: Path, spec: DatasetSpec) -> tuple[dict[str, Path], list[str]]:
    """Map role -> existing file in ``folder`` (raw preferred over .gz); also return missing names."""
    found, missing = {}, []
    for role, fname in spec.files.items():
        for candidate in (folder / fname, folder / (fname + ".gz")):
            if candidate.is_file():
                found[role] = candidate
                break
        else:
            missing.append(fname)
    return found, missing


def _complete(folder: Path, spec: DatasetSpec) -> bool:
    return not _locate(folder, spec)[1]


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _user_folder(folder: Path, spec: DatasetSpec, how: str, download: bool) -> Path:
    """Resolve a folder the user chose (argument or env var): itself, its ``<name>/``, or an error."""
    sub = folder / spec.name
    if sub.is_dir() and _complete(sub, spec):
        return sub
    missing = _locate(folder, spec)[1]
    if not missing:
        return folder
    cache = cache_dir(spec.name)
    if download and _same_dir(folder, cache):
        _download_missing(spec, cache, looked=[folder])
        return folder
    if not folder.is_dir():
        raise DataError(
            f"{spec.name}: folder {folder} (given by {how}) does not exist; point {how} at the "
            f"folder that holds {', '.join(missing)} (raw or .gz)"
        )
    raise DataError(
        f"{spec.name}: missing {', '.join(missing)} (raw or .gz) in {folder} (given by {how}); "
        f"put the four files there or point {how} at the folder that holds them"
    )


def find_data_dir(name: str, data_dir=None, download: bool = True) -> Path:
    """Return the folder holding the four IDX files of dataset ``name``; see the module docstring.

    Order: ``data_dir``, ``$NPRUNE_DATA_DIR``, the per-user cache, system folders, then (when
    ``download`` is true) a download from the mirrors into the per-user cache, each file verified
    against its SHA-256 (when known) and its expected shape before it is moved into place.
    Raises :class:`DataError` (one line: which files are missing, where it looked, how to supply
    them) when nothing works.
    """
    spec = _spec(name)
    if data_dir is not None and str(data_dir) != "":
        return _user_folder(Path(data_dir).expanduser(), spec, "--data-dir", download)
    env = os.environ.get(ENV_VAR, "")
    if env:
        return _user_folder(Path(env).expanduser(), spec, f"${ENV_VAR}", download)
    cache = cache_dir(spec.name)
    looked = [cache, *map(Path, spec.system_dirs)]
    for folder in looked:
        if _complete(folder, spec):
            return folder
    if not download:
        missing = _locate(cache, spec)[1]
        raise DataError(
            f"{spec.name}: missing {', '.join(missing)} (raw or .gz); looked in {', '.join(map(str, looked))}; "
            f"downloading is off; put the four files in a folder and pass it with --data-dir or set {ENV_VAR}"
        )
    _download_missing(spec, cache, looked)
    return cache


# --------------------------------------------------------------------------------------------
# downloading


_short = _download.short


def _download_missing(spec: DatasetSpec, cache: Path, looked) -> None:
    """Download every file missing from ``cache``, trying each mirror in turn; DataError on failure."""
    found, missing = _locate(cache, spec)
    where = ", ".join(str(p) for p in looked)
    hint = f"put the four files (raw or .gz) in a folder and pass it with --data-dir or set {ENV_VAR}"
    created = not cache.exists()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(
            f"{spec.name}: missing {', '.join(missing)}; looked in {where}; cannot create cache folder "
            f"{cache} ({_short(exc)}); {hint}"
        ) from None
    roles = {fname: role for role, fname in spec.files.items()}
    for fname in missing:
        reasons = _download.download_file(spec, roles[fname], fname, cache)
        if reasons or not spec.mirrors:
            still_missing = _locate(cache, spec)[1]
            if created:
                try:
                    cache.rmdir()  # only succeeds when empty: leave no trace of a failed first download
                except OSError:
                    pass
            raise DataError(
                f"{spec.name}: missing {', '.join(still_missing)}; looked in {where}; "
                f"download of {fname} failed from {len(spec.mirrors)} mirror(s) "
                f"({'; '.join(reasons) or 'no mirrors'}); {hint}"
            )


# --------------------------------------------------------------------------------------------
# loading

_LOADED: "OrderedDict[tuple, dict[str, np.ndarray]]" = OrderedDict()
_LOADED_MAX = 2


def clear_cache() -> None:
    """Forget the arrays :func:`load_dataset` keeps in memory."""
    _LOADED.clear()


def _fingerprint(paths: dict[str, Path]) -> tuple:
    out = []
    for role in sorted(paths):
        st = paths[role].stat()
        out.append((role, str(paths[role].resolve()), st.st_size, st.st_mtime_ns))
    return tuple(out)


def _known_hashes(except_name: str) -> dict[str, str]:
    """sha256 -> dataset name of the files of *other* datasets (to name a mixed-up folder)."""
    return {h: other.name for other in DATASETS.values()
            if other.name != except_name and other.sha256 for h in other.sha256.values()}


def _load_checked(spec: DatasetSpec, paths: dict[str, Path], verify: bool) -> dict[str, np.ndarray]:
    """Read the four files with every structural check (:mod:`.checks`), then, with ``verify``,
    compare their SHA-256 values: a malformed file is named for its real defect, not as a mismatch."""
    data, digests = {}, {}
    for role in ("x_train", "y_train", "x_test", "y_test"):
        path = paths[role]
        images = data.get("x_" + role[2:]) if role.startswith("y") else None
        try:
            arr, digests[role] = checks.read_checked(
                spec, role, path, verify,
                n_images=None if images is None else len(images),
                images_name=paths["x_" + role[2:]].name)
        except IDXError as exc:
            raise DataError(str(exc)) from None
        arr.setflags(write=False)
        data[role] = arr
    if verify:
        for role, got in digests.items():
            path, fname = paths[role], spec.files[role]
            other = _known_hashes(spec.name).get(got)
            if other:
                raise DataError(f"{path.parent} holds {other}, not {spec.name} ({path.name} is the {other} "
                                f"file); point --data-dir or ${ENV_VAR} at the {spec.name} files")
            problem = checks.sha256_problem(spec, fname, got)
            if problem:
                raise DataError(f"{path}: {problem}; the file is damaged or modified: delete it and "
                                f"download the data set again")
    return data


def load_dataset(name: str = "mnist", data_dir=None, download: bool = True, verify: bool = True) -> dict:
    """Load dataset ``name`` as ``{'x_train', 'y_train', 'x_test', 'y_test'}`` uint8 arrays.

    Images are ``(N, 28, 28)``, labels ``(N,)`` in ``0..9``. The files are found by
    :func:`find_data_dir` (``data_dir``, ``$NPRUNE_DATA_DIR``, cache, system folders, download).
    Always checked, from each file's header before its payload is read: IDX well-formedness, uint8
    dtype, 3-D images of the right size, 1-D labels, equal image/label counts; then the payload
    length (reading stops at the declared size, so a gzip bomb costs no memory) and the label range.
    With ``verify`` also: the canonical record counts (60000/10000; swapped train/test files are
    named as such) and, once all four files are well-formed, the SHA-256 of each decompressed
    payload when the dataset has known hashes, and that no file is another known dataset's. Pass
    ``verify=False`` for custom or modified files. Every failure is a one-line :class:`DataError`
    naming the file.

    Results are cached in memory (keyed by resolved paths, sizes and mtimes), so repeated loads are
    cheap; the returned arrays are therefore **read-only** -- copy them before modifying in place.
    """
    spec = _spec(name)
    folder = find_data_dir(name, data_dir=data_dir, download=download)
    paths, missing = _locate(folder, spec)
    if missing:  # raced with a deletion
        raise DataError(f"{spec.name}: missing {', '.join(missing)} in {folder}")
    try:
        key = (spec.name, bool(verify), _fingerprint(paths), spec.sha256 and tuple(sorted(spec.sha256.items())))
    except OSError as exc:
        raise DataError(f"{folder}: cannot stat dataset files ({_short(exc)})") from None
    if key in _LOADED:
        _LOADED.move_to_end(key)
        return dict(_LOADED[key])
    data = _load_checked(spec, paths, verify)
    _LOADED[key] = data
    while len(_LOADED) > _LOADED_MAX:
        _LOADED.popitem(last=False)
    return dict(data)


# --------------------------------------------------------------------------------------------
# splitting and batching


def _check_rng(rng) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    return rng


def split_validation(x, y, n_val: int = 5000, rng: np.random.Generator | None = None):
    """Hold out ``n_val`` random examples of ``(x, y)`` for validation.

    Returns ``(x_tr, y_tr, x_val, y_val)``. The held-out indices are the first ``n_val`` entries of
    ``rng.permutation(len(x))``; both parts keep the original order of the examples. ``rng`` must
    be an explicit ``np.random.Generator`` (the global ``np.random`` state is never used), so the
    split is deterministic for a given seed. ``0 <= n_val < len(x)``; ``n_val=0`` gives empty
    validation arrays.
    """
    rng = _check_rng(rng)
    n = len(x)
    if len(y) != n:
        raise ValueError(f"x has {n} examples but y has {len(y)}")
    n_val = int(n_val)
    if not 0 <= n_val < n:
        raise ValueError(f"n_val must be in [0, {n}), got {n_val}")
    perm = rng.permutation(n)
    val_idx = np.sort(perm[:n_val])
    tr_idx = np.sort(perm[n_val:])
    return x[tr_idx], y[tr_idx], x[val_idx], y[val_idx]


@dataclass(frozen=True)
class Splits:
    """Train/validation/test arrays ready for training (see :func:`prepare`)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def prepare(data: dict, n_val: int = 5000, seed: int = 0, dtype=np.float32, flatten: bool = False) -> Splits:
    """Turn :func:`load_dataset` output into float arrays and a seeded validation split.

    Normalisation is plain ``x / 255`` (no mean/std), so pixels lie in ``[0, 1]``; images are
    ``(N, 1, H, W)`` (NCHW) or ``(N, H*W)`` when ``flatten``; labels are int64. The validation set
    (``n_val`` examples, may be 0) is drawn from the training set with
    ``split_validation(..., rng=np.random.default_rng(seed))``; the test set is left intact.
    """
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        raise ValueError(f"dtype must be a floating type, got {dtype}")
    rng = np.random.default_rng(seed)
    x_tr, y_tr, x_val, y_val = split_validation(data["x_train"], data["y_train"], n_val, rng)

    def images(x):
        out = np.asarray(x).astype(dtype)
        out /= dtype.type(255)
        return out.reshape(len(out), -1) if flatten else out.reshape(len(out), 1, *out.shape[1:])

    def labels(y):
        return np.asarray(y).astype(np.int64)

    return Splits(
        x_train=images(x_tr), y_train=labels(y_tr),
        x_val=images(x_val), y_val=labels(y_val),
        x_test=images(data["x_test"]), y_test=labels(data["y_test"]),
    )


def iterate_minibatches(n: int, batch_size: int, rng: np.random.Generator,
                        drop_last: bool = True) -> Iterator[np.ndarray]:
    """Yield the index arrays of one epoch: ``rng.permutation(n)`` cut into ``batch_size`` pieces.

    With ``drop_last=True`` (the default) a final partial batch is dropped, so every batch has
    exactly ``batch_size`` indices (and nothing is yielded when ``n < batch_size``); with
    ``drop_last=False`` it is yielded too. Call again for the next epoch.
    """
    rng = _check_rng(rng)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    perm = rng.permutation(int(n))
    stop = (len(perm) // batch_size) * batch_size if drop_last else len(perm)
    for start in range(0, stop, batch_size):
        yield perm[start:start + batch_size]
