"""Dense training speed of nprune vs PyTorch CPU on LeNet-300-100 and LeNet-5.

Usage::

    python benchmarks/train_speed.py [--threads N] [--epochs 3] [--reps 3] [--nets lenet300,lenet5]
                                     [--steps S] [--torch-python PYTHON] [--no-torch]

Recipes (same for both frameworks): LeNet-300-100 Adam lr 1.2e-3 batch 60; LeNet-5 (Caffe: conv 20@5x5,
maxpool 2, conv 50@5x5, maxpool 2, fc 500 + ReLU, fc 10) SGD lr 0.01 momentum 0.9 batch 64. MNIST
train split of 55,000 images (``prepare(..., n_val=5000, seed=0)``), preloaded in memory (NumPy arrays;
tensors made with ``torch.from_numpy`` for torch); each epoch is a permutation from
``nprune.training.batches`` (the same indices for both frameworks), the last partial batch dropped. The
torch model starts from the nprune model's initial weights. The timed loop is exactly
``nprune.training.train``'s inner loop (``np.take`` into buffers, ``train_step``, ``opt.step``), no
evaluation; nprune runs the default dense path (``--kernel dense``: masked dense GEMMs and the
compact optimiser, what an unpruned run gets).

Variants, each trained in a process of its own (a fresh interpreter per measurement, so that neither
framework's threads, allocator or flush-to-zero state touches the other):

* ``nprune``;
* ``torch``: ``torch.optim.Adam`` / ``SGD`` with their defaults. Adam's second-moment state decays
  towards the subnormal range for weights whose gradient stays zero, and x86 arithmetic on subnormals
  is slow, so its epochs get slower as training goes on;
* ``torch ftz``: the same after ``torch.set_flush_denormal(True)`` (subnormals flushed to zero, as
  nprune's optimiser does in its own way);
* ``torch fused``: ``fused=True`` (one fused kernel for the whole update; Adam and SGD).

The measurements run in turns -- nprune, torch, torch ftz, torch fused, then again in a rotated order,
``--reps`` times -- so that drift of a shared machine hits all alike. Each child warms up on 20 batches,
restores the initial weights and times ``--epochs`` epochs. Reported per net and variant: the median
seconds per epoch over all its epochs, its first and last epoch (medians over the reps), achieved
GEMM GFLOP/s and its fraction of the fp32 GEMM peak (2048^3, measured by ``gemm_peak.peak_gflops`` in
the parent at the same thread count), and nprune's time over the variant's: the median and range of
the ratios of the measurements that ran next to each other (rep by rep, per epoch).

FLOP count per step (GEMM FLOPs only, forward + backward): for every Dense ``(in -> out)`` with batch N
it is ``2*N*in*out`` for the forward, the same for dW and the same for dx except for the first layer;
for every Conv2D with F filters of C x kh x kw and output OH x OW it is ``2*N*OH*OW*F*C*kh*kw`` for each
of forward, dW and dx (dx skipped for the first layer). GFLOP/s achieved = FLOPs per epoch / seconds.
Results are also written as JSON to ``benchmarks/results/train_speed-<time>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

RECIPES = {  # net: (optimizer, lr, momentum, batch)
    "lenet300": ("adam", 1.2e-3, 0.0, 60),
    "lenet5": ("sgd", 0.01, 0.9, 64),
}


def _set_threads(n):
    if n:
        for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[v] = str(n)


def load_data(data_dir=None):
    """MNIST as the package finds it (``data_dir``, ``$NPRUNE_DATA_DIR``, the user cache, ...)."""
    from nprune.data.datasets import load_dataset, prepare
    return prepare(load_dataset("mnist", data_dir=data_dir), n_val=5000, seed=0)


def step_flops(model, batch):
    """GEMM FLOPs of one training step (see the module docstring for the formula)."""
    from nprune.layers import Conv2D, Dense
    shape = (batch, 1, 28, 28)
    total, first = 0, True
    for layer in model.layers:
        if isinstance(layer, Dense):
            f = 2 * batch * layer.in_features * layer.out_features
            shape = (batch, layer.out_features)
        elif isinstance(layer, Conv2D):
            shape = layer.output_shape(shape)
            f = 2 * batch * shape[2] * shape[3] * layer.out_channels * layer.in_channels * layer.kh * layer.kw
        else:
            if hasattr(layer, "output_shape"):
                shape = layer.output_shape(shape)
            continue
        total += f * (2 if first else 3)
        first = False
    return total


def time_epochs(runners, n, bs, epochs, seed, steps=None):
    """Warm up every runner's ``run`` on 20 batches and ``restart()`` it (weights and optimiser back
    to the start), then time ``epochs`` epochs of the same seeded permutation batches, the runners
    taking turns epoch by epoch (A, B, A, B, ...) so that a machine that slows down or speeds up
    during the run affects them alike. Returns {name: [seconds per epoch]}. ``steps``: time only the
    first ``steps`` batches of each epoch and scale the time to the whole epoch."""
    import numpy as np
    from nprune.training import batches
    for r in runners.values():
        r["run"](batches(n, bs, 20, np.random.default_rng(123)))  # warm-up (buffers, BLAS threads)
        r["restart"]()
    rng = np.random.default_rng(seed)
    times = {name: [] for name in runners}
    for _ in range(epochs):
        idxs = list(batches(n, bs, n // bs, rng))
        timed = idxs[:steps] if steps else idxs
        for name, r in runners.items():
            t0 = time.perf_counter()
            r["run"](timed)
            times[name].append((time.perf_counter() - t0) * len(idxs) / len(timed))
    return times


def setup_nprune(net, data, seed=0):
    import numpy as np
    from nprune.evaluate import evaluate as evaluate_model
    from nprune.nets import build
    from nprune.optim import make_optimizer
    from nprune.training import train_step
    opt_name, lr, mom, bs = RECIPES[net]
    model = build(net, np.random.default_rng(seed))
    init = model.get_weights()
    opt = make_optimizer(opt_name, model, lr, mom)
    x, y = data.x_train, data.y_train
    xb = np.empty((bs,) + x.shape[1:], x.dtype)
    yb = np.empty((bs,), y.dtype)

    def run(idxs):
        for idx in idxs:
            np.take(x, idx, axis=0, out=xb, mode="clip")  # as nprune.training.train
            np.take(y, idx, axis=0, out=yb, mode="clip")
            train_step(model, xb, yb)
            opt.step()

    def restart():
        model.set_weights(init)
        opt.reset()

    def evaluate():
        t0 = time.perf_counter()
        evaluate_model(model, data.x_val, data.y_val, 5000)
        evaluate_model(model, data.x_test, data.y_test, 5000)
        return time.perf_counter() - t0

    return dict(run=run, restart=restart, evaluate=evaluate, init=init, steps_per_epoch=len(x) // bs,
                flops_per_step=step_flops(model, bs), bs=bs, n=len(x))


def torch_model(net, init):
    """The torch twin of ``nprune.nets.build(net)``, with ``init``'s weights (nprune names and layout);
    ``init`` None keeps torch's own default initialisation."""
    import torch
    from torch import nn
    if net == "lenet300":
        m = nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                          nn.Linear(100, 10))
        names = [("1", "fc1"), ("3", "fc2"), ("5", "fc3")]
    else:
        m = nn.Sequential(nn.Conv2d(1, 20, 5), nn.MaxPool2d(2), nn.Conv2d(20, 50, 5), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, 10))
        names = [("0", "conv1"), ("2", "conv2"), ("5", "fc1"), ("7", "fc2")]
    if init is None:
        return m
    sd = {}
    for tn, nn_ in names:
        w = init[f"{nn_}.W"]
        sd[f"{tn}.weight"] = torch.from_numpy(w.T.copy() if w.ndim == 2 else w.copy())
        sd[f"{tn}.bias"] = torch.from_numpy(init[f"{nn_}.b"].copy())
    m.load_state_dict(sd)
    return m


