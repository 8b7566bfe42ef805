"""Run folders: settings as a frozen dataclass, a folder named by a stable hash of them, atomic writes.

A run folder holds everything one experiment recipe produced::

    <out>/<net>-<hash>/settings.json
    <out>/<net>-<hash>/seed_<s>/init.npz                  the original initialisation
    <out>/<net>-<hash>/seed_<s>/dense/                    round 0 (shared by every strategy)
    <out>/<net>-<hash>/seed_<s>/<strategy>/round_<r>/     rounds 1..R
        masks.npz  start.npz  final.npz  metrics.json  timing.json

A round is finished when its ``metrics.json`` exists; it is written last, and every file is written to
a temporary name and moved into place with ``os.replace``, so a kill at any moment leaves either a
finished round or no round. Rerunning the same command skips finished rounds: resume for free.

The hash covers only what changes the numbers of a given (seed, strategy, round): net, data set,
initialiser, optimiser and its settings, iterations, evaluation period, validation size, pruning rates
and scope. Seeds, strategies and the number of rounds are not hashed, so a rerun with more seeds or
more rounds extends the same folder.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json


def stable_hash(obj, n: int = 10) -> str:
    """First ``n`` hex digits of the SHA-256 of ``obj``'s canonical JSON."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def dataclass_dict(dc) -> dict:
    """``dataclasses.asdict`` with tuples turned into lists (JSON-stable)."""
    def fix(v):
        if isinstance(v, (list, tuple)):
            return [fix(x) for x in v]
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        return v
    return {k: fix(v) for k, v in dataclasses.asdict(dc).items()}
