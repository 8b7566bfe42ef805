"""IMP and the reset strategies: rewind restores bit-identical initial values, reinit draws fresh
values from the same distribution, rewind-to-K and finetune, nesting, exact counts, pruned weights
stay zero, resume gives identical files, divergence is recorded without corrupting results."""
import filecmp
from pathlib import Path

import numpy as np
import pytest

from nprune.data.fsutil import load_json, load_npz
from nprune.experiment.config import Recipe
from nprune.experiment.imp import IMP
from nprune.experiment.strategies import (STRATEGIES, Strategy, check_strategy, find_strategy,
                                          strategy_color, strategy_order)
from nprune.experiment.report import write_report
from nprune.pruning import n_to_prune

RECIPE = Recipe.from_dict(dict(net="lenet300", iterations=30, eval_every=10, batch_size=32, lr=2e-3,
                              rates=(("fc1", 0.5), ("fc2", 0.5), ("fc3", 0.25))))


def _run(tmp_path, synth, strategies=("rewind", "reinit"), rounds=2, recipe=RECIPE, sub="run"):
    imp = IMP(recipe, tmp_path / sub, synth)
    for s in strategies:
        imp.run_strategy(0, s, rounds)
    return imp


def test_strategy_names():
    for s in ("rewind", "reinit", "finetune", "rewind-to-0", "rewind-to-500"):
        assert check_strategy(s) == s
    for s in ("rewinds", "rewind-to-", "rewind-to--3", ""):
        with pytest.raises(ValueError):
            check_strategy(s)


def test_rewind_reinit_masks_counts_and_zeros(tmp_path, synth):
    imp = _run(tmp_path, synth)
    init = load_npz(imp.seed_dir(0) / "init.npz")
    prev = {s: load_npz(imp.round_dir(0, "dense", 0) / "masks.npz") for s in ("rewind", "reinit")}
    for r in (1, 2):
        for s in ("rewind", "reinit"):
            d = imp.round_dir(0, s, r)
            masks, start, final = (load_npz(d / f) for f in ("masks.npz", "start.npz", "final.npz"))
            for name, m in masks.items():
                before = prev[s][name]
                assert not np.any(m & ~before)                               # nesting
                rate = dict(RECIPE.prune.rates)[name.split(".")[0]]
                assert before.sum() - m.sum() == n_to_prune(rate, before.sum())  # exact count
                assert np.all(start[name][~m] == 0) and np.all(final[name][~m] == 0)
                if s == "rewind":   # survivors start bit-identical to the original initialisation
                    assert np.array_equal(start[name][m], init[name][m])
                else:               # fresh values, same distribution
                    assert not np.any(start[name][m] == init[name][m])
                    a, b = start[name][m], init[name].ravel()
                    assert abs(a.std() / b.std() - 1) < 0.1
            for name in ("fc1.b", "fc2.b", "fc3.b"):
                assert np.array_equal(start[name], init[name])  # zero-initialised biases
            prev[s] = masks
    # reinit draws are new every round
    s1 = load_npz(imp.round_dir(0, "reinit", 1) / "start.npz")["fc1.W"]
    s2 = load_npz(imp.round_dir(0, "reinit", 2) / "start.npz")["fc1.W"]
    m2 = load_npz(imp.round_dir(0, "reinit", 2) / "masks.npz")["fc1.W"]
    assert not np.array_equal(s1[m2], s2[m2])
    # both strategies see the same masks in round 1 (pruned from the same dense run)
    for name in init:
        if name.endswith(".W"):
            a = load_npz(imp.round_dir(0, "rewind", 1) / "masks.npz")[name]
            b = load_npz(imp.round_dir(0, "reinit", 1) / "masks.npz")[name]
            assert np.array_equal(a, b)


