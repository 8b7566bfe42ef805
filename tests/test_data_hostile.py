"""Hostile and unlucky data: every defect ends in one DataError line naming the file and the defect,
with bounded memory (gzip bombs, tampered mirrors, swapped, truncated or padded files)."""
from __future__ import annotations

import dataclasses
import io
import os
import struct
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest

from nprune.data import datasets as ds
from nprune.data import download
from nprune.data.datasets import DataError, find_data_dir, load_dataset
from nprune.data.idx import IDXError, read_idx, write_idx

ROOT = Path(__file__).resolve().parents[1]
NAMES = list(ds.FILE_NAMES.values())
#: Peak resident memory allowed while a 1 GiB gzip bomb is rejected.
PEAK_LIMIT_MB = 300


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No env var, a private cache, no system folders, no network, empty in-memory cache."""
    monkeypatch.delenv(ds.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    for name, spec in list(ds.DATASETS.items()):
        monkeypatch.setitem(ds.DATASETS, name, dataclasses.replace(spec, system_dirs=()))

    def no_network(url, *a, **k):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    ds.clear_cache()
    yield
    ds.clear_cache()


def header(dims, code=0x08) -> bytes:
    return bytes([0, 0, code, len(dims)]) + struct.pack(">" + "I" * len(dims), *dims)


def write_gz_stream(path: Path, head: bytes, n_zeros: int, tail: bytes = b"", level: int = 6) -> Path:
    """A gzip file of ``head`` + ``n_zeros`` zero bytes + ``tail``, compressed piece by piece."""
    c = zlib.compressobj(level, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(1 << 20)
    with open(path, "wb") as f:
        f.write(c.compress(head))
        left = n_zeros
        while left:
            n = min(left, len(zeros))
            f.write(c.compress(zeros[:n]))
            left -= n
        f.write(c.compress(tail))
        f.write(c.flush())
    return path


def canonical_folder(folder: Path, counts=None, label_tail: bytes = b"") -> Path:
    """MNIST-sized files (zeros) whose headers declare the canonical shapes (or ``counts``)."""
    folder.mkdir(parents=True, exist_ok=True)
    n_train, n_test = counts or (60000, 10000)
    write_gz_stream(folder / "train-images-idx3-ubyte.gz", header((n_train, 28, 28)), n_train * 784)
    write_gz_stream(folder / "train-labels-idx1-ubyte.gz", header((n_train,)), n_train - len(label_tail), label_tail)
    write_gz_stream(folder / "t10k-images-idx3-ubyte.gz", header((n_test, 28, 28)), n_test * 784)
    write_gz_stream(folder / "t10k-labels-idx1-ubyte.gz", header((n_test,)), n_test)
    return folder


def load_error(folder, **kw) -> str:
    with pytest.raises(DataError) as info:
        load_dataset("mnist", data_dir=folder, download=False, **kw)
    msg = str(info.value)
    assert msg and "\n" not in msg and "Traceback" not in msg
    return msg


# ---------------------------------------------------------------- structure, named before the checksum


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_truncated_file(tiny_idx_dir, gz):
    data = header((10, 28, 28)) + bytes(10 * 784 - 1)
    _replace(tiny_idx_dir, "t10k-images-idx3-ubyte", data, gz)
    msg = load_error(tiny_idx_dir, verify=False)
    assert "t10k-images-idx3-ubyte" in msg
    assert "truncated payload: shape 10x28x28 of uint8 needs 7840 payload bytes, file has 7839" in msg


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_extra_bytes(tiny_idx_dir, gz):
    data = header((10, 28, 28)) + bytes(10 * 784 + 5)
    _replace(tiny_idx_dir, "t10k-images-idx3-ubyte", data, gz)
    msg = load_error(tiny_idx_dir, verify=False)
    assert "t10k-images-idx3-ubyte" in msg
    assert "trailing bytes after payload: shape 10x28x28 of uint8 needs 7840 payload bytes, file has 7845" in msg


def _replace(folder: Path, fname: str, data: bytes, gz: bool = True) -> None:
    (folder / (fname + ".gz")).unlink()
    if gz:
        write_gz_stream(folder / (fname + ".gz"), data, 0)
    else:
        (folder / fname).write_bytes(data)


def test_bad_magic(tiny_idx_dir):
    _replace(tiny_idx_dir, "train-labels-idx1-ubyte", b"\x50\x4b\x03\x04" + bytes(40))
    msg = load_error(tiny_idx_dir, verify=False)
    assert "train-labels-idx1-ubyte.gz: bad magic: first two bytes are 504b" in msg


@pytest.mark.parametrize("verify", [True, False])
def test_255_dimensions_short_message(tiny_idx_dir, verify):
    _replace(tiny_idx_dir, "train-images-idx3-ubyte", header((2**32 - 1,) * 255))
    path = tiny_idx_dir / "train-images-idx3-ubyte.gz"
    msg = load_error(tiny_idx_dir, verify=verify)
    assert str(path) in msg and "images must be 3-D (N, H, W), got 255 dimensions" in msg
    assert len(msg.replace(str(path), "")) < 200


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_255_dimensions_short_message_from_read_idx(tmp_path, gz):
    path = tmp_path / ("big.idx" + (".gz" if gz else ""))
    data = header((2**32 - 1,) * 255) + bytes(10)
    if gz:
        write_gz_stream(path, data, 0)
    else:
        path.write_bytes(data)
    with pytest.raises(IDXError) as info:
        read_idx(path)
    assert "truncated payload" in info.value.problem and "(255 dims)" in info.value.problem
    assert len(info.value.problem) < 200


def test_29x29_images(tiny_idx_dir):
    write_idx(tiny_idx_dir / "train-images-idx3-ubyte.gz", np.zeros((20, 29, 29), np.uint8))
    msg = load_error(tiny_idx_dir, verify=False)
    assert "train-images-idx3-ubyte.gz: images are 29x29, expected 28x28 (shape 20x29x29)" in msg


def test_label_10(tiny_idx_dir):
    labels = np.arange(10, dtype=np.uint8)
    labels[3] = 10
    write_idx(tiny_idx_dir / "t10k-labels-idx1-ubyte.gz", labels)
    msg = load_error(tiny_idx_dir, verify=False)
    assert "t10k-labels-idx1-ubyte.gz: label 10 out of range 0..9 (1 of 10 labels out of range)" in msg


def test_count_mismatch(tiny_idx_dir):
    write_idx(tiny_idx_dir / "t10k-labels-idx1-ubyte.gz", np.zeros(12, np.uint8))
    msg = load_error(tiny_idx_dir, verify=False)
    assert "t10k-labels-idx1-ubyte.gz: 12 labels but t10k-images-idx3-ubyte.gz has 10 images" in msg


def test_train_and_test_swapped(tmp_path):
    folder = canonical_folder(tmp_path / "swapped", counts=(10000, 60000))
    msg = load_error(folder)
    assert "train-images-idx3-ubyte.gz: holds 10000 images, the size of the test set" in msg
    assert "look swapped" in msg and "SHA-256" not in msg


def test_labels_swapped(tmp_path):
    folder = canonical_folder(tmp_path / "labels")
    (folder / "train-labels-idx1-ubyte.gz").unlink()
    write_gz_stream(folder / "train-labels-idx1-ubyte.gz", header((10000,)), 10000)
    msg = load_error(folder)
    assert "train-labels-idx1-ubyte.gz: holds 10000 labels, the size of the test set" in msg


def test_structure_named_before_checksum(tmp_path):
    """A canonical-size label file with one bad label is reported as such, not as a SHA-256 mismatch."""
    folder = canonical_folder(tmp_path / "bad-label", label_tail=b"\x0c")
    msg = load_error(folder)
    assert "train-labels-idx1-ubyte.gz: label 12 out of range 0..9" in msg


def test_canonical_truncated_named_before_checksum(tmp_path):
    folder = canonical_folder(tmp_path / "cut")
    (folder / "t10k-images-idx3-ubyte.gz").unlink()
    write_gz_stream(folder / "t10k-images-idx3-ubyte.gz", header((10000, 28, 28)), 10000 * 784 - 784)
    msg = load_error(folder)
    assert "t10k-images-idx3-ubyte.gz: truncated payload" in msg and "SHA-256" not in msg


def test_sha_mismatch_message(tmp_path):
    folder = canonical_folder(tmp_path / "zeros")  # well-formed, but not the published bytes
    msg = load_error(folder)
    assert "train-images-idx3-ubyte.gz: differs from the published mnist train-images-idx3-ubyte" in msg
    assert "SHA-256" in msg and "delete it" in msg
    assert "verify" not in msg
    assert len(msg) < 400


# ---------------------------------------------------------------- gzip bombs


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    """About 1 MB of gzip that inflates to 1 GiB of zeros behind a valid MNIST train-images header."""
    path = tmp_path_factory.mktemp("bomb") / "train-images-idx3-ubyte.gz"
    write_gz_stream(path, header((60000, 28, 28)), 1 << 30, level=9)
    assert path.stat().st_size < 2 << 20
    return path


def _run_measured(code: str, tmp_path: Path) -> tuple[str, float]:
    """Run ``code`` in a fresh interpreter; return its last line of output and its peak RSS in MB.

    The peak is the kernel's high-water mark of the new program's memory (``VmHWM``). Linux carries
    ``ru_maxrss`` over from the parent across fork and exec, so there it would report the size of
    this test process instead; it is used only where ``VmHWM`` is missing.
    """
    prog = textwrap.dedent(code) + textwrap.dedent("""
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            with open("/proc/self/status") as f:
                peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        except (OSError, StopIteration):
            pass
        print(peak)
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT), XDG_CACHE_HOME=str(tmp_path / "xdg-cache"))
    env.pop(ds.ENV_VAR, None)
    out = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, env=env, timeout=300,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    return lines[-2], int(lines[-1]) / 1024  # ru_maxrss is in KiB on Linux


