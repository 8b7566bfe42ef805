"""Running a job's rounds: in this process, with ``--jobs N`` on N worker processes, or with
``--cluster`` on a Dask cluster (:mod:`nprune.experiment.cluster`); the last two share the order of
rounds, :class:`RoundPlan`.

A job is one recipe with its plan (strategies, rounds, seeds). Whichever process trains a round, it
gives the same numbers, and a round already on disk is skipped: an interrupted job resumes.
"""
from __future__ import annotations

import os
import pickle
import signal
import sys
import threading
import time
import traceback
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
    last = imp.run_round(seed, strategy, r)   # round r - 1 is on disk: round r alone
    done = last is not None
    return seed, strategy, r, done, done and bool(last.get("diverged"))


def run_job(job: dict, out: Path, data_dir, download: bool, jobs: int, quiet: bool, kernel,
            clock: Clock | None = None, cluster=None) -> Path:
    """Run (or resume) ``job`` in its run folder below ``out``; ``jobs`` > 1 uses worker processes,
    ``cluster`` (a :class:`nprune.experiment.cluster.Cluster`) a Dask cluster. ``clock`` counts the
    iterations of the whole command (default: this job's alone) for the ETA."""
    recipe = job["recipe"]
    run_dir = out / recipe.folder_name()
    imp = IMP(recipe, run_dir, kernel=kernel, notice=print_notice)
    plan = {"strategies": job["strategies"], "rounds": job["rounds"], "seeds": job["seeds"], "kernel": kernel}
    imp.prepare_folder(dict(plan, **cluster.record()) if cluster is not None else plan)
    imp.kernel_thresholds()   # auto: saved in the run folder by its first run, reused afterwards
    total = remaining_iterations(imp, job)
    if not quiet:
        print(f"run folder: {run_dir} ({total} training iterations to go)", file=sys.stderr, flush=True)
    if total == 0:
        return run_dir
    clock = clock or Clock(total)
    if cluster is not None:
        cluster.run(job, imp, data_dir, download, quiet, clock)
        return run_dir
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

    Whenever a worker is free it takes the round :meth:`RoundPlan.next` gives. Each round gives the
    same numbers in whichever process runs it (a resume is the same thing). Each worker is a fresh
    process whose BLAS uses cores // jobs threads.

    Ctrl-C, a worker's error or a dead worker stop the other workers at once (a round's files are
    written atomically, so a stopped round leaves nothing half-written); a dead worker raises
    :class:`WorkerDied`."""
    import multiprocessing as mp
    from multiprocessing.connection import wait
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    saved = {k: os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    plan = RoundPlan(IMP(recipe, run_dir, kernel=kernel), job)
    common = (data_dir, download, quiet, kernel)
    workers: list[_Worker] = []
    clean = False
    for k in saved:
        os.environ[k] = threads
    try:
        _start_workers(mp.get_context("spawn"), jobs, workers)
        idle = list(workers)
        busy = {}   # a busy worker's connection -> the worker
        while plan.pending():
            while idle and plan.has_ready():
                s, st, r = plan.next()
                w = idle.pop(0)
                w.send((recipe, run_dir, s, st, r) + common + (clock.state(),))
                busy[w.conn] = w
            signalled = wait(list(busy) + [w.process.sentinel for w in workers])
            for conn in [c for c in signalled if c in busy]:
                w = busy.pop(conn)
                s, st, r, ok, diverged = w.result()   # a worker's exception is raised here
                idle.append(w)
                plan.finished((s, st, r), ok, diverged)
                clock.done += recipe.train.iterations
                if not quiet:
                    print_finished(recipe.net, s, st, r, clock)
            for w in workers:   # a worker gone without its result (or while idle)
                if w.process.sentinel in signalled:
                    raise w.died()
        clean = True
    finally:
        _stop_workers(workers, clean)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def print_finished(net: str, seed: int, strategy: str, r: int, clock: Clock) -> None:
    name = "dense round 0" if strategy == "dense" else f"{strategy} round {r}"
    print(f"finished: {net} seed {seed} {name} ({clock.done}/{clock.total} iterations of the "
          f"command, elapsed {hms(clock.elapsed())}, eta {clock.eta()})", file=sys.stderr, flush=True)


#: Strategies whose round r reads the masks of the ``rewind`` chain's round r.
TICKET_STRATEGIES = ("ticket-reinit", "ticket-random-mask")


class RoundPlan:
    """Which round runs next, for --jobs and --cluster: the rounds of a job not finished in the run
    folder of ``imp``, one at a time, each handed out once what it reads is finished.

    A seed's dense round 0 comes first; each (seed, strategy) chain then runs its rounds in order,
    round r once round r - 1 is finished. A ticket control's round r (``ticket-reinit``,
    ``ticket-random-mask``) also waits for the ``rewind`` round r of its seed, which the plan runs as
    a chain of its own even when the job does not name it (the ticket round would compute it
    otherwise, and two workers would compute the same rounds). Of the rounds ready,
    :meth:`next` gives the one of the chain with the most rounds still to run (a dense round counts
    its seed's chains); ties go to the earlier seed. So the workers stay busy until the last
    chains: 5 seeds x 2 strategies on 2 workers end at about half the total work, where whole
    chains at a time would leave one worker idle through a dense round."""

    def __init__(self, imp: IMP, job: dict):
        self.rounds, self.seeds = job["rounds"], list(job["seeds"])
        strategies = list(job["strategies"])
        if "rewind" not in strategies and any(st in TICKET_STRATEGIES for st in strategies):
            strategies.insert(0, "rewind")
        self.dense = set()     # seeds whose dense round 0 is to run
        self.chains = {}       # (seed, strategy) -> the chain's next round to run
        self.rewound = {}      # seed -> the last rewind round finished (rounds + 1: none to wait for)
        self.running = set()   # (seed, strategy) of the rounds handed out
        for s in self.seeds:
            if not imp.is_done(s, "dense", 0):
                self.dense.add(s)
            for st in strategies:
                r = _next_round(imp, s, st, self.rounds)
                if r is not None:
                    self.chains[(s, st)] = r
            r = self.chains.get((s, "rewind"))
            self.rewound[s] = self.rounds + 1 if r is None else r - 1

    def _ready(self) -> list:
        out = [(s, "dense") for s in self.seeds if s in self.dense and (s, "dense") not in self.running]
        for (s, st), r in self.chains.items():
            if (s, st) in self.running or s in self.dense:
                continue
            if st in TICKET_STRATEGIES and self.rewound[s] < r:
                continue
            out.append((s, st))
        return out

    def _priority(self, key) -> tuple:
        s, st = key
        if st == "dense":
            left = 1 + sum(self.rounds - r + 1 for (s2, _), r in self.chains.items() if s2 == s)
        else:
            left = self.rounds - self.chains[key] + 1
        return left, -self.seeds.index(s)

    def has_ready(self) -> bool:
        return bool(self._ready())

    def pending(self) -> bool:
        """Rounds are left to hand out or running."""
        return bool(self.running or self._ready())

    def next(self) -> tuple:
        """``(seed, strategy, round)`` of the ready round to run next (``(seed, "dense", 0)`` for a
        dense round); it counts as running until :meth:`finished`."""
        key = max(self._ready(), key=self._priority)
        self.running.add(key)
        return key[0], key[1], 0 if key[1] == "dense" else self.chains[key]

    def finished(self, key: tuple, ok: bool, diverged: bool) -> None:
        """Round ``key`` = ``(seed, strategy, round)`` ended: ``ok`` it is finished (else its chain
        stopped before it), ``diverged`` it diverged. A chain goes on after a finished round that
        did not diverge; a ticket control whose rewind chain stopped is released to stop itself."""
        s, st, r = key
        self.running.discard((s, st))
        goes_on = ok and not diverged
        if st == "dense":
            self.dense.discard(s)
            if not goes_on:
                for k in [k for k in self.chains if k[0] == s]:
                    del self.chains[k]
            return
        if goes_on and r < self.rounds:
            self.chains[(s, st)] = r + 1
        else:
            self.chains.pop((s, st), None)
        if st == "rewind":
            self.rewound[s] = r if goes_on and r < self.rounds else self.rounds + 1


class WorkerDied(Exception):
    """A --jobs worker process ended without finishing its round (killed, out of memory)."""


class _RemoteTraceback(Exception):
    """The traceback of a worker's exception, chained to the exception raised again in the parent."""

    def __str__(self):
        return self.args[0]


#: Ctrl-C and a closed terminal reach the whole process group, and a service manager may send
#: SIGTERM to it: the workers ignore all three, and the parent stops them.
_STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))


