"""Figures in the style of the lottery-ticket paper, drawn from the saved per-round metrics.

* ``accuracy_vs_weights``: test accuracy at early stop vs percent of weights remaining (log x axis,
  reversed so pruning goes left to right, one tick per pruning level of the run), one line per
  strategy, mean over seeds with min-max error bars (none for one seed), and the dense round's mean
  as a dashed line.
* ``early_stop_vs_weights``: early-stop iteration vs percent of weights remaining, same layout, with
  the iteration budget as a line; a point whose early stop sits at the budget is hollow, since the
  minimum validation loss was at the last evaluation and the true early stop is unknown.
* ``time_vs_weights``: test accuracy at early stop and wall-clock milliseconds per training
  iteration vs percent of weights remaining, for the kernel the rounds ran with (rounds that have
  a ``timing.json``).
* ``curves``: test accuracy over training iterations, one panel (with its own y range) per strategy,
  one line per round (mean over seeds) coloured by round. Only the evaluations where the test set
  was evaluated are drawn (null elsewhere in the saved curve): a full curve needs ``--test-every``;
  without it each round has its final point only (drawn as a marker).

Every title names the net, data set, strategies, seeds and iterations per round. The ``draw_*``
functions return the Figure (for tests and notebooks); :func:`all_plots` draws, saves and closes.
"""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib

if not os.environ.get("MPLBACKEND"):
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..data.fsutil import atomic_open  # noqa: E402
from .runs import by_strategy, strategy_labels  # noqa: E402
from .strategies import strategy_color  # noqa: E402

DENSE_COLOR = "black"   # the dense round alone, when no strategy has a round yet
FORMATS = ("png", "svg", "pdf")
NET_NAMES = {"lenet300": "LeNet-300-100", "lenet5": "LeNet-5"}
DATASET_NAMES = {"mnist": "MNIST", "fashion": "Fashion-MNIST", "fashion_mnist": "Fashion-MNIST"}
MAX_CURVES = 8          # rounds drawn per curves panel; more rounds are thinned evenly
HOLLOW = "white"        # face colour of a point whose early stop sits at the budget


# ---------------------------------------------------------------------------------------------------
# what the run is: the text of every title

class RunInfo:
    """What titles say about a run: net, data set, strategies, seeds and iterations per round, read
    from ``settings.json``'s recipe where there is one, else from the rows (``name`` stands for the
    net then)."""

    def __init__(self, rows: list, settings: dict | None = None, name: str = ""):
        recipe = (settings or {}).get("recipe", {})
        self.net = NET_NAMES.get(recipe.get("net"), recipe.get("net") or name or "run")
        self.dataset = DATASET_NAMES.get(recipe.get("dataset"), recipe.get("dataset") or "")
        self.strategies = list(by_strategy(rows))
        self.seeds = sorted({m["seed"] for m in rows})
        ends = [m["curves"]["iterations"][-1] for m in rows if m.get("curves", {}).get("iterations")]
        self.iterations = recipe.get("iterations") or (max(ends) if ends else None)

    @property
    def n_seeds(self) -> int:
        return len(self.seeds)

    def title(self, what: str = "", bars: bool = True) -> str:
        """Two lines: net, data set, strategies (and ``what``); then seeds, iterations and (``bars``)
        what the error bars span."""
        head = self.net + (f" on {self.dataset}" if self.dataset else "")
        head += ": " + " vs ".join(self.strategies) if self.strategies else ""
        n = self.n_seeds
        bits = [f"{n} seed{'s' if n != 1 else ''}"]
        if self.iterations:
            bits.append(f"{self.iterations:,} iterations per round")
        if bars:
            bits.append(f"bars: min-max over {n} seeds" if n > 1 else "no bars")
        return (f"{head}{what}\n" + ", ".join(bits))


