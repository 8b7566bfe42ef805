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
    "shape_text",
    "TAIL_MARGIN",
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
        problem = " ".join(str(problem).split())
        self.problem = problem if len(problem) <= _MAX_PROBLEM else problem[:_MAX_PROBLEM - 3] + "..."
        super().__init__(f"{_one_line(self.path)}: {self.problem}")


_MAX_PROBLEM = 300
#: Compressed bytes read from a gzip file at a time.
_IN_CHUNK = 1 << 16
#: Largest piece of decompressed data produced at a time.
_OUT_CHUNK = 1 << 20
#: Bytes read past the size the header declares before giving up on counting them exactly.
TAIL_MARGIN = 1 << 16
#: Deflate cannot inflate one byte to more than 1032 (a whole gzip file holds less than this).
_MAX_INFLATE_RATIO = 1032


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _is_gz_name(path) -> bool:
    return os.fspath(path).lower().endswith(".gz")


def shape_text(dims) -> str:
    """``60000x28x28``; a long shape is cut short (``1x2x3x4x...(255 dims)``)."""
    dims = tuple(dims)
    if len(dims) > 6:
        return "x".join(map(str, dims[:4])) + f"x...({len(dims)} dims)"
    return "x".join(map(str, dims)) or "()"


def _count_text(n: int) -> str:
    return str(n) if n < 10**15 else f"about 2**{n.bit_length() - 1}"


def _chunks(path, fh, gz: bool):
    """Yield the decompressed contents of the open file ``fh`` in pieces of at most ``_OUT_CHUNK``
    bytes, so a caller can stop early (a gzip bomb is never inflated past what the caller reads).
    Concatenated gzip members are read like ``gzip.decompress`` reads them."""
    if not gz:
        while True:
            chunk = fh.read(_OUT_CHUNK)
            if not chunk:
                return
            yield chunk
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    pending = b""
    try:
        while True:
            if not pending:
                pending = fh.read(_IN_CHUNK)
                if not pending:
                    out = d.decompress(b"", _OUT_CHUNK)  # output zlib still holds
                    while out:
                        yield out
                        out = d.decompress(d.unconsumed_tail, _OUT_CHUNK)
                    if not d.eof:
                        raise IDXError(path, "truncated gzip data (the file ends inside the compressed stream)")
                    return
            out = d.decompress(pending, _OUT_CHUNK)
            if out:
                yield out
            if d.eof:
                pending = d.unused_data
                while len(pending) < 2:
                    more = fh.read(_IN_CHUNK)
                    if not more:
                        break
                    pending += more
                if not pending:
                    return
                if pending[:2] != _GZIP_MAGIC:
                    raise IDXError(path, "corrupt gzip data (bytes that are not gzip follow the compressed stream)")
                d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            else:
                pending = d.unconsumed_tail
    except zlib.error as exc:
        raise IDXError(path, f"corrupt gzip data ({exc})") from None


def _parse_header(buf, path, final: bool):
    """``(dtype, dims, header_len)`` from the first bytes of an IDX file, or None when more bytes are
    needed. A defect is reported as soon as the bytes showing it are there; ``final`` means no more
    bytes will come."""
    n = len(buf)
    if n >= 2 and (buf[0] != 0 or buf[1] != 0):
        raise IDXError(path, f"bad magic: first two bytes are {bytes(buf[:2]).hex()}, expected 0000 (not an IDX file)")
    if n >= 3 and buf[2] not in TYPE_CODES:
        known = ", ".join(f"0x{c:02X}" for c in TYPE_CODES)
        raise IDXError(path, f"unknown type code 0x{buf[2]:02X} (known: {known})")
    if n < 4:
        if final:
            raise IDXError(path, f"truncated header: {n} bytes, need at least 4")
        return None
    ndim = buf[3]
    if ndim < 1:
        raise IDXError(path, "header declares 0 dimensions (need at least 1)")
    header_len = 4 + 4 * ndim
    if n < header_len:
        if final:
            raise IDXError(path, f"truncated header: {n} bytes, need {header_len} for {ndim} dimensions")
        return None
    dims = struct.unpack(">" + "I" * ndim, bytes(buf[4:header_len]))
    return TYPE_CODES[buf[2]], dims, header_len


def _length_problem(dtype, dims, expected: int, actual: int, more: bool = False) -> str:
    kind = "truncated payload" if actual < expected and not more else "trailing bytes after payload"
    has = f"more than {actual}" if more else str(actual)
    return (f"{kind}: shape {shape_text(dims)} of {dtype.newbyteorder('=').name} needs "
            f"{_count_text(expected)} payload bytes, file has {has}")


