"""nprune.kernels.thresholds: the table format, its checks, the shipped table, the user file."""
from __future__ import annotations

import json

import numpy as np
import pytest

from nprune import nets
from nprune.kernels import ThresholdsError, apply_kernel, calibrate, kernel_report, thresholds

from kernels_util import table


def test_lookup_feature_major_mode_falls_back_to_the_plain_mode():
    t = table({"Dense 50x30": {"small": {"eval": 0.1, "train": None, "train_f": 0.3}}})
    assert thresholds.lookup_threshold(t, "Dense 50x30", "small", "eval_f") == 0.1     # missing: eval's
    assert thresholds.lookup_threshold(t, "Dense 50x30", "small", "train_f") == 0.3
    t["thresholds"]["Dense 50x30"]["small"]["eval_f"] = None                       # present: never
    assert thresholds.lookup_threshold(t, "Dense 50x30", "small", "eval_f") is None


def test_feature_major_modes_validated_and_shown():
    thresholds.check_thresholds(table({"Dense 50x30": {"small": {"eval_f": 0.2}}}), "t")
    with pytest.raises(ThresholdsError, match="unknown mode 'eval_g'"):
        thresholds.check_thresholds(table({"Dense 50x30": {"small": {"eval_g": 0.2}}}), "t")
    txt = thresholds.format_thresholds(table({"Dense 50x30": {"small": {"eval": 0.1, "eval_f": 0.2}},
                                          "Dense 9x9": {"small": {"eval": 0.1}}}))
    assert txt.count("feature-major input") == 1 and "-/-/0.2" in txt


def test_shipped_table_is_valid_and_covers_the_nets():
    t = thresholds.SHIPPED_THRESHOLDS
    assert thresholds.check_thresholds(t, "shipped") is t and t["source"] == "shipped"
    keys = {s["key"] for s in calibrate.calibration_layers()}
    assert keys <= set(t["thresholds"])
    want = {s["key"]: set(calibrate._cal_modes(s)) for s in calibrate.calibration_layers()}
    assert set(t["thresholds_by_threads"]) == {"2"}
    for entries in (t["thresholds"], t["thresholds_by_threads"]["2"]):
        assert set(entries) == set(t["thresholds"])
        for shape, classes in entries.items():
            assert set(classes) == set(thresholds.BATCH_CLASSES)
            assert all(set(m) == want[shape] for m in classes.values()), shape
    assert "machine" in t and "command" in t
    assert thresholds.active_thresholds() is t                  # no user file (fixture)


def test_thresholds_by_thread_count(monkeypatch):
    # the table of the largest thread count not above the process's; below every key: thresholds
    t = table({"Dense 50x30": {"small": {"eval": 0.1}}})
    t["thresholds_by_threads"] = {"2": {"Dense 50x30": {"small": {"eval": 0.02}}},
                                  "4": {"Dense 50x30": {"small": {"eval": None}}}}
    t = thresholds.check_thresholds(t, "t")
    got = {n: thresholds.entries(t, n)["Dense 50x30"]["small"]["eval"] for n in (1, 2, 3, 4, 8)}
    assert got == {1: 0.1, 2: 0.02, 3: 0.02, 4: None, 8: None}
    for var, n, want in (("OPENBLAS_NUM_THREADS", "1", 0.1), ("OMP_NUM_THREADS", "2", 0.02)):
        monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setenv(var, n)
        assert thresholds.blas_threads() == int(n)
        assert thresholds.lookup_threshold(t, "Dense 50x30", "small", "eval") == want
    txt = thresholds.format_thresholds(t)
    assert "1 BLAS thread:" in txt and "2 BLAS threads or more:" in txt and "4 BLAS threads" in txt
    # auto follows the thread count's table
    model = nets.build("lenet300", np.random.default_rng(0))
    model.set_masks({"fc1.W": np.random.default_rng(0).random((784, 300)) < 0.05})
    t2 = table({"Dense 784x300": {"small": {"eval": 0.1}}})
    t2["thresholds_by_threads"] = {"2": {"Dense 784x300": {"small": {"eval": None}}}}
    for n, use in (("1", True), ("2", False)):
        monkeypatch.setenv("OMP_NUM_THREADS", n)
        apply_kernel(model, "auto", thresholds=t2)
        model.forward(np.zeros((8, 1, 28, 28), np.float32), train=False)
        assert kernel_report(model)[0]["use_kernel"] == use


