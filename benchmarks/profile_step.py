"""Per-layer timing breakdown of one training step (median microseconds per step).

Usage::

    python benchmarks/profile_step.py [--nets lenet300,lenet5] [--steps 200] [--threads N]
                                      [--rounds R --kernel auto|dense|sparse]

For each net the step is run piece by piece exactly as :func:`nprune.training.train` runs it: data gather
(``np.take`` of a random minibatch into preallocated buffers), every layer's forward (train mode), the
softmax cross-entropy, the flush of tiny logit gradients, every layer's backward (reverse order), the
optimiser step (LeNet-300-100: Adam, batch 60; LeNet-5: SGD momentum 0.9, batch 64). Each piece is
timed with ``perf_counter`` and the median over ``--steps`` steps (after a warm-up) is printed as a
markdown table, plus the median of an untimed whole step (``train_step`` + ``step``) for comparison
with the sum of the parts.

``--rounds R`` profiles a pruned network instead: random masks at the densities R rounds of Frankle &
Carbin's layer-wise rates leave (hidden fc layers 0.8^R, the output layer and convolutions 0.9^R;
R = 18 leaves 1.9% of LeNet-300-100), with the layer kernels of ``--kernel`` (default ``auto``) and
the optimiser's compact path, as a pruned round of an experiment trains.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--nets", default="lenet300,lenet5")
ap.add_argument("--steps", type=int, default=200)
ap.add_argument("--warmup", type=int, default=20)
ap.add_argument("--threads", type=int, default=None, help="BLAS threads (default: library default)")
ap.add_argument("--data-dir", help="folder with the MNIST files (else found as the package finds it: $NPRUNE_DATA_DIR, the user cache, system folders)")
ap.add_argument("--rounds", type=int, default=0,
                help="profile a pruned net: random masks at R rounds of F&C's rates (default 0: dense)")
ap.add_argument("--kernel", choices=["auto", "dense", "sparse"], default="auto",
                help="layer kernels of a pruned net (with --rounds)")
args = ap.parse_args()
if args.threads:
    for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[v] = str(args.threads)

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from nprune.kernels import apply_kernel  # noqa: E402
from nprune.losses import softmax_cross_entropy  # noqa: E402
from nprune.nets import build  # noqa: E402
from nprune.optim import make_optimizer  # noqa: E402
from nprune.training import flush_tiny_gradients, train_step  # noqa: E402

RECIPES = {"lenet300": ("adam", 1.2e-3, 0.0, 60), "lenet5": ("sgd", 0.01, 0.9, 64)}


def load(data_dir):
    try:
        from nprune.data.datasets import load_dataset, prepare
        d = prepare(load_dataset("mnist", data_dir=data_dir), n_val=5000, seed=0)
        return d.x_train, d.y_train
    except Exception as e:  # pragma: no cover - offline fallback
        print(f"(MNIST not available: {e}; using random data)", file=sys.stderr)
        rng = np.random.default_rng(0)
        return rng.random((55000, 1, 28, 28), np.float32), rng.integers(0, 10, 55000)


def profile(net, x, y, steps, warmup):
    opt_name, lr, mom, bs = RECIPES[net]
    rng = np.random.default_rng(0)
    model = build(net, rng)
    if args.rounds:
        masks = {}
        last = model.names[-1]
        for k, m in model.bool_masks().items():
            p = 0.9 ** args.rounds if (k.startswith(last + ".") or k.startswith("conv")) else 0.8 ** args.rounds
            masks[k] = rng.random(m.shape) < p
        model.set_masks(masks)
        apply_kernel(model, args.kernel)
        left = sum(int(m.sum()) for m in masks.values()) / sum(m.size for m in masks.values())
        print(f"({net}: random masks of {args.rounds} rounds, {100 * left:.2f}% of weights left, "
              f"kernel {args.kernel})")
    opt = make_optimizer(opt_name, model, lr, mom)
    xb = np.empty((bs,) + x.shape[1:], x.dtype)
    yb = np.empty((bs,), y.dtype)
    rows: dict[str, list] = {}
    order: list[str] = []

    def rec(key, dt):
        if key not in rows:
            rows[key] = []
            order.append(key)
        rows[key].append(dt)

    pc = time.perf_counter
    whole = []
    per_epoch = len(x) // bs
    for s in range(warmup + steps):
        keep = s >= warmup
        t = pc()
        if s % per_epoch == 0:
            perm = rng.permutation(len(x))        # epochs as permutations, as train() draws them
        idx = perm[(s % per_epoch) * bs:(s % per_epoch + 1) * bs]
        np.take(x, idx, axis=0, out=xb, mode="clip")
        np.take(y, idx, axis=0, out=yb, mode="clip")
        t1 = pc()
        if keep:
            rec("data gather", t1 - t)
        h = xb
        for name, layer in zip(model.names, model.layers):
            t = pc()
            h = layer.forward(h, True)
            if keep:
                rec(f"{name} fwd", pc() - t)
        t = pc()
        loss, d = softmax_cross_entropy(h, yb)
        if keep:
            rec("loss (softmax CE)", pc() - t)
        t = pc()
        flush_tiny_gradients(d)
        if keep:
            rec("flush of tiny dL/dlogits", pc() - t)
        for name, layer in zip(reversed(model.names), reversed(model.layers)):
            if d is None:  # the first layer with parameters returns no dx: backward ends there
                break
            t = pc()
            d = layer.backward(d)
            if keep:
                rec(f"{name} bwd", pc() - t)
        t = pc()
        opt.step()
        if keep:
            rec(f"optimizer ({opt_name})", pc() - t)
        # an un-instrumented step, for the total
        t = pc()
        train_step(model, xb, yb)
        opt.step()
        if keep:
            whole.append(pc() - t)
    return order, rows, whole


def main():
    x, y = load(args.data_dir)
    for net in args.nets.split(","):
        order, rows, whole = profile(net, x, y, args.steps, args.warmup)
        med = {k: float(np.median(v)) * 1e6 for k, v in rows.items()}
        tot = sum(med.values())
        print(f"\n### {net} (batch {RECIPES[net][3]}, {RECIPES[net][0]}), median us per step "
              f"over {args.steps} steps\n")
        print("| part | us | % |")
        print("|---|---:|---:|")
        for k in order:
            print(f"| {k} | {med[k]:.0f} | {100 * med[k] / tot:.1f} |")
        print(f"| **sum of parts** | {tot:.0f} | 100 |")
        print(f"| whole step (train_step + step), median | {np.median(whole) * 1e6:.0f} | |")


if __name__ == "__main__":
    main()
