"""Figures: the files of a run (also when only the dense round is finished or every round diverged),
and what each figure shows, checked on matplotlib's own objects for synthetic 1-seed and 3-seed runs."""
import matplotlib
import numpy as np
import pytest
from matplotlib.colors import to_rgba
from matplotlib.container import ErrorbarContainer

from nprune.experiment.plots import RunInfo, all_plots, draw_curves, draw_metric, draw_time, parse_formats

ITERS = 600
SETTINGS = {"recipe": {"net": "lenet5", "dataset": "mnist", "iterations": ITERS}}


def _row(strategy, r, left, acc, diverged=False, seed=0, stop=10):
    m = {"seed": seed, "strategy": strategy, "round": r, "percent_left": left, "diverged": diverged}
    if not diverged:
        m.update(early_stop_test_acc=acc, early_stop_iter=stop,
                 curves={"iterations": [5, 10], "test_acc": [acc - 0.1, acc]})
    return m


def test_three_pngs(tmp_path):
    rows = [_row("dense", 0, 100.0, 0.9), _row("rewind-to-5", 1, 50.0, 0.91), _row("rewind", 1, 50.0, 0.92),
            _row("reinit", 1, 50.0, 0.0, diverged=True)]
    for sub, rs in (("all", rows), ("dense", rows[:1]), ("diverged", rows[-1:])):
        files = all_plots(rs, tmp_path / sub, "t")
        assert [f.name for f in files] == ["accuracy_vs_weights.png", "early_stop_vs_weights.png", "curves.png"]
        assert all(f.read_bytes()[:4] == b"\x89PNG" for f in files)


def _run_rows(seeds, rounds=5, capped=True):
    """A run of rewind and reinit, the shape of ``runs.collect``'s rows: percent left halves each
    round; rewind stays accurate and stops early, reinit degrades and (``capped``) stops at the budget
    from round 3 on (for seed 0 only, with 3 seeds)."""
    evals = list(range(100, ITERS + 1, 100))
    rows = []
    for seed in seeds:
        def row(strategy, r, acc, stop):
            lo = acc - (0.3 if strategy == "reinit" else 0.1)
            curve = np.linspace(lo, acc, len(evals))
            return {"seed": seed, "strategy": strategy, "round": r, "percent_left": 100 * 0.5 ** r,
                    "diverged": False, "early_stop_iter": stop, "early_stop_test_acc": acc,
                    "final_test_acc": acc, "curves": {"iterations": evals, "test_acc": list(curve)}}
        rows.append(row("dense", 0, 0.97 + 0.001 * seed, 400))
        for r in range(1, rounds + 1):
            rows.append(row("rewind", r, 0.975 + 0.001 * seed, 300))
            at_cap = capped and r >= 3 and seed == 0
            rows.append(row("reinit", r, 0.97 - 0.02 * r - 0.002 * seed, ITERS if at_cap else 500))
    return rows


def _hollow(ax):
    return [ln for ln in ax.get_lines() if ln.get_marker() == "o" and len(ln.get_xdata())
            and to_rgba(ln.get_markerfacecolor()) == to_rgba("white")]


