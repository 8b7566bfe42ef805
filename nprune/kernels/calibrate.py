"""Measuring the kernels on this machine: the ``auto`` thresholds table and the cost model.

``python -m nprune.kernels.calibrate calibrate`` times each layer's sparse kernel and its dense code
side by side on every layer shape of :mod:`nprune.nets`, at a grid of random-mask densities
(:data:`CAL_DENSITIES`), batch sizes (:data:`CAL_BATCHES`) and 1 and all BLAS threads
(:func:`measure_thresholds`). An entry's threshold is the highest density below which the kernel is
at least 10% faster (:data:`AUTO_MARGIN`) everywhere, so that ``auto`` is never measurably slower
than dense. The table goes to :func:`~.thresholds.user_thresholds_path`, which ``auto`` then uses
instead of the shipped table (:func:`calibrate_thresholds`). ``show`` prints the table in use;
``cost-model`` measures and prints the constants of :data:`nprune.kernels.cost.COST`
(:func:`measure_cost_model`).

This is the only module of the package that imports :mod:`nprune.nets` (for the layer shapes);
``nprune.kernels`` does not import it.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from .. import nets
from ..layers import Conv2D, Dense
from ..data.fsutil import atomic_write_json
from .conv import SparseMatrix
from .cost import COST
from .dispatch import make_kernel
from .thresholds import (ALL_MODES, AUTO_MODES, BATCH_CLASSES, CALIBRATE_COMMAND, FMAJOR_MODES,
                         THRESHOLDS_FORMAT, ThresholdsError, active_thresholds, blas_threads,
                         check_thresholds, format_thresholds, load_thresholds, shape_key,
                         user_thresholds_path)

# The kernel must take <= AUTO_MARGIN x the dense time (paired median ratio and best times over
# CAL_REPEATS interleaved blocks of ~CAL_TARGET seconds) at a density, and at every lower density of
# CAL_DENSITIES, for that density to be the threshold.
AUTO_MARGIN = 0.9
CAL_REPEATS = 7
CAL_TARGET = 0.003
CAL_DENSITIES = (0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.035, 0.04, 0.045, 0.05, 0.06,
                 0.07, 0.085, 0.1, 0.12, 0.15, 0.2, 0.3, 0.5, 1.0)
# batch sizes measured per batch class (the class's threshold is the minimum over them); conv layers
# are measured at a smaller 'large' batch (their im2col columns grow 25x faster than the input)
CAL_BATCHES = {"1": (1,), "small": (16, 64, 256), "large": (1024, 4096)}
CAL_BATCHES_CONV = {"1": (1,), "small": (16, 64, 256), "large": (512,)}

_F32 = np.float32



def calibration_layers(net_names=None) -> list[dict]:
    """Every distinct Dense/Conv2D layer (by :func:`shape_key`, with its input size) of the networks
    of :mod:`nprune.nets`: ``{"key", "net", "name", "layer", "in_shape", "first"}`` (``first``: the
    network's first parametrised layer, which gets the images in C order and needs no dx)."""
    out, seen = [], set()
    for net in (net_names or nets.NETS):
        model = nets.build(net, np.random.default_rng(0))
        x = np.zeros((1, 1, 28, 28), _F32)
        first = True
        for name, layer in zip(model.names, model.layers):
            if isinstance(layer, (Dense, Conv2D)):
                key = shape_key(layer, x.shape)
                if key not in seen:
                    seen.add(key)
                    out.append(dict(key=key, net=net, name=name, layer=layer,
                                    in_shape=tuple(x.shape[1:]), first=first))
                first = False
            x = layer.forward(x, train=False)
    return out


def _blas_threads():
    """([thread counts to measure], threadpool_limits or None): 1 and all cores when threadpoolctl
    is importable (the threshold must hold for --jobs 1 and --jobs N alike), else the current."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return [None], None
    n = os.cpu_count() or 1
    return ([1, n] if n > 1 else [1]), threadpool_limits


def _cal_inputs(layer, spec, n, rng):
    """Input and upstream gradient in the memory order the layer sees inside its network: C-ordered
    images for a first layer; batch-last (C, H, W, N) for an inner conv; C order for an inner Dense
    (the order a dense predecessor produces; a sparse predecessor's F order only helps the kernel)."""
    shape = (n,) + tuple(spec["in_shape"])
    if isinstance(layer, Conv2D):
        if spec["first"]:
            x = rng.random(shape, dtype=_F32)
        else:
            x = rng.random(shape[1:] + (n,), dtype=_F32).transpose(3, 0, 1, 2)
        _, f, oh, ow = layer.output_shape(shape)
        dout = rng.standard_normal((f, oh, ow, n), dtype=_F32).transpose(3, 0, 1, 2)
    else:
        x = rng.random(shape, dtype=_F32)
        dout = rng.standard_normal((n, layer.out_features), dtype=_F32)
    return x, dout


def _time_pair(layer, kernel, x, dout, train, threads, limits, repeats) -> dict:
    """{threads: {"kernel": s/call, "dense": s/call, "ratio": r}} for a forward (plus backward when
    ``train``): ``repeats`` rounds, each a block of ~CAL_TARGET seconds of either path back to back
    (order alternating); times are the fastest block's, ``ratio`` the median over rounds of kernel
    block / dense block of the same round -- both robust to other jobs stealing the CPU. Stops early
    once the two are a factor 2 apart in every round."""
    import contextlib

    def run(k):
        layer.kernel = k
        layer.forward(x, train)
        if train:
            layer.backward(dout)

    out = {}
    try:
        for t in threads:
            ctx = limits(limits=t, user_api="blas") if (limits and t) else contextlib.nullcontext()
            with ctx:
                arms = (("dense", None), ("kernel", kernel))
                probe = {}
                for name, k in arms:
                    run(k)                          # warm-up (buffers, caches)
                    t0 = time.perf_counter()
                    run(k)
                    probe[name] = time.perf_counter() - t0
                number = max(1, min(200, int(CAL_TARGET / max(max(probe.values()), 1e-7))))
                ts = {"dense": [], "kernel": []}
                for r in range(repeats):
                    for name, k in (arms if r % 2 == 0 else arms[::-1]):
                        t0 = time.perf_counter()
                        for _ in range(number):
                            run(k)
                        ts[name].append((time.perf_counter() - t0) / number)
                    if r >= 2 and (max(ts["kernel"]) < 0.5 * min(ts["dense"])
                                   or min(ts["kernel"]) > 2.0 * max(ts["dense"])):
                        break
                ratios = np.array(ts["kernel"]) / np.array(ts["dense"])
                out[t] = {"kernel": float(min(ts["kernel"])), "dense": float(min(ts["dense"])),
                          "ratio": float(np.median(ratios))}
    finally:
        layer.kernel = None
    return out


def _passes(res: dict, margin: float = AUTO_MARGIN) -> bool:
    """The kernel is faster by ``margin`` in the paired ratio and in the best times, at every
    thread count measured."""
    return all(v["ratio"] <= margin and v["kernel"] <= margin * v["dense"] for v in res.values())


def _cal_modes(spec, modes=None) -> tuple:
    """The modes calibrated for a layer: the feature-major ``_f`` modes for Dense layers -- all three
    for an inner one (a sparse predecessor leaves its input F-ordered), ``eval_f`` for a first one
    (the feature-major evaluation copy of :func:`nprune.evaluate.evaluation_copy`); none for conv
    layers (batch-last throughout)."""
    if isinstance(spec["layer"], Dense):
        out = AUTO_MODES + (("eval_f",) if spec["first"] else FMAJOR_MODES)
    else:
        out = AUTO_MODES
    return tuple(m for m in out if modes is None or m in modes)


def measure_thresholds(specs=None, densities=CAL_DENSITIES, batches=None, repeats=CAL_REPEATS,
                       verbose=False, seed=0, modes=None, masks=None, threads=None,
                       margin=AUTO_MARGIN) -> tuple[dict, list]:
    """Measure the ``auto`` thresholds on this machine. Returns (thresholds, measurements).

    For each layer shape (:func:`calibration_layers`), batch class and mode, at each batch size of
    the class (``CAL_BATCHES``; conv ``CAL_BATCHES_CONV``) the densities of ``densities`` are tried in
    increasing order on a random mask: the kernel (``sparse``, as auto runs it) and the dense masked
    path are timed side by side (:func:`_time_pair`) at 1 BLAS thread and at all cores, and the scan
    stops at the first density where the kernel is not <= AUTO_MARGIN x dense at every thread count.
    The threshold is the last density that passed (None if none did), minimised over the class's
    batch sizes. Random masks are the kernels' worst case at a given density (IMP masks kill whole
    rows and columns, which only helps the kernel), so the thresholds err on the dense side.
    Inner Dense layers are also measured with feature-major (F-ordered) input, the ``_f`` modes
    (:data:`FMAJOR_MODES`; the upstream gradient stays C-ordered, as a dense successor returns it,
    the kernel's worse case). ``modes``: measure only these modes.

    ``masks`` ({shape key: [boolean masks]}, e.g. the masks of the rounds of a pruning schedule)
    replaces the random masks of ``densities`` for the shapes it names (other shapes are skipped):
    they are tried in increasing density, and the threshold is the geometric mean of the last
    passing and the first failing density (the densest mask's density when none fails).
    ``threads``: the BLAS thread counts to measure (default 1 and all cores); ``margin``: the
    kernel's time must be at most this fraction of dense's (:data:`AUTO_MARGIN`). ``batches``:
    {batch class: batch sizes}; a class with no sizes is left out of the table."""
    all_threads, limits = _blas_threads()
    threads = all_threads if threads is None or limits is None else list(threads)
    rng = np.random.default_rng(seed)
    table, meas = {}, []
    for spec in (calibration_layers() if specs is None else specs):
        layer, key = spec["layer"], spec["key"]
        if masks is not None and key not in masks:
            continue
        seq = (sorted(((float(m.mean()), m) for m in masks[key]), key=lambda t: t[0])
               if masks is not None else None)
        layer.kernel = None
        need_dx0 = layer.need_dx
        cls_batches = batches or (CAL_BATCHES_CONV if isinstance(layer, Conv2D) else CAL_BATCHES)
        table[key] = {}
        for cls in BATCH_CLASSES:
            if not cls_batches.get(cls):
                continue
            table[key][cls] = {}
            for mode in _cal_modes(spec, modes):
                base = mode[:-2] if mode.endswith("_f") else mode
                train = base != "eval"
                layer.need_dx = base == "train_dx" if train else not spec["first"]
                thr, per = 1.0, {}
                for n in cls_batches[cls]:
                    x, dout = _cal_inputs(layer, spec, n, rng)
                    if mode != base:   # feature-major input, as a sparse predecessor leaves it; the
                        x = np.asfortranarray(x)   # upstream gradient stays C-ordered (worse case)
                    best = None
                    scan = seq if seq is not None else [(d, None) for d in densities]
                    for i, (d, m) in enumerate(scan):
                        if d > thr:
                            break
                        layer.set_mask("W", m if m is not None
                                       else rng.random(layer.params["W"].shape) < d)
                        k = make_kernel(layer, "sparse")
                        res = _time_pair(layer, k, x, dout, train, threads, limits, repeats)
                        ok = _passes(res, margin)
                        if not ok:                  # a failure is confirmed by a second measurement
                            meas.append({"shape": key, "batch_class": cls, "mode": mode,
                                         "batch": n, "density": d, "pass": ok, "retried": True,
                                         "times": {str(t): v for t, v in res.items()}})
                            res = _time_pair(layer, k, x, dout, train, threads, limits, repeats)
                            ok = _passes(res, margin)
                        meas.append({"shape": key, "batch_class": cls, "mode": mode, "batch": n,
                                     "density": d, "pass": ok,
                                     "times": {str(t): v for t, v in res.items()}})
                        if not ok:
                            if seq is not None and best is not None:
                                best = round(float(np.sqrt(best * d)), 4)
                            break
                        best = d if seq is None else round(d, 4)
                    per[n] = best
                    if best is None:
                        thr = None
                        break
                    thr = min(thr, best)
                table[key][cls][mode] = thr
                if verbose:
                    print(f"  {key:44s} {cls:5s} {mode:8s} " + " ".join(
                        f"b{n}:{'-' if b is None else f'{b:g}'}" for n, b in per.items())
                        + f"  => {'never' if thr is None else f'{thr:g}'}", flush=True)
        layer.set_mask("W", None)
        layer.need_dx = need_dx0
    return table, meas


def _machine() -> dict:
    import platform
    import scipy
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "scipy": scipy.__version__}
    try:
        from threadpoolctl import threadpool_info
        pools = [p for p in threadpool_info() if p.get("user_api") == "blas"]
        if pools:
            info["blas"] = f"{pools[0].get('internal_api')} {pools[0].get('version')}"
            info["blas_threads_default"] = pools[0].get("num_threads")
    except ImportError:
        pass
    if hasattr(os, "getloadavg"):
        info["load_avg_at_start"] = [round(v, 2) for v in os.getloadavg()]
    return info


def _min_merge(a: dict, b: dict) -> dict:
    """Entry-wise the more conservative of two threshold tables (None = never wins)."""
    out = {}
    for shape in a.keys() | b.keys():
        out[shape] = {}
        for c in BATCH_CLASSES:
            ma, mb = a.get(shape, {}).get(c, {}), b.get(shape, {}).get(c, {})
            out[shape][c] = {m: (None if ma.get(m) is None or mb.get(m) is None
                                 else min(ma[m], mb[m])) for m in ALL_MODES if m in ma or m in mb}
    return out


def calibrate_thresholds(path=None, quick: bool = False, runs: int = 1,
                         verbose: bool = True) -> Path:
    """Measure the ``auto`` thresholds (:func:`measure_thresholds`, ``runs`` times, keeping the
    smallest threshold of each entry; a few minutes per run) and write them as JSON to ``path``
    (default :func:`user_thresholds_path`, which ``auto`` then uses). Returns the path."""
    path = Path(path) if path is not None else user_thresholds_path()
    machine = _machine()
    t0 = time.perf_counter()
    kw = dict(repeats=5) if quick else {}
    table, meas = None, []
    for r in range(max(1, runs)):
        if verbose and runs > 1:
            print(f"run {r + 1} of {runs}", flush=True)
        t, m = measure_thresholds(verbose=verbose, seed=r, **kw)
        table = t if table is None else _min_merge(table, t)
        meas += [dict(x, run=r) for x in m]
    if hasattr(os, "getloadavg"):
        machine["load_avg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    obj = {"format": THRESHOLDS_FORMAT, "machine": machine,
           "command": CALIBRATE_COMMAND + (" --quick" if quick else "")
           + (f" --runs {runs}" if runs > 1 else ""),
           "margin": AUTO_MARGIN, "densities": list(CAL_DENSITIES),
           "batches": {"dense": CAL_BATCHES, "conv": CAL_BATCHES_CONV},
           "seconds": round(time.perf_counter() - t0, 1), "thresholds": table, "measurements": meas}
    check_thresholds(obj, str(path))
    atomic_write_json(path, obj)
    return path


def _median_time(fn, repeat=7, number=20):
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        ts.append((time.perf_counter() - t0) / number)
    return float(np.median(ts))


def measure_cost_model(verbose: bool = False) -> dict:
    """Measure the cost-model constants on this machine (a few seconds). Returns a dict shaped like
    :data:`nprune.kernels.cost.COST`; does not change it (to use the result:
    ``nprune.kernels.cost.COST.update(measure_cost_model())``)."""
    rng = np.random.default_rng(0)
    R, C, M = 300, 784, 60
    A = rng.standard_normal((R, C)).astype(_F32)
    X = rng.standard_normal((C, M)).astype(_F32)
    small = rng.standard_normal((8, 8)).astype(_F32)
    t_big = _median_time(lambda: np.matmul(A, X))
    t_small = _median_time(lambda: np.matmul(small, small), number=200)
    fma = "gemm_fma_1thread" if blas_threads() == 1 else "gemm_fma"
    res = {"gemm_call": t_small, fma: max(t_big - t_small, 1e-9) / (R * C * M)}
    sm = SparseMatrix(np.arange(R * C).reshape(R, C))
    pts = []
    for d in (0.2, 0.05):
        mask = rng.random((R, C)) < d
        sm.rebuild(mask)
        sm.refresh(A, ("csr",))
        t = _median_time(lambda: sm.matmul(X, "sparse"))
        pts.append((sm.nnz * M, t))
        D = rng.standard_normal((R, M)).astype(_F32)
        tg = _median_time(lambda: sm.grad_values(D, X, "sparse"), number=5)
        pts_g = (sm.nnz * M, tg)
    (n1, t1), (n2, t2) = pts
    res["spmm_fma"] = max((t1 - t2) / (n1 - n2), 1e-12)
    res["spmm_call"] = max(t2 - res["spmm_fma"] * n2, 1e-6)
    res["sddmm_fma"] = pts_g[1] / pts_g[0]
    res["sddmm_call"] = COST["sddmm_call"]
    big = rng.standard_normal((2000, 784)).astype(_F32)
    tc = _median_time(lambda: np.ascontiguousarray(big.T), number=5)
    res["copy_elem"] = tc / big.size
    res["copy_call"] = COST["copy_call"]
    if verbose:
        for k, v in res.items():
            print(f"    {k!r}: {v:.3g},")
    return res


def main(argv=None) -> int:
    import argparse
    import sys
    ap = argparse.ArgumentParser(
        prog="python -m nprune.kernels.calibrate",
        description="The thresholds table that '--kernel auto' follows (per layer shape, batch size "
                    "and mode: the highest mask density at which the sparse kernel runs), and the "
                    "cost model the sparse kernels use to pick their method.")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    cal = sub.add_parser(
        "calibrate", help="measure the auto thresholds on this machine (a few minutes) and write "
                          "them where auto reads them first",
        description="Time the sparse kernels against the dense code on every layer shape of the "
                    f"networks and write the thresholds to {user_thresholds_path()} (or --out); "
                    "auto then uses them instead of the shipped table. Run it on a quiet machine.")
    cal.add_argument("--out", help="write the thresholds here instead of the user cache")
    cal.add_argument("--quick", action="store_true", help="fewer repeats (noisier, faster)")
    cal.add_argument("--runs", type=int, default=1,
                     help="measure this many times and keep the smallest threshold of each entry "
                          "(noisy machines)")
    sub.add_parser("show", help="print the thresholds auto uses now (and where they come from)")
    sub.add_parser("cost-model", help="measure and print the sparse kernels' cost-model constants "
                                      "(nprune.kernels.cost.COST; nothing is written)")
    a = ap.parse_args(argv)
    try:
        if a.command == "calibrate":
            p = calibrate_thresholds(a.out, quick=a.quick, runs=a.runs, verbose=True)
            print(format_thresholds(load_thresholds(p, source=str(p))))
            print(f"wrote {p}")
        elif a.command == "show":
            print(format_thresholds(active_thresholds()))
        elif a.command == "cost-model":
            measure_cost_model(verbose=True)
        else:
            ap.print_help()
    except ThresholdsError as e:
        print(f"nprune: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
