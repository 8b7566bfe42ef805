"""Report files rebuilt from a run folder's saved metrics."""
from pathlib import Path

from test_imp import _run

from nprune.experiment.report import write_report
from nprune.experiment.runs import collect


def test_report_rebuild(tmp_path, synth):
    imp = _run(tmp_path, synth, rounds=2)
    info = write_report(imp.dir)
    names = {Path(f).name for f in info["files"]}
    assert {"results.csv", "curves.csv", "summary.md", "accuracy_vs_weights.png",
            "early_stop_vs_weights.png", "curves.png"} <= names
    first = (imp.dir / "results.csv").read_text()
    (imp.dir / "results.csv").unlink()
    write_report(imp.dir)
    assert (imp.dir / "results.csv").read_text() == first
    lines = first.strip().splitlines()
    assert len(lines) == 1 + 1 + 2 * 2          # header, dense, 2 strategies x 2 rounds
    assert len(collect(imp.dir)) == 5
    files = {Path(f).name for f in write_report(imp.dir, plot_format="png,pdf")["files"]}
    assert {"accuracy_vs_weights.pdf", "early_stop_vs_weights.pdf", "curves.pdf", "curves.png"} <= files
    assert (imp.dir / "curves.pdf").read_bytes()[:5] == b"%PDF-"


def test_training_time_in_results_summary_and_a_plot(tmp_path, synth):
    """Each round's wall time (from timing.json) is in results.csv, in summary.md's training-time
    table and in time_vs_weights; comparisons of results leave exactly these out."""
    import csv
    import io
    import json
    from nprune.experiment.report import TIMING_COLUMNS, without_timings
    imp = _run(tmp_path, synth, rounds=2)
    info = write_report(imp.dir)
    assert "time_vs_weights.png" in {Path(f).name for f in info["files"]}
    rows = list(csv.DictReader(io.StringIO((imp.dir / "results.csv").read_text())))
    t = json.loads((imp.round_dir(0, "rewind", 2) / "timing.json").read_text())
    row = next(r for r in rows if r["strategy"] == "rewind" and r["round"] == "2")
    assert float(row["seconds"]) == float(f"{t['seconds']:.6g}")
    assert float(row["ms_per_iteration"]) == float(f"{1e3 * t['seconds'] / 30:.6g}")   # 30 iterations
    assert row["kernel"] == "dense" == t["kernel"]
    summary = (imp.dir / "summary.md").read_text()
    assert "## Training time" in summary and "| rewind s/round | rewind ms/it |" in summary
    # the same run with other timings compares equal once the timings are left out
    before = {n: (imp.dir / n).read_bytes() for n in ("results.csv", "summary.md")}
    for p in imp.dir.rglob("timing.json"):
        p.write_text(json.dumps({"seconds": 123.0, "kernel": "dense"}))
    write_report(imp.dir)
    for name, old in before.items():
        new = (imp.dir / name).read_bytes()
        assert new != old and without_timings(name, new) == without_timings(name, old)
    header = (imp.dir / "results.csv").read_text().splitlines()[0].split(",")
    assert header[-len(TIMING_COLUMNS):] == TIMING_COLUMNS
    assert not set(TIMING_COLUMNS) & set(without_timings("results.csv", (imp.dir / "results.csv").read_bytes())
                                         .decode().splitlines()[0].split(","))
    # a malformed timing.json is not shown, never believed
    (imp.round_dir(0, "rewind", 1) / "timing.json").write_text('{"seconds": "soon"}')
    assert "seconds" not in next(m for m in collect(imp.dir) if m["strategy"] == "rewind" and m["round"] == 1)


def test_summary_has_a_table_per_measure_with_a_column_per_strategy(tmp_path, synth):
    """summary.md: accuracy at the early stop, early-stop iteration and final accuracy, each a
    table with one column per strategy, whose cells are the mean [min-max] of results.csv."""
    import csv
    import io
    imp = _run(tmp_path, synth, rounds=2)
    write_report(imp.dir)
    text = (imp.dir / "summary.md").read_text()
    rows = list(csv.DictReader(io.StringIO((imp.dir / "results.csv").read_text())))
    strategies = sorted({r["strategy"] for r in rows} - {"dense"})
    for heading, column, fmt in [("## Test accuracy (%) at the early stop", "early_stop_test_acc", "{:.2f}"),
                                 ("## Early-stop iteration", "early_stop_iter", "{:.0f}"),
                                 ("## Final test accuracy (%)", "final_test_acc", "{:.2f}")]:
        table = text.split(heading + "\n\n")[1].split("\n\n")[0].splitlines()
        head = [c.strip() for c in table[0].strip("|").split("|")]
        assert head[:2] == ["round", "weights left %"] and sorted(head[2:]) == strategies
        assert len(table) == 2 + 3                           # header, rule, rounds 0-2
        for line in table[3:]:
            cells = dict(zip(head, (c.strip() for c in line.strip("|").split("|"))))
            for s in strategies:
                r = next(r for r in rows if r["strategy"] == s and r["round"] == cells["round"])
                scale = 100 if "acc" in column else 1
                assert cells[s] == fmt.format(float(r[column]) * scale)      # one seed: the value


def test_a_strategy_on_fewer_seeds_names_its_seeds_in_tables_and_legends():
    """A strategy run on fewer seeds than the run (a control added on one seed) is labelled with
    its own seeds, so its mean over one seed is not read as a mean over all of them."""
    from nprune.experiment.report import summary_markdown
    from nprune.experiment.runs import by_strategy, strategy_labels

    def m(seed, strategy, r, acc):
        return {"seed": seed, "strategy": strategy, "round": r, "percent_left": 100 * 0.8 ** r,
                "early_stop_test_acc": acc, "early_stop_iter": 100, "final_test_acc": acc,
                "diverged": False, "weights": {"total": {"left": 8, "percent": 100 * 0.8 ** r}}}
    rows = [m(0, "dense", 0, 0.98), m(1, "dense", 0, 0.97),
            m(0, "rewind", 1, 0.99), m(1, "rewind", 1, 0.96), m(0, "ticket-reinit", 1, 0.95)]
    labels = strategy_labels(by_strategy(rows), [0, 1])
    assert labels == {"rewind": "rewind", "ticket-reinit": "ticket-reinit (seed 0)"}
    assert strategy_labels(by_strategy(rows[:4]), [0, 1]) == {"rewind": "rewind"}
    table = summary_markdown(rows).split("## Test accuracy (%) at the early stop\n\n")[1].splitlines()
    assert table[0] == "| round | weights left % | rewind | ticket-reinit (seed 0) |"
    assert table[3] == "| 1 | 80.00 | 97.50 [96.00-99.00] | 95.00 |"
