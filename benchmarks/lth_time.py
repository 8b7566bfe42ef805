"""The wall time of a ``--preset lth`` run predicted from kernel timings: how much of it is the
kernels themselves, and what the kernels would have to gain for a given wall time.

Input: the markdown that ``benchmarks/auto_check.py`` prints for LeNet-300-100 (its schedule is the
``lth`` preset's: 20/20/10% per round), at the BLAS thread count of a run's worker (1 for
``--jobs 2``). One round of the preset at weights level r costs, with no overhead at all:

    iterations x train_ms[r]                       (training steps: forward, backward, optimiser)
  + (iterations / eval_every) x infer_ms[r]         (validation evaluations, 5,000 images each)
  + 2 x 2 x infer_ms[r]                             (test set, 10,000 images, at most twice a round)

with ``train_ms`` and ``infer_ms`` (``infer C``) either auto's or the faster of dense and sparse
(``best``). The preset runs one dense round per seed and rounds 1..R per seed and strategy; the sum
over rounds divided by ``--jobs`` is the predicted wall time. ``--results`` adds the mean measured
seconds per round of a finished run (its ``results.csv``).

Usage: python benchmarks/auto_check.py --blas-threads 1 --nets lenet300 > auto1.md
       python benchmarks/lth_time.py auto1.md [--results RUN/results.csv] [--jobs 2] [--minutes 75]
"""
from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nprune.experiment.config import PRESETS  # noqa: E402

TEST_IMAGES_OVER_VAL = 2  # 10,000 test images against auto_check's 5,000 validation images


def read_auto_check(text: str, net: str = "lenet300") -> dict:
    """{round: {mode: (percent left, dense ms, sparse ms, auto ms, auto per layer)}} from auto_check's
    table of ``net``."""
    rows, in_net = defaultdict(dict), False
    for line in text.splitlines():
        if line.startswith("## "):
            in_net = line[3:].strip() == net
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if in_net and line.startswith("| ") and len(cells) >= 6 and cells[0].isdigit():
            rows[int(cells[0])][cells[2]] = (float(cells[1].rstrip("%")),
                                             *(float(c) for c in cells[3:6]), cells[6])
    if not rows:
        raise SystemExit(f"lth_time: no '## {net}' table of auto_check.py in the input")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("auto_check", help="auto_check.py's output for LeNet-300-100")
    ap.add_argument("--results", default=None, help="results.csv of a finished --preset lth run")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--minutes", type=float, default=75.0, help="the wall time to compare with")
    a = ap.parse_args()
    try:
        rows = read_auto_check(Path(a.auto_check).read_text())
    except OSError as e:
        raise SystemExit(f"lth_time: {a.auto_check}: {e.strerror}")
    p = PRESETS["lth"]
    s = p["nets"]["lenet300"]
    n_seeds, n_strat = len(p["seeds"]), len(p["strategies"])
    missing = [r for r in range(s["rounds"] + 1) if not {"train", "infer C"} <= rows[r].keys()]
    if missing:
        raise SystemExit(f"lth_time: {a.auto_check}: no train / infer C rows for rounds {missing}")
    evals = s["iterations"] // s["eval_every"] + 2 * TEST_IMAGES_OVER_VAL
    measured = defaultdict(list)
    if a.results:
        with open(a.results, newline="") as f:
            for m in csv.DictReader(f):
                measured[int(m["round"])].append(float(m["seconds"]))

    print(f"# The lth preset's wall time from kernel timings\n\n"
          f"{s['iterations']} iterations and {evals} evaluations of 5,000 images per round; "
          f"{n_seeds} seeds x {n_strat} strategies; --jobs {a.jobs}\n")
    head = ["round", "weights left", "rounds run", "train ms (auto / best)",
            "s per round: auto", "s per round: best"] + (["s per round: measured"] if a.results else [])
    print("| " + " | ".join(head) + " |\n" + "|---" * len(head) + "|")
    tot = {"auto": 0.0, "best": 0.0, "measured": 0.0}
    sparse_rounds, sparse_best = [], 0.0  # rounds where auto trains fc1 (88% of weights) sparse
    for r in range(s["rounds"] + 1):
        left, *train, layers = rows[r]["train"]
        infer = rows[r]["infer C"][1:4]
        n = n_seeds if r == 0 else n_seeds * n_strat
        sec = {"auto": (s["iterations"] * train[2] + evals * infer[2]) / 1e3,
               "best": (s["iterations"] * min(train) + evals * min(infer)) / 1e3}
        for k in sec:
            tot[k] += n * sec[k]
        if layers.startswith("S"):
            sparse_rounds.append(r)
            sparse_best += n * sec["best"]
        line = [str(r), f"{left:.1f}%", str(n), f"{train[2]:.2f} / {min(train):.2f}",
                f"{sec['auto']:.1f}", f"{sec['best']:.1f}"]
        if a.results:
            got = measured.get(r, [])
            tot["measured"] += sum(got)
            line.append(f"{sum(got) / len(got):.1f} ({len(got)})" if got else "-")
        print("| " + " | ".join(line) + " |")
    print()
    for k in ("auto", "best") + (("measured",) if a.results else ()):
        print(f"{k:>9}: {tot[k] / 60:7.1f} min of rounds, {tot[k] / a.jobs / 60:6.1f} min wall "
              f"with --jobs {a.jobs}")
    if sparse_rounds:
        print(f"\nrounds where auto trains fc1 sparse ({', '.join(map(str, sparse_rounds))}): "
              f"{sparse_best / a.jobs / 60:.1f} min wall at the best kernels; the others "
              f"{(tot['best'] - sparse_best) / a.jobs / 60:.1f} min")
    need = tot["best"] / a.jobs / 60 / a.minutes
    print(f"\nfor {a.minutes:g} min wall, every kernel call would have to be {need:.2f}x faster "
          f"than the faster of dense and sparse measured here")


if __name__ == "__main__":
    main()
