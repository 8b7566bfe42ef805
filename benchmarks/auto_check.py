"""Check the ``auto`` kernel choice: at every level of a lottery-ticket schedule, is ``--kernel auto``
within 5% of the faster of ``--kernel dense`` and ``--kernel sparse``?

Masks: real magnitude-pruned masks (:func:`nprune.pruning.magnitude_layerwise` of trained weights) at
Frankle & Carbin's per-round rates -- LeNet-300-100: hidden layers 20%, output layer 10%; LeNet-5:
conv 10%, fc1 20%, output layer 10% -- with ``--iters-per-round`` steps of training between rounds
(the recipe's optimiser and batch). Levels: 100, 51, 26, 13.5, 7, 3.6, 1.9% ... of the weights
(every round; ``--rounds`` picks some). The masks are cached in ``benchmarks/results/``.

At each level three models share the weights and masks and differ only in the kernel (``dense``,
``sparse``, ``auto`` with the thresholds table in use, or ``--thresholds FILE``); all three use the
default (compact) optimiser. Rows:

* ``train``: one training step at the recipe's batch (60 / 64): ``train_step`` + ``opt.step``;
* ``infer C``: ``evaluate`` of validation images at the training loop's evaluation batch (5,000)
  from the plain C-ordered array: 5,000 images for LeNet-300-100 (chunks of 512 or 1,024 rows), 1,024
  for LeNet-5 (its inference runs 256 images at a time whatever the batch);
* ``infer FM`` (networks without convolutions): the same from each model's feature-major
  evaluation copy (:func:`nprune.evaluate.feature_major`), the layout a run evaluates from when its
  first layer may run sparse.

Timing: ``--repeats`` rounds; in each, every model runs a block of calls of ~``--target`` seconds,
in an order that rotates round by round. Reported: the median seconds per call of each model, and
auto's ratio to the faster of dense and sparse: ``max(median(auto/dense), median(auto/sparse))``
of the per-round ratios (a paired comparison: each round's blocks ran back to back), with the range
of that ratio over the rounds; and auto's speed-up over ``--kernel dense``, the median and range of
the per-round dense/auto ratios. Also ``best``: auto's fastest block over the fastest
block of either other model. A row where the ratio exceeds ``1 + --tol`` is measured again with
three times the repeats (noise guard); if both the ratio and ``best`` still exceed it, the row is
marked FAIL and the script exits with status 1 (a real loss shows in both; on a loaded machine a
single disturbed block moves one of them).

Usage: python benchmarks/auto_check.py [--blas-threads N] [--nets lenet300,lenet5] [--rounds 0,3,6]
                                       [--thresholds FILE] [--repeats 7] [--tol 0.05]
"""
from __future__ import annotations

import argparse
import time

from _common import RESULTS, env_line, md_table

import numpy as np  # after _common (it applies --blas-threads before NumPy loads)

from nprune import nets
from nprune.data.datasets import load_dataset, prepare
from nprune.evaluate import evaluate, feature_major
from nprune.kernels import apply_kernel, kernel_report
from nprune.kernels.thresholds import active_thresholds, load_thresholds
from nprune.optim import SGD, Adam
from nprune.pruning import magnitude_layerwise
from nprune.training import batches, train_step

RATES = {"lenet300": {"fc1.W": 0.2, "fc2.W": 0.2, "fc3.W": 0.1},
         "lenet5": {"conv1.W": 0.1, "conv2.W": 0.1, "fc1.W": 0.2, "fc2.W": 0.1}}
#: rounds of the schedule (LeNet-300-100 round 19: 1.5% left; LeNet-5 round 19: 2.3%)
ROUNDS = {"lenet300": 19, "lenet5": 19}
BATCH = {"lenet300": 60, "lenet5": 64}
EVAL_BATCH = 5000
EVAL_IMAGES = {"lenet300": 5000, "lenet5": 1024}
VARIANTS = ("dense", "sparse", "auto")


