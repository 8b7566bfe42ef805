"""Tests for nprune.data.datasets: search order, download + verification, checks, splitting."""
from __future__ import annotations

import dataclasses
from pathlib import Path
import os
import urllib.error
import urllib.request

import numpy as np
import pytest

from nprune.data import datasets as ds
from nprune.data.datasets import DataError, load_dataset, find_data_dir, split_validation, prepare, iterate_minibatches
from nprune.data.idx import read_idx, sha256_of_payload, write_idx

NAMES = list(ds.FILE_NAMES.values())

REAL_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
REAL_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
# Debian's dataset-fashion-mnist folder, read before the fixture below hides the system folders
FASHION_SYSTEM_DIR = Path(ds.DATASETS["fashion-mnist"].system_dirs[0])


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No env var, a private cache, no system folders, no real network, empty in-memory cache."""
    monkeypatch.delenv(ds.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    for name, spec in list(ds.DATASETS.items()):
        monkeypatch.setitem(ds.DATASETS, name, dataclasses.replace(spec, system_dirs=()))

    def no_network(url, *a, **k):
        if str(url).startswith("file:"):
            return real_urlopen(url, *a, **k)
        raise urllib.error.URLError("network disabled in tests")

    real_urlopen = urllib.request.urlopen
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    ds.clear_cache()
    yield
    ds.clear_cache()


def tiny_spec(monkeypatch, folder, name="mnist", **changes):
    """Make ``name`` expect the tiny dataset in ``folder`` (its hashes and counts)."""
    hashes = {f: sha256_of_payload(folder / (f + ".gz")) for f in NAMES}
    spec = dataclasses.replace(ds.DATASETS[name], sha256=hashes, n_train=20, n_test=10, **changes)
    monkeypatch.setitem(ds.DATASETS, name, spec)
    return spec


def assert_one_line(err):
    msg = str(err)
    assert msg and "\n" not in msg and "Traceback" not in msg
    return msg


# ---------------------------------------------------------------- finding and loading


def test_load_tiny_via_data_dir(tiny_idx_dir):
    data = load_dataset("mnist", data_dir=tiny_idx_dir, verify=False)
    assert set(data) == {"x_train", "y_train", "x_test", "y_test"}
    assert data["x_train"].shape == (20, 28, 28) and data["x_train"].dtype == np.uint8
    assert data["y_train"].shape == (20,) and data["y_train"].dtype == np.uint8
    assert data["x_test"].shape == (10, 28, 28) and data["y_test"].shape == (10,)
    np.testing.assert_array_equal(data["y_test"], np.arange(10))


def test_load_tiny_via_env_var(tiny_idx_dir, monkeypatch):
    monkeypatch.setenv(ds.ENV_VAR, str(tiny_idx_dir))
    assert find_data_dir("mnist", download=False) == tiny_idx_dir
    data = load_dataset("mnist", verify=False)
    assert data["x_train"].shape == (20, 28, 28)


def test_env_var_subfolder_per_dataset(tiny_idx_dir, monkeypatch):
    root = tiny_idx_dir.parent
    (root / "fashion-mnist").mkdir()
    for f in tiny_idx_dir.iterdir():
        (root / "fashion-mnist" / f.name).write_bytes(f.read_bytes())
    monkeypatch.setenv(ds.ENV_VAR, str(root))
    assert find_data_dir("fashion-mnist") == root / "fashion-mnist"


def test_data_dir_beats_env_var(tiny_idx_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(ds.ENV_VAR, str(tmp_path / "elsewhere"))
    assert find_data_dir("mnist", data_dir=tiny_idx_dir) == tiny_idx_dir


def test_raw_files_accepted(tiny_idx_dir):
    for f in NAMES:
        gz = tiny_idx_dir / (f + ".gz")
        write_idx(tiny_idx_dir / f, read_idx(gz))
        gz.unlink()
    assert load_dataset("mnist", data_dir=tiny_idx_dir, verify=False)["x_train"].shape == (20, 28, 28)


def test_cache_and_system_dirs_searched(tiny_idx_dir, tmp_path, monkeypatch):
    spec = ds.DATASETS["fashion-mnist"]
    monkeypatch.setitem(ds.DATASETS, "fashion-mnist", dataclasses.replace(spec, system_dirs=(str(tiny_idx_dir),)))
    assert find_data_dir("fashion-mnist", download=False) == tiny_idx_dir
    cache = ds.cache_dir("fashion-mnist")
    assert cache == tmp_path / "xdg-cache" / "nprune" / "fashion-mnist"
    cache.mkdir(parents=True)
    for f in tiny_idx_dir.iterdir():
        (cache / f.name).write_bytes(f.read_bytes())
    assert find_data_dir("fashion-mnist", download=False) == cache


def test_missing_files_in_data_dir(tiny_idx_dir):
    (tiny_idx_dir / "t10k-labels-idx1-ubyte.gz").unlink()
    (tiny_idx_dir / "train-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError) as info:
        load_dataset("mnist", data_dir=tiny_idx_dir)  # download=True, but never into a user folder
    msg = assert_one_line(info.value)
    assert "t10k-labels-idx1-ubyte" in msg and "train-images-idx3-ubyte" in msg
    assert "train-labels-idx1-ubyte" not in msg and str(tiny_idx_dir) in msg
    assert not ds.cache_dir("mnist").exists()


def test_missing_files_in_env_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(ds.ENV_VAR, str(tmp_path / "empty"))
    with pytest.raises(DataError, match=ds.ENV_VAR) as info:
        find_data_dir("mnist")
    assert all(n in str(info.value) for n in NAMES)


@pytest.mark.parametrize("download", [False, True])
def test_nothing_anywhere_one_line_error(download):
    with pytest.raises(DataError) as info:
        load_dataset("mnist", download=download)
    msg = assert_one_line(info.value)
    assert all(n in msg for n in NAMES)
    assert str(ds.cache_dir("mnist")) in msg
    assert "--data-dir" in msg and ds.ENV_VAR in msg
    if download:
        assert "network disabled" in msg and "ossci-datasets" in msg
    assert not ds.cache_dir("mnist").exists()


def test_unknown_dataset():
    with pytest.raises(DataError, match="unknown dataset 'cifar'"):
        load_dataset("cifar", download=False)


# ---------------------------------------------------------------- content checks


def _rewrite(folder, fname, arr):
    write_idx(folder / (fname + ".gz"), arr)


def test_count_mismatch(tiny_idx_dir):
    _rewrite(tiny_idx_dir, "train-labels-idx1-ubyte", np.zeros(19, np.uint8))
    with pytest.raises(DataError, match="19 labels but train-images-idx3-ubyte.gz has 20 images") as info:
        load_dataset("mnist", data_dir=tiny_idx_dir, verify=False)
    assert "train-labels-idx1-ubyte.gz" in assert_one_line(info.value)


def test_label_out_of_range(tiny_idx_dir):
    _rewrite(tiny_idx_dir, "t10k-labels-idx1-ubyte", np.full(10, 10, np.uint8))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz: label 10 out of range 0..9"):
        load_dataset("mnist", data_dir=tiny_idx_dir, verify=False)


@pytest.mark.parametrize(
    "fname, arr, needle",
    [
        ("train-images-idx3-ubyte", np.zeros((20, 784), np.uint8), "3-D"),
        ("train-images-idx3-ubyte", np.zeros((20, 28, 27), np.uint8), "expected 28x28"),
        ("train-labels-idx1-ubyte", np.zeros((20, 1), np.uint8), "1-D"),
        ("t10k-images-idx3-ubyte", np.zeros((10, 28, 28), np.float32), "expected uint8"),
        ("t10k-labels-idx1-ubyte", np.zeros(10, np.int32), "expected uint8"),
    ],
)
def test_bad_shapes_and_dtypes(tiny_idx_dir, fname, arr, needle):
    _rewrite(tiny_idx_dir, fname, arr)
    with pytest.raises(DataError, match=needle) as info:
        load_dataset("mnist", data_dir=tiny_idx_dir, verify=False)
    assert fname in assert_one_line(info.value)


def test_malformed_idx_becomes_data_error(tiny_idx_dir):
    (tiny_idx_dir / "train-labels-idx1-ubyte.gz").write_bytes(b"\x00\x00\x08")
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz: not a gzip file") as info:
        load_dataset("mnist", data_dir=tiny_idx_dir, verify=False)
    assert_one_line(info.value)


def test_checksum_enforced(tiny_idx_dir, monkeypatch):
    tiny_spec(monkeypatch, tiny_idx_dir)
    assert load_dataset("mnist", data_dir=tiny_idx_dir)["x_train"].shape == (20, 28, 28)
    x = read_idx(tiny_idx_dir / "t10k-images-idx3-ubyte.gz")
    x[0, 0, 0] ^= 1  # still a well-formed IDX file, just not the canonical bytes
    _rewrite(tiny_idx_dir, "t10k-images-idx3-ubyte", x)
    with pytest.raises(DataError, match="SHA-256") as info:
        load_dataset("mnist", data_dir=tiny_idx_dir)
    assert "t10k-images-idx3-ubyte.gz" in assert_one_line(info.value)
    assert load_dataset("mnist", data_dir=tiny_idx_dir, verify=False)["x_test"][0, 0, 0] == x[0, 0, 0]


def test_verify_checks_canonical_counts(tiny_idx_dir, monkeypatch):
    spec = ds.DATASETS["fashion-mnist"]
    monkeypatch.setitem(ds.DATASETS, "fashion-mnist", dataclasses.replace(spec, sha256=None))
    with pytest.raises(DataError, match=r"expected \(60000, 28, 28\)"):
        load_dataset("fashion-mnist", data_dir=tiny_idx_dir)  # no hashes: counts are verified


def test_mnist_files_rejected_as_fashion(tiny_idx_dir, monkeypatch):
    tiny_spec(monkeypatch, tiny_idx_dir, "mnist")
    spec = ds.DATASETS["fashion-mnist"]
    monkeypatch.setitem(ds.DATASETS, "fashion-mnist", dataclasses.replace(spec, n_train=20, n_test=10, sha256=None))
    with pytest.raises(DataError, match="holds mnist, not fashion-mnist"):
        load_dataset("fashion-mnist", data_dir=tiny_idx_dir)


def test_in_memory_cache_and_read_only(tiny_idx_dir):
    a = load_dataset("mnist", data_dir=tiny_idx_dir, verify=False)
    b = load_dataset("mnist", data_dir=tiny_idx_dir, verify=False)
    assert a["x_train"] is b["x_train"]
    with pytest.raises(ValueError):
        a["x_train"][0, 0, 0] = 1
    new = np.zeros((20, 28, 28), np.uint8)
    _rewrite(tiny_idx_dir, "train-images-idx3-ubyte", new)
    os.utime(tiny_idx_dir / "train-images-idx3-ubyte.gz", ns=(1, 1))  # make sure the mtime changes
    c = load_dataset("mnist", data_dir=tiny_idx_dir, verify=False)
    np.testing.assert_array_equal(c["x_train"], new)


# ---------------------------------------------------------------- downloading


def _bad_mirror(tmp_path):
    """A mirror serving well-formed files with the wrong content."""
    folder = tmp_path / "bad-mirror"
    folder.mkdir()
    rng = np.random.default_rng(99)
    write_idx(folder / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (20, 28, 28), dtype=np.uint8))
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.ones(20, np.uint8))
    write_idx(folder / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (10, 28, 28), dtype=np.uint8))
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(b"<html>not found</html>")
    return folder


def test_download_verifies_and_falls_back_to_next_mirror(tiny_idx_dir, tmp_path, monkeypatch):
    mirrors = (
        "http://example.invalid/mnist/",          # no network
        (tmp_path / "does-not-exist").as_uri() + "/",  # 404-like
        _bad_mirror(tmp_path).as_uri() + "/",      # wrong bytes
        tiny_idx_dir.as_uri(),                     # good (no trailing slash on purpose)
    )
    tiny_spec(monkeypatch, tiny_idx_dir, mirrors=mirrors)
    cache = ds.cache_dir("mnist")
    assert find_data_dir("mnist") == cache
    assert sorted(p.name for p in cache.iterdir()) == sorted(n + ".gz" for n in NAMES)  # no temp files left
    for n in NAMES:
        assert (cache / (n + ".gz")).read_bytes() == (tiny_idx_dir / (n + ".gz")).read_bytes()
    data = load_dataset("mnist")
    np.testing.assert_array_equal(data["y_train"], np.arange(20) % 10)


def test_download_only_missing_files(tiny_idx_dir, tmp_path, monkeypatch):
    tiny_spec(monkeypatch, tiny_idx_dir, mirrors=(tiny_idx_dir.as_uri() + "/",))
    cache = ds.cache_dir("mnist")
    cache.mkdir(parents=True)
    keep = cache / "train-images-idx3-ubyte.gz"
    keep.write_bytes((tiny_idx_dir / keep.name).read_bytes())
    os.utime(keep, ns=(5, 5))
    assert find_data_dir("mnist", data_dir=cache) == cache  # the cache may be named explicitly
    assert keep.stat().st_mtime_ns == 5
    assert len(list(cache.iterdir())) == 4


def test_download_all_mirrors_bad(tiny_idx_dir, tmp_path, monkeypatch):
    tiny_spec(monkeypatch, tiny_idx_dir, mirrors=(_bad_mirror(tmp_path).as_uri() + "/",))
    with pytest.raises(DataError) as info:
        find_data_dir("mnist")
    msg = assert_one_line(info.value)
    assert "SHA-256 mismatch" in msg and "--data-dir" in msg
    assert not ds.cache_dir("mnist").exists()  # rejected temp files and the new empty folder are removed


def test_download_checks_shape_without_hashes(tiny_idx_dir, monkeypatch):
    spec = ds.DATASETS["fashion-mnist"]
    monkeypatch.setitem(ds.DATASETS, "fashion-mnist", dataclasses.replace(
        spec, sha256=None, mirrors=(tiny_idx_dir.as_uri() + "/",)))
    with pytest.raises(DataError, match=r"rejected, shape \(20, 28, 28\), expected \(60000, 28, 28\)"):
        find_data_dir("fashion-mnist")


# ---------------------------------------------------------------- splitting and batching


def test_split_validation_deterministic_disjoint_covering():
    x = np.arange(100)
    y = x * 10
    a = split_validation(x, y, 30, np.random.default_rng(7))
    b = split_validation(x, y, 30, np.random.default_rng(7))
    c = split_validation(x, y, 30, np.random.default_rng(8))
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a[2], c[2])
    x_tr, y_tr, x_val, y_val = a
    assert len(x_val) == 30 and len(x_tr) == 70
    assert not set(x_tr) & set(x_val)
    assert sorted([*x_tr, *x_val]) == list(range(100))
    np.testing.assert_array_equal(y_tr, x_tr * 10)
    np.testing.assert_array_equal(y_val, x_val * 10)


def test_split_validation_arguments():
    x = np.arange(10)
    x_tr, _, x_val, y_val = split_validation(x, x, 0, np.random.default_rng(0))
    assert len(x_tr) == 10 and x_val.shape == (0,) and y_val.shape == (0,)
    with pytest.raises(TypeError):
        split_validation(x, x, 2, 0)
    with pytest.raises(ValueError):
        split_validation(x, x, 10, np.random.default_rng(0))
    with pytest.raises(ValueError):
        split_validation(x, x[:9], 2, np.random.default_rng(0))


@pytest.mark.parametrize("flatten", [False, True])
def test_prepare(tiny_idx_dir, flatten):
    data = load_dataset("mnist", data_dir=tiny_idx_dir, verify=False)
    s = prepare(data, n_val=5, seed=3, flatten=flatten)
    assert s.x_train.shape == ((15, 784) if flatten else (15, 1, 28, 28))
    assert s.x_val.shape[0] == 5 and s.x_test.shape[0] == 10
    for x in (s.x_train, s.x_val, s.x_test):
        assert x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0
    for y in (s.y_train, s.y_val, s.y_test):
        assert y.dtype == np.int64
    np.testing.assert_array_equal(s.x_test.reshape(10, 28, 28) * 255, data["x_test"])
    again = prepare(data, n_val=5, seed=3, flatten=flatten)
    np.testing.assert_array_equal(again.y_val, s.y_val)
    empty = prepare(data, n_val=0)
    assert empty.x_val.shape == (0, 1, 28, 28) and empty.y_val.shape == (0,) and len(empty.x_train) == 20
    assert prepare(data, n_val=0, dtype=np.float64).x_train.dtype == np.float64


def test_iterate_minibatches():
    rng = np.random.default_rng(0)
    batches = list(iterate_minibatches(10, 3, rng))
    assert [len(b) for b in batches] == [3, 3, 3]
    assert len(set(np.concatenate(batches))) == 9
    batches = list(iterate_minibatches(10, 3, np.random.default_rng(0), drop_last=False))
    assert [len(b) for b in batches] == [3, 3, 3, 1]
    assert sorted(np.concatenate(batches)) == list(range(10))
    assert list(iterate_minibatches(2, 3, rng)) == []


# ---------------------------------------------------------------- the real thing


def test_real_mnist(mnist_dir):
    data = load_dataset("mnist", data_dir=mnist_dir, download=False, verify=True)  # SHA-256 verified
    assert data["x_train"].shape == (60000, 28, 28) and data["x_train"].dtype == np.uint8
    assert data["x_test"].shape == (10000, 28, 28)
    assert np.bincount(data["y_train"], minlength=10).tolist() == REAL_TRAIN_COUNTS
    assert np.bincount(data["y_test"], minlength=10).tolist() == REAL_TEST_COUNTS
    assert load_dataset("mnist", data_dir=mnist_dir)["x_train"] is data["x_train"]  # cached in memory


def test_real_fashion_mnist_from_debian_package():
    """Debian's dataset-fashion-mnist files are found and verified (skipped when not installed)."""
    system = FASHION_SYSTEM_DIR
    if not all((system / (f + ".gz")).exists() for f in ds.FILE_NAMES.values()):
        pytest.skip("dataset-fashion-mnist is not installed")
    ds.clear_cache()
    d = load_dataset("fashion-mnist", data_dir=system)
    assert d["x_train"].shape == (60000, 28, 28) and d["y_test"].shape == (10000,)
    assert np.bincount(d["y_train"]).tolist() == [6000] * 10


@pytest.mark.parametrize("how", ["arg", "env"])
def test_a_folder_that_does_not_exist_says_so(tmp_path, monkeypatch, how):
    folder = tmp_path / "nowhere"
    if how == "env":
        monkeypatch.setenv(ds.ENV_VAR, str(folder))
    with pytest.raises(DataError) as info:
        find_data_dir("mnist", data_dir=folder if how == "arg" else None)
    msg = assert_one_line(info.value)
    assert f"folder {folder}" in msg and "does not exist" in msg and all(n in msg for n in NAMES)


def test_checksum_message_gives_no_library_only_advice(tiny_idx_dir, monkeypatch):
    tiny_spec(monkeypatch, tiny_idx_dir)
    x = read_idx(tiny_idx_dir / "t10k-images-idx3-ubyte.gz")
    x[0, 0, 0] ^= 1
    _rewrite(tiny_idx_dir, "t10k-images-idx3-ubyte", x)
    with pytest.raises(DataError) as info:
        load_dataset("mnist", data_dir=tiny_idx_dir)
    assert "SHA-256" in str(info.value) and "verify" not in str(info.value)
