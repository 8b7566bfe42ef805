"""Tests for nprune.data.idx: round trips and every malformed-input case."""
from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from nprune.data.idx import IDXError, parse_idx, read_idx, read_payload, sha256_of_payload, write_idx

DTYPES = [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64]
SHAPES = [(7,), (3, 5), (2, 3, 4), (2, 1, 3, 2)]


def _sample(dtype, shape, rng):
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype) * 1e3
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, shape, endpoint=True, dtype=dtype)


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{len(s)}d")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_round_trip(tmp_path, dtype, shape, gz):
    arr = _sample(dtype, shape, np.random.default_rng(0))
    path = tmp_path / ("a.idx" + (".gz" if gz else ""))
    write_idx(path, arr)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == gz
    out = read_idx(path)
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    assert out.shape == shape
    np.testing.assert_array_equal(out, arr)
    assert out.flags.writeable and out.flags.c_contiguous


def test_big_endian_on_disk_and_non_native_input(tmp_path):
    path = tmp_path / "x.idx"
    write_idx(path, np.array([1, 256], dtype="<i2"))
    assert path.read_bytes() == bytes([0, 0, 0x0B, 1, 0, 0, 0, 2, 0, 1, 1, 0])
    write_idx(path, np.array([1.5, -2.0], dtype=">f8"))
    np.testing.assert_array_equal(read_idx(path), [1.5, -2.0])


def test_compress_flag_and_gzip_detected_by_magic(tmp_path):
    arr = np.arange(12, dtype=np.int32).reshape(3, 4)
    path = tmp_path / "no-suffix"
    write_idx(path, arr, compress=True)
    assert path.read_bytes()[:2] == b"\x1f\x8b"
    np.testing.assert_array_equal(read_idx(path), arr)
    with pytest.raises(IDXError):
        write_idx(tmp_path / "c.gz", arr, compress=False)


def test_write_is_atomic_and_leaves_no_temp(tmp_path):
    path = tmp_path / "a.idx"
    write_idx(path, np.zeros(3, np.uint8))
    write_idx(path, np.ones(4, np.uint8))
    assert [p.name for p in tmp_path.iterdir()] == ["a.idx"]
    np.testing.assert_array_equal(read_idx(path), np.ones(4, np.uint8))


def test_write_rejects_unsupported(tmp_path):
    for bad in (np.zeros(3, np.uint16), np.zeros(3, bool), np.zeros(3, np.int64), np.float32(1.0)):
        with pytest.raises(IDXError):
            write_idx(tmp_path / "bad.idx", bad)
    assert not list(tmp_path.iterdir())


def test_sha256_of_payload_ignores_compression(tmp_path):
    arr = np.arange(100, dtype=np.uint8)
    write_idx(tmp_path / "a", arr)
    write_idx(tmp_path / "a.gz", arr)
    assert sha256_of_payload(tmp_path / "a") == sha256_of_payload(tmp_path / "a.gz")
    assert read_payload(tmp_path / "a.gz") == (tmp_path / "a").read_bytes()


def _header(code=0x08, dims=(3,)):
    return bytes([0, 0, code, len(dims)]) + struct.pack(">" + "I" * len(dims), *dims)


BAD = {
    "empty": (b"", "truncated header"),
    "short-magic": (b"\x00\x00\x08", "truncated header"),
    "short-dims": (bytes([0, 0, 8, 2, 0, 0, 0, 3, 0, 0]), "truncated header"),
    "truncated-payload": (_header(dims=(2, 3)) + b"\x01" * 5, "truncated payload"),
    "trailing-bytes": (_header(dims=(3,)) + b"\x01" * 4, "trailing bytes"),
    "wide-payload-short": (_header(0x0C, (2,)) + b"\x00" * 7, "needs 8 payload bytes, file has 7"),
    "bad-magic": (b"\x01\x00\x08\x01" + struct.pack(">I", 1) + b"\x00", "bad magic"),
    "unknown-type": (_header(code=0x0A) + b"\x00" * 3, "unknown type code 0x0A"),
    "zero-dims": (bytes([0, 0, 8, 0]), "0 dimensions"),
}


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input(tmp_path, case, gz):
    data, needle = BAD[case]
    path = tmp_path / (f"bad-{case}.idx" + (".gz" if gz else ""))
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(IDXError) as info:
        read_idx(path)
    msg = str(info.value)
    assert path.name in msg and needle in msg
    assert "\n" not in msg
    assert isinstance(info.value, ValueError)


def test_gz_name_but_not_gzip(tmp_path):
    path = tmp_path / "labels.gz"
    path.write_bytes(_header() + b"\x00\x01\x02")
    with pytest.raises(IDXError, match="not a gzip file") as info:
        read_idx(path)
    assert "labels.gz" in str(info.value) and "\n" not in str(info.value)


def test_corrupt_gzip(tmp_path):
    path = tmp_path / "c.idx.gz"
    path.write_bytes(gzip.compress(_header() + b"\x00\x01\x02")[:-6])
    with pytest.raises(IDXError, match="gzip") as info:
        read_idx(path)
    assert "c.idx.gz" in str(info.value) and "\n" not in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(IDXError, match="nope.idx"):
        read_idx(tmp_path / "nope.idx")


def test_concatenated_gzip_members(tmp_path):
    arr = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    raw = _header(0x0B, (2, 3, 4)) + arr.astype(">i2").tobytes()
    path = tmp_path / "two.gz"
    path.write_bytes(gzip.compress(raw[:10]) + gzip.compress(raw[10:]))
    np.testing.assert_array_equal(read_idx(path), arr)


def test_garbage_after_gzip_stream(tmp_path):
    path = tmp_path / "g.gz"
    path.write_bytes(gzip.compress(_header() + b"\x00\x01\x02") + b"junk")
    with pytest.raises(IDXError, match="corrupt gzip data"):
        read_idx(path)


def test_gzip_checksum_error(tmp_path):
    data = bytearray(gzip.compress(_header() + b"\x00\x01\x02"))
    data[-8] ^= 0xFF  # CRC-32 of the member
    path = tmp_path / "crc.gz"
    path.write_bytes(bytes(data))
    with pytest.raises(IDXError, match="corrupt gzip data"):
        read_idx(path)


def test_header_checked_before_the_payload_is_read(tmp_path):
    """``check_header`` sees the header first; a rejected header stops reading after the first piece."""
    path = tmp_path / "big.gz"
    write_idx(path, np.zeros((64, 1024, 64), np.uint8))  # 4 MiB, more than one decompressed piece
    seen = []

    class Counter:
        n = 0

        def update(self, b):
            self.n += len(b)

    counter = Counter()
    with pytest.raises(IDXError, match="big.gz: no thanks"):
        read_idx(path, check_header=lambda dtype, dims: seen.append((dtype, dims)) or "no thanks", hasher=counter)
    assert seen == [(np.dtype(np.uint8), (64, 1024, 64))]
    assert counter.n <= 1 << 20


def test_parse_idx_long_shape_message_is_short():
    with pytest.raises(IDXError) as info:
        parse_idx(_header(dims=(2**32 - 1,) * 255))
    assert "(255 dims)" in str(info.value) and "about 2**" in str(info.value)
    assert len(str(info.value)) < 200
