"""Measure the ``auto`` thresholds on real pruning masks: the table shipped in
``nprune/kernels/thresholds.json``.

``python -m nprune.kernels.calibrate calibrate`` scans random masks, the sparse kernels' worst case
at a given density; magnitude pruning leaves masks whose dead rows and columns (the MNIST border
pixels, dead units) the kernels skip, so they pay at higher densities. This script times each layer
of LeNet-300-100 and LeNet-5 on the masks of every round of the lottery-ticket schedule
(:func:`auto_check.imp_masks`: magnitude pruning of trained weights at Frankle & Carbin's rates)
with :func:`nprune.kernels.calibrate.measure_thresholds` (``masks=``, break-even margin
``--margin``), at the batch sizes a run uses -- training at the recipe's batch (60 / 64, class
``small``); inference at the evaluation chunks (512 rows for LeNet-300-100, class ``large``; 64 and
256 images for LeNet-5, class ``small``) -- in both memory orders (the ``_f`` modes), once at 1 BLAS
thread and once at 2. Only those (class, mode) entries enter the table (:data:`USED`). The threshold of an entry is the geometric mean of the last density where
the kernel is at least as fast as dense and the first where it is not.

The table for 1 thread is written as ``thresholds`` and the one for 2 threads as
``thresholds_by_threads["2"]`` (see :mod:`nprune.kernels.thresholds`); entries this script does not
use (batch 1; LeNet-300-100's training at large and inference at small batches; LeNet-5's large
batches) are kept from ``--base`` (by default the shipped table; in the shipped table they come from
the random-mask calibration, ``python -m nprune.kernels.calibrate calibrate --runs 2``).

Usage: python benchmarks/imp_thresholds.py [--out FILE] [--ship] [--base FILE] [--repeats 7] [--margin 1.0]
"""
from __future__ import annotations

import argparse
import copy
import json
import time

from _common import RESULTS, env_info


from auto_check import ROUNDS, imp_masks
from nprune.data.datasets import load_dataset, prepare
from nprune.kernels import calibrate
from nprune.kernels.thresholds import SHIPPED_FILE, THRESHOLDS_FORMAT, check_thresholds

BATCHES = {"lenet300": {"small": (60,), "large": (512,)},
           "lenet5": {"small": (64, 256)}}
TRAIN_MODES = ("train", "train_dx", "train_f", "train_dx_f")
EVAL_MODES = ("eval", "eval_f")
#: the (batch class, modes) a run meets, per net: only these measured entries enter the table
USED = {"lenet300": {"small": TRAIN_MODES, "large": EVAL_MODES},
        "lenet5": {"small": TRAIN_MODES + EVAL_MODES}}


def merge(base: dict, measured: dict) -> dict:
    """``base`` (a {shape: {class: {mode: threshold}}} table) with the ``measured`` entries
    (measured[net] = such a table) that a run uses (:data:`USED`) put in; a shape that gets an
    ``eval_f`` entry gets one in every class (batch 1: the same as its ``eval``)."""
    full = copy.deepcopy(base)
    for net, table in measured.items():
        for key, classes in table.items():
            for cls, modes in classes.items():
                used = {m: v for m, v in modes.items() if m in USED[net].get(cls, ())}
                full.setdefault(key, {}).setdefault(cls, {}).update(used)
            if any("eval_f" in m for m in full[key].values()):
                for modes in full[key].values():
                    modes.setdefault("eval_f", modes.get("eval"))
    return full
COMMAND = "python benchmarks/imp_thresholds.py"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(RESULTS / "imp_thresholds.json"),
                    help="the table with every measurement")
    ap.add_argument("--ship", action="store_true",
                    help="also write the table, without the measurements, as the shipped table")
    ap.add_argument("--base", default=str(SHIPPED_FILE))
    ap.add_argument("--repeats", type=int, default=calibrate.CAL_REPEATS)
    ap.add_argument("--margin", type=float, default=1.0)
    ap.add_argument("--iters-per-round", type=int, default=300)
    ap.add_argument("--data-dir", default=None)
    a = ap.parse_args()
    data = prepare(load_dataset("mnist", data_dir=a.data_dir, download=False), n_val=5000, seed=0)
    base = json.loads(open(a.base, encoding="utf-8").read())
    t0 = time.perf_counter()
    tables = {}
    meas = []
    for threads in (1, 2):
        measured = {}
        for net in ("lenet300", "lenet5"):
            rounds = imp_masks(net, data, ROUNDS[net], a.iters_per_round)
            specs = calibrate.calibration_layers([net])
            masks = {s["key"]: [r[s["name"] + ".W"] for r in rounds] for s in specs}
            t, m = calibrate.measure_thresholds(specs=specs, batches=BATCHES[net], masks=masks,
                                                threads=[threads], margin=a.margin,
                                                repeats=a.repeats, verbose=True)
            measured[net] = t
            meas += [dict(x, threads=threads, net=net) for x in m]
        tables[threads] = merge(base["thresholds"], measured)
        print(f"threads {threads}: {json.dumps(measured)}", flush=True)
    obj = {"format": THRESHOLDS_FORMAT, "source": "shipped",
           "command": f"{COMMAND} --margin {a.margin:g} --repeats {a.repeats}",
           "machine": env_info(), "margin": a.margin,
           "seconds": round(time.perf_counter() - t0, 1),
           "thresholds": tables[1], "thresholds_by_threads": {"2": tables[2]},
           "measurements": meas}
    check_thresholds(obj, a.out)
    with open(a.out, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
    print(f"wrote {a.out}")
    if a.ship:
        obj.pop("measurements")
        with open(SHIPPED_FILE, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1)
            f.write("\n")
        print(f"wrote {SHIPPED_FILE}")


if __name__ == "__main__":
    main()
