"""Figures in the style of the lottery-ticket paper, drawn from the saved per-round metrics.

* ``accuracy_vs_weights.png``: test accuracy at early stop vs percent of weights remaining (log x
  axis, reversed so pruning goes left to right), one line per strategy, mean over seeds with min/max
  error bars.
* ``early_stop_vs_weights.png``: early-stop iteration vs percent of weights remaining, same layout.
* ``curves.png``: test accuracy over training iterations for selected rounds, one panel per strategy.
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
from .runs import by_strategy  # noqa: E402
from .strategies import strategy_color  # noqa: E402

DENSE_COLOR = "black"   # the dense round alone, when no strategy has a round yet


def _series(rounds: dict, key: str):
    xs, mean, lo, hi = [], [], [], []
    for r in sorted(rounds):
        ms = [m for m in rounds[r] if not m.get("diverged")]
        if not ms:
            continue
        vals = np.array([m[key] for m in ms], float)
        xs.append(np.mean([m["percent_left"] for m in ms]))
        mean.append(vals.mean())
        lo.append(vals.mean() - vals.min())
        hi.append(vals.max() - vals.mean())
    return np.array(xs), np.array(mean), np.array([lo, hi])


def _weights_axis(ax, lowest: float = 0.5):
    ax.set_xscale("log")
    ax.set_xlim(105, lowest * 0.9)
    ax.set_xlabel("percent of weights remaining")
    ticks = [t for t in (100, 51.3, 21.1, 7.0, 3.6, 1.9, 1.0, 0.5, 0.2, 0.1) if t >= lowest * 0.9]
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.grid(True, alpha=0.3)


def plot_metric(rows: list, key: str, ylabel: str, title: str, path, scale: float = 1.0) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    lowest = 100.0
    for i, (s, rounds) in enumerate(by_strategy(rows).items()):
        x, y, err = _series(rounds, key)
        if len(x):
            ax.errorbar(x, y * scale, yerr=err * scale, marker="o", ms=4, capsize=3,
                        label=s, color=DENSE_COLOR if s == "dense" else strategy_color(s, i))
            lowest = min(lowest, x.min())
    _weights_axis(ax, lowest)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    _legend(ax)
    fig.tight_layout()
    path = Path(path)
    _save(fig, path)
    return path


def plot_curves(rows: list, title: str, path, max_rounds: int = 5) -> Path:
    groups = by_strategy(rows)
    fig, axes = plt.subplots(1, max(1, len(groups)), figsize=(5.2 * max(1, len(groups)), 4.0),
                             squeeze=False, sharey=True)
    for ax, (s, rounds) in zip(axes[0], groups.items()):
        rs = sorted(rounds)
        pick = sorted(set(rs[:: max(1, int(np.ceil(len(rs) / max_rounds)))] + [rs[-1]]))
        cmap = plt.get_cmap("viridis")
        for j, r in enumerate(pick):
            m = next((m for m in rounds[r] if not m.get("diverged") and "curves" in m), None)
            if m is None:
                continue
            c = m["curves"]
            ax.plot(c["iterations"], np.array(c["test_acc"]) * 100,
                    color=cmap(j / max(1, len(pick) - 1)),
                    label=f"{m['percent_left']:.1f}% left (seed {m['seed']})")
        ax.set_title(f"{title}: {s}")
        ax.set_xlabel("training iteration")
        ax.grid(True, alpha=0.3)
        _legend(ax, fontsize=8)
    axes[0][0].set_ylabel("test accuracy (%)")
    lows = [min(m["curves"]["test_acc"]) for m in rows if "curves" in m and m["curves"]["test_acc"]]
    if lows:
        axes[0][0].set_ylim(max(0, min(95, min(lows) * 100 - 1)), 100)
    fig.tight_layout()
    path = Path(path)
    _save(fig, path)
    return path


def _legend(ax, **kw) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kw)
    else:
        ax.text(0.5, 0.5, "no finished (non-diverged) round", ha="center", transform=ax.transAxes)


def _save(fig, path: Path) -> None:
    """Save as PNG atomically, like every result file."""
    with atomic_open(path) as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def all_plots(rows: list, out_dir, title: str) -> list:
    """Write the three figures into ``out_dir``; return their paths."""
    out_dir = Path(out_dir)
    return [
        plot_metric(rows, "early_stop_test_acc", "test accuracy at early stop (%)", title,
                    out_dir / "accuracy_vs_weights.png", scale=100),
        plot_metric(rows, "early_stop_iter", "early-stop iteration (min val loss)", title,
                    out_dir / "early_stop_vs_weights.png"),
        plot_curves(rows, title, out_dir / "curves.png"),
    ]
