"""Shared pytest fixtures (keep minimal; others may append fixtures below)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nprune.data.idx import write_idx

def write_tiny_dataset(folder: Path, n_train: int = 20, n_test: int = 10, seed: int = 0) -> Path:
    """Write a tiny fake MNIST-layout dataset (gzip IDX, 28x28 uint8, labels 0..9) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }
    for name, arr in arrays.items():
        write_idx(folder / (name + ".gz"), arr)
    return folder


@pytest.fixture
def tiny_idx_dir(tmp_path) -> Path:
    """A folder with a tiny fake dataset (20 train / 10 test images) under the four standard .gz names."""
    return write_tiny_dataset(tmp_path / "tiny")


def _find_real_mnist() -> tuple[Path | None, str]:
    """The real MNIST folder as the package finds it (``$NPRUNE_DATA_DIR``, the user cache where
    ``python -m nprune.experiment`` downloads it, system folders), never downloading; else None
    and the package's own one-line reason."""
    from nprune.data.datasets import DataError, find_data_dir
    try:
        return find_data_dir("mnist", download=False).resolve(), ""
    except DataError as e:
        return None, str(e)


# Looked up once, when the tests are collected: before any test's monkeypatch changes the
# environment, so a test that isolates itself from the user's data still gets the real folder.
_REAL_MNIST, _WHY_NO_MNIST = _find_real_mnist()


def mnist_dir() -> Path | None:
    """The real MNIST folder (see :func:`_find_real_mnist`), or None."""
    return _REAL_MNIST


@pytest.fixture(name="mnist_dir")
def mnist_dir_fixture() -> Path:
    """Path of the real MNIST files; skips the test, saying why, when they are not found."""
    if _REAL_MNIST is None:
        pytest.skip(f"real MNIST not found: {_WHY_NO_MNIST}")
    return _REAL_MNIST


@pytest.fixture
def rng() -> np.random.Generator:
    """A fresh seeded generator per test (never the global np.random state)."""
    return np.random.default_rng(12345)


def synthetic_splits(n_train: int = 600, n_val: int = 200, n_test: int = 200, seed: int = 0):
    """A small learnable 10-class problem shaped like MNIST (N, 1, 28, 28) float32: each class is a
    fixed random template plus noise. Used where real data is not the point."""
    from nprune.data.datasets import Splits
    g = np.random.default_rng(seed)
    templates = g.random((10, 1, 28, 28)).astype(np.float32)

    def make(n):
        y = g.integers(0, 10, n)
        x = templates[y] * 0.6 + g.random((n, 1, 28, 28)).astype(np.float32) * 0.4
        return x.astype(np.float32), y.astype(np.int64)

    xtr, ytr = make(n_train)
    xva, yva = make(n_val)
    xte, yte = make(n_test)
    return Splits(xtr, ytr, xva, yva, xte, yte)


@pytest.fixture
def synth():
    return synthetic_splits()


@pytest.fixture(autouse=True)
def _hermetic_cache(tmp_path, monkeypatch):
    """Every test gets an empty per-user cache: a kernel calibration (or anything else) in the
    real ~/.cache/nprune must not change what a test sees."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, env=None, timeout=300):
    """``python -m nprune.experiment ARGS`` in a child process from the repository root."""
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "nprune.experiment", *args], capture_output=True,
                          text=True, env=e, timeout=timeout, cwd=ROOT)


def real_mnist() -> Path:
    """The real MNIST folder, or skip the calling test."""
    if _REAL_MNIST is None:
        pytest.skip(f"real MNIST not found: {_WHY_NO_MNIST}")
    return _REAL_MNIST


def run_files(run: Path) -> dict:
    """{relative path: bytes} of a run folder's arrays, JSON and CSV files, timings excepted."""
    from nprune.experiment.report import without_timings
    return {p.relative_to(run): without_timings(p.name, p.read_bytes()) for p in sorted(run.rglob("*"))
            if p.is_file() and not p.name.startswith(".") and p.name != "timing.json"
            and p.suffix in (".npz", ".json", ".csv")}
