"""Training loop and whole-network checks: batches without replacement, determinism, early-stop
metric, the test set evaluated only where it is read, divergence, and a float64 gradient check of a
whole masked network."""
import dataclasses

import numpy as np
import pytest

from nprune import nets
from nprune.gradcheck import rel_error
from nprune.losses import softmax_cross_entropy
from nprune.training import (DIVERGE_FACTOR, GRAD_FLUSH_BELOW, DivergenceError, TrainConfig, batches,
                             train, train_step)


def test_batches_are_epoch_permutations():
    rng = np.random.default_rng(0)
    got = list(batches(100, 10, 25, rng))
    assert len(got) == 25 and all(len(b) == 10 for b in got)
    for e in range(2):   # each full epoch covers every example exactly once
        epoch = np.concatenate(got[e * 10:(e + 1) * 10])
        assert sorted(epoch.tolist()) == list(range(100))
    # partial last batch dropped: 105 examples, batch 10 -> 10 batches per epoch
    got = list(batches(105, 10, 10, np.random.default_rng(0)))
    assert len(set(np.concatenate(got).tolist())) == 100


def test_batches_reject_batch_larger_than_data():
    with pytest.raises(ValueError):
        next(batches(5, 10, 1, np.random.default_rng(0)))


CFG = TrainConfig(optimizer="adam", lr=2e-3, batch_size=32, iterations=120, eval_every=20)


@pytest.mark.parametrize("net", ["lenet300", "lenet5"])
def test_same_seed_twice_is_identical(net, synth):
    cfg = dataclasses.replace(CFG, iterations=40 if net == "lenet5" else 120)
    outs = []
    for _ in range(2):
        model = nets.build(net, np.random.default_rng(3))
        res, _ = train(model, synth, cfg, np.random.default_rng(4))
        outs.append((model.get_weights(), res.to_dict()))
    (w1, r1), (w2, r2) = outs
    for k in w1:
        assert np.array_equal(w1[k], w2[k]), k
    r1.pop("seconds"), r2.pop("seconds")
    assert r1 == r2


def test_learns_and_records_curves(synth):
    model = nets.build("lenet300", np.random.default_rng(0))
    cfg = dataclasses.replace(CFG, test_every=CFG.eval_every)
    res, snaps = train(model, synth, cfg, np.random.default_rng(1), snapshot_at=[0, 40])
    assert res.iterations == [20, 40, 60, 80, 100, 120]
    for k in ("train_loss", "val_loss", "val_acc", "test_loss", "test_acc"):
        assert len(getattr(res, k)) == 6
    assert res.final_test_acc > 0.9          # the synthetic task is easy
    # the early-stop iteration is the one of minimum validation loss, and the accuracy reported is
    # the test accuracy measured there
    i = int(np.argmin(res.val_loss))
    assert res.early_stop_iter == res.iterations[i]
    assert res.early_stop_test_acc == res.test_acc[i]
    assert set(snaps) == {0, 40}
    assert not np.array_equal(snaps[0]["fc1.W"], snaps[40]["fc1.W"])


def test_float32_end_to_end(synth):
    model = nets.build("lenet300", np.random.default_rng(0))
    train(model, synth, dataclasses.replace(CFG, iterations=5), np.random.default_rng(1))
    for name, p in model.params().items():
        assert p.dtype == np.float32, name
    for name, g in model.grads().items():
        assert g.dtype == np.float32, name
    assert model.forward(synth.x_test[:4], train=False).dtype == np.float32


def _masked_lenet300(seed=0, density=0.4):
    rng = np.random.default_rng(seed)
    model = nets.build("lenet300", rng)
    model.set_masks({n: rng.random(model.params()[n].shape) < density for n in model.prunable()})
    return model


def _run(cfg, data, seed=0):
    model = _masked_lenet300(seed)
    res, _ = train(model, data, cfg, np.random.default_rng(seed + 1))
    return model, res


def _noisy_labels(data, fraction=0.4):
    """``data`` with a ``fraction`` of its training labels redrawn: training overfits, and the
    validation loss has its minimum before the last evaluation."""
    rng = np.random.default_rng(0)
    y = data.y_train.copy()
    k = rng.random(len(y)) < fraction
    y[k] = rng.integers(0, 10, k.sum())
    return dataclasses.replace(data, y_train=y)