def make_optimizer(net, model):
    return Adam(model, 1.2e-3) if net == "lenet300" else SGD(model, 0.01, momentum=0.9)


def imp_masks(net, data, rounds, iters_per_round) -> list[dict]:
    """The masks of rounds 0..rounds of the schedule (cached in benchmarks/results/)."""
    path = RESULTS / f"imp_masks_{net}_r{rounds}_i{iters_per_round}.npz"
    if path.exists():
        z = np.load(path)
        out = [{} for _ in range(rounds + 1)]
        for k in z.files:
            r, name = k.split("/", 1)
            out[int(r)][name] = z[k]
        return out
    model = nets.build(net, np.random.default_rng(0))
    opt = make_optimizer(net, model)
    rng = np.random.default_rng(0)
    x, y = data.x_train, data.y_train

    def train(iters):
        for idx in batches(len(x), BATCH[net], iters, rng):
            train_step(model, x[idx], y[idx])
            opt.step()
    train(iters_per_round)
    masks = model.bool_masks()
    out = [masks]
    for _ in range(rounds):
        masks = magnitude_layerwise(model.get_weights(), masks, RATES[net])
        model.set_masks(masks)
        opt.reset()
        train(iters_per_round)
        out.append(masks)
    RESULTS.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **{f"{r}/{k}": v for r, m in enumerate(out) for k, v in m.items()})
    return out


