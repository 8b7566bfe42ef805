"""Checks of one file of an MNIST-style data set, structure first and checksum last.

The header is judged before any payload byte is read (element type, number of dimensions, image
size, record count against the canonical one and against the images' count), reading stops at the
size the header declares (:func:`nprune.data.idx.read_idx`), labels are checked for range, and
only a file that passes all of that is compared with its published SHA-256. A mismatch message
therefore names the real defect of a malformed file, and a SHA-256 mismatch means a well-formed
file with other contents.

Problems are raised as :class:`~nprune.data.idx.IDXError` (one line: ``"<file>: <problem>"``);
:mod:`.datasets` turns them into ``DataError``.
"""
from __future__ import annotations

import hashlib

import numpy as np

from .idx import IDXError, read_idx, shape_text

__all__ = ["read_checked", "header_problem", "sha256_problem", "canonical_bytes"]


def _split(role: str) -> str:
    return "train" if role.endswith("train") else "test"


def canonical_bytes(spec, role: str) -> int:
    """Size of the canonical uncompressed IDX file in ``role`` (header and payload)."""
    shape = spec.expected_shape(role)
    n = 1
    for d in shape:
        n *= d
    return 4 + 4 * len(shape) + n


def header_problem(spec, role: str, dtype, dims, verify: bool, n_images: int | None = None,
                   images_name: str = "the images file") -> str | None:
    """What is wrong with an IDX header for ``role`` of ``spec``, or None.

    With ``verify`` the record count must be the canonical one (a count equal to the other split's
    is reported as swapped train/test files); ``n_images`` is the count of the matching images
    file, which a labels file must equal.
    """
    if dtype != np.uint8:
        return f"dtype {dtype}, expected uint8"
    images = role.startswith("x")
    if images and len(dims) != 3:
        return f"images must be 3-D (N, H, W), got {len(dims)} dimensions (shape {shape_text(dims)})"
    if not images and len(dims) != 1:
        return f"labels must be 1-D (N,), got {len(dims)} dimensions (shape {shape_text(dims)})"
    if images and tuple(dims[1:]) != tuple(spec.image_shape):
        want = "x".join(map(str, spec.image_shape))
        return f"images are {dims[1]}x{dims[2]}, expected {want} (shape {shape_text(dims)})"
    what = "images" if images else "labels"
    if verify:
        want = spec.expected_shape(role)
        other = spec.n_test if _split(role) == "train" else spec.n_train
        if dims[0] != want[0] and dims[0] == other:
            other_split = "test" if _split(role) == "train" else "train"
            return (f"holds {dims[0]} {what}, the size of the {other_split} set; {spec.name} has {want[0]} "
                    f"{_split(role)} {what}: the train and t10k files look swapped")
        if tuple(dims) != want:
            return f"shape {tuple(dims)}, expected {want} for {spec.name}"
    if not images and n_images is not None and dims[0] != n_images:
        return f"{dims[0]} labels but {images_name} has {n_images} images"
    return None


def read_checked(spec, role: str, path, verify: bool, n_images: int | None = None,
                 images_name: str = "the images file") -> tuple[np.ndarray, str]:
    """Read ``path`` as ``role`` of ``spec`` with every structural check; return the array and the
    SHA-256 (hex) of its decompressed bytes. Raises :class:`IDXError` naming ``path``."""
    hasher = hashlib.sha256()

    def check(dtype, dims):
        return header_problem(spec, role, dtype, dims, verify, n_images, images_name)

    arr = read_idx(path, check_header=check, hasher=hasher)
    if role.startswith("y") and arr.size:
        top = int(arr.max())
        if top >= spec.n_classes:
            bad = int(np.count_nonzero(arr >= spec.n_classes))
            raise IDXError(path, f"label {top} out of range 0..{spec.n_classes - 1} "
                                 f"({bad} of {arr.size} labels out of range)")
    return arr, hasher.hexdigest()


def sha256_problem(spec, fname: str, got: str) -> str | None:
    """The mismatch of a well-formed file's SHA-256 with the published one, or None (also when the
    data set has no known hashes)."""
    if spec.sha256 is None:
        return None
    want = spec.sha256[fname]
    if got == want:
        return None
    return (f"differs from the published {spec.name} {fname} (SHA-256 of the decompressed data is "
            f"{got[:16]}..., expected {want[:16]}...)")