def parse_formats(plot_format: str) -> list:
    """``"png"``, ``"svg,pdf"``, ...: the list of file formats; ValueError for an unknown one."""
    fmts = [f.strip().lower().lstrip(".") for f in str(plot_format).split(",") if f.strip()]
    bad = [f for f in fmts if f not in FORMATS]
    if bad or not fmts:
        raise ValueError(f"plot format {plot_format!r}: choose one or more of {', '.join(FORMATS)}, "
                         "comma-separated")
    return list(dict.fromkeys(fmts))


# ---------------------------------------------------------------------------------------------------
# series and the weights axis

def _ok(ms: list) -> list:
    return [m for m in ms if not m.get("diverged")]


def _series(rounds: dict, key: str):
    """Per finished round: mean percent left, mean/min/max of ``key`` over seeds, seed count, values."""
    out = []
    for r in sorted(rounds):
        ms = _ok(rounds[r])
        if ms:
            vals = np.array([m[key] for m in ms], float)
            out.append((np.mean([m["percent_left"] for m in ms]), vals))
    xs = np.array([x for x, _ in out])
    mean = np.array([v.mean() for _, v in out])
    err = np.array([[v.mean() - v.min() for _, v in out], [v.max() - v.mean() for _, v in out]])
    return xs, mean, err.reshape(2, len(out)), [v for _, v in out]


def levels(rows: list) -> list:
    """The run's levels of weights left (percent), one per round (mean over seeds and strategies),
    densest first."""
    by_round = {}
    for m in rows:
        if "percent_left" in m:
            by_round.setdefault(m["round"], []).append(m["percent_left"])
    return sorted((float(np.mean(v)) for v in by_round.values()), reverse=True)


def _pct(t: float) -> str:
    return f"{t:.3g}" if t >= 1 else f"{t:.2g}"


def _weights_axis(ax, lv: list) -> None:
    """Log x axis, reversed (100% at left), a tick at each level of ``lv``."""
    lv = lv or [100.0]
    ax.set_xscale("log")
    ax.set_xlim(max(lv) * 1.12, min(lv) / 1.12)
    ax.set_xlabel("percent of weights remaining (log scale)")
    ax.set_xticks(lv)
    ax.set_xticklabels([_pct(t) for t in lv])
    ax.minorticks_off()
    ax.grid(True, alpha=0.3)


def _thin_tick_labels(ax, pad: float = 6.0) -> None:
    """Blank x tick labels that would overlap their left neighbour (in pixels, after layout), keeping
    the first and the last (100% and the sparsest level) always."""
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    labels = [t.get_text() for t in ax.get_xticklabels()]
    if len(labels) < 3:
        return
    boxes = [t.get_window_extent(renderer) for t in ax.get_xticklabels()]

    def clear(a, b):
        lo, hi = sorted((a, b), key=lambda bb: bb.x0)
        return lo.x1 + pad <= hi.x0

    keep = [0]
    for i in range(1, len(labels) - 1):
        if clear(boxes[keep[-1]], boxes[i]) and clear(boxes[i], boxes[-1]):
            keep.append(i)
    keep.append(len(labels) - 1)
    ax.set_xticklabels([s if i in keep else "" for i, s in enumerate(labels)])


