"""``--cluster ADDRESS``: a job's rounds on a Dask distributed cluster, with the bits of one process.

The client (the command) keeps the run folder: it alone reads and writes it. Each round is one call
submitted to Dask, handed out in the order of :class:`~nprune.experiment.schedule.RoundPlan`, that carries exactly
the files the round reads (the previous round's metrics, final and masks, the seed's ``init.npz``,
the dense rewind point, the ticket's masks, the folder's kernel thresholds). The worker runs the round
in an in-memory :class:`~nprune.experiment.imp.IMP` and returns the files it made; the client checks
each array against the SHA-256 its round recorded and writes arrays first, ``metrics.json`` last,
atomically, as one process does. So nothing but the data has to be shared with the workers, a
worker that dies mid-round costs that round only (Dask runs it again elsewhere), and a client that
dies leaves a run folder that the same command resumes.

Each worker loads the data itself (:func:`nprune.data.datasets.load_dataset`: ``--data-dir``,
``$NPRUNE_DATA_DIR``, its cache) once per process; before any round the client checks that every
worker's four files have the SHA-256 of its own. A round limits its process's BLAS threads to the
worker machine's cores divided by the worker threads (Dask's) on that machine, as ``--jobs N``
gives each process cores // N.

``dask[distributed]`` and ``threadpoolctl`` are optional (``pip install 'nprune[cluster]'``); this
module imports them only when a cluster is used.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import re
from pathlib import Path, PurePosixPath

from ..data.datasets import DataError
from ..data.fsutil import CorruptFileError, atomic_write_bytes, atomic_write_json
from .runs import METRICS, RunFolderError
from .schedule import TICKET_STRATEGIES, RoundPlan, WorkerDied, print_finished

MAX_LOCAL_WORKERS = 256
NEEDS_DISTRIBUTED = "--cluster needs dask's distributed scheduler: pip install 'nprune[cluster]'"
ADDRESS_FORMS = f"tcp://HOST:PORT (a running Dask scheduler) or local:N (N in 1..{MAX_LOCAL_WORKERS} local worker processes)"


class ClusterError(Exception):
    """The cluster cannot be used (not reachable, no workers): one line, exit status 2."""


def parse_address(text: str) -> str:
    """``tcp://host:port`` or ``local:N`` checked, else ValueError with a one-line message."""
    m = re.fullmatch(r"local:([0-9]{1,4})", text)
    if m:
        if 1 <= int(m.group(1)) <= MAX_LOCAL_WORKERS:
            return f"local:{int(m.group(1))}"
    else:
        m = re.fullmatch(r"tcp://([A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]):([0-9]{1,5})", text)
        if m and 1 <= int(m.group(2)) <= 65535:
            return text
    raise ValueError(f"--cluster must be {ADDRESS_FORMS}; got {text[:60]!r}")


def has_distributed() -> bool:
    """Whether dask's distributed scheduler (and threadpoolctl, which the workers need) import."""
    try:
        import distributed  # noqa: F401
        import threadpoolctl  # noqa: F401
    except ImportError:
        return False
    return True


def data_digests(dataset: str, data_dir=None, download: bool = True) -> dict:
    """``{file name: SHA-256 of its decompressed bytes}`` of the four files of ``dataset`` as this
    process finds them, read with the checks of :func:`~nprune.data.datasets.load_dataset`
    (DataError when they are missing or bad)."""
    from ..data import checks, datasets
    from ..data.idx import IDXError
    spec = datasets._spec(dataset)
    folder = datasets.find_data_dir(dataset, data_dir=data_dir, download=download)
    paths, missing = datasets._locate(folder, spec)
    if missing:
        raise DataError(f"{spec.name}: missing {', '.join(missing)} in {folder}")
    out = {}
    for role in ("x_train", "y_train", "x_test", "y_test"):
        try:
            out[spec.files[role]] = checks.read_checked(spec, role, paths[role], verify=False)[1]
        except IDXError as e:
            raise DataError(str(e)) from None
    return out


def checked_digests(dataset: str, data_dir=None, download: bool = True) -> dict:
    """The digests of :func:`data_digests`, found the cheap way when the data set has published
    ones: :func:`~nprune.data.datasets.load_dataset` checks the files against them (DataError
    otherwise) and keeps the arrays in memory, so a round's loading of the data costs no second read."""
    from ..data import datasets
    spec = datasets._spec(dataset)
    if spec.sha256 is None:
        return data_digests(dataset, data_dir, download)
    datasets.load_dataset(dataset, data_dir=data_dir, download=download)
    return {spec.files[role]: spec.sha256[spec.files[role]] for role in ("x_train", "y_train", "x_test", "y_test")}


