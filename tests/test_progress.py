"""Progress lines: one per round start, evaluation (throttled), end and divergence."""
import io
import time

from nprune.experiment.progress import Progress, hms


def test_hms():
    assert hms(0) == "0:00:00" and hms(3725.9) == "1:02:05" and hms(-4) == "0:00:00"


def test_lines_and_eta():
    out = io.StringIO()
    p = Progress("lenet300", total_iterations=20, every=0, stream=out)
    p("start", seed=0, strategy="rewind", round=1, density=51.2, layers={"fc1.W": 50.0})
    p("eval", seed=0, strategy="rewind", round=1, iteration=5, total=10, val_acc=0.5, test_acc=0.25)
    p.every, p.last = 3600, time.perf_counter()        # now an hour between lines, but the last one
    p("eval", seed=0, strategy="rewind", round=1, iteration=7, total=10, val_acc=0.5, test_acc=0.25)
    p("eval", seed=0, strategy="rewind", round=1, iteration=10, total=10, val_acc=0.9, test_acc=0.8)
    p("done", seed=0, strategy="rewind", round=1, seconds=1.25,
      metrics={"early_stop_iter": 10, "early_stop_test_acc": 0.8, "percent_left": 51.2})
    p("diverged", seed=0, strategy="reinit", round=2, error="loss nan")
    lines = out.getvalue().splitlines()
    assert lines[0] == "[lenet300 seed 0 rewind round 1] 51.20% of weights left (fc1 50.0%)"
    assert "it 5/10 val 50.00% test 25.00%" in lines[1] and "eta" in lines[1]
    assert "it 10/10" in lines[2] and len(lines) == 5          # it 7 fell inside the throttle
    assert lines[3].endswith("done in 1.2s: early stop at 10, test 80.00% (51.20% left)")
    assert "DIVERGED: loss nan" in lines[4]
    assert p.done_before == 10


def test_quiet_prints_nothing():
    out = io.StringIO()
    Progress("lenet5", 10, quiet=True, stream=out)("diverged", seed=0, strategy="x", round=1, error="e")
    assert out.getvalue() == ""


def test_one_clock_gives_the_eta_of_the_whole_command(monkeypatch):
    """Two nets' runs share one Clock: the second net's lines count the first net's iterations as
    done and its own as still to do, so the ETA is the whole command's."""
    from nprune.experiment import progress
    now = [0.0]
    monkeypatch.setattr(progress.time, "time", lambda: now[0])
    clock = progress.Clock(40)                       # lenet300: 10 iterations; lenet5: 30
    out = io.StringIO()
    first = Progress("lenet300", clock=clock, every=0, stream=out)
    first("start", seed=0, strategy="dense", round=0, density=100.0, layers={})
    now[0] = 10.0
    first("eval", seed=0, strategy="dense", round=0, iteration=10, total=10, val_acc=0.5, test_acc=0.5)
    first("done", seed=0, strategy="dense", round=0, seconds=10.0,
          metrics={"early_stop_iter": 10, "early_stop_test_acc": 0.5, "percent_left": 100.0})
    second = Progress("lenet5", clock=clock, every=0, stream=out)
    second("start", seed=0, strategy="dense", round=0, density=100.0, layers={})
    now[0] = 15.0
    second("eval", seed=0, strategy="dense", round=0, iteration=5, total=30, val_acc=0.5, test_acc=0.5)
    lines = [ln for ln in out.getvalue().splitlines() if " it " in ln]
    assert lines[0].endswith("elapsed 0:00:10 eta 0:00:30")    # 10 of 40 done in 10 s
    assert lines[1].endswith("elapsed 0:00:15 eta 0:00:25")    # 15 of 40 done in 15 s
    assert second.done_before == 10


def test_without_a_total_no_eta():
    out = io.StringIO()
    Progress("lenet5", every=0, stream=out)("eval", seed=0, strategy="x", round=1, iteration=1,
                                            total=2, val_acc=0.5, test_acc=0.5)
    assert "elapsed" in out.getvalue() and "eta" not in out.getvalue()


def test_a_copy_of_the_clock_carries_on(monkeypatch):
    from nprune.experiment import progress
    now = [110.0]
    monkeypatch.setattr(progress.time, "time", lambda: now[0])
    copy = progress.Clock(*(40, 10, 100.0))    # a --jobs worker's: 10 of 40 done, the command began at 100
    assert copy.elapsed() == 10.0 and copy.eta(10) == "0:00:10"     # 20 of 40 done in 10 s
