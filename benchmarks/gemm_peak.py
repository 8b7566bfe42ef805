"""fp32 GEMM throughput of NumPy's BLAS on this machine (GFLOP/s), for a large square product and the
real layer shapes of LeNet-300-100 / LeNet-5.

Usage: ``python benchmarks/gemm_peak.py [--threads N]``. Importable: :func:`gemm_gflops` and
:func:`peak_gflops` (used by ``train_speed.py`` so the peak is measured in the same run).

A GEMM ``(m, k) @ (k, n)`` counts ``2*m*k*n`` FLOPs.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

# (label, m, k, n): forward, dW and dx GEMMs of the training step of both nets.
LAYER_SHAPES = [
    ("lenet300 fc1 fwd   60x784 @ 784x300", 60, 784, 300),
    ("lenet300 fc1 dW   784x60  @ 60x300", 784, 60, 300),
    ("lenet5 conv1 fwd   20x25  @ 25x36864", 20, 25, 36864),
    ("lenet5 conv2 fwd   50x500 @ 500x4096", 50, 500, 4096),
    ("lenet5 conv2 dW    50x4096 @ 4096x500", 50, 4096, 500),
    ("lenet5 conv2 dx   500x50  @ 50x4096", 500, 50, 4096),
    ("lenet5 fc1 fwd     64x800 @ 800x500", 64, 800, 500),
]


def gemm_gflops(m: int, k: int, n: int, seconds: float = 0.3, dtype=np.float32) -> float:
    """Median GFLOP/s of ``np.matmul(a, b, out=c)`` for a (m, k) @ (k, n) product in ``dtype``."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k)).astype(dtype)
    b = rng.standard_normal((k, n)).astype(dtype)
    c = np.empty((m, n), dtype)
    np.matmul(a, b, out=c)
    t0 = time.perf_counter()
    np.matmul(a, b, out=c)
    one = max(time.perf_counter() - t0, 1e-7)
    reps = max(5, int(seconds / one))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        np.matmul(a, b, out=c)
        ts.append(time.perf_counter() - t0)
    return 2.0 * m * k * n / float(np.median(ts)) / 1e9


def peak_gflops(size: int = 2048, seconds: float = 1.0) -> float:
    """fp32 GFLOP/s of a ``size``^3 GEMM (the reference "peak" of this machine and BLAS)."""
    return gemm_gflops(size, size, size, seconds)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:  # BLAS is already loaded: limit its pool at run time if threadpoolctl exists
        try:
            from threadpoolctl import threadpool_limits
            threadpool_limits(args.threads)
        except ImportError:
            print("(threadpoolctl not installed: set OPENBLAS_NUM_THREADS before starting instead)")
    print("| GEMM | GFLOP/s |")
    print("|---|---:|")
    print(f"| 2048 x 2048 x 2048 | {peak_gflops():.1f} |")
    for label, m, k, n in LAYER_SHAPES:
        print(f"| {label} | {gemm_gflops(m, k, n):.1f} |")


if __name__ == "__main__":
    main()
