"""Training-level benchmark: seconds per epoch and inference throughput, dense vs auto kernels, at
the IMP levels of a real (shortened) lottery-ticket run on MNIST.

Masks: magnitude pruning (nprune.pruning.magnitude_layerwise) of TRAINED weights at Frankle & Carbin's
rates (fc 20%, output layer 10%, conv 10% per round), with a short retraining between rounds
(--iters-per-round). At each timed level the same weights/masks are trained for --steps steps with
dense and with auto kernels (same data order, blocks interleaved), giving s/epoch (steps x 55000/60),
the test accuracy after the steps for both, and inference throughput at batch 10,000.

Variants (each trains its own copy from the same weights, masks and data order; blocks interleaved
in a rotating order):
* ``dense``: ``--kernel dense``, what a user gets without the sparse kernels: masked dense kernels +
  the compact optimiser (nprune.optim's default);
* ``auto``: ``apply_kernel(model, "auto")`` + the compact optimiser: per layer, the sparse kernel iff the
  mask density is <= the threshold of the thresholds table in use (the user's calibration from
  ``python -m nprune.kernels.calibrate calibrate`` if any, else the shipped table) -- a lookup, no timing;
* ``dense again``: ``dense`` a second time, to show the noise floor of the comparison.
Speed-ups are auto against ``dense``.
Inference: ``chunked_logits(model, x_test[:10000])`` (C-ordered input), and the same images from
each model's :func:`~nprune.evaluate.feature_major` copy (``predict(model, fm)``), the layout
the training loop evaluates from when the first layer may run sparse; the feature-major speed-up is
against the faster of dense's two layouts.

Usage: python benchmarks/sparse_train.py [--quick] [--blas-threads N] [--data-dir DIR]
Writes benchmarks/results/sparse_train.json and sparse_train.png.
"""
from __future__ import annotations

import argparse
import time

from _common import RESULTS, env_info, env_line, md_table, save_json

import numpy as np  # after _common (it applies --blas-threads before NumPy loads)

from nprune import nets
from nprune.data.datasets import load_dataset, prepare
from nprune.kernels import active_thresholds, apply_kernel, kernel_report
from nprune.evaluate import chunked_logits, evaluate, feature_major, predict
from nprune.optim import Adam
from nprune.pruning import magnitude_layerwise
from nprune.training import batches, train_step

RATES = {"lenet300": {"fc1.W": 0.2, "fc2.W": 0.2, "fc3.W": 0.1},
         "lenet5": {"conv1.W": 0.1, "conv2.W": 0.1, "fc1.W": 0.2, "fc2.W": 0.1}}


