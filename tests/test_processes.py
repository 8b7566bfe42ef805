"""The processes of a run: --jobs workers die with their parent, a dead worker is one line, and
SIGTERM, SIGHUP and a repeated Ctrl-C stop a run like one Ctrl-C (one line, 128 + signal, nothing
left running, resumable). Each run is started in a session of its own, so that its process group
holds the command and everything it started."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, real_mnist, run_cli

ARGS = ["--net", "lenet300", "--strategies", "rewind", "--eval-every", "100", "--val", "1000", "--quiet"]
ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}   # 2 cores: one-process runs too
RESUME_LINE = "finished rounds are saved, rerun the same command to resume"


def _args(tmp_path, rounds, seeds, *extra, iterations=200):
    return [*ARGS, "--iterations", str(iterations), "--rounds", str(rounds), "--seeds", str(seeds),
            "--data-dir", str(real_mnist()), "--out", str(tmp_path / "out"), *extra]


def _start(tmp_path, args) -> tuple[subprocess.Popen, Path]:
    """The command in a new session; its stderr goes to a file (a pipe nobody reads could block
    it, and a closed one would stop its processes for another reason than the one tested)."""
    err = tmp_path / "stderr.txt"
    with open(err, "w") as f:
        p = subprocess.Popen([sys.executable, "-m", "nprune.experiment", *args], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=f, start_new_session=True,
                             env=dict(os.environ, **ONE_THREAD), preexec_fn=_default_stop_signals)
    return p, err


def _default_stop_signals() -> None:
    """In the child before it starts: the stop signals at their defaults, as from a terminal.
    Under ``nohup`` (or a CI runner that ignores SIGHUP) the child would inherit an ignored SIGHUP,
    which nprune rightly leaves ignored."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, process group) of a process, or None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    state, ppid, pgrp = text.rsplit(")", 1)[1].split()[:3]
    return state, int(ppid), int(pgrp)


def _alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] not in "ZX"   # a zombie has exited (its parent reaps it)


def _live_pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit() and _alive(int(d))]


def _workers(pid: int) -> list[int]:
    """The --jobs workers of process ``pid``: its children started by multiprocessing's spawn."""
    out = []
    for c in _live_pids():
        st = _stat(c)
        try:
            if st and st[1] == pid and b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes():
                out.append(c)
        except OSError:
            pass
    return out


def _group(pgid: int) -> list[int]:
    """Live processes of process group ``pgid``."""
    return [p for p in _live_pids() if (_stat(p) or ("", 0, 0))[2] == pgid]


def _until(cond, timeout: float, what: str):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        v = cond()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s: {what}")


def _training(tmp_path, p, n: int) -> None:
    """Wait until ``n`` rounds are being trained (their start.npz written, metrics.json not)."""
    def started():
        assert p.poll() is None, "the command ended before it was stopped"
        return sum(not (d.parent / "metrics.json").exists()
                   for d in (tmp_path / "out").glob("*/seed_*/**/start.npz")) >= n
    _until(started, 120, f"{n} rounds in training")


def _nothing_left(pgid: int) -> None:
    _until(lambda: not _group(pgid), 10, f"the processes of group {pgid} end: {_group(pgid)}")


