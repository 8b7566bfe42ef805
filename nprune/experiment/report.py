"""Tables from a run folder: ``results.csv`` (one row per seed, strategy and round), ``curves.csv``
(one row per evaluation; its test columns are empty where the test set was not evaluated),
``summary.md`` (means over seeds, min-max in brackets), and the plots. Everything is rebuilt from
the saved ``metrics.json`` files, so ``report RUN_DIR`` works on any run, finished or not."""
from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from ..data.fsutil import atomic_write_text
from .runs import RunFolder, by_strategy, collect, strategy_labels


RESULT_COLUMNS = ["seed", "strategy", "round", "percent_left", "weights_left", "early_stop_iter",
                  "early_stop_val_loss", "early_stop_val_acc", "early_stop_test_acc",
                  "final_val_acc", "final_test_acc", "lr", "diverged"]
#: Wall-clock columns of results.csv (from each round's timing.json): they change from run to run,
#: so comparisons of results leave them out (:func:`without_timings`).
TIMING_COLUMNS = ["seconds", "ms_per_iteration", "kernel"]
TIMING_HEADING = "## Training time"


def without_timings(name: str, data: bytes) -> bytes:
    """A result file's bytes without what changes from run to run: ``results.csv`` without its
    timing columns, ``summary.md`` without its training-time section; other files unchanged."""
    if name == "results.csv":
        rows = list(csv.reader(io.StringIO(data.decode())))
        keep = [i for i, c in enumerate(rows[0]) if c not in TIMING_COLUMNS] if rows else []
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows([[r[i] for i in keep if i < len(r)] for r in rows])
        return buf.getvalue().encode()
    if name == "summary.md":
        text = data.decode()
        start = text.find(TIMING_HEADING)
        if start >= 0:
            end = text.find("\n## ", start + 1)
            text = text[:start] + (text[end + 1:] if end >= 0 else "")
        return text.encode()
    return data


def results_csv(rows: list) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(RESULT_COLUMNS + TIMING_COLUMNS)
    for m in rows:
        m = dict(m, weights_left=m["weights"]["total"]["left"])
        w.writerow([_fmt(m.get(c, "")) for c in RESULT_COLUMNS + TIMING_COLUMNS])
    return buf.getvalue()


#: curves.csv columns measured only at some evaluations: the test set is evaluated at the final
#: iteration and every ``test_every`` iterations (``--test-every``); elsewhere the cell is empty
SPARSE_CURVE_COLUMNS = ("test_loss", "test_acc")