class _Worker:
    """One worker process (``index`` counts from 1) and the parent's end of its pipe, which carries
    a task to the worker and its result back."""

    def __init__(self, index: int, process, conn):
        self.index, self.process, self.conn = index, process, conn

    def send(self, payload) -> None:
        try:
            self.conn.send(payload)
        except OSError:   # the worker is gone: its end of the pipe is closed
            raise self.died() from None

    def result(self) -> tuple:
        """The finished round's ``_task`` value; the worker's exception is raised again here."""
        try:
            reply = self.conn.recv()
        except (EOFError, OSError):
            raise self.died() from None
        if reply[0] == "error":
            raise reply[1] from _RemoteTraceback(reply[2])
        return reply[1]

    def died(self) -> WorkerDied:
        self.process.join(5)   # a closed pipe can come a moment before the exit status
        code = self.process.exitcode
        how = ("still running" if code is None else f"signal {-code}" if code < 0
               else f"exit status {code}")
        return WorkerDied(f"worker {self.index} died ({how}); finished rounds are saved; rerun the "
                          "same command to resume")


def _start_workers(ctx, jobs: int, workers: list) -> None:
    """Start ``jobs`` worker processes, appended to ``workers`` as each one starts (so that the
    caller stops them whatever happens next). The stop signals stay blocked while they start: a
    worker is born with them blocked and ignores them before it unblocks them, and a signal meant
    for this process waits until the workers are in ``workers``."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        for i in range(1, jobs + 1):
            ours, theirs = ctx.Pipe()
            p = ctx.Process(target=_worker_main, args=(theirs, os.getpid()), name=f"nprune-worker-{i}")
            try:
                p.start()
            finally:
                theirs.close()
            workers.append(_Worker(i, p, ours))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _stop_workers(workers: list, clean: bool) -> None:
    """End the workers and wait for them. After the last round (``clean``) each one is told to
    return; otherwise (Ctrl-C, an error, a dead worker) each one is killed at once: they ignore
    the stop signals, and a round in flight would only be lost later."""
    if clean:
        for w in workers:
            try:
                w.conn.send(None)
            except OSError:
                pass
        for w in workers:
            w.process.join(10)
    for w in workers:
        if w.process.exitcode is None:
            w.process.kill()
    for w in workers:
        w.process.join()
        w.conn.close()
        w.process.close()


def _worker_main(conn, parent_pid: int) -> None:
    """A worker process: run the tasks that come through ``conn``, one at a time, and send back
    ``("ok", value)`` or ``("error", exception, traceback text)``, until ``None`` comes. It exits
    at once when the parent dies, kill -9 included: an idle worker sees its pipe closed, a busy one
    is caught by :func:`_watch_parent`."""
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    while True:
        try:
            payload = conn.recv()
        except (EOFError, OSError):
            os._exit(1)
        if payload is None:
            return
        try:
            reply = ("ok", _task(payload))
        except BaseException as e:
            reply = ("error", _portable(e), traceback.format_exc())
        try:
            conn.send(reply)
        except OSError:
            os._exit(1)


def _watch_parent(parent_pid: int, every: float = 0.5) -> None:
    """End this process once its parent is gone: the orphan gets another parent (init or a
    subreaper), so ``os.getppid()`` changes."""
    while os.getppid() == parent_pid:
        time.sleep(every)
    os._exit(1)


def _portable(e: BaseException) -> BaseException:
    """``e`` if it survives pickling, else a RuntimeError with its type and message."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")


def _next_round(imp: IMP, seed: int, strategy: str, rounds: int) -> int | None:
    """The first round of a chain that is not on disk, or None when the chain is finished (all
    rounds done, or a finished round diverged)."""
    for r in range(1, rounds + 1):
        if not imp.is_done(seed, strategy, r):
            return r
        if imp.metrics(seed, strategy, r).get("diverged"):
            return None
    return None