def _probe(datasets_: list, data_dir, download: bool) -> dict:
    """On a worker: its usable cores and, per data set, the digests of its files or the reason
    it has none."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    data = {}
    for name in datasets_:
        try:
            data[name] = checked_digests(name, data_dir, download)
        except Exception as e:   # reported by the client, naming this worker
            data[name] = f"{type(e).__name__}: {e}" if not isinstance(e, DataError) else str(e)
    return {"cores": cores, "data": data}


# ---------------------------------------------------------------------------------------------------
# on a worker: one round

_WORKER_DATA: dict = {}   # a worker process loads the data once and keeps it for its later rounds


def _worker_data(recipe, data_dir, download: bool, digests: dict):
    key = (recipe.dataset, recipe.n_val, data_dir)
    if key not in _WORKER_DATA:
        from .schedule import _load_data
        mine = checked_digests(recipe.dataset, data_dir, download)
        if mine != digests:   # a worker that joined after the client's check
            raise DataError(f"this worker's {recipe.dataset} files differ from the client's")
        _WORKER_DATA.clear()
        _WORKER_DATA[key] = _load_data(recipe, data_dir, download)
    return _WORKER_DATA[key]


def _blas_threads(slots_by_host: dict) -> tuple[str, int]:
    """This worker's address and its BLAS threads: its machine's cores / the worker threads there."""
    from distributed import get_worker
    from distributed.comm import get_address_host
    w = get_worker()
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    slots = slots_by_host.get(get_address_host(w.address)) or w.state.nthreads
    return w.address, max(1, cores // max(1, slots))


def run_remote_round(work: dict) -> dict:
    """On a Dask worker: round ``work["round"]`` of ``work["strategy"]`` for ``work["seed"]`` in an
    in-memory IMP filled with ``work["files"]`` (relative path -> npz bytes or JSON object) and
    ``work["finished"]`` (relative round folder -> its metrics, checked by the client). Returns the
    round's metrics (None: its chain stopped before it), the files the round made, and where it ran."""
    from threadpoolctl import threadpool_limits
    from .imp import IMP
    address, threads = _blas_threads(work["slots_by_host"])
    recipe = work["recipe"]
    data = _worker_data(recipe, work["data_dir"], work["download"], work["digests"])
    imp = IMP(recipe, None, data, kernel=work["kernel"])
    imp._thresholds = work["thresholds"]
    files = {Path(k): v for k, v in work["files"].items()}
    imp._files.update(files)
    imp._checked.update({Path(k): (m, None) for k, m in work["finished"].items()})
    with threadpool_limits(limits=threads):
        m = imp.run_round(work["seed"], work["strategy"], work["round"])
    made = {PurePosixPath(p).as_posix(): v for p, v in imp._files.items() if files.get(p) is not v}
    return {"metrics": m, "files": made, "worker": address, "blas_threads": threads}


# ---------------------------------------------------------------------------------------------------
# the client side: what a round reads, and writing back what it made

def _needs_init(strategy: str) -> bool:
    return strategy in ("dense", "rewind", "ticket-random-mask") or strategy.startswith("rewind-to-")


def round_inputs(imp, seed: int, strategy: str, r: int) -> tuple[dict, dict]:
    """``(files, finished)`` that round ``r`` reads, from the client's run folder ``imp``: files by
    relative path (npz bytes, JSON objects) and the metrics of the finished rounds it reads."""
    files, finished = {}, {}

    def add(path: Path) -> None:
        if imp.exists(path):
            try:
                files[imp.rel(path)] = path.read_bytes() if path.suffix == ".npz" else imp.load_json(path)
            except (CorruptFileError, OSError):   # a damaged record: the round makes it again
                pass

    def add_round(st: str, k: int, names: tuple) -> None:
        rd = imp.round_dir(seed, st, k)
        finished[imp.rel(rd)] = imp.metrics(seed, st, k)
        for name in names:
            add(rd / name)

    if strategy == "dense":
        r = 0
    if _needs_init(strategy):
        add(imp.seed_dir(seed) / "init.npz")
        add(imp.seed_dir(seed) / "init.json")
    if r == 0:
        return files, finished
    if strategy.startswith("rewind-to-"):
        k = strategy.removeprefix("rewind-to-")
        add(imp.seed_dir(seed) / "dense" / f"rewind_{k}.npz")
        add(imp.seed_dir(seed) / "dense" / f"rewind_{k}.json")
    if strategy in TICKET_STRATEGIES:
        add_round(strategy, r - 1, ())
        add_round("rewind", r, ("masks.npz",))
    else:
        prev = imp.metrics(seed, strategy, r - 1)
        add_round(strategy, r - 1, () if prev.get("diverged") else ("masks.npz", "final.npz"))
    return files, finished


