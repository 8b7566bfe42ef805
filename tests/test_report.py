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
