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