def test_rewind_to_k_and_finetune(tmp_path, synth):
    imp = _run(tmp_path, synth, strategies=("rewind-to-10", "finetune"), rounds=1)
    snap = load_npz(imp.seed_dir(0) / "dense" / "rewind_10.npz")
    init = load_npz(imp.seed_dir(0) / "init.npz")
    d = imp.round_dir(0, "rewind-to-10", 1)
    masks, start = load_npz(d / "masks.npz"), load_npz(d / "start.npz")
    for name, m in masks.items():
        assert np.array_equal(start[name][m], snap[name][m])
        assert not np.array_equal(snap[name], init[name])
    d = imp.round_dir(0, "finetune", 1)
    masks, start = load_npz(d / "masks.npz"), load_npz(d / "start.npz")
    dense_final = load_npz(imp.round_dir(0, "dense", 0) / "final.npz")
    for name, m in masks.items():
        assert np.array_equal(start[name][m], dense_final[name][m])
    assert load_json(d / "metrics.json")["lr"] == pytest.approx(RECIPE.train.lr * RECIPE.finetune_lr_factor)


def _tree(root: Path) -> dict:
    return {p.relative_to(root): p for p in sorted(root.rglob("*")) if p.is_file()
            and p.name != "timing.json"}


def test_resume_after_interruption_gives_identical_files(tmp_path, synth):
    _run(tmp_path, synth, rounds=3, sub="full")
    # interrupted: stop in the middle of round 2 of reinit, then run again
    def boom(event, **k):
        if event == "eval" and k["strategy"] == "reinit" and k["round"] == 2:
            raise KeyboardInterrupt

    imp = IMP(RECIPE, tmp_path / "part", synth, progress=boom)
    with pytest.raises(KeyboardInterrupt):
        for s in ("rewind", "reinit"):
            imp.run_strategy(0, s, 3)
    assert not (imp.round_dir(0, "reinit", 2) / "metrics.json").exists()
    # a killed writer can leave a temporary file behind; it must not matter
    (imp.round_dir(0, "reinit", 2) / ".final.npz.xyz.tmp").write_bytes(b"junk")
    imp2 = IMP(RECIPE, tmp_path / "part", synth)
    for s in ("rewind", "reinit"):
        imp2.run_strategy(0, s, 3)
    a, b = _tree(tmp_path / "full"), _tree(tmp_path / "part")
    b = {k: v for k, v in b.items() if not k.name.endswith(".tmp")}
    assert a.keys() == b.keys()
    for k in a:
        assert filecmp.cmp(a[k], b[k], shallow=False), k


def test_rerun_skips_finished_rounds(tmp_path, synth):
    _run(tmp_path, synth, rounds=1)
    events = []
    imp = IMP(RECIPE, tmp_path / "run", synth, progress=lambda e, **k: events.append(e))
    imp.run_strategy(0, "rewind", 2)
    assert events.count("start") == 1      # only round 2 trained


def test_divergence_recorded_and_later_rounds_skipped(tmp_path, synth):
    recipe = RECIPE.replace(optimizer="sgd", lr=1e6, momentum=0.9)
    imp = IMP(recipe, tmp_path / "div", synth)
    rows = imp.run_strategy(0, "rewind", 3)
    assert rows[0]["diverged"] and len(rows) == 1
    assert not (imp.round_dir(0, "dense", 0) / "final.npz").exists()
    write_report(tmp_path / "div")   # the report copes with a diverged round
    assert "diverged" in (tmp_path / "div" / "summary.md").read_text()


def test_global_and_random_scopes(tmp_path, synth):
    for scope in ("global", "random"):
        recipe = RECIPE.replace(scope=scope)
        imp = _run(tmp_path, synth, strategies=("rewind",), rounds=1, recipe=recipe, sub=scope)
        m = load_json(imp.round_dir(0, "rewind", 1) / "metrics.json")
        lw = load_json(_run(tmp_path, synth, ("rewind",), 1, RECIPE, "layer").round_dir(
            0, "rewind", 1) / "metrics.json")
        assert m["weights"]["total"]["left"] == lw["weights"]["total"]["left"]
        if scope == "random":
            assert m["weights"]["fc1.W"]["left"] == lw["weights"]["fc1.W"]["left"]


