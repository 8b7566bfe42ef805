"""The public API (nprune/api.py, exported by nprune/__init__.py), and the README's example run as
written."""
from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest

import nprune
from conftest import ROOT, real_mnist, synthetic_splits


def test_public_names_are_the_functions_not_modules():
    for name in ("build", "train", "prune", "rewind", "density", "load_data", "recipe", "imp"):
        assert callable(getattr(nprune, name)), name
        assert getattr(nprune, name).__doc__, name
    assert nprune.IMP and nprune.Recipe and nprune.Sequential


def test_build_train_prune_rewind_on_synthetic_data():
    data = synthetic_splits()
    net = nprune.build("lenet300", seed=0)
    init = net.get_weights()
    first = nprune.train(net, data, iterations=60, eval_every=20, batch_size=30)
    assert first.iterations == [20, 40, 60] and first.early_stop_iter in (20, 40, 60)
    masks = nprune.prune(net, {"fc1": 0.5, "fc2.W": 0.5, "fc3": 0.2})
    assert set(masks) == {"fc1.W", "fc2.W", "fc3.W"}
    assert masks["fc1.W"].sum() == 784 * 300 // 2 and masks["fc3.W"].sum() == 1000 - 200
    assert nprune.density(net) == pytest.approx((117600 + 15000 + 800) / 266200)
    nprune.rewind(net, init)
    w = net.get_weights()
    for name, m in masks.items():
        assert np.all(w[name][~m] == 0)                       # pruned: exactly zero
        assert np.array_equal(w[name][m], init[name][m])      # survivors: their initial values
    nprune.train(net, data, iterations=40, eval_every=20, batch_size=30)
    w = net.get_weights()
    assert all(np.all(w[n][~m] == 0) for n, m in masks.items())   # still zero after training
    again = nprune.prune(net, 0.5)                             # masks nest: only survivors go
    assert all(np.all(again[n] <= masks[n]) for n in masks)
    assert again["fc3.W"].sum() == 800 - 400


def test_unknown_names_are_errors_listing_the_valid_ones():
    net = nprune.build("lenet300", seed=0)
    with pytest.raises(ValueError, match=r"'conv1'.*fc1, fc2, fc3.*fc1\.W"):
        nprune.prune(net, {"conv1": 0.5})
    with pytest.raises(ValueError, match="fc1.b"):
        net.set_masks({"fc1.b": None})
    with pytest.raises(TypeError, match="unknown training setting.*lrr"):
        nprune.train(net, synthetic_splits(), iterations=1, lrr=0.1)
    with pytest.raises(ValueError, match="unknown scope"):
        nprune.prune(net, 0.5, scope="everywhere")


def test_imp_in_memory_equals_imp_on_disk(tmp_path):
    data = synthetic_splits()
    recipe = nprune.recipe("lenet300", iterations=40, eval_every=20, n_val=200)
    mem = nprune.imp(recipe, data).run(seeds=[0], strategies=["rewind", "reinit"], rounds=2)
    disk_imp = nprune.imp(recipe, data, run_dir=tmp_path / "run")
    disk = disk_imp.run(seeds=[0], strategies=["rewind", "reinit"], rounds=2)
    assert [(r["strategy"], r["round"]) for r in mem] == \
        [("dense", 0), ("rewind", 1), ("rewind", 2), ("reinit", 1), ("reinit", 2)]
    assert json.dumps(mem) == json.dumps(disk)
    assert not any(Path(".").glob("seed_*"))                  # nothing written in memory mode
    settings = json.loads((tmp_path / "run" / "settings.json").read_text())
    assert settings["recipe"] == recipe.to_dict()
    assert settings["last_plan"]["strategies"] == ["rewind", "reinit"]
    # a second run resumes: nothing is retrained, the same rows come back
    assert disk_imp.run(seeds=[0], strategies=["rewind", "reinit"], rounds=2) == disk


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_readme_api_example_runs(monkeypatch):
    """The README's example, as written, on the real MNIST (found as the tool finds it)."""
    monkeypatch.setenv("NPRUNE_DATA_DIR", str(real_mnist()))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(_readme_example(), "README.md", "exec"), {})
    lines = out.getvalue().splitlines()
    m = re.match(r"(\d+\.\d)% of weights left: test accuracy (\d+\.\d\d)% at the early stop", lines[0])
    assert m and float(m.group(1)) == pytest.approx(50.1, abs=0.05) and float(m.group(2)) > 90
    assert [line.split()[:2] for line in lines[1:]] == \
        [["dense", "0"], ["rewind", "1"], ["rewind", "2"], ["reinit", "1"], ["reinit", "2"]]


def test_prune_names_are_checked_and_global_scope_stays_within_the_named_tensors():
    net = nprune.build("lenet300", seed=0)
    with pytest.raises(ValueError, match="two rates for fc1.W"):
        nprune.prune(net, {"fc1": 0.5, "fc1.W": 0.1})
    with pytest.raises(ValueError, match="two masks for fc1.W"):
        net.set_masks({"fc1": None, "fc1.W": None})
    masks = nprune.prune(net, {"fc1": 0.5}, scope="global")
    assert masks["fc1.W"].sum() == 784 * 300 // 2
    assert masks["fc2.W"].all() and masks["fc3.W"].all()          # not named: untouched
    assert nprune.prune(net, np.float32(0.5))["fc3.W"].sum() == 500


def test_imp_run_refuses_a_folder_of_another_recipe(tmp_path):
    data = synthetic_splits()
    r1 = nprune.recipe("lenet300", iterations=20, eval_every=10, n_val=200)
    nprune.imp(r1, data, run_dir=tmp_path).run(seeds=[0], rounds=1)
    r2 = nprune.recipe("lenet300", iterations=30, eval_every=10, n_val=200)
    with pytest.raises(ValueError, match="another recipe"):
        nprune.imp(r2, data, run_dir=tmp_path).run(seeds=[0], rounds=1)
    with pytest.raises(ValueError, match="needs data"):
        nprune.IMP(r1).run()