def test_gzip_bomb_in_a_folder_is_rejected_with_bounded_memory(bomb, tmp_path):
    folder = tmp_path / "bombed"
    folder.mkdir()
    (folder / bomb.name).symlink_to(bomb)
    for fname in NAMES[1:]:
        (folder / (fname + ".gz")).write_bytes(b"never read")
    msg, peak = _run_measured(f"""
        from nprune.data.datasets import DataError, load_dataset
        try:
            load_dataset("mnist", data_dir={str(folder)!r}, download=False)
        except DataError as exc:
            print(exc)
        else:
            print("loaded")
    """, tmp_path)
    print(f"peak memory while rejecting the local bomb: {peak:.0f} MB")
    assert peak < PEAK_LIMIT_MB
    assert "train-images-idx3-ubyte.gz: trailing bytes after payload" in msg
    assert "needs 47040000 payload bytes, file has more than" in msg


def test_gzip_bomb_from_a_tampered_mirror(bomb, tmp_path):
    msg, peak = _run_measured(f"""
        import dataclasses, io, urllib.request
        from nprune.data import datasets as ds
        from nprune.data.datasets import DataError, find_data_dir

        class Response(io.BytesIO):
            headers = {{}}  # no Content-Length, like a chunked reply

        def mirror(url, *a, **k):
            return Response(open({str(bomb)!r}, "rb").read())

        urllib.request.urlopen = mirror
        spec = ds.DATASETS["mnist"]
        ds.DATASETS["mnist"] = dataclasses.replace(spec, system_dirs=(), mirrors=("https://mirror.invalid/mnist/",))
        try:
            find_data_dir("mnist")
        except DataError as exc:
            print(exc)
        else:
            print("accepted")
    """, tmp_path)
    print(f"peak memory while rejecting the mirror's bomb: {peak:.0f} MB")
    assert peak < PEAK_LIMIT_MB
    assert "https://mirror.invalid/mnist/train-images-idx3-ubyte.gz: rejected, trailing bytes after payload" in msg
    assert not (tmp_path / "xdg-cache" / "nprune" / "mnist").exists()  # no temp file left behind