def curves_csv(rows: list) -> str:
    """One row per evaluation. The cells of :data:`SPARSE_CURVE_COLUMNS` are empty at the
    evaluations where the test set was not evaluated."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    cols = ["iterations", "train_loss", "val_loss", "val_acc", "test_loss", "test_acc"]
    w.writerow(["seed", "strategy", "round", "percent_left", "iteration"] + cols[1:])
    for m in rows:
        c = m.get("curves")
        if not c:
            continue
        for i in range(len(c["iterations"])):
            w.writerow([m["seed"], m["strategy"], m["round"], _fmt(m["percent_left"])] +
                       [_sparse(c[k][i]) if k in SPARSE_CURVE_COLUMNS else _fmt(c[k][i])
                        for k in cols])
    return buf.getvalue()


def _sparse(v):
    """A cell of a sparse column: empty where nothing was measured (null)."""
    return "" if v is None or (isinstance(v, float) and v != v) else _fmt(v)


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def _cell(vals, scale=1.0, digits=2):
    vals = np.asarray([v for v in vals if v is not None and np.isfinite(v)], float) * scale
    if vals.size == 0:
        return "diverged"
    if vals.size == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{vals.mean():.{digits}f} [{vals.min():.{digits}f}-{vals.max():.{digits}f}]"


#: summary.md's tables of results, one per measure, one column per strategy: (heading, key in
#: metrics.json, scale, digits).
MEASURES = [("Test accuracy (%) at the early stop", "early_stop_test_acc", 100, 2),
            ("Early-stop iteration", "early_stop_iter", 1, 0),
            ("Final test accuracy (%)", "final_test_acc", 100, 2)]


def summary_markdown(rows: list, settings: dict | None = None, title: str = "") -> str:
    groups = by_strategy(rows)
    rounds = sorted({r for g in groups.values() for r in g})
    seeds = sorted({m["seed"] for m in rows})
    lines = [f"# {title or 'nprune run'}", ""]
    if settings:
        recipe = settings.get("recipe", settings)
        lines.append("Recipe: " + ", ".join(f"{k}={v}" for k, v in recipe.items()))
        lines.append("")
    lines.append(f"Seeds: {', '.join(map(str, seeds))} (cells: mean [min-max] over seeds; a strategy "
                 "run on fewer seeds names its own in its column's heading). The early "
                 "stop is the evaluated iteration of minimum validation loss; \"final\" is the last "
                 "iteration of the round.")
    lines.append("")
    names = strategy_labels(groups, seeds)
    for heading, key, scale, digits in MEASURES:
        lines += [f"## {heading}", ""] + measure_table(groups, rounds, key, scale, digits, names) + [""]
    lines += sparsity_markdown(groups)
    lines += timing_markdown(groups, rounds, names)
    return "\n".join(lines)


def measure_table(groups: dict, rounds: list, key: str, scale: float, digits: int,
                  names: dict) -> list:
    """One measure, mean [min-max] over seeds, a row per round and a column per strategy (headed
    by ``names[strategy]``); a round with diverged seeds says how many, and averages the others."""
    head = ["round", "weights left %", *(names[s] for s in groups)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rounds:
        lefts = [m["percent_left"] for g in groups.values() for m in g.get(r, [])]
        row = [str(r), f"{np.mean(lefts):.2f}" if lefts else ""]
        for s in groups:
            ms = groups[s].get(r, [])
            ok = [m for m in ms if not m.get("diverged")]
            mark = f" ({len(ms) - len(ok)} of {len(ms)} diverged)" if ok and len(ok) < len(ms) else ""
            row.append(_cell([m[key] for m in ok], scale, digits) + mark if ms else "")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def timing_markdown(groups: dict, rounds: list, names: dict) -> list:
    """Wall time per round and per training iteration (evaluation included), mean [min-max] over
    seeds, for the kernel each round ran with: how much faster a sparse ticket trains."""
    timed = [m for g in groups.values() for ms in g.values() for m in ms if "seconds" in m]
    if not timed:
        return []
    kernels = sorted({m.get("kernel") or "unknown" for m in timed})
    lines = [TIMING_HEADING, "",
             f"Wall-clock seconds per round and milliseconds per training iteration (evaluations "
             f"included), kernel {', '.join(kernels)}; they change from run to run and machine to "
             "machine.", ""]
    head = ["round", "weights left %"]
    for s in groups:
        head += [f"{names[s]} s/round", f"{names[s]} ms/it"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rounds:
        lefts = [m["percent_left"] for g in groups.values() for m in g.get(r, [])]
        row = [str(r), f"{np.mean(lefts):.2f}" if lefts else ""]
        for s in groups:
            ms = [m for m in groups[s].get(r, []) if "seconds" in m]
            row += [_cell([m["seconds"] for m in ms], 1, 1) if ms else "",
                    _cell([m["ms_per_iteration"] for m in ms], 1, 3) if ms else ""]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    return lines


def sparsity_markdown(groups: dict) -> list:
    """Weights left per layer and round (count and percent), for each strategy's first seed."""
    lines = []
    for s, rounds in groups.items():
        firsts = [sorted(rounds[r], key=lambda m: m["seed"])[0] for r in sorted(rounds) if rounds[r]]
        if not firsts:
            continue
        layers = [k for k in firsts[0]["weights"] if k != "total"]
        lines.append(f"Weights left per layer, {s} (seed {firsts[0]['seed']}):")
        lines.append("")
        lines.append("| round | " + " | ".join(layers + ["total"]) + " |")
        lines.append("|" + "---|" * (len(layers) + 2))
        for m in firsts:
            cells = [f"{m['weights'][k]['left']} ({m['weights'][k]['percent']:.2f}%)" for k in layers + ["total"]]
            lines.append(f"| {m['round']} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def write_report(run_dir, plot_format: str = "png", strict: bool = True, notice=None) -> dict:
    """Rebuild ``results.csv``, ``curves.csv``, ``summary.md`` and the plots of ``run_dir``, in each
    format of ``plot_format`` (``"png"``, ``"svg"``, ``"pdf"`` or a comma-separated combination).
    Every round is checked first (:func:`nprune.experiment.runs.collect`): with ``strict`` a round
    that does not check out is a RunFolderError; otherwise it is left out and ``notice`` hears of it.
    Returns ``{"rows": n, "files": [paths]}``; raises FileNotFoundError when nothing is finished."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run folder")
    rows = collect(run_dir, strict=strict, notice=notice)
    if not rows:
        raise FileNotFoundError(f"{run_dir}: no finished round to report (no seed_*/…/metrics.json)")
    settings = RunFolder(run_dir).settings()
    title = run_dir.name
    if settings:
        rec = settings.get("recipe", {})
        title = f"{rec.get('net', '')} on {rec.get('dataset', '')} ({run_dir.name})"
    files = []
    for name, text in (("results.csv", results_csv(rows)), ("curves.csv", curves_csv(rows)),
                       ("summary.md", summary_markdown(rows, settings, title))):
        atomic_write_text(run_dir / name, text)
        files.append(run_dir / name)
    from .plots import all_plots   # matplotlib only when figures are drawn
    files += all_plots(rows, run_dir, run_dir.name, plot_format=plot_format, settings=settings)
    return {"rows": len(rows), "files": files,
            "diverged": [{k: m[k] for k in ("seed", "strategy", "round")} for m in rows if m["diverged"]]}


def train_summary_markdown(runs, per_epoch) -> str:
    """Per-seed early-stop and final figures of ``train --seeds`` with their mean (a markdown table).
    The early stop is the evaluation of minimum validation loss; nothing here is chosen on test."""
    lines = ["| seed | early stop: epoch | val loss | val acc % | test acc % | final test acc % |",
             "|---|---:|---:|---:|---:|---:|"]
    cols = []
    for r in runs:
        x = r["result"]
        row = (x["early_stop_iter"] / per_epoch, x["early_stop_val_loss"], 100 * x["early_stop_val_acc"],
               100 * x["early_stop_test_acc"], 100 * x["final_test_acc"])
        cols.append(row)
        lines.append(f"| {r['seed']} | {row[0]:.2f} | {row[1]:.4f} | {row[2]:.2f} | {row[3]:.2f} | {row[4]:.2f} |")
    m = [sum(c[i] for c in cols) / len(cols) for i in range(5)]
    lines.append(f"| **mean of {len(cols)}** | {m[0]:.2f} | {m[1]:.4f} | {m[2]:.2f} | **{m[3]:.2f}** | {m[4]:.2f} |")
    return "\n".join(lines)
