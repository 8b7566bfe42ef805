"""Work items of an element-wise update over a model's flat buffers (:mod:`nprune.optim`'s dense path).

A work item is a tuple ``(p, g, mask or None, *arrays)`` of arrays of one shape (the parameter, its
gradient, the mask to re-apply after the update, then the optimiser's state and scratch arrays, a
scratch slot being None until filled). :func:`chunked_items` cuts each item into flat chunks;
:func:`flat_runs` first merges the items of parameters that lie back to back in the flat buffers of
:class:`~nprune.model.Sequential` (and of the optimiser's state, laid out at the same offsets), so
that a whole model is a few chunks of ``chunk`` entries rather than one or more short items per
parameter. Every entry goes through the same element-wise arithmetic either way: results do not
change by a bit.
"""
from __future__ import annotations

import numpy as np


def chunked_items(work, chunk: int) -> list:
    """The work items ``(p, g, mask, *arrays)`` with every item larger than ``chunk`` entries cut
    into items of flat views of at most ``chunk`` entries (C-contiguous arrays only: views)."""
    out = []
    for w in work:
        n = w[0].size
        if n <= chunk or not all(a is None or a.flags.c_contiguous for a in w):
            out.append(w)
            continue
        flat = [None if a is None else a.reshape(-1) for a in w]
        for lo in range(0, n, chunk):
            out.append(tuple(None if f is None else f[lo:lo + chunk] for f in flat))
    return out


def offset_in(a, flat) -> int | None:
    """Where the C-contiguous array ``a`` starts in the 1-D array ``flat`` (in entries), or None
    when ``a`` is not a view of ``flat``'s memory."""
    if a is None or flat is None or not a.flags.c_contiguous or a.dtype != flat.dtype:
        return None
    d = a.ctypes.data - flat.ctypes.data
    if d < 0 or d % a.itemsize or d + a.nbytes > flat.nbytes:
        return None
    return d // a.itemsize


def _root(a):
    while a.base is not None and isinstance(a.base, np.ndarray):
        a = a.base
    return a


def _follows(a, b) -> bool:
    """Whether the C-contiguous 1-D arrays ``a`` and ``b`` (or both None) are back to back in
    one buffer (``b`` starts where ``a`` ends)."""
    if a is None or b is None:
        return a is None and b is None
    return (a.dtype == b.dtype and _root(a) is _root(b) and b.flags.c_contiguous
            and a.ctypes.data + a.nbytes == b.ctypes.data)


def _joined(a, b):
    """One 1-D view over ``a`` then ``b`` (see :func:`_follows`)."""
    if a is None:
        return None
    r = _root(a).reshape(-1)
    lo = offset_in(a, r)
    return r[lo:lo + a.size + b.size]


def flat_runs(work, flat_params, chunk: int) -> list:
    """The dense path's work items ``(p, g, mask or None, *arrays)`` cut into chunks of at most
    ``chunk`` entries. Items of parameters that are back to back in the flat buffers (``flat_params``,
    and the state buffers at the same offsets) are merged into one run first, and each run is cut
    as a whole; the re-mask of a run reads a flat copy of the masks (1 where nothing is pruned),
    and a chunk that meets no masked parameter gets no mask. Other items: :func:`chunked_items`."""
    if flat_params is None:
        return chunked_items(work, chunk)
    ones = None
    runs, rest = [], []     # runs: [arrays of the run (1-D; the mask slot: flat mask), masked spans]
    for p, g, m, *s in work:
        off = offset_in(p, flat_params)
        flat = [None if a is None else a.reshape(-1) for a in (p, g, *s)]
        if off is None or not all(a is None or a.flags.c_contiguous for a in (p, g, *s)):
            rest.append((p, g, m, *s))
            continue
        if ones is None:
            ones = np.ones_like(flat_params)
        mview = ones[off:off + p.size]
        if m is not None:
            mview[...] = m.reshape(-1)
        arrays = [flat[0], flat[1], mview] + flat[2:]
        last = runs[-1] if runs else None
        if last is not None and all(_follows(a, b) for a, b in zip(last[0], arrays)):
            n = last[0][0].size
            if m is not None:
                last[1].append((n, n + p.size))
            last[0] = [_joined(a, b) for a, b in zip(last[0], arrays)]
        else:
            runs.append([arrays, [(0, p.size)] if m is not None else []])
    out = chunked_items(rest, chunk)
    for (p, g, m, *s), masked in runs:
        for lo in range(0, p.size, chunk):
            hi = min(lo + chunk, p.size)
            mm = m[lo:hi] if any(a < hi and b > lo for a, b in masked) else None
            out.append((p[lo:hi], g[lo:hi], mm, *(None if a is None else a[lo:hi] for a in s)))
    return out
