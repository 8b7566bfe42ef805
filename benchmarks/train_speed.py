"""Dense training speed of nprune vs PyTorch CPU on LeNet-300-100 and LeNet-5, in one run.

Usage::

    python benchmarks/train_speed.py [--epochs 3] [--nets lenet300,lenet5] [--no-torch] [--threads N]

Recipes (same for both frameworks): LeNet-300-100 Adam lr 1.2e-3 batch 60; LeNet-5 (Caffe: conv 20@5x5,
maxpool 2, conv 50@5x5, maxpool 2, fc 500 + ReLU, fc 10) SGD lr 0.01 momentum 0.9 batch 64. MNIST
train split of 55,000 images (``prepare(..., n_val=5000, seed=0)``), preloaded in memory (NumPy arrays;
tensors made with ``torch.from_numpy`` for torch); each epoch is a permutation from
``nprune.training.batches`` (the same indices for both frameworks), the last partial batch dropped. The
torch model starts from the nprune model's initial weights. The timed loop is exactly
``nprune.training.train``'s inner loop (``np.take`` into buffers, ``train_step``, ``opt.step``), no
evaluation; the time of one evaluation pass over 15,000 images (``evaluate`` val + test; the
second of two passes in a row) is reported separately.

The two frameworks train in turns, epoch by epoch (nprune, torch, nprune, ...), so that drift of a
shared machine hits both alike. Reported per net and framework: median seconds per epoch over
``--epochs`` epochs (after a short warm-up), ratio nprune/torch (of the medians; also the median and
range of the per-turn ratios), achieved GEMM GFLOP/s and its fraction of the fp32 GEMM peak (2048^3,
measured by ``gemm_peak.peak_gflops`` in the same run), and the peak RSS of a separate child process
that loads the data, trains the net for one epoch and evaluates (the peak resident memory of
that child, i.e. the training process's own peak; read as ``VmHWM``, see :func:`peak_rss_mb`).

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


def time_epochs(runners, n, bs, epochs, seed):
    """Warm up every runner's ``run`` on 20 batches and ``restart()`` it (weights and optimiser back
    to the start), then time ``epochs`` epochs of the same seeded permutation batches, the runners
    taking turns epoch by epoch (A, B, A, B, ...) so that a machine that slows down or speeds up
    during the run affects them alike. Returns {name: [seconds per epoch]}."""
    import numpy as np
    from nprune.training import batches
    for r in runners.values():
        r["run"](batches(n, bs, 20, np.random.default_rng(123)))  # warm-up (buffers, BLAS threads)
        r["restart"]()
    rng = np.random.default_rng(seed)
    times = {name: [] for name in runners}
    for _ in range(epochs):
        idxs = list(batches(n, bs, n // bs, rng))
        for name, r in runners.items():
            t0 = time.perf_counter()
            r["run"](idxs)
            times[name].append(time.perf_counter() - t0)
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


def time_nprune(net, data, epochs, seed=0):
    """nprune alone (the peak-memory child)."""
    r = setup_nprune(net, data, seed)
    time_epochs({"nprune": r}, r["n"], r["bs"], epochs, seed)
    r["evaluate"]()


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


def setup_torch(net, data, init):
    import numpy as np
    import torch
    import torch.nn.functional as F
    opt_name, lr, mom, bs = RECIPES[net]
    model = torch_model(net, init)
    if opt_name == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=mom)
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


def peak_rss_mb():
    """This process's peak resident set in MB: ``VmHWM`` from /proc/self/status (Linux), else
    ``ru_maxrss``. (``ru_maxrss`` of a freshly exec'd child also counts the *parent's* RSS at fork
    time -- Linux keeps the larger of the old and new address space's high-water mark across
    execve -- so it would charge the benchmark's own memory, torch included, to the child.)"""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_rss(net, threads):
    """Peak RSS (MB) of a fresh process that loads MNIST, trains ``net`` one epoch and evaluates."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", net, "--epochs", "1"]
    if threads:
        cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--nets", default="lenet300,lenet5")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-memory child processes")
    ap.add_argument("--threads", type=int, default=None,
                    help="BLAS / torch threads (default: each library's default)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    _set_threads(args.threads)

    if args.child:  # peak-memory child: train one epoch, evaluate, print the peak RSS in MB
        data = load_data()
        time_nprune(args.child, data, 1)
        print(peak_rss_mb())
        return

    import numpy as np
    from gemm_peak import peak_gflops
    torch = None
    if not args.no_torch:
        try:
            import torch
            if args.threads:
                torch.set_num_threads(args.threads)
        except ImportError:
            print("(PyTorch not installed: nprune only)")
    data = load_data()
    peak = peak_gflops()
    rows, out = [], {"peak_gflops": peak, "epochs": args.epochs, "threads": args.threads,
                     "torch": None if torch is None else torch.__version__, "nets": {}}
    for net in args.nets.split(","):
        rss = None if args.no_rss else child_rss(net, args.threads)
        r = setup_nprune(net, data)
        runners = {"nprune": r}
        if torch is not None:
            runners["torch"] = setup_torch(net, data, r["init"])
        times = time_epochs(runners, r["n"], r["bs"], args.epochs, 0)
        fl_epoch = r["flops_per_step"] * r["steps_per_epoch"]
        # evaluation: each framework twice in a row, the second timed (threads awake, buffers made)
        res = {fw: {"epoch_s": times[fw], "eval_s": [runners[fw]["evaluate"](), runners[fw]["evaluate"]()][1]}
               for fw in runners}
        res["nprune"].update(rss_mb=rss, steps_per_epoch=r["steps_per_epoch"],
                             flops_per_step=r["flops_per_step"])
        out["nets"][net] = res
        s_np = float(np.median(times["nprune"]))
        s_t = float(np.median(times["torch"])) if "torch" in times else None
        if s_t:   # the epochs ran in turns: the median of the per-turn ratios shrugs off drift
            pairs = [a / b for a, b in zip(times["nprune"], times["torch"])]
            res["ratio_per_turn"] = pairs
            res["ratio_median_of_turns"] = float(np.median(pairs))
        for fw, s in (("nprune", s_np), ("torch", s_t)):
            if s is None:
                continue
            ratio = (f"{s_np / s_t:.2f} ({res['ratio_median_of_turns']:.2f}, "
                     f"{min(res['ratio_per_turn']):.2f}-{max(res['ratio_per_turn']):.2f})") if s_t else "-"
            gf = fl_epoch / s / 1e9
            rss_s = f"{rss:.0f} MB" if (fw == "nprune" and rss) else "-"
            ev = res[fw]["eval_s"]
            rows.append(f"| {net} | {fw} | {s:.3f} | {ratio if fw == 'nprune' else ''} | {gf:.1f} | "
                        f"{100 * gf / peak:.0f}% | {ev:.3f} | {rss_s} |")
    print(f"\nfp32 GEMM peak (2048^3, this run): {peak:.1f} GFLOP/s; epochs timed: {args.epochs}; "
          f"threads: {args.threads or 'default'}\n")
    print("nprune/torch: ratio of the medians (median, min-max of the per-turn ratios; the two ran "
          "epoch by epoch in turns)\n")
    print("| net | framework | s/epoch (median) | nprune/torch | GEMM GFLOP/s | % of peak | eval 15k imgs (s) | peak RSS |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    path = os.path.join(HERE, "results", f"train_speed-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"\n(JSON: {os.path.relpath(path)})")


if __name__ == "__main__":
    main()
