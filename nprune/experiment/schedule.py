"""Running a job's rounds: in this process, or with ``--jobs N`` on N worker processes.

A job is one recipe with its plan (strategies, rounds, seeds). Whichever process trains a round, it
gives the same numbers, and a round already on disk is skipped: an interrupted job resumes.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from .config import Recipe
from .imp import IMP
from .progress import Clock, Progress, hms
from .runs import print_notice


def remaining_iterations(imp: IMP, job: dict) -> int:
    """Training iterations of ``job`` not on disk yet: every unfinished round, dense round 0 included."""
    r = job["recipe"]
    n = 0
    for s in job["seeds"]:
        if not imp.is_done(s, "dense", 0):
            n += r.train.iterations
        for st in job["strategies"]:
            n += sum(r.train.iterations for k in range(1, job["rounds"] + 1) if not imp.is_done(s, st, k))
    return n


def _load_data(recipe: Recipe, data_dir, download: bool):
    from ..data.datasets import load_dataset, prepare
    raw = load_dataset(recipe.dataset, data_dir=data_dir, download=download)
    return prepare(raw, n_val=recipe.n_val, seed=0)


_WORKER_DATA: dict = {}   # a worker process loads the data once and keeps it for its later tasks


def _task(payload) -> tuple:
    """Worker entry for --jobs: one round, ``(seed, "dense", 0)`` or ``(seed, strategy, r)``, whose
    previous round is finished; ``clock`` is the command's :meth:`Clock.state` when the round was
    handed out, so the worker's progress lines show the command's ETA. Returns
    ``(seed, strategy, r, finished, diverged)``."""
    recipe, run_dir, seed, strategy, r, data_dir, download, quiet, kernel, clock = payload
    key = (recipe.dataset, recipe.n_val, data_dir)
    if key not in _WORKER_DATA:
        _WORKER_DATA.clear()
        _WORKER_DATA[key] = _load_data(recipe, data_dir, download)
    imp = IMP(recipe, run_dir, _WORKER_DATA[key], kernel=kernel)
    imp.progress = Progress(recipe.net, quiet=quiet, clock=Clock(*clock))
    if strategy == "dense":
        last = imp.run_dense(seed)
    else:   # rounds < r are on disk: this runs round r only (or stops early, as a resume would)
        last = imp.run_strategy(seed, strategy, r)[-1]
    done = last["round"] == r
    return seed, strategy, r, done, done and bool(last.get("diverged"))


def run_job(job: dict, out: Path, data_dir, download: bool, jobs: int, quiet: bool, kernel,
            clock: Clock | None = None) -> Path:
    """Run (or resume) ``job`` in its run folder below ``out``; ``jobs`` > 1 uses worker processes.
    ``clock`` counts the iterations of the whole command (default: this job's alone) for the ETA."""
    recipe = job["recipe"]
    run_dir = out / recipe.folder_name()
    imp = IMP(recipe, run_dir, kernel=kernel, notice=print_notice)
    imp.prepare_folder({"strategies": job["strategies"], "rounds": job["rounds"],
                        "seeds": job["seeds"], "kernel": kernel})
    imp.kernel_thresholds()   # auto: saved in the run folder by its first run, reused afterwards
    total = remaining_iterations(imp, job)
    if not quiet:
        print(f"run folder: {run_dir} ({total} training iterations to go)", file=sys.stderr, flush=True)
    if total == 0:
        return run_dir
    clock = clock or Clock(total)
    if jobs <= 1:
        imp.data = _load_data(recipe, data_dir, download)
        imp.progress = Progress(recipe.net, quiet=quiet, clock=clock)
        for s in job["seeds"]:
            for st in job["strategies"]:
                imp.run_strategy(s, st, job["rounds"])
        return run_dir
    _run_parallel(job, recipe, run_dir, data_dir, download, jobs, quiet, kernel, clock)
    return run_dir


def _run_parallel(job, recipe, run_dir, data_dir, download, jobs, quiet, kernel, clock: Clock) -> None:
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

    def rounds_left(key):   # the scheduling priority; ties go to the earlier seed
        if key[1] == "dense":
            return 1 + sum(rounds - r + 1 for r in waiting[key[0]].values()), -seeds.index(key[0])
        return rounds - ready[key] + 1, -seeds.index(key[0])

    common = (data_dir, download, quiet, kernel)
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
                fut = pool.submit(_task, (recipe, run_dir, key[0], key[1], r) + common + (clock.state(),))
                running[fut] = key
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                key = running.pop(fut)
                s, st, r, ok, diverged = fut.result()   # a worker's exception is raised here
                clock.done += recipe.train.iterations
                if st == "dense":
                    chains = waiting.pop(s)
                    if ok and not diverged:
                        ready.update(chains)
                elif ok and not diverged and r < rounds:
                    ready[key] = r + 1
                if not quiet:
                    name = "dense round 0" if st == "dense" else f"{st} round {r}"
                    print(f"finished: {recipe.net} seed {s} {name} ({clock.done}/{clock.total} "
                          f"iterations of the command, elapsed {hms(clock.elapsed())}, eta "
                          f"{clock.eta()})", file=sys.stderr, flush=True)
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
        if imp.metrics(seed, strategy, r).get("diverged"):
            return None
    return None