def setup_torch(net, data, init, fused=False):
    import numpy as np
    import torch
    import torch.nn.functional as F
    opt_name, lr, mom, bs = RECIPES[net]
    model = torch_model(net, init)
    if opt_name == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr, fused=fused or None)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=mom, fused=fused or None)
    x = torch.from_numpy(data.x_train)
    y = torch.from_numpy(data.y_train.astype(np.int64))

    def run(idxs):
        for idx in idxs:
            i = torch.from_numpy(idx)
            xb, yb = x[i], y[i]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()

    def restart():
        model.load_state_dict(torch_model(net, init).state_dict())
        opt.state.clear()

    def evaluate():
        t0 = time.perf_counter()
        with torch.no_grad():
            for xs, ys in ((data.x_val, data.y_val), (data.x_test, data.y_test)):
                for i in range(0, len(xs), 5000):
                    out = model(torch.from_numpy(xs[i:i + 5000]))
                    F.cross_entropy(out, torch.from_numpy(ys[i:i + 5000].astype(np.int64)))
                    int((out.argmax(1).numpy() == ys[i:i + 5000]).sum())
        return time.perf_counter() - t0

    return dict(run=run, restart=restart, evaluate=evaluate)


VARIANTS = ("nprune", "torch", "torch ftz", "torch fused")


