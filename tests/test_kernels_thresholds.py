"""nprune.kernels.thresholds: the table format, its checks, the shipped table, the user file."""
from __future__ import annotations

import json

import numpy as np
import pytest

from nprune import nets
from nprune.kernels import ThresholdsError, apply_kernel, calibrate, thresholds

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
    inner = {s["key"] for s in calibrate.calibration_layers() if calibrate._cal_modes(s) == thresholds.ALL_MODES}
    for shape, classes in t["thresholds"].items():
        assert set(classes) == set(thresholds.BATCH_CLASSES)
        want = thresholds.ALL_MODES if shape in inner else thresholds.AUTO_MODES
        assert all(set(m) == set(want) for m in classes.values()), shape
    assert "machine" in t and "command" in t
    assert thresholds.active_thresholds() is t                  # no user file (fixture)


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