def write_round(imp, seed: int, strategy: str, r: int, made: dict, worker: str) -> None:
    """Write the files round ``r`` made (``made``: relative path -> npz bytes or JSON object) into
    the run folder of ``imp``: each array checked against the SHA-256 its round's metrics or its
    record (``init.json``, ``rewind_<k>.json``) gives, arrays first, ``metrics.json`` last."""
    def bad(rel, why):
        return RunFolderError(f"{imp.dir / rel}: {why}, as returned by worker {worker}; not written")

    rd = imp.rel(imp.round_dir(seed, strategy, r))
    metrics = made.get(f"{rd}/{METRICS}")
    for rel, v in made.items():
        p = PurePosixPath(rel)
        if p.is_absolute() or ".." in p.parts or not p.parts:
            raise bad(rel, "a path outside the run folder")
        if p.suffix != ".npz":
            continue
        if str(p.parent) == rd and isinstance(metrics, dict):
            want = metrics.get("files", {}).get(p.name)
        else:
            record = made.get(str(p.with_suffix(".json")))
            want = record.get("sha256") if isinstance(record, dict) else None
        if not isinstance(v, bytes) or want is None or hashlib.sha256(v).hexdigest() != want:
            raise bad(rel, "its SHA-256 differs from the one recorded with it")
    if metrics is not None and imp.exists(imp.dir / rd / METRICS):   # a round that did not check out
        (imp.dir / rd / METRICS).unlink()
    order = sorted(made, key=lambda rel: (not rel.endswith(".npz"), rel.endswith("/" + METRICS), rel))
    for rel in order:
        path = imp.dir / rel
        imp._inside(path)
        if rel.endswith(".npz"):
            atomic_write_bytes(path, made[rel])
        else:
            atomic_write_json(path, made[rel])
    imp.forget(seed, strategy, r)


# ---------------------------------------------------------------------------------------------------

