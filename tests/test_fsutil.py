"""Atomic writers: a failed write leaves the old file and no temporary; equal data gives equal bytes;
arrays round-trip without pickles; the cache root follows XDG_CACHE_HOME."""
from pathlib import Path

import numpy as np
import pytest

from nprune.data.fsutil import (atomic_open, atomic_save_npz, atomic_write_json, atomic_write_text,
                                cache_dir, load_json, load_npz)


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "f.txt"
    atomic_write_text(path, "old")
    with pytest.raises(RuntimeError):
        with atomic_open(path) as f:
            f.write(b"half")
            raise RuntimeError("killed")
    assert path.read_text() == "old"
    assert [p.name for p in path.parent.iterdir()] == ["f.txt"]


def test_json_bytes_do_not_depend_on_key_order(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"b": 1, "a": [1.5, None]})
    atomic_write_json(tmp_path / "b.json", {"a": [1.5, None], "b": 1})
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert load_json(tmp_path / "a.json") == {"a": [1.5, None], "b": 1}


def test_npz_round_trip(tmp_path):
    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "m": np.array([True, False])}
    for compress in (True, False):
        atomic_save_npz(tmp_path / f"{compress}.npz", arrays, compress=compress)
        back = load_npz(tmp_path / f"{compress}.npz")
        assert back.keys() == arrays.keys()
        for k in arrays:
            assert back[k].dtype == arrays[k].dtype and np.array_equal(back[k], arrays[k])


def test_cache_dir_follows_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "nprune"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")      # not absolute: ignored, as the spec says
    assert cache_dir() == Path.home() / ".cache" / "nprune"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "nprune"
