"""Download one data-set file from its mirrors, checked before it is moved into place.

A download is bounded twice: the mirror may send at most the canonical uncompressed size of the file
plus a margin (:func:`download_limit`), and inflating it stops at the size its IDX header declares
(:func:`nprune.data.idx.read_idx`), so a tampered mirror serving a gzip bomb costs neither disk nor
memory. The file is then checked like a local one (:mod:`.checks`) and, last, against its published
SHA-256. A plain-http mirror is only used for a data set whose SHA-256 values are known.
"""
from __future__ import annotations

import os
import tempfile
import urllib.request
from pathlib import Path

from . import checks
from .idx import IDXError

__all__ = ["DOWNLOAD_TIMEOUT", "MAX_DOWNLOAD_BYTES", "download_limit", "fetch", "download_file"]

#: Seconds to wait on each mirror before trying the next one.
DOWNLOAD_TIMEOUT = 20.0
#: Refuse downloads larger than this (bytes as sent by the mirror), whatever the file.
MAX_DOWNLOAD_BYTES = 128 * 1024 * 1024
#: Bytes a mirror may send beyond the canonical uncompressed size of a file.
DOWNLOAD_MARGIN = 1 << 20


def short(exc: BaseException, limit: int = 100) -> str:
    """One line of at most ``limit`` characters describing ``exc``."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def download_limit(spec, role: str) -> int:
    """Most bytes a mirror may send for ``role``: the canonical uncompressed file plus a margin (a
    gzip file of it is smaller), never more than :data:`MAX_DOWNLOAD_BYTES`."""
    return min(MAX_DOWNLOAD_BYTES, checks.canonical_bytes(spec, role) + DOWNLOAD_MARGIN)


def fetch(url: str, dest_dir: Path, limit: int = MAX_DOWNLOAD_BYTES, timeout: float = DOWNLOAD_TIMEOUT) -> Path:
    """Download ``url`` into a new temporary file in ``dest_dir`` and return its path; OSError when
    the mirror announces or sends more than ``limit`` bytes."""
    fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=".download-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            announced = getattr(resp, "headers", None) and resp.headers.get("Content-Length")
            if announced and announced.isdigit() and int(announced) > limit:
                raise OSError(f"announces {announced} bytes, more than the {limit} allowed")
            total = 0
            while True:
                chunk = resp.read(1 << 20)
                if not chunk:
                    break
                total += len(chunk)
                if total > limit:
                    raise OSError(f"sent more than the {limit} bytes allowed")
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        unlink(Path(tmp))
        raise
    return Path(tmp)


def unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def check_download(tmp: Path, spec, role: str, fname: str) -> bool:
    """Verify a downloaded file (structure, then SHA-256); return whether it is gzip. Raises
    ValueError describing the first defect."""
    try:
        _, got = checks.read_checked(spec, role, tmp, verify=True)
    except IDXError as exc:
        raise ValueError(exc.problem) from None
    problem = checks.sha256_problem(spec, fname, got)
    if problem:
        raise ValueError(f"SHA-256 mismatch: {problem}")
    with open(tmp, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def mirror_urls(spec, fname: str) -> list[str]:
    return [(base if base.endswith("/") else base + "/") + fname + ".gz" for base in spec.mirrors]


def download_file(spec, role: str, fname: str, dest: Path) -> list[str]:
    """Fetch ``fname`` (as ``.gz``) from the mirrors of ``spec`` in turn into ``dest``; on success the
    checked file is moved into place and ``[]`` returned, else one reason per mirror."""
    reasons = []
    for url in mirror_urls(spec, fname):
        if url.lower().startswith("http:") and spec.sha256 is None:
            reasons.append(f"{url}: skipped, plain http and no SHA-256 to check the file against")
            continue
        try:
            tmp = fetch(url, dest, download_limit(spec, role))
        except Exception as exc:  # network, HTTP, bad URL, timeouts, too large: try the next mirror
            reasons.append(f"{url}: {short(exc)}")
            continue
        try:
            gz = check_download(tmp, spec, role, fname)
        except (ValueError, OSError) as exc:
            unlink(tmp)
            reasons.append(f"{url}: rejected, {short(exc, 240)}")
            continue
        os.replace(tmp, dest / (fname + ".gz" if gz else fname))
        return []
    return reasons