def time_paired(fns: dict, repeats: int, target: float) -> dict:
    """{name: [seconds per call, one per round]}: blocks of ~target seconds, order rotating."""
    names = list(fns)
    for f in fns.values():          # warm-up (buffers, the kernels' structures, auto's lookups)
        f()
        f()
    number = {}
    for k, f in fns.items():
        t0 = time.perf_counter()
        f()
        number[k] = max(1, int(target / max(time.perf_counter() - t0, 1e-6)))
    ts = {k: [] for k in names}
    for r in range(repeats):
        s = r % len(names)
        order = names[s:] + names[:s]
        if (r // len(names)) % 2:
            order = order[::-1]
        for k in order:
            f, n = fns[k], number[k]
            t0 = time.perf_counter()
            for _ in range(n):
                f()
            ts[k].append((time.perf_counter() - t0) / n)
    return ts


def verdict(ts: dict) -> dict:
    a = np.array(ts["auto"])
    rd, rs = a / np.array(ts["dense"]), a / np.array(ts["sparse"])
    worst = rd if np.median(rd) >= np.median(rs) else rs
    sp = np.array(ts["dense"]) / a
    best = float(a.min() / min(min(ts["dense"]), min(ts["sparse"])))
    return {"med": {k: float(np.median(v)) for k, v in ts.items()},
            "speedup": float(np.median(sp)), "sp_lo": float(sp.min()), "sp_hi": float(sp.max()),
            "ratio": float(np.median(worst)), "lo": float(worst.min()), "hi": float(worst.max()),
            "vs": "dense" if worst is rd else "sparse", "best": best}


def choices(model, mode) -> str:
    """Per parametrised layer, what auto ran in ``mode`` (train / eval): S (sparse) or D."""
    out = []
    for r in kernel_report(model):
        if r["kernel"] == "dense" or r["dense_everywhere"]:
            out.append("D")
            continue
        used = [v["use"] for k, v in r["decisions"].items() if ("eval" in k) == (mode == "eval")]
        out.append("S" if used and all(used) else ("D" if not any(used) else "S/D"))
    return "".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nets", default="lenet300,lenet5")
    ap.add_argument("--rounds", default=None, help="comma-separated rounds (default: all)")
    ap.add_argument("--iters-per-round", type=int, default=300)
    ap.add_argument("--thresholds", default=None, help="a thresholds JSON file (default: the table in use)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--target", type=float, default=0.05, help="seconds per timed block")
    ap.add_argument("--tol", type=float, default=0.05)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--blas-threads", type=int, default=None,
                    help="OpenBLAS threads (set before NumPy loads, see _common.py)")
    a = ap.parse_args()
    table = load_thresholds(a.thresholds, source=a.thresholds) if a.thresholds else active_thresholds()
    data = prepare(load_dataset("mnist", data_dir=a.data_dir, download=False), n_val=5000, seed=0)
    print(f"# auto vs the faster of dense and sparse\n\n{env_line()}\n"
          f"thresholds: {table.get('source')}; {a.repeats} rounds of ~{a.target}s blocks; "
          f"fail above {1 + a.tol:.2f}\n")
    failures = 0
    for net in a.nets.split(","):
        all_masks = imp_masks(net, data, ROUNDS[net], a.iters_per_round)
        rounds = range(len(all_masks)) if a.rounds is None else [int(r) for r in a.rounds.split(",")]
        x, y = data.x_train, data.y_train
        xv, yv = data.x_val[:EVAL_IMAGES[net]], data.y_val[:EVAL_IMAGES[net]]
        idx = list(batches(len(x), BATCH[net], 64, np.random.default_rng(1)))
        xbs = [(x[i], y[i]) for i in idx]
        rows = []
        for rnd in rounds:
            masks = all_masks[rnd]
            left = sum(m.sum() for m in masks.values()) / sum(m.size for m in masks.values())
            w0 = nets.build(net, np.random.default_rng(0)).get_weights()
            models = {}
            for v in VARIANTS:
                m = nets.build(net, np.random.default_rng(0))
                m.set_weights(w0)
                m.set_masks(masks)
                apply_kernel(m, v, thresholds=table if v == "auto" else None)
                models[v] = (m, make_optimizer(net, m))

            def step_fn(v):
                m, o = models[v]
                it = [0]

                def f():
                    xb, yb = xbs[it[0] % len(xbs)]
                    it[0] += 1
                    train_step(m, xb, yb)
                    o.step()
                return f
            cases = [("train", {v: step_fn(v) for v in VARIANTS})]
            cases.append(("infer C", {v: (lambda m=models[v][0]: evaluate(m, xv, yv, EVAL_BATCH))
                                      for v in VARIANTS}))
            if net == "lenet300":
                fms = {v: feature_major(models[v][0], xv, EVAL_BATCH) for v in VARIANTS}
                cases.append(("infer FM", {v: (lambda m=models[v][0], f=fms[v]: evaluate(m, f, yv, EVAL_BATCH))
                                           for v in VARIANTS}))
            for name, fns in cases:
                res = verdict(time_paired(fns, a.repeats, a.target))
                status = "ok"
                if res["ratio"] > 1 + a.tol:
                    res = verdict(time_paired(fns, 3 * a.repeats, a.target))
                    status = ("ok (2nd)" if min(res["ratio"], res["best"]) <= 1 + a.tol
                              else "FAIL")
                failures += status == "FAIL"
                md = res["med"]
                rows.append([rnd, f"{100 * left:.1f}%", name, f"{md['dense'] * 1e3:.2f}",
                             f"{md['sparse'] * 1e3:.2f}", f"{md['auto'] * 1e3:.2f}",
                             choices(models["auto"][0], "eval" if name != "train" else "train"),
                             f"{res['ratio']:.3f} ({res['lo']:.2f}-{res['hi']:.2f}) vs {res['vs']}; "
                             f"best {res['best']:.3f}",
                             status, f"{res['speedup']:.2f}x ({res['sp_lo']:.2f}-{res['sp_hi']:.2f})"])
                print(f"  {net} round {rnd} {name}: {rows[-1][3:]}", flush=True)
        print(f"\n## {net}\n")
        print(md_table(["round", "weights left", "mode", "dense ms", "sparse ms", "auto ms",
                        "auto per layer", "auto / faster (range)", "check",
                        "dense / auto (range)"], rows))
        print()
    print(f"{failures} row(s) fail" if failures else "all rows within tolerance")
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