def _legend(ax, **kw) -> None:
    """The legend with the data series first and the reference lines and marker keys after them."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        last = [lab.startswith(("dense mean", "budget", "hollow")) for lab in labels]
        order = sorted(range(len(labels)), key=lambda i: last[i])
        ax.legend([handles[i] for i in order], [labels[i] for i in order], **kw)
    else:
        ax.text(0.5, 0.5, "no finished (non-diverged) round", ha="center", transform=ax.transAxes)


# ---------------------------------------------------------------------------------------------------
# the figures

def draw_metric(rows: list, key: str, ylabel: str, info: RunInfo, scale: float = 1.0,
                dense_line: bool = False, budget: bool = False, ax=None):
    """A metric vs weights left, one line per strategy; ``dense_line``: the dense mean dashed;
    ``budget``: the iteration budget as a line and points at the budget hollow. Draws into ``ax``
    when given (None: a new figure). Returns the Figure."""
    own = ax is None
    fig, ax = plt.subplots(figsize=(6.4, 4.4)) if own else (ax.figure, ax)
    rows = [m for m in rows if m.get(key) is not None or m.get("diverged")]
    cap = info.iterations if budget else None
    n_capped = 0
    groups = by_strategy(rows)
    labels = strategy_labels(groups, info.seeds)
    for i, (s, rounds) in enumerate(groups.items()):
        x, y, err, vals = _series(rounds, key)
        if not len(x):
            continue
        color = DENSE_COLOR if s == "dense" else strategy_color(s, i)
        if max(len(v) for v in vals) > 1:
            ax.errorbar(x, y * scale, yerr=err * scale, marker="o", ms=5, capsize=3,
                        label=labels[s], color=color)
        else:
            ax.plot(x, y * scale, marker="o", ms=5, label=labels[s], color=color)
        if cap:
            at = np.array([bool(np.any(v >= cap)) for v in vals])
            if at.any():
                n_capped += int(at.sum())
                ax.plot(x[at], y[at] * scale, ls="none", marker="o", ms=5, mfc=HOLLOW, mec=color,
                        zorder=3.5, gid="at-budget")
    dense = [m[key] for m in _ok([m for m in rows if m["round"] == 0])]
    if dense_line and dense:
        ax.axhline(np.mean(dense) * scale, ls="--", lw=1, color="gray", zorder=1,
                   label=f"dense mean ({np.mean(dense) * scale:.2f})", gid="dense-mean")
    if cap:
        ax.axhline(cap * scale, ls=":", lw=1.2, color="black", zorder=1,
                   label=f"budget ({cap:,} iterations)", gid="budget")
        ax.set_ylim(0, cap * scale * 1.1)
        if n_capped:
            who = "a seed stopped" if info.n_seeds > 1 else "stopped"
            ax.plot([], [], ls="none", marker="o", ms=5, mfc=HOLLOW, mec="gray",
                    label=f"hollow: {who} at the budget (min val loss at\nthe last evaluation; "
                          "true early stop unknown)")
    _weights_axis(ax, levels(rows))
    ax.set_ylabel(ylabel)
    _legend(ax, fontsize=8, loc="best")
    if own:
        ax.set_title(info.title(), fontsize=10)
        fig.tight_layout()
        _thin_tick_labels(ax)
    return fig


def draw_time(rows: list, info: RunInfo):
    """Test accuracy at early stop (top) and wall-clock milliseconds per training iteration
    (bottom, evaluations included) vs weights left, for the kernel(s) the rounds ran with: does a
    sparser ticket train faster at the same accuracy? Returns the Figure."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.4, 7.2), sharex=True)
    draw_metric(rows, "early_stop_test_acc", "test accuracy at early stop (%)", info, scale=100,
                dense_line=True, ax=top)
    draw_metric(rows, "ms_per_iteration", "ms per training iteration", info, ax=bottom)
    bottom.set_ylim(bottom=0)
    top.set_xlabel("")
    kernels = sorted({m.get("kernel") or "unknown" for m in rows if "kernel" in m})
    # the kernel joins the second line: the first holds every strategy's name and can be long
    top.set_title(info.title() + f", kernel {', '.join(kernels)}", fontsize=10)
    fig.tight_layout()
    _thin_tick_labels(bottom)
    return fig


def _pick_rounds(rs: list, most: int = MAX_CURVES) -> list:
    """All rounds if at most ``most``, else every k-th one (k as small as fits) and the last."""
    if len(rs) <= most:
        return rs
    step = int(np.ceil((len(rs) - 1) / (most - 1)))
    return sorted(set(rs[::step]) | {rs[-1]})


def _mean_curve(ms: list):
    """Mean test-accuracy curve over seeds (on the iterations they share), at the evaluations where
    every seed's test accuracy was measured (the saved curve holds null elsewhere)."""
    cs = [m["curves"] for m in ms if m.get("curves") and m["curves"].get("iterations")]
    if not cs:
        return None
    n = min(len(c["iterations"]) for c in cs)
    acc = np.mean([np.asarray([np.nan if v is None else v for v in c["test_acc"][:n]], float)
                   for c in cs], axis=0)
    keep = np.isfinite(acc)
    if not keep.any():
        return None
    return np.asarray(cs[0]["iterations"][:n])[keep], acc[keep], len(cs)


