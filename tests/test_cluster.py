"""--cluster: the rounds on a Dask cluster give the bits of one process, also when a worker is
killed mid-round and when the client is killed and the command run again; local:N; the one-line
errors (no distributed, a bad address, a worker whose data differs).

The cluster is a real one on this machine: a ``dask scheduler`` and two ``dask worker`` processes
(one process, one thread each), each started in a process group of its own and killed at the end."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, real_mnist, run_cli, run_files

distributed = pytest.importorskip("distributed", reason="dask's distributed scheduler is not installed "
                                                        "(pip install -e '.[cluster]')")
pytest.importorskip("threadpoolctl", reason="threadpoolctl is not installed (pip install -e '.[cluster]')")

ARGS = ["--net", "lenet300", "--iterations", "200", "--eval-every", "100", "--rounds", "3", "--seeds", "2",
        "--strategies", "rewind,reinit", "--val", "1000", "--kernel", "dense", "--quiet"]
ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
N_ROUNDS = 2 * (1 + 2 * 3)   # seeds x (dense + strategies x rounds)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d))
    return out


def _worker_process(nanny_pid: int) -> int:
    """The worker process a ``dask worker`` command's nanny started (multiprocessing's spawn)."""
    for _ in range(300):
        for c in _children(nanny_pid):
            try:
                if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes():
                    return c
            except OSError:
                pass
        time.sleep(0.1)
    raise AssertionError(f"no worker process below {nanny_pid}")


class _Dask:
    """A scheduler and two workers; ``address`` is the scheduler's."""

    def __init__(self, tmp: Path):
        self.port = _free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen] = []
        env = dict(os.environ, PYTHONPATH=str(ROOT), NPRUNE_DATA_DIR=str(real_mnist()))
        self.log = open(tmp / "dask.log", "w")

        def start(*args):
            p = subprocess.Popen([sys.executable, "-m", *args], cwd=tmp, env=env, stdout=self.log,
                                 stderr=subprocess.STDOUT, start_new_session=True)
            self.procs.append(p)
            return p
        start("distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", str(self.port),
              "--no-dashboard")
        self.workers = [start("distributed.cli.dask_worker", self.address, "--nworkers", "1",
                              "--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1")
                        for _ in range(2)]
        with distributed.Client(self.address, timeout="60s") as c:
            c.wait_for_workers(2, timeout=120)

    def close(self):
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in self.procs:
            p.wait(timeout=30)
        self.log.close()


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory):
    d = _Dask(tmp_path_factory.mktemp("dask"))
    try:
        yield d
    finally:
        d.close()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The files of a one-process run at one BLAS thread."""
    out = tmp_path_factory.mktemp("one")
    r = run_cli(*ARGS, "--data-dir", str(real_mnist()), "--out", str(out), env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    return run_files(next(out.glob("lenet300-*")))


def _same(run: Path, reference: dict, cluster: str) -> None:
    """``run``'s files equal the reference's; settings.json's last plan also says where it ran."""
    files = run_files(run)
    settings = json.loads(files.pop(Path("settings.json")))
    ref = dict(reference)
    want = json.loads(ref.pop(Path("settings.json")))
    assert files == ref
    plan = settings["last_plan"]
    assert plan.pop("cluster") == cluster
    workers = plan.pop("workers")
    assert workers and all(w["blas_threads"] >= 1 and w["nthreads"] >= 1 for w in workers.values())
    assert settings == want


def _metrics_files(out: Path) -> int:
    return len(list(out.glob("lenet300-*/seed_*/**/metrics.json")))