def child(variant, net, epochs, threads, steps=None):
    """One measurement (in a fresh process): {"epoch_s": [...], "steps_per_epoch", "flops_per_step"}."""
    data = load_data()
    r = setup_nprune(net, data)
    if variant == "nprune":
        runner = r
    else:
        import torch
        if threads:
            torch.set_num_threads(threads)
        if variant == "torch ftz":
            torch.set_flush_denormal(True)
        runner = setup_torch(net, data, r["init"], fused=variant == "torch fused")
    times = time_epochs({variant: runner}, r["n"], r["bs"], epochs, 0, steps)[variant]
    return {"epoch_s": times, "steps_per_epoch": r["steps_per_epoch"],
            "flops_per_step": r["flops_per_step"]}


def run_child(python, variant, net, epochs, threads, steps=None):
    cmd = [python, os.path.abspath(__file__), "--child", variant, "--nets", net, "--epochs", str(epochs)]
    if steps:
        cmd += ["--steps", str(steps)]
    if threads:
        cmd += ["--threads", str(threads)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(HERE, ".."),
                                                        os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3, help="epochs timed per measurement")
    ap.add_argument("--reps", type=int, default=3, help="measurements per variant (in turns)")
    ap.add_argument("--nets", default="lenet300,lenet5")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--torch-python", default=sys.executable,
                    help="the Python interpreter that has torch (default: this one)")
    ap.add_argument("--threads", type=int, default=None,
                    help="BLAS / torch threads (default: each library's default)")
    ap.add_argument("--steps", type=int, default=None,
                    help="time only this many steps of each epoch, scaled to the whole epoch")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    _set_threads(args.threads)

    if args.child:
        print(json.dumps(child(args.child, args.nets, args.epochs, args.threads, args.steps)))
        return

    import numpy as np
    from gemm_peak import peak_gflops
    variants = VARIANTS[:1] if args.no_torch else VARIANTS
    peak = peak_gflops()
    out = {"peak_gflops": peak, "epochs": args.epochs, "reps": args.reps, "threads": args.threads,
           "nets": {}}
    rows = []
    for net in args.nets.split(","):
        res = {v: [] for v in variants}
        for rep in range(args.reps):
            order = variants[rep % len(variants):] + variants[:rep % len(variants)]
            for v in order:
                py = sys.executable if v == "nprune" else args.torch_python
                res[v].append(run_child(py, v, net, args.epochs, args.threads, args.steps))
                print(f"  {net} rep {rep} {v}: {res[v][-1].get('epoch_s', res[v][-1])}", flush=True)
        out["nets"][net] = res
        base = res["nprune"][0]
        fl_epoch = base["flops_per_step"] * base["steps_per_epoch"]
        for v in variants:
            if any("error" in m for m in res[v]):
                rows.append(f"| {net} | {v} | failed: {next(m['error'] for m in res[v] if 'error' in m)} |"
                            + " |" * 6)
                continue
            ep = np.array([m["epoch_s"] for m in res[v]])          # reps x epochs
            s = float(np.median(ep))
            gf = fl_epoch / s / 1e9
            ratio = ""
            if v != "nprune":
                pairs = (np.array([m["epoch_s"] for m in res["nprune"]]) / ep).ravel()
                ratio = f"{np.median(pairs):.2f} ({pairs.min():.2f}-{pairs.max():.2f})"
            rows.append(f"| {net} | {v} | {s:.3f} | {np.median(ep[:, 0]):.3f} | "
                        f"{np.median(ep[:, -1]):.3f} | {ratio} | {gf:.1f} | {100 * gf / peak:.0f}% |")
    print(f"\nfp32 GEMM peak (2048^3, this run): {peak:.1f} GFLOP/s; threads: "
          f"{args.threads or 'default'}; {args.reps} measurements x {args.epochs} epochs per variant, "
          f"each in its own process, in turns"
          + (f"; {args.steps} steps timed per epoch, scaled to the epoch" if args.steps else "") + "\n")
    print("| net | variant | s/epoch (median) | first epoch | last epoch | nprune / variant "
          "(median, range) | GEMM GFLOP/s | % of peak |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    path = os.path.join(HERE, "results", f"train_speed-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"\n(JSON: {os.path.relpath(path)})")


if __name__ == "__main__":
    main()
