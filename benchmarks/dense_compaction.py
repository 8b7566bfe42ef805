"""Dense compaction: dense vs CSR vs compact for fc1 of LeNet-300-100, and what the kernel picks.

    python benchmarks/dense_compaction.py [--blas-threads N] [--repeats 7]

Masks: two structured ones (whole units and inputs pruned, the kind compaction is for), a random
4.4% mask on a live block of 687 inputs x 263 units (what magnitude pruning leaves in a rewound
LeNet-300-100 ticket's fc1 at 4.5% of weights) and a random 1.8% mask (nothing dead: the live block
is as sparse as W). Calls: a training step at batch 60
(forward + dW; fc1 needs no dX) and inference at batch 10,000. Variants run side by side
(``time_side_by_side``: interleaved, median of repeats): ``dense`` (no kernel), ``csr`` and
``compact`` (the Dense kernel forced to each mode) and ``model`` (the kernel unforced: the cost
model picks per call; the last column says what it picked). Prints a markdown table of microseconds
per call; writes benchmarks/results/dense_compaction.json.
"""
from __future__ import annotations

import argparse

from _common import env_info, env_line, md_table, save_json, time_side_by_side

import numpy as np  # after _common (it applies --blas-threads before NumPy loads)

from nprune.layers import Dense
from nprune.kernels import DenseKernelSparse


def masks(rng):
    a = np.zeros((784, 300), bool)
    a[100:700, :120] = True
    b = np.zeros((784, 300), bool)
    b[:, :150] = rng.random((784, 150)) < 0.5
    c = np.zeros((784, 300), bool)     # the live block of a rewound ticket's fc1 at round 14
    c[:687, :263] = rng.random((687, 263)) < 10344 / (687 * 263)
    c[:687, 0] = c[0, :263] = True
    return {"40% of units x 600 inputs, all kept (30.6%)": a,
            "half the units dead, the rest at 50% (25%)": b,
            "4.4%, 37 units and 97 inputs dead": c,
            "random 1.8% (nothing dead)": rng.random((784, 300)) < 0.018}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blas-threads", type=int, default=None, help="set before NumPy loads")
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    rows, out = [], {"env": env_info(), "rows": []}
    for name, m in masks(rng).items():
        layer = Dense(784, 300, rng)
        layer.need_dx = False
        layer.set_mask("W", m)
        kernels = {"dense": None, "csr": DenseKernelSparse(layer, {"fwd": "sparse"}),
                   "compact": DenseKernelSparse(layer, {"fwd": "compact"}),
                   "model": DenseKernelSparse(layer)}
        for n, train in ((60, True), (10_000, False)):
            x = rng.random((n, 784), dtype=np.float32)
            d = rng.standard_normal((n, 300)).astype(np.float32)

            def call(k):
                def f():
                    layer.kernel = k
                    y = layer.forward(x, train)
                    if train:
                        layer.backward(d)
                    return y
                return f
            t = time_side_by_side({v: call(k) for v, k in kernels.items()}, repeats=a.repeats)
            layer.kernel = kernels["model"]
            layer.forward(x, train)
            pick = "compact" if kernels["model"]._last_compact else "CSR"
            med = {v: t[v]["median"] * 1e6 for v in kernels}
            label = "step, batch 60" if train else "inference, batch 10,000"
            rows.append([name, label] + [f"{med[v]:,.0f}" for v in kernels] + [pick])
            out["rows"].append({"mask": name, "call": label, "us": med, "pick": pick})
    print(f"# Dense compaction, fc1 of LeNet-300-100\n\n{env_line()}\n")
    print(md_table(["mask", "call", "dense us", "CSR us", "compact us", "kernel (model) us", "model picks"],
                   rows))
    print(f"\nwrote {save_json('dense_compaction.json', out)}")


if __name__ == "__main__":
    main()
