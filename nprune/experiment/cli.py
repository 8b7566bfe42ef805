"""The command line of ``python -m nprune.experiment``: flags, presets, subcommands, messages."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

from .. import nets
from ..init import INITIALIZERS
from .imp import IMP, Recipe, check_strategy, default_rates
from ..data.fsutil import atomic_write_json, load_json

# ---------------------------------------------------------------------------------------------------
# presets: per-net recipe fields, plus the plan (nets, strategies, rounds, seeds)

LENET300_ADAM = dict(optimizer="adam", lr=1.2e-3, momentum=0.0, batch_size=60)
LENET5_SGD = dict(optimizer="sgd", lr=0.01, momentum=0.9, batch_size=64)

PRESETS = {
    "default": {
        "about": "a few minutes: both nets, rewind vs reinit, 1 seed, 50% of the hidden-layer weights "
                 "pruned per round (25% of conv/output), 5 rounds, short training",
        "nets": {
            "lenet300": dict(LENET300_ADAM, iterations=1500, eval_every=150, rate=0.5, rounds=5),
            "lenet5": dict(LENET5_SGD, iterations=600, eval_every=150, rate=0.5, rounds=5),
        },
        "strategies": ["rewind", "reinit"], "seeds": [0],
    },
    "seed": {
        "about": "the founding write-up's schedule: 9% of every layer pruned per round, 25 rounds "
                 "(down to ~9.5% of weights), both nets, rewind vs reinit",
        "nets": {
            "lenet300": dict(LENET300_ADAM, iterations=5000, eval_every=250, layer_rate=0.09, rounds=25),
            "lenet5": dict(LENET5_SGD, iterations=2000, eval_every=250, layer_rate=0.09, rounds=25),
        },
        "strategies": ["rewind", "reinit"], "seeds": [0],
    },
    "lth": {
        "about": "Frankle & Carbin's LeNet-300-100 recipe: Adam 1.2e-3, batch 60, 50,000 iterations "
                 "per round, 20/20/10% per round, 5,000 validation images, evaluation every 100 "
                 "iterations, 18 rounds (down to ~1.9%), 5 seeds, rewind vs reinit",
        "nets": {"lenet300": dict(LENET300_ADAM, iterations=50000, eval_every=100, rate=0.2, rounds=18)},
        "strategies": ["rewind", "reinit"], "seeds": [0, 1, 2, 3, 4],
    },
    "lenet5": {
        "about": "LeNet-5 (Caffe): SGD momentum 0.9, lr 0.01, batch 64, 5,000 iterations per round, "
                 "conv 10% / fc 20% / output 10% per round, 20 rounds (down to ~1.9%), 3 seeds, "
                 "rewind vs reinit",
        "nets": {"lenet5": dict(LENET5_SGD, iterations=5000, eval_every=250, rate=0.2, rounds=20)},
        "strategies": ["rewind", "reinit"], "seeds": [0, 1, 2],
    },
}

NET_CHOICES = list(nets.NETS) + ["both"]
INIT_CHOICES = sorted(k for k in INITIALIZERS if k != "zeros")   # weight initialisers by name


class UsageError(Exception):
    """A bad flag value: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (``nprune: error: ...``) rather than usage + error."""

    def error(self, message):
        raise UsageError(f"{message} (see --help)")


def _parse_seeds(text: str) -> list[int]:
    """``3`` -> [0, 1, 2]; ``0,3,7`` -> those seeds; ``2-4`` -> [2, 3, 4] (parts may be mixed)."""
    try:
        if text.strip().isdigit():
            n = int(text)
            if n < 1:
                raise UsageError(f"--seeds: need at least one seed, got {text!r}")
            return list(range(n))
        out = []
        for part in text.split(","):
            a, sep, b = part.strip().partition("-")
            out += range(int(a), int(b) + 1) if sep else [int(a)]
    except ValueError:
        raise UsageError(f"--seeds: expected a count (3) or a list (0,1,2 or 0-4), got {text!r}") from None
    if not out:
        raise UsageError(f"--seeds: no seeds in {text!r}")
    return sorted(set(out))


def _parse_layer_rates(text: str) -> dict:
    out = {}
    for part in text.split(","):
        name, _, val = part.partition("=")
        try:
            out[name.strip()] = float(val)
        except ValueError:
            raise UsageError(f"--layer-rates: expected NAME=RATE[,NAME=RATE...], got {text!r}") from None
    return out


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m nprune.experiment",
        description="Lottery-ticket experiments: train, prune by magnitude, reset the survivors "
                    "(rewind / reinit / rewind-to-K / finetune), repeat; write tables and plots. "
                    "Subcommands: 'report RUN_DIR...' rebuilds tables and plots from saved files; "
                    "'train --net NET --epochs N' trains one dense network; 'presets' lists the presets.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="default", choices=list(PRESETS),
                   help="starting recipe; every value can be overridden by the flags below")
    p.add_argument("--net", choices=NET_CHOICES, help="network(s) to prune (preset's by default)")
    p.add_argument("--strategies", help="comma-separated reset strategies: rewind, reinit, finetune, "
                                        "rewind-to-K (e.g. rewind-to-500)")
    p.add_argument("--rounds", type=int, help="pruning rounds after the dense round 0")
    p.add_argument("--rate", type=float, help="fraction of survivors pruned per round in hidden fc "
                                              "layers; conv and output layers get half")
    p.add_argument("--layer-rates", help="explicit per-layer rates, e.g. fc1=0.2,fc2=0.2,fc3=0.1")
    p.add_argument("--scope", choices=["layer", "global", "random"],
                   help="layer: per-layer magnitude; global: one magnitude threshold across layers; "
                        "random: same per-layer counts at random positions (control)")
    p.add_argument("--iterations", type=int, help="training iterations per round")
    p.add_argument("--eval-every", type=int, help="evaluate on validation and test every N iterations")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--optimizer", choices=["adam", "sgd"])
    p.add_argument("--lr", type=float)
    p.add_argument("--momentum", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--init", choices=INIT_CHOICES)
    p.add_argument("--finetune-lr-factor", type=float, help="finetune trains at lr times this")
    p.add_argument("--val", type=int, help="validation images held out of the training set")
    p.add_argument("--seeds", help="number of seeds (3 -> 0,1,2) or a list (0,3,7 or 0-4)")
    p.add_argument("--dataset", default="mnist", choices=["mnist", "fashion-mnist"])
    p.add_argument("--data-dir", help="folder with the four IDX files (else $NPRUNE_DATA_DIR, the "
                                      "user cache, or a download into the cache)")
    p.add_argument("--no-download", action="store_true", help="never download the data set")
    p.add_argument("--out", default="runs", help="folder that receives one sub-folder per run")
    p.add_argument("--jobs", type=int, default=1, help="independent trainings run side by side; "
                                                      "BLAS threads per process = cores / jobs")
    p.add_argument("--kernel", choices=["dense", "sparse", "auto"], default="auto",
                   help="layer kernels: dense (masked dense GEMMs), sparse (always the sparse "
                        "kernels) or auto (per layer, the sparse kernel where the mask's density is "
                        "below the thresholds measured for its shape and batch size; see python -m "
                        "nprune.sparse --help). A run folder keeps the thresholds of its first run "
                        "(kernel_thresholds.json), so a resumed run makes the same choices; the "
                        "kernel is not part of the recipe hash")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def resolve(args) -> list[dict]:
    """Turn preset + flags into a list of jobs ``{"recipe", "strategies", "rounds", "seeds"}``."""
    preset = PRESETS[args.preset]
    nets_wanted = list(preset["nets"]) if args.net is None else (
        list(nets.NETS) if args.net == "both" else [args.net])
    strategies = preset["strategies"] if args.strategies is None else \
        [s.strip() for s in args.strategies.split(",") if s.strip()]
    if not strategies:
        raise UsageError("--strategies: give at least one strategy")
    for s in strategies:
        try:
            check_strategy(s)
        except ValueError as e:
            raise UsageError(f"--strategies: {e}") from None
    seeds = preset["seeds"] if args.seeds is None else _parse_seeds(args.seeds)
    if args.rounds is not None and args.rounds < 0:
        raise UsageError(f"--rounds must be >= 0, got {args.rounds}")
    if args.rate is not None and not 0 < args.rate < 1:
        raise UsageError(f"--rate must be in (0, 1), got {args.rate}")
    for flag in ("iterations", "batch_size"):
        v = getattr(args, flag)
        if v is not None and v <= 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be > 0, got {v}")
    if args.eval_every is not None and args.eval_every < 0:
        raise UsageError(f"--eval-every must be >= 0, got {args.eval_every}")
    if args.val is not None and not 0 <= args.val < 60000:
        raise UsageError(f"--val must be in [0, 60000), got {args.val}")
    if args.lr is not None and not args.lr > 0:
        raise UsageError(f"--lr must be > 0, got {args.lr}")
    if args.momentum is not None and not 0 <= args.momentum < 1:
        raise UsageError(f"--momentum must be in [0, 1), got {args.momentum}")
    if args.jobs < 1:
        raise UsageError(f"--jobs must be >= 1, got {args.jobs}")
    jobs = []
    for net in nets_wanted:
        base = dict(preset["nets"].get(net) or next(iter(preset["nets"].values())))
        if net not in preset["nets"]:   # a preset for the other net: take its optimiser recipe
            base.update(LENET300_ADAM if net == "lenet300" else LENET5_SGD)
        rounds = base.pop("rounds")
        rate = base.pop("rate", None)
        layer_rate = base.pop("layer_rate", None)
        if args.rounds is not None:
            rounds = args.rounds
        if args.rate is not None:
            rate, layer_rate = args.rate, None
        if layer_rate is not None:
            model_layers = [p.split(".")[0] for p in nets.build(net, _rng0()).prunable()]
            rates = tuple((n, layer_rate) for n in model_layers)
        else:
            rates = default_rates(net, rate)
        if args.layer_rates:
            explicit = _parse_layer_rates(args.layer_rates)
            known = dict(rates)
            unknown = [n for n in explicit if n not in known]
            if unknown:
                raise UsageError(f"--layer-rates: {net} has no prunable layer {', '.join(unknown)} "
                                 f"(it has {', '.join(known)})")
            known.update(explicit)
            rates = tuple(known.items())
        overrides = {k: getattr(args, a) for k, a in (
            ("iterations", "iterations"), ("eval_every", "eval_every"), ("batch_size", "batch_size"),
            ("optimizer", "optimizer"), ("lr", "lr"), ("momentum", "momentum"),
            ("weight_decay", "weight_decay"), ("init", "init"), ("n_val", "val"), ("scope", "scope"),
            ("finetune_lr_factor", "finetune_lr_factor")) if getattr(args, a) is not None}
        fields = dict(base, **overrides)
        recipe = Recipe(net=net, dataset=args.dataset, rates=rates,
                        **{k: v for k, v in fields.items() if k in Recipe.__dataclass_fields__})
        try:
            recipe.validate()
        except ValueError as e:
            raise UsageError(str(e)) from None
        jobs.append({"recipe": recipe, "strategies": strategies, "rounds": rounds, "seeds": seeds})
    return jobs


def _rng0():
    import numpy as np
    return np.random.default_rng(0)


# ---------------------------------------------------------------------------------------------------
# progress

def _hms(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """Progress lines on stderr: round, strategy, seed, iteration, accuracy, elapsed and ETA.

    The ETA counts the training iterations still to run in this process (rounds already on disk are
    not counted) at the rate measured so far."""

    def __init__(self, net: str, total_iterations: int, quiet: bool = False, every: float = 5.0,
                 stream=None):
        self.net, self.total, self.quiet, self.every = net, max(1, total_iterations), quiet, every
        self.stream = stream or sys.stderr
        self.t0 = time.perf_counter()
        self.done_before = 0   # iterations of finished trainings
        self.current = 0
        self.last = 0.0

    def _eta(self) -> str:
        done = self.done_before + self.current
        el = time.perf_counter() - self.t0
        if done == 0:
            return "?"
        return _hms(el / done * max(0, self.total - done))

    def __call__(self, event: str, **k) -> None:
        if event == "start":
            self.current = 0
            layers = ", ".join(f"{n.split('.')[0]} {p:.1f}%" for n, p in k.get("layers", {}).items())
            self._print(f"[{self.net} seed {k['seed']} {k['strategy']} round {k['round']}] "
                        f"{k['left']:.2f}% of weights left ({layers})")
        elif event == "eval":
            self.current = k["iteration"]
            now = time.perf_counter()
            if now - self.last >= self.every or k["iteration"] == k["total"]:
                self.last = now
                self._print(f"[{self.net} seed {k['seed']} {k['strategy']} round {k['round']}] "
                            f"it {k['iteration']}/{k['total']} val {100 * k['val_acc']:.2f}% "
                            f"test {100 * k['test_acc']:.2f}% elapsed "
                            f"{_hms(time.perf_counter() - self.t0)} eta {self._eta()}")
        elif event == "done":
            self.done_before += self.current
            self.current = 0
            m = k["metrics"]
            self._print(f"[{self.net} seed {k['seed']} {k['strategy']} round {k['round']}] done in "
                        f"{k['seconds']:.1f}s: early stop at {m['early_stop_iter']}, test "
                        f"{100 * m['early_stop_test_acc']:.2f}% ({m['percent_left']:.2f}% left)")
        elif event == "diverged":
            self._print(f"[{self.net} seed {k['seed']} {k['strategy']} round {k['round']}] "
                        f"DIVERGED: {k['error']}; later rounds of this strategy are skipped")

    def _print(self, line: str) -> None:
        if not self.quiet:
            print(line, file=self.stream, flush=True)


# ---------------------------------------------------------------------------------------------------
# running

def _remaining_iterations(imp: IMP, job: dict) -> int:
    r = job["recipe"]
    n = 0
    for s in job["seeds"]:
        if not imp.is_done(s, "dense", 0):
            n += r.iterations
        for st in job["strategies"]:
            n += sum(r.iterations for k in range(1, job["rounds"] + 1) if not imp.is_done(s, st, k))
    return n


def _load_data(recipe: Recipe, data_dir, download: bool):
    from ..data.datasets import load_dataset, prepare
    raw = load_dataset(recipe.dataset, data_dir=data_dir, download=download)
    return prepare(raw, n_val=recipe.n_val, seed=0)


_WORKER_DATA: dict = {}   # a worker process loads the data once and keeps it for its later tasks


def _task(payload) -> tuple:
    """Worker entry for --jobs: one round, ``(seed, "dense", 0)`` or ``(seed, strategy, r)``, whose
    previous round is finished. Returns ``(seed, strategy, r, finished, diverged)``."""
    recipe, run_dir, seed, strategy, r, data_dir, download, quiet, kernel = payload
    key = (recipe.dataset, recipe.n_val, data_dir)
    if key not in _WORKER_DATA:
        _WORKER_DATA.clear()
        _WORKER_DATA[key] = _load_data(recipe, data_dir, download)
    imp = IMP(recipe, run_dir, _WORKER_DATA[key], kernel=kernel)
    imp.progress = Progress(recipe.net, recipe.iterations, quiet)
    if strategy == "dense":
        last = imp.run_dense(seed)
    else:   # rounds < r are on disk: this runs round r only (or stops early, as a resume would)
        last = imp.run_strategy(seed, strategy, r)[-1]
    done = last["round"] == r
    return seed, strategy, r, done, done and bool(last.get("diverged"))


def run_job(job: dict, out: Path, data_dir, download: bool, jobs: int, quiet: bool, kernel) -> Path:
    recipe = job["recipe"]
    run_dir = out / recipe.folder_name()
    settings = {"recipe": recipe.to_dict(), "hash_covers": "recipe only",
                "last_plan": {"strategies": job["strategies"], "rounds": job["rounds"],
                              "seeds": job["seeds"], "kernel": kernel}}
    atomic_write_json(run_dir / "settings.json", settings)
    imp = IMP(recipe, run_dir, kernel=kernel)
    imp.kernel_thresholds()   # auto: saved in the run folder by its first run, reused afterwards
    total = _remaining_iterations(imp, job)
    if not quiet:
        print(f"run folder: {run_dir} ({total} training iterations to go)", file=sys.stderr, flush=True)
    if total == 0:
        return run_dir
    if jobs <= 1:
        imp.data = _load_data(recipe, data_dir, download)
        imp.progress = Progress(recipe.net, total, quiet)
        for s in job["seeds"]:
            for st in job["strategies"]:
                imp.run_strategy(s, st, job["rounds"])
        return run_dir
    _run_parallel(job, recipe, run_dir, data_dir, download, jobs, quiet, kernel)
    return run_dir


def _run_parallel(job, recipe, run_dir, data_dir, download, jobs, quiet, kernel) -> None:
    """Run the job's rounds on ``jobs`` worker processes, one round per task.

    A seed's dense round 0 comes first; each (seed, strategy) chain then runs its rounds in order,
    round r once round r - 1 is on disk. Whenever a worker is free it takes the ready round of the
    chain with the most rounds still to run (a dense round counts its seed's chains), so the workers
    stay busy until the last chains: 5 seeds x 2 strategies on 2 workers end at about half the total
    work, where whole chains per task would leave one worker idle through a dense round. Each round
    gives the same numbers in whichever process runs it (a resume is the same thing). Each worker is
    a fresh process whose BLAS uses cores // jobs threads."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    saved = {k: os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    imp = IMP(recipe, run_dir, kernel=kernel)
    rounds, seeds, strategies = job["rounds"], job["seeds"], job["strategies"]
    # ready[(seed, strategy)] = the next round of a chain free to run it; a seed's unfinished dense
    # round is ready as (seed, "dense"): 0, and its chains wait in waiting[seed] until it is done
    ready, waiting = {}, {}
    for s in seeds:
        chains = {(s, st): _next_round(imp, s, st, rounds) for st in strategies}
        chains = {key: r for key, r in chains.items() if r is not None}
        if imp.is_done(s, "dense", 0):
            ready.update(chains)
        else:
            ready[(s, "dense")], waiting[s] = 0, chains
    total = _remaining_iterations(imp, job)

    def rounds_left(key):   # the scheduling priority; ties go to the earlier seed
        if key[1] == "dense":
            return 1 + sum(rounds - r + 1 for r in waiting[key[0]].values()), -seeds.index(key[0])
        return rounds - ready[key] + 1, -seeds.index(key[0])

    common = (data_dir, download, quiet, kernel)
    t0, done_it = time.perf_counter(), 0
    for k in saved:
        os.environ[k] = threads
    pool = None
    try:
        pool = ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init)
        running = {}
        while ready or running:
            while ready and len(running) < jobs:
                key = max(ready, key=rounds_left)
                r = ready.pop(key)
                fut = pool.submit(_task, (recipe, run_dir, key[0], key[1], r) + common)
                running[fut] = key
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                key = running.pop(fut)
                s, st, r, ok, diverged = fut.result()   # a worker's exception is raised here
                done_it += recipe.iterations
                if st == "dense":
                    chains = waiting.pop(s)
                    if ok and not diverged:
                        ready.update(chains)
                elif ok and not diverged and r < rounds:
                    ready[key] = r + 1
                if not quiet:
                    el = time.perf_counter() - t0
                    eta = el / done_it * max(0, total - done_it)
                    name = "dense round 0" if st == "dense" else f"{st} round {r}"
                    print(f"finished: {recipe.net} seed {s} {name} ({done_it}/{total} iterations, "
                          f"elapsed {_hms(el)}, eta {_hms(eta)})", file=sys.stderr, flush=True)
    except BaseException:
        # Ctrl-C (the workers ignore it) or a worker's error: stop the rounds in flight at once.
        # Their files are written atomically, so a stopped round leaves nothing half-written.
        procs = getattr(pool, "_processes", None) or {}   # ProcessPoolExecutor has no public kill
        for proc in list(procs.values()):
            proc.terminate()
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _worker_init() -> None:
    """A --jobs worker ignores SIGINT: Ctrl-C reaches the whole process group, and the parent
    alone handles it (it stops the workers and prints one line)."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _next_round(imp: IMP, seed: int, strategy: str, rounds: int) -> int | None:
    """The first round of a chain that is not on disk, or None when the chain is finished (all
    rounds done, or a finished round diverged)."""
    for r in range(1, rounds + 1):
        if not imp.is_done(seed, strategy, r):
            return r
        if load_json(imp.round_dir(seed, strategy, r) / "metrics.json").get("diverged"):
            return None
    return None


def cmd_report(argv) -> int:
    from .report import write_report
    p = _Parser(prog="python -m nprune.experiment report",
                                description="Rebuild results.csv, curves.csv, summary.md and the "
                                            "plots of run folders from their saved files.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    args = p.parse_args(argv)
    for d in args.run_dirs:
        info = write_report(d)
        print(f"{d}: {info['rows']} rounds")
        for f in info["files"]:
            print(f"  {f}")
    return 0


def cmd_train(argv) -> int:
    """Train one dense network and print validation/test accuracy after every epoch."""
    import numpy as np
    from ..data.datasets import load_dataset, prepare
    from ..train import TrainConfig, train
    p = _Parser(prog="python -m nprune.experiment train",
                description="Train one dense network (no pruning) and print its accuracy per epoch. "
                            "Defaults: LeNet-300-100 with Adam 1.2e-3, batch 60; LeNet-5 with SGD "
                            "momentum 0.9, lr 0.01, batch 64.",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--net", choices=list(nets.NETS), default="lenet300")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--optimizer", choices=["adam", "sgd"])
    p.add_argument("--lr", type=float)
    p.add_argument("--momentum", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--init", default="glorot_normal", choices=INIT_CHOICES)
    p.add_argument("--val", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0, help="the seed of a single run")
    p.add_argument("--seeds", help="run several seeds one after another and end with a table and "
                                   "their mean: a count (5 -> 0..4) or a list (0,3,7 or 0-4); "
                                   "overrides --seed")
    p.add_argument("--json", metavar="PATH",
                   help="also write every run's settings, curves and early-stop figures to this "
                        "JSON file (atomically)")
    p.add_argument("--dataset", default="mnist", choices=["mnist", "fashion-mnist"])
    p.add_argument("--data-dir")
    p.add_argument("--no-download", action="store_true")
    p.add_argument("--kernel", choices=["dense", "sparse", "auto"], default="auto",
                   help="layer kernels (see the main command's --help)")
    p.add_argument("--evals-per-epoch", type=int, default=5,
                   help="evaluations on validation and test per epoch; the early stop is the "
                        "evaluation of minimum validation loss")
    a = p.parse_args(argv)
    seeds = [a.seed] if a.seeds is None else _parse_seeds(a.seeds)
    if a.json is not None:   # fail before hours of training, not after
        jp = Path(a.json)
        if jp.is_dir() or not jp.parent.is_dir():
            raise UsageError(f"--json {a.json}: " + ("is a folder" if jp.is_dir() else
                                                     f"folder {jp.parent} does not exist"))
    if a.epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {a.epochs}")
    if a.evals_per_epoch < 1:
        raise UsageError(f"--evals-per-epoch must be >= 1, got {a.evals_per_epoch}")
    base = dict(LENET300_ADAM if a.net == "lenet300" else LENET5_SGD)
    for k in ("optimizer", "lr", "momentum", "weight_decay", "batch_size"):
        if getattr(a, k) is not None:
            base[k] = getattr(a, k)
    if base["batch_size"] <= 0 or not base["lr"] > 0:
        raise UsageError("--batch-size and --lr must be > 0")
    data = prepare(load_dataset(a.dataset, data_dir=a.data_dir, download=not a.no_download),
                   n_val=a.val, seed=0)
    per_epoch = len(data.x_train) // base["batch_size"]
    if a.evals_per_epoch > per_epoch:
        raise UsageError(f"--evals-per-epoch {a.evals_per_epoch} exceeds the {per_epoch} steps per epoch")
    cfg = TrainConfig(iterations=a.epochs * per_epoch, eval_every=per_epoch // a.evals_per_epoch, **base)
    runs = []
    for seed in seeds:
        model = nets.build(a.net, np.random.default_rng([seed, 0, 0]), init=a.init)
        model.set_kernel(a.kernel)
        print(f"{a.net} on {a.dataset}, seed {seed}: {cfg}", flush=True)
        print("| epoch | iteration | train loss | val loss | val acc % | test acc % | elapsed s |")
        print("|---|---|---|---|---|---|---|")
        t0 = time.perf_counter()

        def show(it, total, r):
            print(f"| {it / per_epoch:.2f} | {it} | {r.train_loss[-1]:.4f} | {r.val_loss[-1]:.4f} | "
                  f"{100 * r.val_acc[-1]:.2f} | {100 * r.test_acc[-1]:.2f} | {time.perf_counter() - t0:.1f} |",
                  flush=True)
        res, _ = train(model, data, cfg, np.random.default_rng([seed, 1, 0]), progress=show)
        print(f"best test accuracy {100 * max(res.test_acc):.2f}% ; at early stop (min val loss, iteration "
              f"{res.early_stop_iter}) {100 * res.early_stop_test_acc:.2f}% ; final {100 * res.final_test_acc:.2f}% ; "
              f"training {res.seconds:.1f}s", flush=True)
        runs.append({"seed": seed, "result": res.to_dict()})
        if a.json:   # rewritten after every seed, so an interrupted series keeps what it finished
            _write_train_json(a.json, a, cfg, per_epoch, runs)
    if len(runs) > 1:
        print(_train_summary(runs, per_epoch))
    return 0


def _write_train_json(path, a, cfg, per_epoch, runs) -> None:
    from ..data.datasets import DataError
    try:
        atomic_write_json(path, {"net": a.net, "dataset": a.dataset, "init": a.init, "epochs": a.epochs,
                                 "n_val": a.val, "kernel": a.kernel, "steps_per_epoch": per_epoch,
                                 "config": dataclasses.asdict(cfg), "runs": runs})
    except OSError as err:
        raise DataError(f"--json {path}: cannot write ({err.strerror or err})") from None


def _train_summary(runs, per_epoch) -> str:
    """Per-seed early-stop and final figures of ``train --seeds`` with their mean (a markdown table).
    The early stop is the evaluation of minimum validation loss; nothing here is chosen on test."""
    lines = ["| seed | early stop: epoch | val loss | val acc % | test acc % | final test acc % |",
             "|---|---:|---:|---:|---:|---:|"]
    cols = []
    for r in runs:
        x = r["result"]
        row = (x["early_stop_iter"] / per_epoch, x["early_stop_val_loss"], 100 * x["early_stop_val_acc"],
               100 * x["early_stop_test_acc"], 100 * x["final_test_acc"])
        cols.append(row)
        lines.append(f"| {r['seed']} | {row[0]:.2f} | {row[1]:.4f} | {row[2]:.2f} | {row[3]:.2f} | {row[4]:.2f} |")
    m = [sum(c[i] for c in cols) / len(cols) for i in range(5)]
    lines.append(f"| **mean of {len(cols)}** | {m[0]:.2f} | {m[1]:.4f} | {m[2]:.2f} | **{m[3]:.2f}** | {m[4]:.2f} |")
    return "\n".join(lines)


def cmd_presets() -> int:
    for name, p in PRESETS.items():
        print(f"{name}: {p['about']}")
        for net, fields in p["nets"].items():
            print(f"    {net}: " + ", ".join(f"{k}={v}" for k, v in fields.items()))
    return 0


def cmd_run(argv) -> int:
    args = build_parser().parse_args(argv)
    jobs = resolve(args)
    out = Path(args.out)
    from ..data.datasets import load_dataset
    from .report import write_report
    # --kernel auto: a bad thresholds table (the run folder's or the user's) is reported now
    for job in jobs:
        imp = IMP(job["recipe"], out / job["recipe"].folder_name(), kernel=args.kernel)
        imp.kernel_thresholds(save=False)
    # find (or download) and verify the data before anything is written
    load_dataset(args.dataset, data_dir=args.data_dir, download=not args.no_download)
    done = []
    t0 = time.perf_counter()
    for job in jobs:
        run_dir = run_job(job, out, args.data_dir, not args.no_download, args.jobs, args.quiet, args.kernel)
        info = write_report(run_dir)
        done.append((run_dir, info))
    print(f"finished in {_hms(time.perf_counter() - t0)}")
    for run_dir, info in done:
        print(f"{run_dir}: table {run_dir / 'summary.md'}, plots "
              + ", ".join(str(f) for f in info["files"] if str(f).endswith(".png")))
    for run_dir, _ in done:
        print()
        print((run_dir / "summary.md").read_text())
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    from ..data.datasets import DataError
    from ..sparse import ThresholdsError
    from ..train import DivergenceError
    try:
        if argv and argv[0] == "report":
            return cmd_report(argv[1:])
        if argv and argv[0] == "presets":
            return cmd_presets()
        if argv and argv[0] == "train":
            return cmd_train(argv[1:])
        return cmd_run(argv)
    except (UsageError, ThresholdsError) as e:
        print(f"nprune: error: {e}", file=sys.stderr)
        return 2
    except (DataError, FileNotFoundError, ValueError, DivergenceError) as e:
        print(f"nprune: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"nprune: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("nprune: interrupted; finished rounds are saved, rerun the same command to resume",
              file=sys.stderr)
        return 130

