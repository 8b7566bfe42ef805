"""Training step with and without the flat parameter buffers (paired, alternating; ratios).

    python benchmarks/flat_step.py --blas-threads 1
    python benchmarks/flat_step.py --blas-threads 2 --rounds 0,4,8 --repeats 15

LeNet-300-100, Adam lr 1.2e-3, batch 60, on random MNIST-shaped batches: the whole step
(``train_step`` + the optimiser's step) and the optimiser's step alone, for a model whose parameters
live in flat buffers (as :func:`nprune.nets.build` makes it) and for the same model with every
parameter in an array of its own (the optimiser's per-parameter path). ``--rounds R``: random masks
at the densities R rounds of Frankle & Carbin's rates leave (0.8^R for fc1/fc2, 0.9^R for fc3), dense
kernels. The two models are timed in alternation, block after block, and the table gives the median
time per step and the median of the per-block ratios (flat / separate; < 1: the flat buffers are
faster), so a noisy machine slows both alike.
"""
from __future__ import annotations

import argparse
import time

from _common import env_line  # first: applies --blas-threads before NumPy loads

import numpy as np  # noqa: E402

from nprune import nets  # noqa: E402
from nprune.optim import Adam  # noqa: E402
from nprune.training import train_step  # noqa: E402


def setup(flat: bool, rounds: int):
    rng = np.random.default_rng(0)
    model = nets.build("lenet300", rng)
    if not flat:
        model.unflatten()
    if rounds:
        dens = {"fc1.W": 0.8 ** rounds, "fc2.W": 0.8 ** rounds, "fc3.W": 0.9 ** rounds}
        model.set_masks({n: rng.random(model.params()[n].shape) < d for n, d in dens.items()})
    opt = Adam(model, 1.2e-3)
    x = rng.random((64, 60, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, (64, 60))
    return model, opt, x, y


def block(model, opt, x, y, steps: int, what: str) -> float:
    t0 = time.perf_counter()
    for i in range(steps):
        if what == "step":
            train_step(model, x[i % len(x)], y[i % len(y)])
        opt.step()
    return (time.perf_counter() - t0) / steps


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blas-threads", help="BLAS threads (read before NumPy loads; see _common)")
    ap.add_argument("--rounds", default="0,4", help="pruning levels to time (0: dense)")
    ap.add_argument("--repeats", type=int, default=11, help="alternating blocks per model")
    ap.add_argument("--steps", type=int, default=100, help="steps per block")
    a = ap.parse_args(argv)
    print(env_line())
    print("\n| rounds | timed | separate µs/step | flat µs/step | flat / separate (median of pairs) |")
    print("|---:|---|---:|---:|---:|")
    for rounds in (int(r) for r in a.rounds.split(",")):
        runs = {flat: setup(flat, rounds) for flat in (False, True)}
        for what in ("step", "optimizer"):
            for r in runs.values():
                block(*r, 20, what)                                   # warm-up
            times = {False: [], True: []}
            for k in range(a.repeats):
                order = (False, True) if k % 2 == 0 else (True, False)
                for flat in order:
                    times[flat].append(block(*runs[flat], a.steps, what))
            ratio = np.median(np.array(times[True]) / np.array(times[False]))
            print(f"| {rounds} | {what} | {np.median(times[False]) * 1e6:.0f} | "
                  f"{np.median(times[True]) * 1e6:.0f} | {ratio:.3f} |", flush=True)


if __name__ == "__main__":
    main()
