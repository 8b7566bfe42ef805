"""Kernel-level benchmark of nprune.kernels on the real LeNet layer shapes.

For each layer (LeNet-300-100 fc1/fc2/fc3, LeNet-5 conv1/conv2/fc1/fc2), density and batch size it
times, side by side (interleaved round robin, median of repeats):

* ``infer``: forward with train=False;
* ``step``: forward(train=True) + backward (dW, db, and dX when the layer needs it in its network),

for the variants ``dense`` (masked dense path, layer.kernel=None), ``csr`` (all products sparse; Dense:
CSR forward, SDDMM dW, dX with the CSR of W), ``csc`` (as csr but dX with the CSC reading of A),
``compact`` (dead rows/cols dropped, dense GEMMs on the live block) and ``auto`` (what ``apply_kernel(model, "auto")``
attaches: the deterministic lookup in the thresholds table in use -- the user's calibration from
``python -m nprune.kernels.calibrate calibrate`` if there is one, else the shipped table; printed at the top --
or no kernel at all when the table has no threshold for the layer's shape; the "auto chose" column
gives the threshold it compared the density with). Masks are RANDOM (uniform, per weight) at
the given density, so compaction only helps where random masks kill whole rows (very low densities).
Dense layers get their input in the memory order they see inside a network: C order for the first
layer of LeNet-300-100 (the flattened images), feature-major (F order) for the others (the output of
a sparse predecessor; the dense path is indifferent to the order).

Usage:  python benchmarks/kernels.py [--quick] [--torch] [--blas-threads N]
Writes benchmarks/results/kernels.json and kernels.png.
"""
from __future__ import annotations

import argparse

from _common import RESULTS, env_info, env_line, md_table, save_json, time_side_by_side

import numpy as np  # after _common (it applies --blas-threads before NumPy loads)

from nprune.layers import Conv2D, Dense
from nprune.kernels import ConvKernelSparse, DenseKernelSparse, active_thresholds, auto_kernel
from nprune.kernels.thresholds import batch_class

LAYERS = [
    # name, kind, args, input shape (without batch), need_dx in its network
    ("lenet300.fc1", "dense", (784, 300), (784,), False),   # first layer: no dX
    ("lenet300.fc2", "dense", (300, 100), (300,), True),
    ("lenet300.fc3", "dense", (100, 10), (100,), True),
    ("lenet5.conv1", "conv", (1, 20, 5), (1, 28, 28), False),
    ("lenet5.conv2", "conv", (20, 50, 5), (20, 12, 12), True),
    ("lenet5.fc1", "dense", (800, 500), (800,), True),
    ("lenet5.fc2", "dense", (500, 10), (500,), True),
]
#: a variant "beats" dense (for the crossover) when it takes less than this fraction of its time
BEATS = 0.95

VARIANTS = {
    "csr": {"fwd": "sparse", "dx": "sparse", "dw": "sparse"},
    "csc": {"fwd": "sparse", "dx": "csc", "dw": "sparse"},
    "compact": {"fwd": "compact", "dx": "compact", "dw": "compact"},
}


def make_layer(kind, args, rng):
    if kind == "dense":
        return Dense(*args, rng), DenseKernelSparse
    return Conv2D(*args, rng), ConvKernelSparse


