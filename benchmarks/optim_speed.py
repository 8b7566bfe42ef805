"""Optimiser step time against the chunk size of the dense path, for the parameters of both networks.

    python benchmarks/optim_speed.py                  # Adam on LeNet-300-100, SGD momentum on LeNet-5
    python benchmarks/optim_speed.py --repeats 9

Each configuration is timed interleaved with the others (round robin, median over rounds), so a
noisy machine slows all of them alike; read the ratios. The unchunked row runs one NumPy call per
pass over each whole parameter. GB/s is the implied traffic (~3 array accesses of 4
bytes per entry per pass). Nothing here changes results: the updates are element-wise, so every
chunk size gives bit-identical parameters (tests/test_optim.py checks it).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from _common import env_line  # noqa: F401  (also puts the repo on sys.path)
from nprune import nets, optim


def step_time(opt, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.step()
    return (time.perf_counter() - t0) / steps


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7, help="timing rounds (median)")
    ap.add_argument("--steps", type=int, default=50, help="steps per timing round")
    ap.add_argument("--chunks", default="0,8192,32768,65536,131072", help="0 = no chunking")
    a = ap.parse_args(argv)
    print(env_line())
    chunks = [int(c) for c in a.chunks.split(",")]
    for net, name in (("lenet300", "adam"), ("lenet5", "sgd")):
        model = nets.build(net, np.random.default_rng(0))
        rng = np.random.default_rng(1)
        for g in model.grads().values():
            g[...] = rng.standard_normal(g.shape) * 1e-2
        n = sum(p.size for p in model.params().values())
        opts = {c: optim.make_optimizer(name, model, 1e-4, momentum=0.9 if name == "sgd" else 0.0)
                for c in chunks}
        times = {c: [] for c in chunks}
        saved = optim.CHUNK
        try:
            for _ in range(a.repeats):
                for c, o in opts.items():
                    optim.CHUNK = c if c else n
                    o._chunks = None
                    step_time(o, 5)
                    times[c].append(step_time(o, a.steps))
        finally:
            optim.CHUNK = saved
        passes = 10 if name == "adam" else 5     # array passes per element (read or write)
        base = np.median(times[chunks[0]])
        print(f"\n{net}, {name}: {n:,} parameters, ~{passes} passes per entry")
        print(f"| chunk | µs/step | vs chunk {chunks[0] or 'none'} | GB/s |")
        print("|---:|---:|---:|---:|")
        for c in chunks:
            m = np.median(times[c])
            print(f"| {c if c else 'none'} | {m * 1e6:.0f} | {base / m:.2f}x | "
                  f"{passes * 3 * 4 * n / m / 1e9:.1f} |")


if __name__ == "__main__":
    main()
