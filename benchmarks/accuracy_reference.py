"""Accuracy of nprune against PyTorch CPU on the same recipe, split, initial weights and batch order.

Usage::

    python benchmarks/accuracy_reference.py [--nets lenet300,lenet5] [--seeds 5] [--torch-init nprune|torch]

The project's accuracy targets are for fixed recipes: LeNet-300-100 with Adam 1.2e-3, batch 60, Glorot
normal, 10 epochs; LeNet-5 with SGD momentum 0.9, lr 0.01, batch 64, 5 epochs. This script asks whether
a shortfall is nprune's or the recipe's: for every seed it trains

* nprune with ``nprune.training.train`` exactly as ``python -m nprune.experiment train --net NET --seed S``
  does (model from ``default_rng([S, 0, 0])``, data order from ``default_rng([S, 1, 0])``,
  ``--evals-per-epoch`` evaluations per epoch, early stop = evaluation of minimum validation loss), and
* PyTorch on the same 55,000 / 5,000 split, with the same batches in the same order and evaluated at
  the same iterations with the same early-stop rule. With ``--torch-init nprune`` (default) it starts
  from nprune's initial weights; with ``--torch-init torch`` from PyTorch's own default initialisation
  (Kaiming-uniform with a = sqrt(5), biases U(+-1/sqrt(fan_in))), seeded with ``torch.manual_seed(S)``.

Printed: a per-seed table of test accuracy at the early stop and at the end, and the means. Nothing is
selected on the test set. Results also go to ``benchmarks/results/accuracy_reference-<time>.json``.
Without PyTorch installed, only nprune's column is filled.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from train_speed import RECIPES, torch_model  # noqa: E402

EPOCHS = {"lenet300": 10, "lenet5": 5}   # the targets' budgets


def run_nprune(net, data, seed, iterations, eval_every):
    import numpy as np
    from nprune import nets
    from nprune.training import TrainConfig, train
    opt, lr, mom, bs = RECIPES[net]
    model = nets.build(net, np.random.default_rng([seed, 0, 0]), init="glorot_normal")
    init = model.get_weights()
    cfg = TrainConfig(optimizer=opt, lr=lr, momentum=mom, batch_size=bs, iterations=iterations,
                      eval_every=eval_every, test_every=eval_every)   # the whole test curve
    res, _ = train(model, data, cfg, np.random.default_rng([seed, 1, 0]))
    return init, {"iterations": res.iterations, "val_loss": res.val_loss, "val_acc": res.val_acc,
                  "test_acc": res.test_acc, "seconds": res.seconds}


def run_torch(net, data, seed, iterations, eval_every, init):
    """The torch twin of ``nprune.training.train``: same batches (``nprune.training.batches`` with the same
    generator), same evaluation points. ``init`` None = torch's default initialisation."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from nprune.training import batches
    opt_name, lr, mom, bs = RECIPES[net]
    if init is None:
        torch.manual_seed(seed)
        model = torch_model(net, None)
    else:
        model = torch_model(net, init)
    opt = (torch.optim.Adam(model.parameters(), lr=lr) if opt_name == "adam"
           else torch.optim.SGD(model.parameters(), lr=lr, momentum=mom))
    x = torch.from_numpy(data.x_train)
    y = torch.from_numpy(data.y_train.astype(np.int64))

    def evaluate(xs, ys):
        loss = correct = 0.0
        with torch.no_grad():
            for i in range(0, len(xs), 5000):
                out = model(torch.from_numpy(xs[i:i + 5000]))
                yy = torch.from_numpy(ys[i:i + 5000].astype(np.int64))
                loss += float(F.cross_entropy(out, yy, reduction="sum"))
                correct += int((out.argmax(1) == yy).sum())
        return loss / len(xs), correct / len(xs)

    out = {"iterations": [], "val_loss": [], "val_acc": [], "test_acc": []}
    t0 = time.perf_counter()
    it = 0
    for idx in batches(len(data.x_train), bs, iterations, np.random.default_rng([seed, 1, 0])):
        i = torch.from_numpy(idx)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[i]), y[i]).backward()
        opt.step()
        it += 1
        if it % eval_every == 0 or it == iterations:
            vl, va = evaluate(data.x_val, data.y_val)
            _, ta = evaluate(data.x_test, data.y_test)
            for k, v in (("iterations", it), ("val_loss", vl), ("val_acc", va), ("test_acc", ta)):
                out[k].append(v)
    out["seconds"] = time.perf_counter() - t0
    return out


