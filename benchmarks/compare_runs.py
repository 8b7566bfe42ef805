"""Compare two run folders file by file, timings excepted.

    python benchmarks/compare_runs.py RUNS_A RUNS_B

Both arguments are ``--out`` folders (or single run folders). Every file is compared:

- ``*.npz``: the same array names, dtypes, shapes and bytes (the zip container itself carries
  write times, so the archives are compared by their arrays);
- ``timing.json``: skipped (wall-clock seconds);
- ``results.csv`` and ``summary.md``: byte for byte without their wall-clock columns and section
  (:func:`nprune.experiment.report.without_timings`);
- every other file: byte for byte (``metrics.json``, ``settings.json``, plots, ...). ``--skip GLOB`` leaves more files out, e.g. ``--skip '*.png'``.

Temporary files (``.*.tmp``) are ignored. Prints one line per difference and a closing count;
exits 1 when anything differs, so a script can use it as a check. Used to show that a change of
the code leaves the results of ``python -m nprune.experiment`` unchanged: run the same command
at two commits into two ``--out`` folders, then compare them.
"""
from __future__ import annotations

import argparse
import fnmatch
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nprune.experiment.report import without_timings  # noqa: E402


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")
            if p.is_file() and not (p.name.startswith(".") and p.name.endswith(".tmp"))}


def _npz_equal(a: Path, b: Path) -> str | None:
    with np.load(a, allow_pickle=False) as za, np.load(b, allow_pickle=False) as zb:
        if sorted(za.files) != sorted(zb.files):
            return f"arrays {sorted(za.files)} != {sorted(zb.files)}"
        for k in za.files:
            x, y = za[k], zb[k]
            if x.dtype != y.dtype or x.shape != y.shape:
                return f"{k}: {x.dtype}{x.shape} != {y.dtype}{y.shape}"
            if x.tobytes() != y.tobytes():
                n = int(np.sum(x.view(np.uint8) != y.view(np.uint8)))
                return f"{k}: {n} bytes differ"
    return None


def compare(a: Path, b: Path, skip=()) -> list[str]:
    """One line per difference between folders ``a`` and ``b`` (empty: the same results)."""
    skip = ("timing.json", "time_vs_weights.*") + tuple(skip)
    keep = lambda p: not any(fnmatch.fnmatch(Path(p).name, g) for g in skip)  # noqa: E731
    fa, fb = set(filter(keep, _files(a))), set(filter(keep, _files(b)))
    out = [f"only in {a}: {p}" for p in sorted(fa - fb)] + [f"only in {b}: {p}" for p in sorted(fb - fa)]
    for p in sorted(fa & fb):
        if p.endswith(".npz"):
            why = _npz_equal(a / p, b / p)
        else:
            name = Path(p).name
            same = without_timings(name, (a / p).read_bytes()) == without_timings(name, (b / p).read_bytes())
            why = None if same else "bytes differ"
        if why:
            out.append(f"differs: {p}: {why}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--skip", action="append", default=[], metavar="GLOB",
                    help="file names to leave out (repeatable)")
    args = ap.parse_args(argv)
    for d in (args.a, args.b):
        if not d.is_dir():
            print(f"compare_runs: {d}: not a folder", file=sys.stderr)
            return 2
    diffs = compare(args.a, args.b, args.skip)
    for line in diffs:
        print(line)
    n = len(_files(args.a) | _files(args.b))
    print(f"{n} files, {len(diffs)} differences")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
