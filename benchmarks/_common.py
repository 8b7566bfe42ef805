"""Shared helpers for the sparse-kernel benchmarks: side-by-side timing, environment, output files."""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

# --blas-threads N (any benchmark): must be applied before NumPy loads OpenBLAS.
if "--blas-threads" in sys.argv:
    _n = sys.argv[sys.argv.index("--blas-threads") + 1]
    for _k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_k] = _n

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"


def blas_info() -> dict:
    """BLAS library and thread count (threadpoolctl when importable, else env variables)."""
    try:
        from threadpoolctl import threadpool_info
        pools = [p for p in threadpool_info() if p.get("user_api") == "blas"]
        if pools:
            p = pools[0]
            return {"blas": p.get("internal_api"), "blas_threads": p.get("num_threads"),
                    "blas_version": p.get("version"), "arch": p.get("architecture")}
    except Exception:  # pragma: no cover
        pass
    env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    n = env["OPENBLAS_NUM_THREADS"] or env["OMP_NUM_THREADS"]
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        name = f"{blas.get('name')} {blas.get('version')}"
    except Exception:  # pragma: no cover
        name = "unknown"
    return {"blas": name, "blas_threads": int(n) if n else f"default (= {os.cpu_count()} cores)",
            "blas_env": env}


def env_info() -> dict:
    import scipy
    return {"python": platform.python_version(), "numpy": np.__version__, "scipy": scipy.__version__,
            "cpus": os.cpu_count(), "machine": platform.machine(), **blas_info(),
            "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None}


def env_line() -> str:
    e = env_info()
    return (f"numpy {e['numpy']}, scipy {e['scipy']}, {e['cpus']} CPUs, BLAS {e['blas']} "
            f"threads={e['blas_threads']}, load avg at start {e['load_avg']}")


def _number_for(fn, target=0.01):
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    return max(1, min(10000, int(target / max(dt, 1e-7))))


def time_side_by_side(fns: dict, repeats: int = 7, target: float = 0.01) -> dict:
    """Time several callables interleaved (one batch of calls each per repeat, in a random order per
    repeat) so that machine noise and cache warmth hit all of them alike. Returns {name: {"median": s, "q25": s, "q75": s, "all": [...]}}
    in seconds per call."""
    numbers = {k: _number_for(f, target) for k, f in fns.items()}
    samples = {k: [] for k in fns}
    names = list(fns)
    order_rng = np.random.default_rng(12345)
    for _ in range(repeats):
        # a fresh random order each repeat: no variant always runs right after the same other one
        # (whoever follows a variant with the same working set finds warm caches)
        for k in order_rng.permutation(names):
            f = fns[k]
            n = numbers[k]
            t0 = time.perf_counter()
            for _ in range(n):
                f()
            samples[k].append((time.perf_counter() - t0) / n)
    out = {}
    for k, s in samples.items():
        a = np.array(s)
        out[k] = {"median": float(np.median(a)), "q25": float(np.percentile(a, 25)),
                  "q75": float(np.percentile(a, 75)), "all": [float(v) for v in a]}
    return out


def save_json(name: str, obj) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    p = RESULTS / name
    p.write_text(json.dumps(obj, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
    return p


def md_table(headers, rows) -> str:
    lines = ["| " + " | ".join(map(str, headers)) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)