@pytest.mark.parametrize("by", [[], {"x": {}}, {"0": {}}, {"2": []},
                                {"2": {"Dense 784x300": {"huge": {}}}}])
def test_malformed_thresholds_by_threads(by):
    t = table({})
    t["thresholds_by_threads"] = by
    with pytest.raises(ThresholdsError, match="thresholds_by_threads|unknown batch class"):
        thresholds.check_thresholds(t, "t")


BAD_FILES = [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"format": "other", "thresholds": {}}', "'format' must be"),
    (json.dumps({"format": "nprune-kernel-thresholds/1", "thresholds": []}), "'thresholds' must be"),
    (json.dumps({"format": "nprune-kernel-thresholds/1",
                 "thresholds": {"Dense 784x300": {"huge": {}}}}), "unknown batch class 'huge'"),
    (json.dumps({"format": "nprune-kernel-thresholds/1",
                 "thresholds": {"Dense 784x300": {"small": {"train": 1.5}}}}), "density in [0, 1]"),
    (json.dumps({"format": "nprune-kernel-thresholds/1",
                 "thresholds": {"Dense 784x300": {"small": {"fast": 0.1}}}}), "unknown mode 'fast'"),
]


@pytest.mark.parametrize("text, needle", BAD_FILES)
def test_malformed_user_file_is_a_one_line_error(tmp_path, text, needle, capsys):
    path = tmp_path / "xdg-cache" / "nprune" / "kernel_thresholds.json"
    path.parent.mkdir(parents=True)
    path.write_text(text)
    with pytest.raises(ThresholdsError) as e:
        thresholds.active_thresholds()
    msg = str(e.value)
    assert str(path) in msg and needle in msg and "\n" not in msg
    with pytest.raises(ThresholdsError):
        apply_kernel(nets.build("lenet300", np.random.default_rng(0)), "auto")
    apply_kernel(nets.build("lenet300", np.random.default_rng(0)), "dense")   # dense never reads it
    assert calibrate.main(["show"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nprune: error: kernel thresholds file")
    assert str(path) in err and "Traceback" not in err


def test_a_table_is_checked_once_where_it_enters(monkeypatch, tmp_path):
    # load_thresholds and a dict handed to apply_kernel are checked; a checked table (Thresholds)
    # goes through apply_kernel and the layers' AutoKernels without another check
    calls = []
    check = thresholds.check_thresholds
    monkeypatch.setattr(thresholds, "check_thresholds", lambda obj, where: calls.append(where)
                        or check(obj, where))
    model = nets.build("lenet300", np.random.default_rng(0))
    apply_kernel(model, "auto", thresholds=table({"Dense 784x300": {"small": {"eval": 0.1}}}))
    assert calls == ["test"]
    path = tmp_path / "t.json"
    path.write_text(json.dumps(table({"Dense 784x300": {"small": {"eval": 0.1}}})))
    t = thresholds.load_thresholds(path)
    assert isinstance(t, thresholds.Thresholds) and calls == ["test", str(path)]
    apply_kernel(model, "auto", thresholds=t)
    apply_kernel(model, "auto")                            # the shipped table, checked at import
    assert calls == ["test", str(path)]
    with pytest.raises(ThresholdsError, match="'format' must be"):
        apply_kernel(model, "auto", thresholds={"thresholds": {}})


def test_user_thresholds_path_follows_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert thresholds.user_thresholds_path() == tmp_path / "nprune" / "kernel_thresholds.json"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert thresholds.user_thresholds_path().parent.parent.name == ".cache"