@pytest.mark.parametrize("lr", [2e-3, 1e-2])
def test_test_set_only_where_read_gives_the_same_results(synth, lr):
    """test_every=0 evaluates the test set on the kept early-stop weights and on the final ones;
    test_every=eval_every evaluates it at every evaluation: the same bits everywhere they meet."""
    data = _noisy_labels(synth)
    base = dataclasses.replace(CFG, lr=lr, iterations=400, eval_every=20)
    m0, r0 = _run(base, data)
    m1, r1 = _run(dataclasses.replace(base, test_every=20), data)
    assert r0.early_stop_iter < 400           # the kept copy is what is tested at early stop
    for k in m0.params():
        assert np.array_equal(m0.params()[k], m1.params()[k]), k
    for k in ("iterations", "train_loss", "val_loss", "val_acc"):
        assert getattr(r0, k) == getattr(r1, k), k
    for k in ("early_stop_iter", "early_stop_val_loss", "early_stop_val_acc", "early_stop_test_acc",
              "final_test_acc", "final_val_acc"):
        assert getattr(r0, k) == getattr(r1, k), k
    i = r1.iterations.index(r1.early_stop_iter)
    assert r1.early_stop_test_acc == r1.test_acc[i]
    # sparse curve: None (JSON null) except at the final evaluation
    assert all(v is None for v in r0.test_acc[:-1] + r0.test_loss[:-1])
    assert r0.test_acc[-1] == r1.test_acc[-1] and r0.test_loss[-1] == r1.test_loss[-1]
    assert np.all(np.isfinite(r1.test_acc))


def test_early_stop_before_the_end_is_tested_on_its_own_weights(synth, monkeypatch):
    """An early stop before the last evaluation: its test accuracy is that of the weights of then."""
    import nprune.training as training
    vals = iter([0.5, 0.2, 0.3, 0.4, 0.6])     # minimum at the second evaluation (iteration 40)
    calls = []
    real = training.evaluate

    def fake(model, x, y, batch):
        loss, acc = real(model, x, y, batch)
        if y is synth.y_val:
            return next(vals), acc
        calls.append(model.get_weights())
        return loss, acc
    monkeypatch.setattr(training, "evaluate", fake)
    cfg = dataclasses.replace(CFG, iterations=100, eval_every=20)
    model = _masked_lenet300()
    res, snaps = train(model, synth, cfg, np.random.default_rng(1), snapshot_at=[40, 100])
    assert res.early_stop_iter == 40
    assert len(calls) == 2                     # the test set: the final weights, then iteration 40's
    for k in snaps[40]:
        assert np.array_equal(calls[0][k], snaps[100][k]), k
        assert np.array_equal(calls[1][k], snaps[40][k]), k
        assert np.array_equal(model.params()[k], snaps[100][k]), k   # the final weights put back
    monkeypatch.setattr(training, "evaluate", real)
    assert res.early_stop_test_acc == real(_with(snaps[40]), synth.x_test, synth.y_test, cfg.eval_batch)[1]


def _with(weights):
    model = _masked_lenet300()
    model.set_weights(weights)
    return model


def test_test_every_must_be_a_multiple_of_eval_every(synth):
    with pytest.raises(ValueError, match="multiple"):
        train(_masked_lenet300(), synth, dataclasses.replace(CFG, test_every=30), np.random.default_rng(0))


def test_divergence_non_finite_loss(synth):
    model = nets.build("lenet300", np.random.default_rng(0))
    cfg = TrainConfig(optimizer="sgd", lr=1e6, momentum=0.9, batch_size=32, iterations=200, eval_every=50)
    with pytest.raises(DivergenceError) as e, np.errstate(all="ignore"):
        train(model, synth, cfg, np.random.default_rng(0))
    assert "diverged" in str(e.value) and "non-finite" in str(e.value) and e.value.rule == "non-finite"


def test_divergence_loss_growth_adam_huge_lr(synth):
    """Adam at lr 1e6 on LeNet-300-100 drives the loss to ~1e20 without overflowing: the mean loss
    of the first evaluation period is far above DIVERGE_FACTOR x the first step's."""
    model = nets.build("lenet300", np.random.default_rng(0))
    cfg = TrainConfig(optimizer="adam", lr=1e6, batch_size=60, iterations=400, eval_every=100)
    with pytest.raises(DivergenceError) as e, np.errstate(all="ignore"):
        train(model, synth, cfg, np.random.default_rng(0))
    assert e.value.rule == "growth" and "mean training loss" in str(e.value)
    assert e.value.iteration == 100 and e.value.loss > DIVERGE_FACTOR * 2.3


def test_normal_run_is_not_diverged(synth):
    model = nets.build("lenet300", np.random.default_rng(0))
    res, _ = train(model, synth, dataclasses.replace(CFG, lr=1.2e-3, iterations=300, eval_every=50),
                   np.random.default_rng(0))
    assert res.iterations[-1] == 300 and res.final_test_acc > 0.9