def early_stop(r):
    """(test acc at the evaluation of minimum validation loss, its iteration, final test acc)."""
    j = min(range(len(r["val_loss"])), key=lambda k: (r["val_loss"][k], k))
    return r["test_acc"][j], r["iterations"][j], r["test_acc"][-1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nets", default="lenet300,lenet5")
    ap.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1")
    ap.add_argument("--epochs", type=int, default=None, help="default: the targets' 10 / 5")
    ap.add_argument("--evals-per-epoch", type=int, default=5)
    ap.add_argument("--torch-init", choices=["nprune", "torch"], default="nprune")
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args()
    import numpy as np
    from nprune.data.datasets import load_dataset, prepare
    have_torch = False
    if not args.no_torch:
        try:
            import torch  # noqa: F401
            have_torch = True
        except ImportError:
            print("(PyTorch not installed: nprune only)")
    data = prepare(load_dataset("mnist"), n_val=5000, seed=0)
    report = {"torch_init": args.torch_init, "nets": {}}
    tables = []
    for net in args.nets.split(","):
        bs = RECIPES[net][3]
        per_epoch = len(data.x_train) // bs
        epochs = args.epochs or EPOCHS[net]
        iterations, eval_every = epochs * per_epoch, per_epoch // args.evals_per_epoch
        rows, runs = [], []
        for seed in range(args.seeds):
            init, rn = run_nprune(net, data, seed, iterations, eval_every)
            rt = (run_torch(net, data, seed, iterations, eval_every,
                            init if args.torch_init == "nprune" else None) if have_torch else None)
            runs.append({"seed": seed, "nprune": rn, "torch": rt})
            a = early_stop(rn)
            b = early_stop(rt) if rt else (math.nan, 0, math.nan)
            rows.append((seed, *a, *b))
            print(f"{net} seed {seed}: nprune {100 * a[0]:.2f}% (it {a[1]}), torch {100 * b[0]:.2f}% "
                  f"(it {b[1]}) [{rn['seconds']:.0f} s / {rt['seconds'] if rt else 0:.0f} s]", flush=True)
        report["nets"][net] = {"epochs": epochs, "iterations": iterations, "eval_every": eval_every,
                               "runs": runs}
        lines = [f"\n{net}, {epochs} epochs ({iterations} iterations, evaluated every {eval_every}); "
                 f"torch init: {args.torch_init}\n",
                 "| seed | nprune early-stop test % | (iteration) | nprune final % | torch early-stop test % "
                 "| (iteration) | torch final % |",
                 "|---|---:|---:|---:|---:|---:|---:|"]
        pc = lambda v: "-" if math.isnan(v) else f"{100 * v:.2f}"   # noqa: E731
        for s, a0, a1, a2, b0, b1, b2 in rows:
            lines.append(f"| {s} | {pc(a0)} | {a1} | {pc(a2)} | {pc(b0)} | {b1 if have_torch else '-'} "
                         f"| {pc(b2)} |")
        m = np.mean(np.array([r[1:] for r in rows], float), axis=0)
        lines.append(f"| **mean** | **{pc(m[0])}** | | {pc(m[2])} | **{pc(m[3])}** | | {pc(m[5])} |")
        tables.append("\n".join(lines))
    print("\n".join(tables))
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    path = os.path.join(HERE, "results", f"accuracy_reference-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump(report, f)
    print(f"\n(JSON: {os.path.relpath(path)})")


if __name__ == "__main__":
    main()