def bench_one(spec, density, batch, ops, repeats, rng):
    name, kind, args, in_shape, need_dx = spec
    layer, K = make_layer(kind, args, rng)
    layer.need_dx = need_dx
    if density < 1:
        layer.set_mask("W", rng.random(layer.params["W"].shape) < density)
    x = rng.random((batch,) + in_shape).astype(np.float32)
    if kind == "dense" and name != "lenet300.fc1" and name != "lenet5.fc1":
        x = np.asfortranarray(x)
    y = layer.forward(x)
    dout = rng.standard_normal(y.shape).astype(np.float32)
    if kind == "dense":
        dout = np.asfortranarray(dout)
    kernels = {"dense": None, "dense2": None}   # dense2: the same dense path again (noise floor)
    for v, modes in VARIANTS.items():
        kernels[v] = K(layer, modes)
    kernels["auto"] = auto_kernel(layer)        # None: no threshold for this shape -> plain dense
    res = {}
    for op in ops:
        fns = {}
        for v, k in kernels.items():
            if op == "infer":
                if v == "csc":
                    continue  # forward is the same product as csr
                def f(k=k):
                    layer.kernel = k
                    layer.forward(x, train=False)
            else:
                def f(k=k):
                    layer.kernel = k
                    layer.forward(x, train=True)
                    layer.backward(dout)
            fns[v] = f
        # auto's decision for this (batch class, mode) is a table lookup on its first call
        layer.kernel = kernels["auto"]
        layer.forward(x, train=(op == "step"))
        t = time_side_by_side(fns, repeats=repeats, target=0.004 if batch < 1000 else 0.02)
        ka = kernels["auto"]
        if ka is None:
            plan = {"use_kernel": False, "threshold": None, "attached": False}
        elif ka.all_dense:       # density above every threshold of the shape: plain dense code
            plan = {"use_kernel": False, "threshold": None, "attached": True, "all_dense": True}
        else:
            dec = [v for k, v in ka.decisions.items()
                   if k[0] == batch_class(batch) and k[1] == (op == "step")]
            if dec:
                plan = dict(ka.last_plan, threshold=dec[0]["threshold"], attached=True)
            else:                # this mode goes to the dense code without a lookup (dense_modes)
                plan = {"use_kernel": False, "threshold": None, "attached": True,
                        "mode_dense": ka.dense_modes}
        res[op] = {"times": t, "auto_plan": plan}
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer densities/repeats")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--torch", action="store_true", help="also time torch dense / torch.sparse (if installed)")
    ap.add_argument("--blas-threads", type=int, default=None,
                    help="OpenBLAS threads (set before NumPy loads, see _common.py)")
    a = ap.parse_args()
    densities = [1.0, 0.5, 0.2, 0.1, 0.05, 0.04, 0.03, 0.02, 0.01]
    batches = [1, 60, 10000]
    repeats = a.repeats or (5 if a.quick else 7)
    if a.quick:
        densities = [1.0, 0.2, 0.1, 0.05, 0.04, 0.03, 0.02, 0.01]
    rng = np.random.default_rng(0)
    th = active_thresholds()
    print(f"# Kernel benchmark (random masks, LeNet layer shapes)\n\n{env_line()}\nauto thresholds: "
          f"{th.get('source')} (measured by `{th.get('command')}` on {th.get('machine')})\n"
          f"median of {repeats} interleaved repeats; "
          "ratio = variant time / dense time (< 1 is faster); conv layers at 'batch 10000' run at 1000 "
          "(im2col of 10000 images does not fit the memory budget)\n")
    results = []
    for spec in LAYERS:
        for batch in batches:
            b = batch if not (spec[1] == "conv" and batch > 1000) else 1000
            ops = ["infer"] if b >= 1000 else ["infer", "step"]
            for d in densities:
                r = bench_one(spec, d, b, ops, repeats, rng)
                for op, v in r.items():
                    t = v["times"]
                    results.append({"layer": spec[0], "batch": b, "density": d, "op": op,
                                    "times": {k: {kk: vv for kk, vv in s.items() if kk != "all"}
                                              for k, s in t.items()},
                                    "auto_plan": v["auto_plan"]})
    # tables
    summary = []
    for spec in LAYERS:
        for op in ("step", "infer"):
            rows_l = [r for r in results if r["layer"] == spec[0] and r["op"] == op]
            if not rows_l:
                continue
            bs = sorted({r["batch"] for r in rows_l})
            for b in bs:
                rows = []
                rs = sorted([r for r in rows_l if r["batch"] == b], key=lambda r: -r["density"])
                for r in rs:
                    t = r["times"]
                    dm = t["dense"]["median"]
                    cells = [f"{100 * r['density']:g}%", f"{dm * 1e6:.0f} ({(t['dense']['q75'] - t['dense']['q25']) * 1e6:.0f})"]
                    for v in ("csr", "csc", "compact", "auto", "dense2"):
                        cells.append(f"{t[v]['median'] / dm:.2f}" if v in t else "-")
                    p = r["auto_plan"]
                    if not p.get("attached"):
                        cells.append("dense (no threshold for this shape)")
                    elif p.get("all_dense"):
                        cells.append("dense (above every threshold of this shape)")
                    elif p.get("mode_dense"):
                        cells.append(f"dense (above every {p['mode_dense']} threshold of this shape)")
                    else:
                        thr = "no entry" if p["threshold"] is None else f"<= {100 * p['threshold']:g}%"
                        cells.append(("kernel " + p["modes"] if p["use_kernel"] else "dense")
                                     + f" (threshold {thr})")
                    rows.append(cells)
                # crossover: highest density from which the best sparse variant (csr/csc/compact; auto
                # excluded -- it IS dense above the crossover) beats dense by at least 5% (more than
                # the typical dense-vs-dense noise: compact on an all-live block is dense's own GEMM,
                # and a tie must not count) all the way down
                cross = None
                for r in sorted(rs, key=lambda r: r["density"]):
                    t = r["times"]
                    best = min(t[v]["median"] for v in ("csr", "csc", "compact") if v in t)
                    if best < BEATS * t["dense"]["median"]:
                        cross = r["density"]
                    else:
                        break
                csr_cross = None
                for r in sorted(rs, key=lambda r: r["density"]):
                    if r["times"]["csr"]["median"] < BEATS * r["times"]["dense"]["median"]:
                        csr_cross = r["density"]
                    else:
                        break
                worst_auto = max(r["times"]["auto"]["median"] / r["times"]["dense"]["median"] for r in rs)
                noise = max(abs(r["times"]["dense2"]["median"] / r["times"]["dense"]["median"] - 1) for r in rs)
                summary.append({"layer": spec[0], "op": op, "batch": b, "crossover_best": cross,
                                "crossover_csr": csr_cross, "auto_worst_ratio": worst_auto,
                                "noise": noise})
                print(f"## {spec[0]} {op} batch {b}\n")
                print(md_table(["density", "dense us (IQR)", "csr", "csc", "compact", "auto",
                                "dense again (noise)", "auto chose"], rows))
                print(f"\ncrossover (sparse beats dense by >= 5% from this density down): best-variant "
                      f"{'none' if cross is None else f'{100 * cross:g}%'}, csr "
                      f"{'none' if csr_cross is None else f'{100 * csr_cross:g}%'}; auto worst ratio "
                      f"{worst_auto:.2f}; dense-vs-dense noise up to {100 * noise:.0f}%\n")
    print("## Summary\n")
    print(md_table(["layer", "op", "batch", "crossover (best)", "crossover (csr)", "auto worst ratio",
                    "dense-vs-dense noise"],
                   [[s["layer"], s["op"], s["batch"],
                     "none" if s["crossover_best"] is None else f"{100 * s['crossover_best']:g}%",
                     "none" if s["crossover_csr"] is None else f"{100 * s['crossover_csr']:g}%",
                     f"{s['auto_worst_ratio']:.2f}", f"{100 * s['noise']:.0f}%"] for s in summary]))
    over = [s for s in summary if s["auto_worst_ratio"] > 1.05]
    print(f"\nauto > 1.05x dense in {len(over)} of {len(summary)} (layer, op, batch) tables"
          + "".join(f"; {s['layer']} {s['op']} b{s['batch']}: {s['auto_worst_ratio']:.2f} "
                    f"(noise {100 * s['noise']:.0f}%)" for s in over))
    torch_res = torch_compare(a.quick, repeats) if a.torch else None
    p = save_json("kernels.json", {"env": env_info(), "masks": "random", "repeats": repeats,
                                   "auto_thresholds": {k: v for k, v in th.items() if k != "measurements"},
                                   "results": results, "summary": summary, "torch": torch_res})
    plot(results)
    print(f"\nwrote {p} and {RESULTS / 'kernels.png'}")