def _legend_texts(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


@pytest.mark.parametrize("seeds", [[0], [0, 1, 2]])
def test_metric_figures(seeds):
    rows = _run_rows(seeds)
    info = RunInfo(rows, SETTINGS, "lenet5-0123456789")
    dense = np.mean([m["early_stop_test_acc"] for m in rows if m["round"] == 0]) * 100
    sparsest = f"{100 * 0.5 ** 5:.3g}"
    acc = draw_metric(rows, "early_stop_test_acc", "acc", info, scale=100, dense_line=True)
    es = draw_metric(rows, "early_stop_iter", "it", info, budget=True)
    for fig in (acc, es):
        ax = fig.axes[0]
        title = ax.get_title()
        assert "LeNet-5" in title and "MNIST" in title and "rewind vs reinit" in title
        assert f"{ITERS:,} iterations per round" in title and "0123456789" not in title
        if len(seeds) == 1:
            assert "1 seed," in title and "no bars" in title
        else:
            assert "3 seeds" in title and "bars: min-max over 3 seeds" in title
        labels = [t.get_text() for t in ax.get_xticklabels()]
        assert labels[0] == "100" and labels[-1] == sparsest
        assert ax.get_xscale() == "log" and ax.get_xlim()[0] > ax.get_xlim()[1]   # 100% at left
        bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
        assert len(bars) == (2 if len(seeds) > 1 else 0)
        matplotlib.pyplot.close(fig)
    ax = acc.axes[0]
    dashed = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    assert len(dashed) == 1 and np.allclose(dashed[0].get_ydata(), dense)
    assert not _hollow(ax)
    ax = es.axes[0]
    budget = [ln for ln in ax.get_lines() if ln.get_gid() == "budget"]
    assert len(budget) == 1 and np.allclose(budget[0].get_ydata(), ITERS)
    hollow = [ln for ln in _hollow(ax) if ln.get_gid() == "at-budget"]
    assert len(hollow) == 1 and sorted(hollow[0].get_xdata()) == [100 * 0.5 ** r for r in (5, 4, 3)]
    assert any(t.startswith("hollow") for t in _legend_texts(ax))


def test_no_hollow_without_budget_stop():
    rows = _run_rows([0, 1, 2], capped=False)
    fig = draw_metric(rows, "early_stop_iter", "it", RunInfo(rows, SETTINGS), budget=True)
    ax = fig.axes[0]
    assert not _hollow(ax) and not any(t.startswith("hollow") for t in _legend_texts(ax))
    matplotlib.pyplot.close(fig)


def test_crowded_ticks_thinned():
    """Many close levels: the labels that are kept do not overlap; 100% and the sparsest stay."""
    rows = [_row("rewind", r, 100 * 0.8 ** r, 0.9, stop=10) for r in range(1, 25)] + \
        [_row("dense", 0, 100.0, 0.9)]
    fig = draw_metric(rows, "early_stop_test_acc", "acc", RunInfo(rows), scale=100, dense_line=True)
    ax = fig.axes[0]
    fig.canvas.draw()
    shown = [t for t in ax.get_xticklabels() if t.get_text()]
    texts = [t.get_text() for t in ax.get_xticklabels()]
    assert texts[0] == "100" and texts[-1] == "0.47" and len(texts) == 25
    assert 2 < len(shown) < 25
    boxes = sorted((t.get_window_extent() for t in shown), key=lambda b: b.x0)
    assert all(a.x1 <= b.x0 for a, b in zip(boxes, boxes[1:]))
    matplotlib.pyplot.close(fig)


@pytest.mark.parametrize("seeds", [[0], [0, 1, 2]])
def test_curves_figure(seeds):
    rows = _run_rows(seeds)
    fig = draw_curves(rows, RunInfo(rows, SETTINGS))
    title = fig._suptitle.get_text()
    assert "LeNet-5" in title and f"{ITERS:,} iterations" in title
    assert (f"mean of {len(seeds)} seeds" in title) == (len(seeds) > 1)
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["rewind", "reinit"]
    for ax in axes:
        assert ax.get_shared_y_axes().get_siblings(ax) == [ax]       # its own y range
        ys = np.concatenate([ln.get_ydata() for ln in ax.get_lines()])
        lo, hi = ax.get_ylim()
        assert lo <= ys.min() and hi >= ys.max() and hi - lo < 2 * (ys.max() - ys.min()) + 1
        assert len(ax.get_lines()) == 6                              # rounds 0..5
        assert ax.get_legend().get_title().get_text() == "all rounds"
    assert axes[0].get_ylim() != axes[1].get_ylim()
    matplotlib.pyplot.close(fig)


def test_curves_subset_named():
    rows = _run_rows([0], rounds=12)
    fig = draw_curves(rows, RunInfo(rows, SETTINGS), max_rounds=5)
    for ax in fig.axes:
        assert len(ax.get_lines()) == 5
        assert ax.get_legend().get_title().get_text() == "rounds 0, 3, 6, 9, 12"
    matplotlib.pyplot.close(fig)


def test_formats(tmp_path):
    rows = _run_rows([0, 1, 2])
    files = all_plots(rows, tmp_path, plot_format="svg,pdf", settings=SETTINGS)
    assert [f.name for f in files] == [f"{s}.{e}" for s in ("accuracy_vs_weights", "early_stop_vs_weights",
                                                          "curves") for e in ("svg", "pdf")]
    assert all(f.read_bytes()[:5] == b"%PDF-" for f in files if f.suffix == ".pdf")
    assert all(b"<svg" in f.read_bytes()[:2000] for f in files if f.suffix == ".svg")
    assert not list(tmp_path.glob("*.png"))
    assert parse_formats("PNG, svg,png") == ["png", "svg"]
    with pytest.raises(ValueError):
        parse_formats("jpg")


def test_a_strategy_on_fewer_seeds_says_so_in_the_legend():
    """A control run on seed 0 of a 3-seed run: its legend entry names its seed."""
    rows = _run_rows([0, 1, 2])
    rows += [dict(m, strategy="ticket-reinit") for m in rows if m["seed"] == 0 and m["strategy"] == "reinit"]
    fig = draw_metric(rows, "early_stop_test_acc", "acc", RunInfo(rows, SETTINGS), scale=100)
    texts = _legend_texts(fig.axes[0])
    assert "ticket-reinit (seed 0)" in texts and "rewind" in texts and "reinit" in texts
    matplotlib.pyplot.close(fig)


def test_time_figure_names_the_kernel_on_the_title_s_second_line():
    """The first title line lists every strategy and can be long; the kernel goes on the second."""
    rows = [dict(m, ms_per_iteration=2.0, kernel="auto") for m in _run_rows([0, 1])]
    fig = draw_time(rows, RunInfo(rows, SETTINGS))
    first, second = fig.axes[0].get_title().splitlines()
    assert "rewind vs reinit" in first and "kernel" not in first
    assert second.endswith(", kernel auto") and "2 seeds" in second
    matplotlib.pyplot.close(fig)