class Cluster:
    """A connection to a Dask cluster (``tcp://host:port``) or a local one it starts (``local:N``),
    for the ``with`` block of a command. :meth:`check_data` compares every worker's data with the
    client's; :meth:`run` runs a job's rounds there."""

    def __init__(self, address: str, quiet: bool = False):
        self.address, self.quiet = address, quiet
        self.client = self._local = None
        self.workers: dict = {}          # address -> {"nthreads", "blas_threads"} at the start
        self.slots_by_host: dict = {}    # host -> worker threads on it
        self._keys = itertools.count()

    def __enter__(self):
        import logging
        import warnings
        from distributed import Client, LocalCluster
        try:
            if self.address.startswith("local:"):
                with warnings.catch_warnings():   # its HTTP server takes another port than 8787
                    warnings.filterwarnings("ignore", message="Port .* is already in use")
                    self._local = LocalCluster(n_workers=int(self.address[6:]), threads_per_worker=1,
                                               processes=True, dashboard_address=None,
                                               silence_logs=logging.ERROR)
                self.client = Client(self._local)
            else:
                self.client = Client(self.address, timeout="20s")
        except (OSError, TimeoutError) as e:
            self.__exit__(None, None, None)
            raise ClusterError(f"--cluster {self.address}: cannot reach the scheduler ({e})") from None
        return self

    def __exit__(self, *exc):
        for x in (self.client, self._local):
            if x is not None:
                try:
                    x.close()
                except Exception:   # closing after a failure must not hide it
                    pass
        self.client = self._local = None
        return False

    def check_data(self, datasets_: list, data_dir, download: bool, digests: dict) -> None:
        """Stop (DataError naming the worker) unless every worker finds each data set of
        ``datasets_`` with the digests ``digests[name]`` this machine has; note each worker's
        cores for its BLAS threads."""
        from distributed.comm import get_address_host
        try:
            self.client.wait_for_workers(1, timeout=60)
        except (OSError, TimeoutError):
            raise ClusterError(f"--cluster {self.address}: no worker joined the scheduler in 60 s") from None
        try:
            probes = self.client.run(_probe, list(datasets_), data_dir, download)
        except Exception as e:   # a worker without nprune, or another version of it
            raise ClusterError(f"--cluster {self.address}: a worker cannot run nprune "
                               f"({type(e).__name__}: {e}); install nprune[cluster] on every worker") from None
        nthreads = self.client.nthreads()
        for addr, p in sorted(probes.items()):
            for name in datasets_:
                got = p["data"][name]
                if isinstance(got, str):
                    raise DataError(f"worker {addr}: {got}")
                if got != digests[name]:
                    diff = sorted(f for f in got if got[f] != digests[name].get(f))
                    raise DataError(f"worker {addr}: its {name} files differ from this machine's "
                                    f"({', '.join(diff)}): give every worker the same data")
        for addr, n in nthreads.items():
            host = get_address_host(addr)
            self.slots_by_host[host] = self.slots_by_host.get(host, 0) + n
        for addr, n in sorted(nthreads.items()):
            cores = probes.get(addr, {}).get("cores", 1)
            self.workers[addr] = {"nthreads": n, "blas_threads":
                                  max(1, cores // self.slots_by_host[get_address_host(addr)])}
        self.digests = digests

    def record(self) -> dict:
        """What ``settings.json`` keeps of this cluster in ``last_plan``."""
        return {"cluster": self.address, "workers": self.workers}

    def run(self, job: dict, imp, data_dir, download: bool, quiet: bool, clock) -> None:
        """Run the job's unfinished rounds (``imp``: its run folder, on the client) on the cluster,
        a round handed out when its inputs are finished and a worker thread is free, and write each
        result into the folder as it comes."""
        from distributed import as_completed
        from distributed.client import FutureCancelledError
        try:
            from distributed import KilledWorker
        except ImportError:   # older releases keep it in the scheduler module
            from distributed.scheduler import KilledWorker
        recipe = job["recipe"]
        plan = RoundPlan(imp, job)
        thresholds = imp.kernel_thresholds()
        running: dict = {}
        done = as_completed()

        def fill():
            slots = max(1, sum(self.client.nthreads().values()))
            while len(running) < slots and plan.has_ready():
                seed, st, r = plan.next()
                files, finished = round_inputs(imp, seed, st, r)
                work = {"recipe": recipe, "kernel": imp.kernel, "thresholds": thresholds,
                        "seed": seed, "strategy": st, "round": r, "files": files,
                        "finished": finished, "data_dir": data_dir, "download": download,
                        "digests": self.digests[recipe.dataset], "slots_by_host": self.slots_by_host}
                n = next(self._keys)
                fut = self.client.submit(run_remote_round, work, pure=False, priority=-n,
                                         key=f"nprune-{recipe.net}-seed{seed}-{st}-{r}-{os.getpid()}-{n}")
                running[fut] = (seed, st, r)
                done.add(fut)

        try:
            fill()
            for fut in done:
                seed, st, r = running.pop(fut)
                try:
                    res = fut.result()
                except KilledWorker as e:
                    raise WorkerDied(f"round {st} {r} of seed {seed} killed the workers that ran it "
                                     f"({e}); finished rounds are saved; rerun the same command to "
                                     "resume") from None
                except FutureCancelledError:
                    raise ClusterError(f"--cluster {self.address}: the scheduler cancelled seed "
                                       f"{seed} {st} round {r}; finished rounds are saved") from None
                write_round(imp, seed, st, r, res["files"], res["worker"])
                m = res["metrics"]
                plan.finished((seed, st, r), m is not None, bool(m and m.get("diverged")))
                clock.done += recipe.train.iterations
                if not quiet:
                    print_finished(recipe.net, seed, st, r, clock)
                fill()
        finally:
            if running:
                self.client.cancel(list(running))


@contextlib.contextmanager
def open_cluster(address: str | None, quiet: bool, datasets_: list, data_dir, download: bool):
    """The command's cluster (``address`` checked by :func:`parse_address`), connected and with
    every worker's data checked against this machine's, for a ``with`` block; None without
    ``address``."""
    if address is None:
        yield None
        return
    with Cluster(address, quiet) as c:
        c.check_data(datasets_, data_dir, download,
                     {d: checked_digests(d, data_dir, download) for d in datasets_})
        yield c