def _kill_group(p: subprocess.Popen) -> None:
    """Whatever a failed test left running: the command and its processes."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()


def _one_line(err: Path) -> str:
    text = err.read_text()
    assert "Traceback" not in text and "leaked" not in text, text
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def _metrics(tmp_path) -> dict:
    run = next((tmp_path / "out").glob("lenet300-*"))
    return {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("metrics.json"))}


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "SIGTERM"])
def test_workers_exit_when_the_parent_dies(tmp_path, sig):
    """kill -9 (or SIGTERM) to the parent alone while both workers train: every worker is gone
    within 10 s (a busy worker watches its parent; nothing tells it otherwise after kill -9). The
    rounds are long (20,000 iterations), so a worker that only noticed at the end of its round
    would fail the test."""
    p, err = _start(tmp_path, _args(tmp_path, 1, 2, "--jobs", "2", iterations=20000))
    try:
        _training(tmp_path, p, 2)
        workers = _until(lambda: len(w := _workers(p.pid)) == 2 and w, 30, "two workers")
        os.kill(p.pid, sig)
        t0 = time.monotonic()
        code = p.wait(30)
        _until(lambda: not any(map(_alive, workers)), 10, f"workers {workers} end")
        print(f"workers gone {time.monotonic() - t0:.2f} s after {sig.name}")
        if sig == signal.SIGTERM:
            assert code == 143
            assert _one_line(err) == f"nprune: interrupted by SIGTERM; {RESUME_LINE}"
        else:
            assert code == -signal.SIGKILL
        _nothing_left(p.pid)
    finally:
        _kill_group(p)


def test_a_dead_worker_is_one_line_and_the_rerun_gives_the_uninterrupted_results(tmp_path):
    """kill -9 of one worker mid-round: the command stops the other one and ends with one line
    naming the worker and the signal, exit 1, no traceback; the same command again finishes the
    run, whose metrics equal an uninterrupted run's."""
    ref = tmp_path / "ref"
    r = run_cli(*_args(ref, 2, 2, "--jobs", "2", iterations=1000), env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    args = _args(tmp_path, 2, 2, "--jobs", "2", iterations=1000)
    p, err = _start(tmp_path, args)
    try:
        _training(tmp_path, p, 2)
        workers = _until(lambda: len(w := _workers(p.pid)) == 2 and w, 30, "two workers")
        os.kill(workers[-1], signal.SIGKILL)
        assert p.wait(30) == 1
    finally:
        _kill_group(p)
    text = err.read_text()
    assert "Traceback" not in text and "leaked" not in text, text
    assert re.fullmatch(r"nprune: error: worker [12] died \(signal 9\); finished rounds are saved; "
                        r"rerun the same command to resume", text.strip().splitlines()[-1]), text
    assert not any(map(_alive, workers))   # the parent stopped and reaped the other one
    _nothing_left(p.pid)
    assert len(_metrics(tmp_path)) < 6   # the run was cut short
    r = run_cli(*args, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    assert _metrics(tmp_path) == _metrics(ref)


@pytest.mark.parametrize("jobs", [1, 2])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_stop_a_run_like_ctrl_c(tmp_path, sig, jobs):
    """SIGTERM or SIGHUP to the whole process group (what a service manager or a closed terminal
    sends) mid-round: one line, exit 128 + signal, no traceback, no process left; the workers
    ignore the signal and the parent stops them. The same command then finishes the run."""
    # rounds long enough (seconds) that the signal surely comes while they train
    args = _args(tmp_path, 1, jobs, "--jobs", str(jobs), iterations=2000)
    p, err = _start(tmp_path, args)
    try:
        _training(tmp_path, p, jobs)
        workers = _workers(p.pid)
        assert len(workers) == (jobs if jobs > 1 else 0)
        os.killpg(p.pid, sig)
        assert p.wait(30) == 128 + sig
    finally:
        _kill_group(p)
    assert _one_line(err) == f"nprune: interrupted by {sig.name}; {RESUME_LINE}"
    assert not any(map(_alive, workers))
    _nothing_left(p.pid)
    assert len(_metrics(tmp_path)) < 2 * jobs   # the run was cut short
    r = run_cli(*args, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    assert len(_metrics(tmp_path)) == 2 * jobs


def test_ctrl_c_held_down_still_exits_130(tmp_path):
    """SIGINT to the process group every few milliseconds until the --jobs 2 command ends: the
    first one stops it and the others, arriving while it stops its workers and prints, are
    ignored: exit 130 (not death by SIGINT), one line, no process left."""
    p, err = _start(tmp_path, _args(tmp_path, 1, 2, "--jobs", "2", iterations=2000))
    try:
        _training(tmp_path, p, 2)
        t0 = time.monotonic()
        while p.poll() is None and time.monotonic() - t0 < 30:
            os.killpg(p.pid, signal.SIGINT)
            time.sleep(0.002)
        assert p.wait(30) == 130
    finally:
        _kill_group(p)
    assert _one_line(err) == f"nprune: interrupted; {RESUME_LINE}"
    _nothing_left(p.pid)


def test_a_signal_while_the_message_is_printed_is_ignored(monkeypatch):
    """In process: SIGTERM stops the command; a SIGINT that comes while main prints its message
    does not escape main; main returns 143 and puts the previous handlers back."""
    from nprune.experiment import cli
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}

    def run(args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)   # the handler raises here
        raise AssertionError("SIGTERM did not stop the command")

    class Stderr:
        text = ""

        def write(self, s):
            os.kill(os.getpid(), signal.SIGINT)
            Stderr.text += s

        def flush(self):
            pass
    monkeypatch.setattr(cli, "cmd_run", run)
    monkeypatch.setattr(sys, "stderr", Stderr())
    try:
        code = cli.main(["--quiet"])
    except KeyboardInterrupt:   # not pytest's own: the test's SIGINT escaped main
        pytest.fail("the SIGINT during the message escaped main")
    assert code == 143
    assert Stderr.text.strip() == f"nprune: interrupted by SIGTERM; {RESUME_LINE}"
    assert {s: signal.getsignal(s) for s in before} == before