def _read_stream(path, chunks, size: int, gz: bool, check_header, hasher) -> np.ndarray:
    """Parse an IDX file arriving in ``chunks`` (decompressed pieces). Nothing beyond the header's
    declared size plus :data:`TAIL_MARGIN` is read, and the payload buffer is only allocated once
    the header has passed every check (``check_header`` included)."""
    head = bytearray()
    parsed = None
    for chunk in chunks:
        if hasher is not None:
            hasher.update(chunk)
        head += chunk
        parsed = _parse_header(head, path, final=False)
        if parsed is not None:
            break
    if parsed is None:
        parsed = _parse_header(head, path, final=True)
    dtype, dims, header_len = parsed
    count = 1
    for d in dims:
        count *= d
    expected = count * dtype.itemsize
    if check_header is not None:
        problem = check_header(dtype.newbyteorder("="), dims)
        if problem:
            raise IDXError(path, problem)
    if not gz and size != header_len + expected:
        raise IDXError(path, _length_problem(dtype, dims, expected, size - header_len))
    if gz and header_len + expected > _MAX_INFLATE_RATIO * size + 1024:
        raise IDXError(path, f"truncated payload: shape {shape_text(dims)} of {dtype.newbyteorder('=').name} "
                             f"needs {_count_text(expected)} payload bytes, more than a gzip file of {size} "
                             f"bytes can hold")
    out = np.empty(expected, np.uint8)
    filled = extra = 0
    pieces = [memoryview(head)[header_len:]]

    for piece in _chain(pieces, chunks, hasher):
        take = min(len(piece), expected - filled)
        if take:
            out[filled:filled + take] = np.frombuffer(piece, np.uint8, count=take)
            filled += take
        extra += len(piece) - take
        if extra > TAIL_MARGIN:
            raise IDXError(path, _length_problem(dtype, dims, expected, expected + TAIL_MARGIN, more=True))
    if filled < expected or extra:
        raise IDXError(path, _length_problem(dtype, dims, expected, filled + extra))
    arr = out.view(dtype).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=False) if dtype.itemsize == 1 else arr.astype(
        dtype.newbyteorder("="))


def _chain(first, rest, hasher):
    yield from first
    for chunk in rest:
        if hasher is not None:
            hasher.update(chunk)
        yield chunk


def _open(path):
    """Open ``path``; return the file, its size and whether it is gzip (by the magic)."""
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise IDXError(path, f"cannot read file ({exc.strerror or exc})") from None
    try:
        size = os.fstat(fh.fileno()).st_size
        gz = fh.read(2) == _GZIP_MAGIC
        fh.seek(0)
    except OSError as exc:
        fh.close()
        raise IDXError(path, f"cannot read file ({exc.strerror or exc})") from None
    if not gz and _is_gz_name(path):
        fh.close()
        raise IDXError(path, "not a gzip file (name ends in .gz but the gzip magic 1f 8b is missing)")
    return fh, size, gz


def read_payload(path) -> bytes:
    """Return the decompressed bytes of ``path`` (raw files are returned as they are).

    Gzip is detected by the ``1f 8b`` magic; a file whose name ends in ``.gz`` but is not gzip,
    a corrupt or truncated gzip stream, and any OS error raise :class:`IDXError`. The whole
    payload is held in memory, however large: to read an IDX file use :func:`read_idx`, which
    stops at the size its header declares.
    """
    fh, _, gz = _open(path)
    with fh:
        try:
            return b"".join(_chunks(path, fh, gz))
        except OSError as exc:
            raise IDXError(path, f"cannot read file ({exc.strerror or exc})") from None


def parse_idx(payload: bytes, path=None) -> np.ndarray:
    """Parse decompressed IDX bytes into an array (native byte order, shape from the header).

    ``path`` is only used in error messages. The payload length must match the header exactly.
    """
    return _read_stream(path, iter([bytes(payload)]), len(payload), False, None, None)


def read_idx(path, check_header=None, hasher=None) -> np.ndarray:
    """Read an IDX file (raw or gzip) and return its array in native byte order.

    The file is streamed: its header is checked as soon as it has arrived, and reading stops once
    the data go more than :data:`TAIL_MARGIN` bytes past the size the header declares, so a small
    gzip file that inflates to gigabytes costs no more memory than the header's array.
    ``check_header(dtype, dims)``, when given, is called with the header's (native) dtype and
    dimensions before the payload is read; a non-empty string it returns is raised as the problem.
    ``hasher`` (e.g. ``hashlib.sha256()``) is updated with every decompressed byte read.

    Raises :class:`IDXError` (one line, naming the file) on a truncated header, wrong magic,
    unknown type code, a payload whose length differs from ``prod(dims) * itemsize``, a ``.gz``
    name on a non-gzip file, corrupt gzip data, or an unreadable file.
    """
    fh, size, gz = _open(path)
    with fh:
        try:
            return _read_stream(path, _chunks(path, fh, gz), size, gz, check_header, hasher)
        except OSError as exc:
            raise IDXError(path, f"cannot read file ({exc.strerror or exc})") from None


def sha256_of_payload(path) -> str:
    """Return the hex SHA-256 of the decompressed bytes of ``path`` (raw files: of the file)."""
    h = hashlib.sha256()
    fh, _, gz = _open(path)
    with fh:
        try:
            for chunk in _chunks(path, fh, gz):
                h.update(chunk)
        except OSError as exc:
            raise IDXError(path, f"cannot read file ({exc.strerror or exc})") from None
    return h.hexdigest()


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
