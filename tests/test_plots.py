"""Figures: the three PNGs of a run, also when only the dense round is finished or every round diverged."""
from nprune.experiment.plots import all_plots


def _row(strategy, r, left, acc, diverged=False):
    m = {"seed": 0, "strategy": strategy, "round": r, "percent_left": left, "diverged": diverged}
    if not diverged:
        m.update(early_stop_test_acc=acc, early_stop_iter=10,
                 curves={"iterations": [5, 10], "test_acc": [acc - 0.1, acc]})
    return m


def test_three_pngs(tmp_path):
    rows = [_row("dense", 0, 100.0, 0.9), _row("rewind-to-5", 1, 50.0, 0.91), _row("rewind", 1, 50.0, 0.92),
            _row("reinit", 1, 50.0, 0.0, diverged=True)]
    for sub, rs in (("all", rows), ("dense", rows[:1]), ("diverged", rows[-1:])):
        files = all_plots(rs, tmp_path / sub, "t")
        assert [f.name for f in files] == ["accuracy_vs_weights.png", "early_stop_vs_weights.png", "curves.png"]
        assert all(f.read_bytes()[:4] == b"\x89PNG" for f in files)