def draw_curves(rows: list, info: RunInfo, max_rounds: int = MAX_CURVES):
    """Test accuracy over training, one panel per strategy with its own y range, one line per round
    (or an evenly spaced subset, named in the legend title) on a sequential colormap. Returns the
    Figure."""
    groups = by_strategy(rows)
    n = max(1, len(groups))
    fig, axes = plt.subplots(1, n, figsize=(5.0 * n, 4.4), squeeze=False)
    cmap = plt.get_cmap("viridis")
    all_rounds = sorted({r for g in groups.values() for r in g})
    shade = {r: cmap(0.9 * k / max(1, len(all_rounds) - 1)) for k, r in enumerate(all_rounds)}
    for ax, (s, rounds) in zip(axes[0], groups.items()):
        rs = [r for r in sorted(rounds) if _mean_curve(_ok(rounds[r]))]
        pick = _pick_rounds(rs, max_rounds)
        lows, highs = [], []
        for r in pick:
            ms = _ok(rounds[r])
            it, acc, k = _mean_curve(ms)
            left = np.mean([m["percent_left"] for m in ms])
            ax.plot(it, acc * 100, color=shade[r], lw=1.5, marker="o" if len(it) < 3 else None,
                    ms=4, label=f"round {r}: {_pct(left)}% left")
            lows.append(acc.min() * 100)
            highs.append(acc.max() * 100)
        if lows:
            lo, hi = min(lows), max(highs)
            margin = max(0.3, 0.05 * (hi - lo))
            ax.set_ylim(max(0.0, lo - margin), min(100.0, hi + margin))
        ax.set_title(s)
        ax.set_xlabel("training iteration")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(True, alpha=0.3)
        which = "all rounds" if pick == rs else "rounds " + ", ".join(map(str, pick))
        _legend(ax, fontsize=8, loc="best", title=which, title_fontsize=8)
    mean = f" (mean of {info.n_seeds} seeds)" if info.n_seeds > 1 else ""
    fig.suptitle(info.title(f": test accuracy during training{mean}", bars=False), fontsize=10)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------------
# files

def _save(fig, stem: Path, formats: list) -> list:
    """Save ``fig`` as ``stem.<fmt>`` for each format, atomically like every result file; close it."""
    paths = []
    for fmt in formats:
        path = stem.with_suffix("." + fmt)
        with atomic_open(path) as f:
            fig.savefig(f, format=fmt, dpi=150 if fmt == "png" else None)
        paths.append(path)
    plt.close(fig)
    return paths


def all_plots(rows: list, out_dir, title: str = "", plot_format: str = "png",
              settings: dict | None = None) -> list:
    """Write the three figures into ``out_dir`` in each format of ``plot_format`` (``"png"``,
    ``"svg"``, ``"pdf"`` or a comma-separated combination); return their paths. ``settings``: the run
    folder's ``settings.json`` (net, data set, iterations for the titles); ``title`` names the run
    when there are none."""
    formats = parse_formats(plot_format)
    out_dir = Path(out_dir)
    info = RunInfo(rows, settings, title)
    figs = (
        ("accuracy_vs_weights", lambda: draw_metric(
            rows, "early_stop_test_acc", "test accuracy at early stop (%)", info, scale=100,
            dense_line=True)),
        ("early_stop_vs_weights", lambda: draw_metric(
            rows, "early_stop_iter", "early-stop iteration (min val loss)", info, budget=True)),
        ("curves", lambda: draw_curves(rows, info)),
    )
    if any("ms_per_iteration" in m for m in rows):
        figs += (("time_vs_weights", lambda: draw_time(rows, info)),)
    files = []
    for stem, draw in figs:
        files += _save(draw(), out_dir / stem, formats)
    return files