@pytest.mark.parametrize("net", ["lenet300", "lenet5"])
def test_whole_masked_network_gradient(net):
    """Central differences (float64) on a random sample of entries of every parameter of a whole
    masked network, against backprop; pruned entries must have exactly zero gradient."""
    rng = np.random.default_rng(7)
    model = nets.build(net, rng, dtype=np.float64)
    masks = {n: rng.random(model.params()[n].shape) < 0.5 for n in model.prunable()}
    model.set_masks(masks)
    for p in model.params().values():      # non-zero biases so every path is exercised
        if p.ndim == 1:
            p[...] = rng.standard_normal(p.shape) * 0.1
    x = rng.random((3, 1, 28, 28))
    y = np.array([1, 5, 9])

    def loss():
        return softmax_cross_entropy(model.forward(x, train=False), y)[0]

    model.loss_and_grads(x, y)
    grads = {k: v.copy() for k, v in model.grads().items()}
    h = 1e-5
    l0 = loss()
    for name, p in model.params().items():
        flat = p.reshape(-1)
        m = masks.get(name)
        live = np.flatnonzero(m.reshape(-1)) if m is not None else np.arange(flat.size)
        idx, num = [], []
        for i in rng.permutation(live):
            old = flat[i]
            flat[i] = old + h
            lp = loss()
            flat[i] = old - h
            lm = loss()
            flat[i] = old
            # max-pool is piecewise linear: skip an entry whose +-h step crosses a kink (the two
            # one-sided slopes disagree); everywhere else the central difference is exact to O(h^2)
            if abs((lp - l0) - (l0 - lm)) > 1e-3 * (abs(lp - l0) + abs(l0 - lm)) + 1e-12:
                continue
            idx.append(i)
            num.append((lp - lm) / (2 * h))
            if len(idx) == 12:
                break
        idx, num = np.array(idx), np.array(num)
        assert len(idx) >= min(6, live.size), name
        assert rel_error(grads[name].reshape(-1)[idx], num) < 1e-7, name
        if m is not None:
            assert np.all(grads[name][~m] == 0.0)


def test_train_step_flushes_subnormal_logit_gradients():
    """A memorised batch makes softmax put ~1e-39 on the wrong classes; dL/dlogits entries below
    GRAD_FLUSH_BELOW (1e-30) reach backward as exact zeros (float32 subnormals are ~100x slower);
    every other entry is untouched."""
    rng = np.random.default_rng(6)
    m = nets.build("lenet300", rng)
    x = rng.random((8, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, 8)
    seen = []
    inner = m.backward
    m.backward = lambda d: seen.append(d.copy()) or inner(d)
    logits0 = m.forward(x, train=False)
    m.layers[-1].params["W"] *= 60.0 / np.abs(logits0).max()    # logits ~100 apart
    m.layers[-1].params["b"][:] = 0
    _, ref = softmax_cross_entropy(m.forward(x, train=False), y)
    tiny = (ref != 0) & (np.abs(ref) < GRAD_FLUSH_BELOW)
    assert tiny.any()                                 # the batch does produce such entries
    train_step(m, x, y)
    d = seen[-1]
    assert np.all(d[tiny] == 0) and np.array_equal(d[~tiny], ref[~tiny])
    assert not np.any((d != 0) & (np.abs(d) < GRAD_FLUSH_BELOW))
    m.loss_and_grads(x, y)                            # the plain gradient: no flush
    np.testing.assert_array_equal(seen[-1], ref)


def test_sparse_test_curve_in_curves_csv_progress_and_plot():
    """Where the test set was not evaluated: an empty curves.csv cell, no test figure in the
    progress line, no point in the curves plot."""
    import io
    import matplotlib
    matplotlib.use("Agg")
    from nprune.experiment.plots import RunInfo, draw_curves
    from nprune.experiment.progress import Progress
    from nprune.experiment.report import SPARSE_CURVE_COLUMNS, curves_csv
    m = {"seed": 0, "strategy": "dense", "round": 0, "percent_left": 100.0, "diverged": False,
         "weights": {"total": {"left": 10, "percent": 100.0}},
         "curves": {"iterations": [10, 20], "train_loss": [1.0, 0.5], "val_loss": [0.9, 0.4],
                    "val_acc": [0.7, 0.8], "test_loss": [None, 0.45], "test_acc": [None, 0.81]}}
    rows = curves_csv([m]).splitlines()
    head = rows[0].split(",")
    assert set(SPARSE_CURVE_COLUMNS) <= set(head)
    first, last = rows[1].split(","), rows[2].split(",")
    for col in SPARSE_CURVE_COLUMNS:
        assert first[head.index(col)] == "" and last[head.index(col)] != ""
    out = io.StringIO()
    p = Progress("lenet300", stream=out, every=0)
    p("eval", seed=0, strategy="dense", round=0, iteration=10, total=20, val_acc=0.7, test_acc=None)
    p("eval", seed=0, strategy="dense", round=0, iteration=20, total=20, val_acc=0.8, test_acc=0.81)
    lines = out.getvalue().splitlines()
    assert "test" not in lines[0] and "test 81.00%" in lines[1]
    fig = draw_curves([m], RunInfo([m]))
    (line,) = fig.axes[0].get_lines()
    assert list(line.get_xdata()) == [20]