def torch_compare(quick, repeats):
    try:
        import torch
    except ImportError:
        print("\n(torch not installed: skipping the torch comparison)")
        return None
    import os
    torch.set_num_threads(int(os.environ.get("OPENBLAS_NUM_THREADS") or os.cpu_count()))
    rng = np.random.default_rng(1)
    rows, out = [], []
    for d in ([1.0, 0.1, 0.02] if quick else [1.0, 0.2, 0.1, 0.05, 0.02, 0.01]):
        W = rng.standard_normal((784, 300)).astype(np.float32) * (rng.random((784, 300)) < d)
        x = rng.random((60, 784)).astype(np.float32)
        tx, tW = torch.from_numpy(x), torch.from_numpy(W)
        tWs = tW.T.contiguous().to_sparse_csr()
        layer = Dense(784, 300, rng)
        layer.set_mask("W", W != 0)
        layer.params["W"][...] = W
        k = DenseKernelSparse(layer, VARIANTS["csr"])
        fns = {"numpy dense": lambda: x @ W, "torch dense": lambda: tx @ tW,
               "torch.sparse csr": lambda: torch.sparse.mm(tWs, tx.T),
               "nprune csr": lambda: k.forward(layer, x, False)}
        t = time_side_by_side(fns, repeats=repeats)
        base = t["numpy dense"]["median"]
        rows.append([f"{100 * d:g}%"] + [f"{t[n]['median'] * 1e6:.0f} ({t[n]['median'] / base:.2f})" for n in fns])
        out.append({"density": d, **{n: t[n]["median"] for n in fns}})
    print(f"\n## Optional: torch {torch.__version__} comparison, fc1 784x300 forward, batch 60 (us, ratio to numpy dense)\n")
    print(md_table(["density"] + list(fns), rows))
    return out


def plot(results):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    layers = [s[0] for s in LAYERS]
    fig, axes = plt.subplots(2, 4, figsize=(18, 8), squeeze=False)
    for ax, name in zip(axes.ravel(), layers):
        for op, ls in (("step", "-"), ("infer", "--")):
            for b in sorted({r["batch"] for r in results if r["layer"] == name and r["op"] == op}):
                rs = sorted([r for r in results if r["layer"] == name and r["op"] == op and r["batch"] == b],
                            key=lambda r: r["density"])
                if not rs:
                    continue
                dens = [100 * r["density"] for r in rs]
                sp = [r["times"]["dense"]["median"] / r["times"]["auto"]["median"] for r in rs]
                ax.plot(dens, sp, ls, marker="o", label=f"auto {op} b={b}")
        ax.axhline(1, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("density %")
        ax.set_ylabel("speedup vs dense")
        ax.legend(fontsize=7)
    axes.ravel()[-1].axis("off")
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / "kernels.png", dpi=90)


if __name__ == "__main__":
    main()