def train_steps(model, opt, data, idx_list):
    x, y = data.x_train, data.y_train
    for idx in idx_list:
        train_step(model, x[idx], y[idx])
        opt.step()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--data-dir", help="folder with the MNIST files (else found as the package finds it: $NPRUNE_DATA_DIR, the user cache, system folders)")
    ap.add_argument("--nets", default="lenet300,lenet5")
    ap.add_argument("--blas-threads", type=int, default=None,
                    help="OpenBLAS threads (set before NumPy loads, see _common.py)")
    a = ap.parse_args()
    data = prepare(load_dataset("mnist", data_dir=a.data_dir, download=False))
    n_train = len(data.x_train)
    per_epoch = n_train // 60
    steps = 200 if a.quick else 600
    blocks = 4 if a.quick else 6
    iters_round = 150 if a.quick else 500
    th = active_thresholds()
    print(f"# Training-level benchmark (IMP masks from magnitude pruning of trained weights)\n\n{env_line()}\n"
          f"s/epoch = time per step (median of {blocks} interleaved blocks of {steps // blocks} steps, "
          f"variants in rotating order) x {per_epoch} steps; accuracy: test accuracy after {steps} steps "
          f"from the same weights with the same data order; 'auto first-step extra ms': extra time of "
          f"auto's first training step under new masks (buffers, structures; once per mask)\n"
          f"auto thresholds: {th.get('source')} (measured by `{th.get('command')}`)\n")
    out = {"env": env_info(), "levels": []}
    for net in a.nets.split(","):
        model = nets.build(net, np.random.default_rng(0))
        rates = RATES[net]
        opt = Adam(model, 1.2e-3)
        rng = np.random.default_rng(0)
        train_steps(model, opt, data, list(batches(n_train, 60, 2 * iters_round, rng)))
        masks = model.bool_masks()
        target_rounds = [0, 3, 7, 11, 15, 18] if net == "lenet300" else [0, 3, 7, 11, 15, 18]
        if a.quick:
            target_rounds = [0, 7, 18]
        rows = []
        for rnd in range(max(target_rounds) + 1):
            if rnd:
                masks = magnitude_layerwise(model.get_weights(), masks, rates)
                model.set_masks(masks)
                opt.reset()
                train_steps(model, opt, data, list(batches(n_train, 60, iters_round, rng)))
            if rnd not in target_rounds:
                continue
            left = sum(m.sum() for m in masks.values()) / sum(m.size for m in masks.values())
            w0 = model.get_weights()
            idx_all = list(batches(n_train, 60, steps, np.random.default_rng(rnd)))
            per_block = steps // blocks
            variants = ("dense", "auto", "dense again")
            times = {v: [] for v in variants}
            accs = {}
            # interleaved blocks: each variant trains its own copy of the weights with its own Adam
            models = {}
            for choice in variants:
                m = nets.build(net, np.random.default_rng(0))
                m.set_masks(masks)
                m.set_weights(w0)
                apply_kernel(m, "auto" if choice == "auto" else "dense")
                models[choice] = (m, Adam(m, 1.2e-3))
            # one warm-up step each, timed (first-call costs: buffers, the kernels' structures and
            # auto's table lookups; reported separately; steady state below)
            warm_idx = list(batches(n_train, 60, 1, np.random.default_rng(1000 + rnd)))
            first = {}
            for choice in variants:
                m, o = models[choice]
                t0 = time.perf_counter()
                train_steps(m, o, data, warm_idx)
                first[choice] = time.perf_counter() - t0
            for b in range(blocks):
                order = variants[b % len(variants):] + variants[:b % len(variants)]
                for choice in order:
                    m, o = models[choice]
                    t0 = time.perf_counter()
                    train_steps(m, o, data, idx_all[b * per_block:(b + 1) * per_block])
                    times[choice].append((time.perf_counter() - t0) / per_block)
            for choice in variants:
                accs[choice] = evaluate(models[choice][0], data.x_test, data.y_test)[1]
            # inference at batch 10,000 (two untimed warm-up calls each)
            # C: the (10000, ...) array as it is; FM: each model's own feature-major copy
            # (nprune.evaluate.feature_major: blocks = its inference chunks), as train() holds the
            # evaluation sets when the first layer may run sparse. Same logits (checked).
            xt = data.x_test[:10000]
            fm = {c: feature_major(models[c][0], xt, batch_size=10000) for c in ("dense", "auto")}
            calls = {("dense", "C"): lambda: chunked_logits(models["dense"][0], xt),
                     ("auto", "C"): lambda: chunked_logits(models["auto"][0], xt),
                     ("dense", "FM"): lambda: predict(models["dense"][0], fm["dense"]),
                     ("auto", "FM"): lambda: predict(models["auto"][0], fm["auto"])}
            for c in ("dense", "auto"):
                assert np.array_equal(calls[(c, "C")](), calls[(c, "FM")]()), "feature-major logits differ"
            inf = {k: [] for k in calls}
            for k in calls:
                calls[k]()
            keys = list(calls)
            for r in range(6):
                for k in (keys if r % 2 == 0 else keys[::-1]):
                    t0 = time.perf_counter()
                    calls[k]()
                    inf[k].append(time.perf_counter() - t0)
            td, ta = np.median(times["dense"]) * per_epoch, np.median(times["auto"]) * per_epoch
            tc2 = np.median(times["dense again"]) * per_epoch
            calib = first["auto"] - np.median(times["auto"])
            idn, ia = np.median(inf[("dense", "C")]), np.median(inf[("auto", "C")])
            idf, iaf = np.median(inf[("dense", "FM")]), np.median(inf[("auto", "FM")])
            best_dense = min(idn, idf)
            rep = kernel_report(models["auto"][0])
            chosen = ", ".join(
                f"{r['layer']}:" + ("none" if r["kernel"] == "dense" else "dense" if r["dense_everywhere"]
                                    else "/".join(("S" if v["use"] else "D")
                                                  for _, v in sorted(r["decisions"].items())))
                for r in rep)
            rows.append([rnd, f"{100 * left:.1f}%", f"{td:.2f}", f"{ta:.2f}", f"{td / ta:.2f}x",
                         f"{tc2 / td:.3f}",
                         f"{accs['dense']:.4f}", f"{accs['auto']:.4f}", f"{10000 / idn:.0f}", f"{10000 / ia:.0f}",
                         f"{idn / ia:.2f}x", f"{10000 / iaf:.0f}", f"{10000 / idf:.0f}",
                         f"{best_dense / iaf:.2f}x", f"{calib * 1e3:.0f}", chosen])
            out["levels"].append({"net": net, "round": rnd, "weights_left": float(left),
                                  "epoch_s_dense": float(td), "epoch_s_auto": float(ta),
                                  "epoch_s_dense_again": float(tc2),
                                  "auto_first_step_extra_s": float(calib), "first_step_s": first,
                                  "acc_dense": accs["dense"], "acc_auto": accs["auto"],
                                  "infer_s_dense": float(idn), "infer_s_auto": float(ia),
                                  "infer_s_dense_fm": float(idf), "infer_s_auto_fm": float(iaf),
                                  "step_times": times,
                                  "infer_times": {f"{c} {lay}": v for (c, lay), v in inf.items()},
                                  "auto_layers": rep,
                                  "density_per_layer": {k: float(v.mean()) for k, v in masks.items()}})
            print(f"  {net} round {rnd}: {100 * left:.1f}% left, epoch {td:.2f}s dense vs {ta:.2f}s auto", flush=True)
        print(f"\n## {net}\n")
        print(md_table(["round", "weights left", "s/epoch dense", "s/epoch auto",
                        "epoch speedup (auto)", "dense again / dense (noise)",
                        "acc dense", "acc auto", "infer img/s dense", "infer img/s auto",
                        "infer speedup", "infer img/s auto, feature-major",
                        "infer img/s dense, feature-major", "infer speedup, feature-major (vs the faster dense)",
                        "auto first-step extra ms",
                        "auto per layer (S=sparse, D=dense per batch class/mode; dense: above every threshold of the shape; none: no threshold for the shape)"], rows))
        print()
    p = save_json("sparse_train.json", out)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for net in a.nets.split(","):
        lv = [l for l in out["levels"] if l["net"] == net]
        x = [100 * l["weights_left"] for l in lv]
        ax[0].plot(x, [l["epoch_s_dense"] / l["epoch_s_auto"] for l in lv], "o-", label=net)
        ax[1].plot(x, [l["infer_s_dense"] / l["infer_s_auto"] for l in lv], "o-", label=net)
        ax[1].plot(x, [min(l["infer_s_dense"], l["infer_s_dense_fm"]) / l["infer_s_auto_fm"] for l in lv],
                   "s--", label=f"{net}, feature-major")
    for axi, t in zip(ax, ("training epoch speedup (auto vs dense)", "inference speedup, batch 10000")):
        axi.set_xscale("log")
        axi.invert_xaxis()
        axi.axhline(1, color="k", lw=0.8)
        axi.set_xlabel("weights left %")
        axi.set_title(t)
        axi.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "sparse_train.png", dpi=90)
    print(f"wrote {p} and {RESULTS / 'sparse_train.png'}")


if __name__ == "__main__":
    main()
