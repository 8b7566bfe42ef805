"""The --jobs scheduler: worker processes give the bits of one process, resume, and stop at Ctrl-C."""
import os
import signal
import subprocess
import sys

from conftest import ROOT, real_mnist, run_cli, run_files


def test_jobs_2_gives_the_bits_of_one_process_and_resumes(tmp_path):
    """--jobs 2 runs one round per task on two worker processes; every saved number equals a
    one-process run's (both at 1 BLAS thread), also when it resumes a folder with whole seeds and
    single rounds missing. 3 seeds x 2 strategies: the scheduler's waiting/ready paths all run."""
    import shutil
    data = real_mnist()
    args = ["--net", "lenet300", "--strategies", "rewind,reinit", "--rounds", "2", "--seeds", "3",
            "--iterations", "60", "--eval-every", "30", "--val", "1000", "--data-dir", str(data)]
    one = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    r = run_cli(*args, "--out", str(tmp_path / "a"), "--quiet", env=one)
    assert r.returncode == 0, r.stderr
    r = run_cli(*args, "--out", str(tmp_path / "b"), "--jobs", "2")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("finished: lenet300 seed") == 3 * (1 + 2 * 2)
    assert "leaked" not in r.stderr and "Traceback" not in r.stderr, r.stderr   # clean shutdown
    a = next((tmp_path / "a").glob("lenet300-*"))
    b = next((tmp_path / "b").glob("lenet300-*"))
    files_a = run_files(a)
    assert run_files(b) == files_a
    # resume: seed 2 entirely gone, seed 1's reinit round 2 and seed 0's rewind rounds 1-2 gone
    c = tmp_path / "c" / a.name
    shutil.copytree(a, c)
    for rel in ("seed_2", "seed_1/reinit/round_2", "seed_0/rewind"):
        shutil.rmtree(c / rel)
    r = run_cli(*args, "--out", str(tmp_path / "c"), "--jobs", "2")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("finished: lenet300 seed") == (1 + 2 * 2) + 1 + 2
    assert run_files(c) == files_a


def test_ctrl_c_with_jobs_2_is_one_line_and_resumable(tmp_path):
    """Ctrl-C (SIGINT to the process group) during a --jobs 2 run: the workers ignore it, the parent
    stops them at once and prints one line, exit 130, no traceback; the same command finishes it."""
    data = real_mnist()
    args = ["--net", "lenet300", "--strategies", "rewind,reinit", "--rounds", "2", "--seeds", "3",
            "--iterations", "300", "--eval-every", "100", "--val", "1000", "--data-dir", str(data),
            "--out", str(tmp_path), "--jobs", "2"]
    p = subprocess.Popen([sys.executable, "-m", "nprune.experiment", *args], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    for line in p.stderr:
        if "finished: lenet300 seed 1 dense" in line:
            break
    os.killpg(p.pid, signal.SIGINT)
    rest = p.stderr.read()
    assert p.wait(timeout=30) == 130
    assert "Traceback" not in rest
    assert rest.strip().splitlines()[-1].startswith("nprune: interrupted")
    run = next(tmp_path.glob("lenet300-*"))
    assert not (run / "seed_2" / "reinit" / "round_2" / "metrics.json").exists()
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    for s in range(3):
        for st in ("rewind", "reinit"):
            assert (run / f"seed_{s}" / st / "round_2" / "metrics.json").exists()


def test_a_workers_error_is_raised_again_in_the_parent(tmp_path):
    """An exception in a worker's round comes back to the parent as itself (same type and message),
    chained to the worker's traceback, and the workers are stopped: nothing of the run is left."""
    from nprune.data.datasets import DataError
    from nprune.experiment.cli import build_parser, resolve
    from nprune.experiment.schedule import _RemoteTraceback, run_job
    args = build_parser().parse_args(["--net", "lenet300", "--strategies", "rewind", "--rounds", "1",
                                      "--seeds", "2", "--iterations", "10", "--eval-every", "5"])
    job = resolve(args)[0]
    before = set(os.listdir("/proc"))
    try:
        run_job(job, tmp_path / "out", tmp_path / "nowhere", False, 2, True, "dense")
    except DataError as e:
        assert isinstance(e.__cause__, _RemoteTraceback)
        assert "_load_data" in str(e.__cause__)
        assert "nowhere" in str(e)
    else:
        raise AssertionError("no DataError")
    mine = [d for d in set(os.listdir("/proc")) - before if d.isdigit()
            and os.path.exists(f"/proc/{d}/stat")
            and int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1]) == os.getpid()
            and b"spawn_main" in open(f"/proc/{d}/cmdline", "rb").read()]
    assert mine == []


