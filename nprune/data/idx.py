"""Read and write IDX files, the format MNIST and Fashion-MNIST are distributed in.

An IDX file is a header followed by a dense, big-endian, C-ordered payload:

* bytes 0-1: zero
* byte 2: element type -- ``0x08`` uint8, ``0x09`` int8, ``0x0B`` int16, ``0x0C`` int32,
  ``0x0D`` float32, ``0x0E`` float64
* byte 3: number of dimensions ``ndim`` (at least 1)
* then ``ndim`` big-endian uint32 sizes, then ``prod(sizes) * itemsize`` bytes of data.

Files may be stored raw or gzip-compressed; :func:`read_idx` detects gzip by its ``1f 8b`` magic (a
file named ``*.gz`` that is not gzip is an error). Every problem is reported as :class:`IDXError`, a
``ValueError`` whose message is one line naming the file and the problem.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import struct
import zlib

import numpy as np

from .fsutil import atomic_write_bytes

__all__ = [
    "IDXError",
    "read_idx",
    "write_idx",
    "read_payload",
    "parse_idx",
    "sha256_of_payload",
    "TYPE_CODES",
]

#: IDX type code -> big-endian NumPy dtype of the payload.
TYPE_CODES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODE_OF_KIND = {(dt.kind, dt.itemsize): code for code, dt in TYPE_CODES.items()}
_GZIP_MAGIC = b"\x1f\x8b"


class IDXError(ValueError):
    """A malformed or unreadable IDX file; ``str(err)`` is one line: ``"<file>: <problem>"``."""

    def __init__(self, path, problem: str):
        self.path = os.fspath(path) if path is not None else "<bytes>"
        self.problem = " ".join(str(problem).split())
        super().__init__(f"{_one_line(self.path)}: {self.problem}")


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _is_gz_name(path) -> bool:
    return os.fspath(path).lower().endswith(".gz")


def read_payload(path) -> bytes:
    """Return the decompressed bytes of ``path`` (raw files are returned as they are).

    Gzip is detected by the ``1f 8b`` magic; a file whose name ends in ``.gz`` but is not gzip,
    a corrupt or truncated gzip stream, and any OS error raise :class:`IDXError`.
    """
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise IDXError(path, f"cannot read file ({exc.strerror or exc})") from None
    if data[:2] == _GZIP_MAGIC:
        try:
            return gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise IDXError(path, f"corrupt or truncated gzip data ({exc})") from None
    if _is_gz_name(path):
        raise IDXError(path, "not a gzip file (name ends in .gz but the gzip magic 1f 8b is missing)")
    return data


def parse_idx(payload: bytes, path=None) -> np.ndarray:
    """Parse decompressed IDX bytes into an array (native byte order, shape from the header).

    ``path`` is only used in error messages. The payload length must match the header exactly.
    """
    n = len(payload)
    if n < 4:
        raise IDXError(path, f"truncated header: {n} bytes, need at least 4")
    if payload[0] != 0 or payload[1] != 0:
        raise IDXError(path, f"bad magic: first two bytes are {payload[:2].hex()}, expected 0000 (not an IDX file)")
    code, ndim = payload[2], payload[3]
    if code not in TYPE_CODES:
        known = ", ".join(f"0x{c:02X}" for c in TYPE_CODES)
        raise IDXError(path, f"unknown type code 0x{code:02X} (known: {known})")
    if ndim < 1:
        raise IDXError(path, "header declares 0 dimensions (need at least 1)")
    header_len = 4 + 4 * ndim
    if n < header_len:
        raise IDXError(path, f"truncated header: {n} bytes, need {header_len} for {ndim} dimensions")
    dims = struct.unpack(">" + "I" * ndim, payload[4:header_len])
    dtype = TYPE_CODES[code]
    count = 1
    for d in dims:
        count *= d
    expected = count * dtype.itemsize
    actual = n - header_len
    if actual != expected:
        shape = "x".join(map(str, dims))
        kind = "truncated payload" if actual < expected else "trailing bytes after payload"
        raise IDXError(
            path,
            f"{kind}: shape {shape} of {dtype.newbyteorder('=').name} needs {expected} payload bytes, "
            f"file has {actual}",
        )
    arr = np.frombuffer(payload, dtype=dtype, count=count, offset=header_len)
    # astype always copies here: the result is writable, owns its data and is native-endian.
    return arr.astype(dtype.newbyteorder("="), copy=True).reshape(dims)


def read_idx(path) -> np.ndarray:
    """Read an IDX file (raw or gzip) and return its array in native byte order.

    Raises :class:`IDXError` (one line, naming the file) on a truncated header, wrong magic,
    unknown type code, a payload whose length differs from ``prod(dims) * itemsize``, a ``.gz``
    name on a non-gzip file, corrupt gzip data, or an unreadable file.
    """
    return parse_idx(read_payload(path), path)


def sha256_of_payload(path) -> str:
    """Return the hex SHA-256 of the decompressed bytes of ``path`` (raw files: of the file)."""
    return hashlib.sha256(read_payload(path)).hexdigest()


def write_idx(path, array, compress: bool | None = None) -> None:
    """Write ``array`` to ``path`` as an IDX file, atomically.

    Supported dtypes: uint8, int8, int16, int32, float32, float64 (any byte order); ``array`` must
    have at least one dimension, each smaller than 2**32. The file is gzip-compressed when
    ``compress`` is True or the name ends in ``.gz`` (``compress=False`` with a ``.gz`` name is an
    error). The data goes to a temporary file in the same folder that then replaces ``path``, so
    readers never see a half-written file.
    """
    arr = np.asarray(array)
    gz_name = _is_gz_name(path)
    if compress is False and gz_name:
        raise IDXError(path, "compress=False contradicts the .gz file name")
    gz = bool(compress) or gz_name
    code = _CODE_OF_KIND.get((arr.dtype.kind, arr.dtype.itemsize))
    if code is None:
        raise IDXError(path, f"unsupported dtype {arr.dtype} (IDX stores uint8, int8, int16, int32, float32, float64)")
    if arr.ndim < 1 or arr.ndim > 255:
        raise IDXError(path, f"IDX needs 1 to 255 dimensions, array has {arr.ndim}")
    if any(d >= 2**32 for d in arr.shape):
        raise IDXError(path, f"dimension too large for IDX in shape {arr.shape}")
    header = struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    data = header + np.ascontiguousarray(arr, dtype=TYPE_CODES[code]).tobytes()
    if gz:
        data = gzip.compress(data, compresslevel=6, mtime=0)
    atomic_write_bytes(path, data)
