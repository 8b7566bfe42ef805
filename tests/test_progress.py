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