class _Folder:
    """What RoundPlan reads of a run folder: which rounds are finished and whether they diverged."""

    def __init__(self, done=(), diverged=()):
        self.done, self.diverged = set(done), set(diverged)

    def is_done(self, seed, strategy, r):
        return (seed, "dense" if r == 0 else strategy, r) in self.done | self.diverged

    def metrics(self, seed, strategy, r):
        return {"diverged": (seed, strategy, r) in self.diverged}


def _drain(plan, diverge=()) -> list:
    """Hand out and finish one round at a time, as one worker would; the order of the rounds."""
    order = []
    while plan.pending():
        key = plan.next()
        order.append(key)
        plan.finished(key, True, key in diverge)
    return order


def test_round_plan_dense_first_then_the_longest_chain():
    from nprune.experiment.schedule import RoundPlan
    plan = RoundPlan(_Folder(), {"rounds": 2, "seeds": [0, 1], "strategies": ["rewind", "reinit"]})
    order = _drain(plan)
    assert order[0] == (0, "dense", 0)
    assert len(order) == 2 * (1 + 2 * 2) and len(set(order)) == len(order)
    for s in (0, 1):   # each chain in order, after its seed's dense round
        for st in ("rewind", "reinit"):
            i = [order.index((s, st, r)) for r in (1, 2)]
            assert order.index((s, "dense", 0)) < i[0] < i[1]
    # two workers: both busy at once after the first dense round
    plan = RoundPlan(_Folder(), {"rounds": 2, "seeds": [0, 1], "strategies": ["rewind", "reinit"]})
    assert [plan.next(), plan.next()] == [(0, "dense", 0), (1, "dense", 0)]
    assert not plan.has_ready()
    plan.finished((1, "dense", 0), True, False)
    assert plan.next()[0] == 1


def test_round_plan_resumes_from_the_folder():
    from nprune.experiment.schedule import RoundPlan
    done = {(0, "dense", 0), (0, "rewind", 1), (0, "rewind", 2), (0, "reinit", 1)}
    plan = RoundPlan(_Folder(done), {"rounds": 2, "seeds": [0], "strategies": ["rewind", "reinit"]})
    assert _drain(plan) == [(0, "reinit", 2)]
    # a chain that diverged on disk is not run further
    plan = RoundPlan(_Folder({(0, "dense", 0)}, {(0, "rewind", 1)}),
                     {"rounds": 3, "seeds": [0], "strategies": ["rewind"]})
    assert _drain(plan) == []


def test_a_ticket_round_waits_for_its_rewind_round():
    """ticket-reinit's round r runs after rewind's round r, which the plan runs even when the job
    names only the ticket control; a diverged rewind chain releases the ticket chain (which then
    stops by itself) and a diverged dense round drops the seed's chains."""
    from nprune.experiment.schedule import RoundPlan
    for strategies in (["ticket-reinit", "rewind"], ["ticket-random-mask"]):
        plan = RoundPlan(_Folder(), {"rounds": 3, "seeds": [0], "strategies": strategies})
        order = _drain(plan)
        ticket = strategies[0]
        for r in (1, 2, 3):
            assert order.index((0, "rewind", r)) < order.index((0, ticket, r))
        assert len(order) == 1 + 2 * 3
    plan = RoundPlan(_Folder(), {"rounds": 3, "seeds": [0], "strategies": ["rewind", "ticket-reinit"]})
    assert plan.next() == (0, "dense", 0)
    plan.finished((0, "dense", 0), True, False)
    assert plan.next() == (0, "rewind", 1) and not plan.has_ready()
    plan.finished((0, "rewind", 1), True, False)
    assert {plan.next(), plan.next()} == {(0, "rewind", 2), (0, "ticket-reinit", 1)}
    plan.finished((0, "ticket-reinit", 1), True, False)
    assert not plan.has_ready()   # ticket round 2 waits for rewind round 2
    plan.finished((0, "rewind", 2), True, True)   # diverged: the ticket chain is let go
    assert plan.next() == (0, "ticket-reinit", 2)
    plan.finished((0, "ticket-reinit", 2), False, False)   # stopped: its chain ends
    assert not plan.pending()
    plan = RoundPlan(_Folder(), {"rounds": 3, "seeds": [0, 1], "strategies": ["rewind"]})
    assert plan.next() == (0, "dense", 0)
    plan.finished((0, "dense", 0), True, True)
    assert _drain(plan) == [(1, "dense", 0)] + [(1, "rewind", r) for r in (1, 2, 3)]