def test_strategy_order_and_colors_come_from_the_registry():
    names = ["rewind-to-500", "finetune", "reinit", "rewind-to-100", "rewind", "mystery"]
    assert sorted(names, key=strategy_order) == ["rewind", "reinit", "finetune", "rewind-to-100",
                                                 "rewind-to-500", "mystery"]
    assert find_strategy("rewind-to-500") == (STRATEGIES["rewind-to-K"], (500,))
    assert strategy_color("rewind", 5) == "tab:blue" and strategy_color("rewind-to-100", 1) == "C4"
    assert strategy_color("mystery", 0) == "C3"


def test_a_new_strategy_is_one_registry_entry(tmp_path, synth, monkeypatch):
    zero = Strategy("zero", "all zeros (a strawman)",
                    lambda imp, seed, r, prev: ({k: np.zeros_like(v) for k, v in prev.items()}, 0.5),
                    order=6, color="tab:red")
    monkeypatch.setitem(STRATEGIES, "zero", zero)
    assert check_strategy("zero") == "zero" and strategy_color("zero", 0) == "tab:red"
    imp = _run(tmp_path, synth, strategies=("zero",), rounds=1)
    d = imp.round_dir(0, "zero", 1)
    assert all(not v.any() for v in load_npz(d / "start.npz").values())
    assert load_json(d / "metrics.json")["lr"] == pytest.approx(RECIPE.train.lr * 0.5)
    assert sorted(["zero", "rewind-to-9", "rewind"], key=strategy_order) == ["rewind", "rewind-to-9", "zero"]


def test_ticket_controls_take_the_rewind_chains_masks(tmp_path, synth):
    """ticket-reinit trains the rewind chain's mask of each round from a fresh draw (reinit's);
    ticket-random-mask keeps the ticket's count per layer at random positions, from W0. Run alone,
    they compute the rewind rounds they need first."""
    imp = IMP(RECIPE, tmp_path / "t", synth)
    imp.run_strategy(0, "ticket-reinit", 2)
    imp.run_strategy(0, "ticket-random-mask", 2)
    imp.run_strategy(0, "reinit", 1)
    init = load_npz(imp.seed_dir(0) / "init.npz")
    for r in (1, 2):
        rewind_masks = load_npz(imp.round_dir(0, "rewind", r) / "masks.npz")
        tr = imp.round_dir(0, "ticket-reinit", r)
        masks, start = load_npz(tr / "masks.npz"), load_npz(tr / "start.npz")
        rm = imp.round_dir(0, "ticket-random-mask", r)
        rmasks, rstart = load_npz(rm / "masks.npz"), load_npz(rm / "start.npz")
        for name, m in rewind_masks.items():
            assert np.array_equal(masks[name], m)                                    # the ticket's mask
            assert not np.array_equal(start[name][m], init[name][m])                 # a fresh draw
            assert rmasks[name].sum() == m.sum() and not np.array_equal(rmasks[name], m)   # counts only
            assert np.array_equal(rstart[name], init[name] * rmasks[name])           # from W0
    reinit_start = load_npz(imp.round_dir(0, "reinit", 1) / "start.npz")
    tr_start = load_npz(imp.round_dir(0, "ticket-reinit", 1) / "start.npz")
    assert np.array_equal(tr_start["fc1.b"], reinit_start["fc1.b"])   # the draw reinit makes
    m1 = load_npz(imp.round_dir(0, "ticket-random-mask", 1) / "masks.npz")["fc1.W"]
    m2 = load_npz(imp.round_dir(0, "ticket-random-mask", 2) / "masks.npz")["fc1.W"]
    assert (m2 & ~m1).any()   # drawn afresh each round, not nested


def test_ticket_controls_stop_where_the_rewind_chain_diverged(tmp_path, synth):
    imp = IMP(RECIPE, tmp_path / "d", synth)
    said = []
    imp.notice = said.append
    rewind = imp.run_strategy(0, "rewind", 1)
    # pretend the rewind chain diverged in round 1: its metrics say so (a digest-consistent edit)
    m = dict(rewind[1], diverged=True)
    imp._checked[imp.round_dir(0, "rewind", 1)] = (m, None)
    rows = imp.run_strategy(0, "ticket-reinit", 2)
    assert len(rows) == 1 and said == ["seed 0 ticket-reinit stops before round 1: the rewind chain "
                                       "diverged in round 1, so it has no ticket of round 1"]
