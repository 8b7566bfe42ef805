"""Training loop and whole-network checks: batches without replacement, determinism, early-stop
metric, divergence, and a float64 gradient check of a whole masked network."""
import dataclasses

import numpy as np
import pytest

from nprune import nets
from nprune.gradcheck import rel_error
from nprune.losses import softmax_cross_entropy
from nprune.training import GRAD_FLUSH_BELOW, DivergenceError, TrainConfig, batches, train, train_step


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
    res, snaps = train(model, synth, CFG, np.random.default_rng(1), snapshot_at=[0, 40])
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


def test_divergence_is_detected(synth):
    model = nets.build("lenet300", np.random.default_rng(0))
    cfg = TrainConfig(optimizer="sgd", lr=1e6, momentum=0.9, batch_size=32, iterations=200, eval_every=50)
    with pytest.raises(DivergenceError) as e, np.errstate(all="ignore"):
        train(model, synth, cfg, np.random.default_rng(0))
    assert "diverged" in str(e.value)


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
