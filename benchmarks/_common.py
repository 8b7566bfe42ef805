"""Shared helpers for the sparse-kernel benchmarks: side-by-side timing, environment, output files."""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

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
    return {"blas": "unknown (see numpy.show_config())", "blas_threads": env}


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
    """Time several callables interleaved (round robin, one batch of calls each per repeat) so that
    machine noise hits all of them alike. Returns {name: {"median": s, "q25": s, "q75": s, "all": [...]}}
    in seconds per call."""
    numbers = {k: _number_for(f, target) for k, f in fns.items()}
    samples = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
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