def test_small_gzip_declaring_a_huge_payload_is_not_inflated(tmp_path):
    path = write_gz_stream(tmp_path / "x.gz", header((60000, 28, 28)), 1000)
    with pytest.raises(IDXError, match="more than a gzip file of .* bytes can hold"):
        read_idx(path)


# ---------------------------------------------------------------- mirrors and the download cap


class FakeResponse(io.BytesIO):
    def __init__(self, data: bytes, length: str | None = None):
        super().__init__(data)
        self.headers = {} if length is None else {"Content-Length": length}


def _serve(monkeypatch, data: bytes, length: str | None = None) -> list:
    calls = []

    def fake(url, *a, **k):
        calls.append(url)
        return FakeResponse(data, length)

    monkeypatch.setattr(urllib.request, "urlopen", fake)
    return calls


def _mnist_from(monkeypatch, mirrors, **changes):
    spec = dataclasses.replace(ds.DATASETS["mnist"], mirrors=mirrors, **changes)
    monkeypatch.setitem(ds.DATASETS, "mnist", spec)
    return spec


def test_download_cap_counts_bytes_sent(monkeypatch):
    spec = _mnist_from(monkeypatch, ("https://mirror.invalid/",))
    cache = ds.cache_dir("mnist")
    cache.mkdir(parents=True)
    for fname in NAMES:
        if fname != "train-labels-idx1-ubyte":
            (cache / (fname + ".gz")).write_bytes(b"present")  # only the labels are downloaded
    limit = download.download_limit(spec, "y_train")
    assert limit < 2 << 20  # the canonical labels file is 60008 bytes
    _serve(monkeypatch, bytes(limit + 1))
    with pytest.raises(DataError, match=f"sent more than the {limit} bytes allowed"):
        find_data_dir("mnist")
    assert sorted(p.name for p in cache.iterdir()) == sorted(n + ".gz" for n in NAMES if "train-labels" not in n)


def test_download_cap_refuses_announced_size(monkeypatch):
    _mnist_from(monkeypatch, ("https://mirror.invalid/",))
    _serve(monkeypatch, b"", length=str(1 << 40))
    with pytest.raises(DataError, match=f"announces {1 << 40} bytes"):
        find_data_dir("mnist")


def test_downloaded_file_checked_for_structure_before_checksum(monkeypatch):
    _mnist_from(monkeypatch, ("https://mirror.invalid/",))
    _serve(monkeypatch, header((10000, 28, 28)))
    with pytest.raises(DataError, match="rejected, holds 10000 images, the size of the test set") as info:
        find_data_dir("mnist")
    assert "SHA-256" not in str(info.value)


def test_no_plain_http_mirrors():
    for spec in ds.DATASETS.values():
        assert spec.mirrors and all(m.startswith("https://") for m in spec.mirrors), spec.name


def test_plain_http_mirror_needs_checksums(monkeypatch):
    _mnist_from(monkeypatch, ("http://mirror.invalid/",), sha256=None)
    calls = _serve(monkeypatch, b"")
    with pytest.raises(DataError, match="skipped, plain http and no SHA-256"):
        find_data_dir("mnist")
    assert calls == []
