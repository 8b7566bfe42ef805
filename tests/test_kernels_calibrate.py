"""nprune.kernels.calibrate: the calibration machinery (its timings are not checked)."""
from __future__ import annotations

import numpy as np

from nprune import nets
from nprune.kernels import apply_kernel, calibrate, kernel_report, thresholds
from nprune.layers import Dense

from kernels_util import table


def test_calibration_modes_per_layer():
    specs = {s["key"]: s for s in calibrate.calibration_layers()}
    # first layer: its input is C-ordered in training, either order in inference (evaluation copy)
    assert calibrate._cal_modes(specs["Dense 784x300"]) == thresholds.AUTO_MODES + ("eval_f",)
    assert calibrate._cal_modes(specs["Dense 300x100"]) == thresholds.ALL_MODES
    conv = next(s for k, s in specs.items() if k.startswith("Conv2D 20x50"))
    assert calibrate._cal_modes(conv) == thresholds.AUTO_MODES
    assert calibrate._cal_modes(specs["Dense 300x100"], thresholds.FMAJOR_MODES) == thresholds.FMAJOR_MODES


def test_user_calibration_file_is_used(tmp_path, monkeypatch):
    # the calibration command writes the user cache file and auto picks it up (measurement stubbed)
    entries = {"Dense 784x300": {c: {m: 0.5 for m in thresholds.AUTO_MODES} for c in thresholds.BATCH_CLASSES}}
    monkeypatch.setattr(calibrate, "measure_thresholds", lambda **k: (entries, []))
    path = calibrate.calibrate_thresholds(verbose=False)
    assert path == tmp_path / "xdg-cache" / "nprune" / "kernel_thresholds.json"
    active = thresholds.active_thresholds()
    assert active["thresholds"] == entries and active["source"] == str(path)
    model = nets.build("lenet300", np.random.default_rng(0))
    model.set_masks({"fc1.W": np.random.default_rng(0).random((784, 300)) < 0.4})
    apply_kernel(model, "auto")
    model.forward(np.zeros((8, 1, 28, 28), np.float32))
    assert [r["use_kernel"] for r in kernel_report(model)] == [True, False, False]


def test_measure_thresholds_runs_on_a_tiny_layer():
    # the calibration machinery end to end on a tiny shape (its numbers are not checked)
    layer = Dense(20, 10, np.random.default_rng(0))
    spec = {"key": "Dense 20x10", "layer": layer, "in_shape": (20,), "first": False}
    t, meas = calibrate.measure_thresholds(specs=[spec], densities=(0.1, 1.0), repeats=1,
                                        batches={"1": (1,), "small": (4,), "large": (300,)})
    assert set(t["Dense 20x10"]) == set(thresholds.BATCH_CLASSES)
    assert all(set(m) == set(thresholds.ALL_MODES) for m in t["Dense 20x10"].values())   # inner layer
    assert {m["mode"] for m in meas} <= set(thresholds.ALL_MODES)
    thresholds.check_thresholds(table(t), "measured")
    assert meas and all(m["shape"] == "Dense 20x10" for m in meas)
    assert layer.kernel is None and layer.masks["W"] is None


def test_kernels_package_does_not_import_the_nets():
    """Below the package's own __init__ (which exports the API), no kernels module but calibrate
    reaches nprune.nets or nprune.model through its imports: kernels sit under the model."""
    from test_imports import MODULES, imports_of
    for mod in (m for m in MODULES if m.startswith("nprune.kernels") and not m.endswith("calibrate")):
        seen, todo = set(), [mod]
        while todo:
            for dep in imports_of(todo.pop()) - seen:
                seen.add(dep)
                todo.append(dep)
        assert not seen & {"nprune.nets", "nprune.model", "nprune.kernels.calibrate"}, mod


def test_cli_show_and_help(capsys):
    assert calibrate.main(["show"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("source: shipped") and "Dense 784x300" in out
    assert calibrate.main([]) == 0
    out = capsys.readouterr().out
    assert all(c in out for c in ("calibrate", "show", "cost-model"))


def test_measure_thresholds_on_given_masks():
    # masks= scans the given masks in increasing density; a class without batch sizes is left out
    layer = Dense(20, 10, np.random.default_rng(0))
    spec = {"key": "Dense 20x10", "layer": layer, "in_shape": (20,), "first": True}
    rng = np.random.default_rng(1)
    masks = [rng.random((20, 10)) < d for d in (0.5, 0.05, 0.2)]
    t, meas = calibrate.measure_thresholds(specs=[spec], masks={"Dense 20x10": masks}, repeats=1,
                                        batches={"small": (4,)}, threads=[1], margin=1.0,
                                        modes=("eval",))
    assert set(t["Dense 20x10"]) == {"small"}
    got = t["Dense 20x10"]["small"]["eval"]
    dens = sorted(float(m.mean()) for m in masks)
    assert got is None or dens[0] <= got <= dens[-1]
    tried = [m["density"] for m in meas if not m.get("retried")]
    assert tried == sorted(tried) and set(tried) <= set(dens)
    # a shape the masks do not name is skipped
    t, _ = calibrate.measure_thresholds(specs=[spec], masks={}, repeats=1, batches={"small": (4,)})
    assert t == {}