def _run_until(args, out: Path, n: int) -> subprocess.Popen:
    """The command started in a process group of its own, returned once ``n`` rounds are in ``out``."""
    p = subprocess.Popen([sys.executable, "-m", "nprune.experiment", *args], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    t0 = time.monotonic()
    while _metrics_files(out) < n:
        assert p.poll() is None, p.stderr.read().decode()
        assert time.monotonic() - t0 < 300, "the run does not progress"
        time.sleep(0.05)
    return p


def test_cluster_gives_the_bits_of_one_process(dask_cluster, reference, tmp_path):
    out = tmp_path / "a"
    r = run_cli(*ARGS, "--data-dir", str(real_mnist()), "--out", str(out), "--cluster", dask_cluster.address)
    assert r.returncode == 0, r.stderr
    _same(next(out.glob("lenet300-*")), reference, dask_cluster.address)


def test_a_worker_killed_mid_round_costs_that_round_only(dask_cluster, reference, tmp_path):
    """kill -9 of one worker process (its nanny starts another): Dask runs its round again on a
    worker, and the run ends as the one-process run does."""
    out = tmp_path / "b"
    args = [*ARGS, "--data-dir", str(real_mnist()), "--out", str(out), "--cluster", dask_cluster.address]
    p = _run_until(args, out, 3)
    os.kill(_worker_process(dask_cluster.workers[0].pid), signal.SIGKILL)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err.decode()
    _same(next(out.glob("lenet300-*")), reference, dask_cluster.address)


def test_a_client_killed_mid_run_resumes(dask_cluster, reference, tmp_path):
    out = tmp_path / "c"
    args = [*ARGS, "--data-dir", str(real_mnist()), "--out", str(out), "--cluster", dask_cluster.address]
    p = _run_until(args, out, 4)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    p.stderr.close()
    assert _metrics_files(out) < N_ROUNDS
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    _same(next(out.glob("lenet300-*")), reference, dask_cluster.address)


def test_local_cluster_with_a_ticket_control(tmp_path):
    """--cluster local:2 starts two worker processes here. ticket-reinit alone: the plan runs the
    rewind chain it reads as rounds of their own, each ticket round after its rewind round; the
    files equal a one-process run's."""
    args = [*ARGS, "--data-dir", str(real_mnist())]
    args[args.index("--rounds") + 1], args[args.index("--seeds") + 1] = "2", "1"
    args[args.index("--strategies") + 1] = "ticket-reinit"
    r = run_cli(*args, "--out", str(tmp_path / "one"), env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    one = run_files(next((tmp_path / "one").glob("lenet300-*")))
    r = run_cli(*args, "--out", str(tmp_path / "local"), "--cluster", "local:2")
    assert r.returncode == 0, r.stderr
    run = next((tmp_path / "local").glob("lenet300-*"))
    assert (run / "seed_0" / "rewind" / "round_2" / "metrics.json").exists()
    _same(run, one, "local:2")
    assert len(json.loads((run / "settings.json").read_text())["last_plan"]["workers"]) == 2


def _main(capsys, *args) -> tuple[int, list]:
    from nprune.experiment.cli import main
    code = main(["--net", "lenet300", "--rounds", "1", "--seeds", "1", "--quiet", *args])
    return code, capsys.readouterr().err.strip().splitlines()


def test_without_distributed_cluster_is_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "distributed", None)   # import distributed raises ImportError
    code, err = _main(capsys, "--out", str(tmp_path), "--cluster", "local:2")
    assert code == 2
    assert err == ["nprune: error: --cluster needs dask's distributed scheduler: pip install 'nprune[cluster]'"]
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("address", ["local:0", "local:257", "local:x", "tcp://127.0.0.1", "tcp://:8786",
                                     "http://host:8786", "tcp://host:70000", "127.0.0.1:8786", ""])
def test_a_bad_address_is_one_line(address, capsys, tmp_path):
    code, err = _main(capsys, "--out", str(tmp_path), "--cluster", address)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("nprune: error: --cluster must be tcp://HOST:PORT"), err
    assert not any(tmp_path.iterdir())


def test_jobs_and_cluster_exclude_each_other(capsys, tmp_path):
    code, err = _main(capsys, "--out", str(tmp_path), "--cluster", "local:2", "--jobs", "2")
    assert code == 2 and len(err) == 1 and "exclude each other" in err[0]


class _StubClient:
    """What Cluster.check_data asks of a Dask client, with set answers."""

    def __init__(self, probes):
        self.probes = probes

    def wait_for_workers(self, n, timeout):
        pass

    def run(self, fn, *args):
        return self.probes

    def nthreads(self):
        return {a: 1 for a in self.probes}


def test_a_worker_without_the_data_or_with_other_data_is_named():
    from nprune.data.datasets import DataError
    from nprune.experiment.cluster import Cluster
    mine = {"mnist": {"train-images-idx3-ubyte": "a", "train-labels-idx1-ubyte": "b",
                      "t10k-images-idx3-ubyte": "c", "t10k-labels-idx1-ubyte": "d"}}
    good = {"cores": 4, "data": mine}
    other = {"cores": 4, "data": {"mnist": dict(mine["mnist"], **{"t10k-labels-idx1-ubyte": "e"})}}
    none = {"cores": 4, "data": {"mnist": "mnist: not found in /nowhere"}}
    for probe, words in ((other, "files differ from this machine's (t10k-labels-idx1-ubyte)"),
                         (none, "mnist: not found in /nowhere")):
        c = Cluster("tcp://s:1")
        c.client = _StubClient({"tcp://10.0.0.1:1": good, "tcp://10.0.0.2:1": probe})
        with pytest.raises(DataError, match="worker tcp://10.0.0.2:1: ") as e:
            c.check_data(["mnist"], None, False, mine)
        assert words in str(e.value)
    c = Cluster("tcp://s:1")
    c.client = _StubClient({"tcp://10.0.0.1:1": good, "tcp://10.0.0.1:2": good, "tcp://10.0.0.2:1": good})
    c.check_data(["mnist"], None, False, mine)
    # BLAS threads: the machine's cores over the worker threads on it
    assert c.record()["workers"] == {"tcp://10.0.0.1:1": {"nthreads": 1, "blas_threads": 2},
                                     "tcp://10.0.0.1:2": {"nthreads": 1, "blas_threads": 2},
                                     "tcp://10.0.0.2:1": {"nthreads": 1, "blas_threads": 4}}


def test_data_digests_are_the_published_ones():
    from nprune.data.datasets import DATASETS
    from nprune.experiment.cluster import data_digests
    assert data_digests("mnist", real_mnist(), download=False) == DATASETS["mnist"].sha256
