"""nprune.kernels.dispatch: apply_kernel, auto following its thresholds table (no timing here),
kernel_report, and whole networks under each kernel choice."""
from __future__ import annotations

import numpy as np
import pytest

from nprune import nets
from nprune.kernels import (AutoKernel, ConvKernelSparse, DenseKernelSparse, apply_kernel,
                            kernel_report, make_kernel, thresholds)
from nprune.evaluate import evaluate, predict
from nprune.layers import Conv2D, Dense
from nprune.optim import SGD, Adam

from kernels_util import close, run_layer, table


def test_values_refresh_after_adam_step_and_mask_invariant():
    rng = np.random.default_rng(6)
    model = nets.build("lenet300", np.random.default_rng(0))
    masks = {n: rng.random(p.shape) < 0.1 for n, p in model.params().items() if n.endswith(".W")}
    model.set_masks(masks)
    apply_kernel(model, "sparse")
    opt = Adam(model, 1e-2)
    x = rng.random((16, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, 16)
    for _ in range(3):
        model.loss_and_grads(x, y)
        opt.step()
    for n, m in masks.items():
        assert np.all(model.params()[n][~m] == 0)
    # the kernels see the updated weights (values refreshed, structure kept)
    logits_sparse = np.array(model.forward(x, train=False))
    apply_kernel(model, "dense")
    close(logits_sparse, model.forward(x, train=False))


@pytest.mark.parametrize("net", ["lenet300", "lenet5"])
@pytest.mark.parametrize("d", [1.0, 0.2, 0.05, 0.01])
@pytest.mark.parametrize("choice", ["sparse", "auto"])
def test_whole_net_same_logits_and_grads(net, d, choice):
    rng = np.random.default_rng(8)
    model = nets.build(net, np.random.default_rng(0))
    masks = {}
    for n, p in model.params().items():
        if n.endswith(".W"):
            m = rng.random(p.shape) < d
            if p.ndim == 2:
                m[: p.shape[0] // 5] = False          # dead inputs, as MNIST's border pixels
            masks[n] = m
    model.set_masks(masks)
    x = rng.random((12, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, 12)
    apply_kernel(model, "dense")
    l0, z0 = model.loss_and_grads(x, y)
    g0 = {k: v.copy() for k, v in model.grads().items()}
    apply_kernel(model, choice)
    l1, z1 = model.loss_and_grads(x, y)
    close(np.asarray(z1), np.asarray(z0))
    assert abs(l1 - l0) < 1e-4 * max(1, abs(l0))
    for k, v in model.grads().items():
        close(v, g0[k])
    assert isinstance(kernel_report(model), list)


def test_apply_kernel_choices():
    model = nets.build("lenet5", np.random.default_rng(0))
    apply_kernel(model, "sparse")
    assert isinstance(model.layers[0].kernel, ConvKernelSparse)
    assert isinstance(model.layers[-1].kernel, DenseKernelSparse)
    apply_kernel(model, "dense")
    assert all(getattr(l, "kernel", None) is None for l in model.layers)
    with pytest.raises(ValueError):
        apply_kernel(model, "fast")


def test_auto_follows_the_table_cached_and_reset_on_mask_change():
    # auto uses the kernel iff the mask density <= the table's threshold for (shape, batch class,
    # mode); missing entries and null mean dense; decisions are cached and forgotten on mask change
    rng = np.random.default_rng(9)
    layer = Dense(784, 300, rng)
    t = table({"Dense 784x300": {"small": {"train_dx": 0.05, "eval": None},
                                 "1": {"eval": 0.05}}})
    layer.set_mask("W", rng.random((784, 300)) < 0.02)
    layer.kernel = k = AutoKernel(layer, thresholds=t)
    x = rng.random((60, 784)).astype(np.float32)
    dout = rng.standard_normal((60, 300)).astype(np.float32)
    y = np.array(layer.forward(x))
    layer.backward(dout)
    gw = layer.grads["W"].copy()
    d = k.decisions[("small", True, True)]
    assert d["use"] and d["threshold"] == 0.05 and d["shape"] == "Dense 784x300"
    assert d["mode"] == "train_dx" and abs(d["density"] - 0.02) < 0.002
    assert k.last_plan["use_kernel"] and isinstance(k.kernel._cache, tuple) and k.kernel._cache[0] == "sparse"
    layer.forward(x[:30])                                   # same class: cached
    assert len(k.decisions) == 1
    layer.forward(x, train=False)                           # small/eval: null -> dense
    assert not k.last_plan["use_kernel"]
    layer.forward(x[:1], train=False)                       # 1/eval: 0.05 -> kernel
    assert k.last_plan["use_kernel"]
    layer.forward(np.concatenate([x] * 5), train=False)     # large/eval: missing -> dense
    assert not k.last_plan["use_kernel"]
    layer.need_dx = False
    layer.forward(x)                                        # small/train (no dx): missing -> dense
    assert not k.last_plan["use_kernel"]
    assert {key: v["use"] for key, v in k.decisions.items()} == {
        ("small", True, True): True, ("small", False, True): False, ("1", False, True): True,
        ("large", False, True): False, ("small", True, False): False}
    layer.need_dx = True
    ref = run_layer(layer, x, dout, None)                        # the kernel's results = dense path's
    close(y, ref[0])
    close(gw, ref[2])
    layer.kernel = k
    assert not k.all_dense
    layer.set_mask("W", rng.random((784, 300)) < 0.5)       # above every threshold: plain dense
    assert k.decisions == {} and k.all_dense
    assert k.dense_modes == "all"                         # every call: the dense code, no lookup
    y = np.array(layer.forward(x))
    assert k.decisions == {} and k.kernel._cache is None   # the sparse kernel did not run
    layer.kernel = None
    np.testing.assert_array_equal(y, layer.forward(x))      # the very same code
    layer.kernel = k
    layer.set_mask("W", rng.random((784, 300)) < 0.01)      # below again: the lookup is back
    assert not k.all_dense and k.dense_modes is None
    layer.forward(x)
    assert k.decisions[("small", True, True)]["use"]


@pytest.mark.parametrize("dense_mode", ["eval", "train"])
def test_auto_sends_a_mode_without_thresholds_straight_to_dense(dense_mode):
    # no threshold reaches this density for one mode: that mode skips the lookup (plain dense
    # code); the other mode still follows the table
    rng = np.random.default_rng(19)
    layer = Dense(50, 30, rng)
    layer.set_mask("W", rng.random((50, 30)) < 0.05)
    modes = {"train": 0.1, "train_dx": 0.1} if dense_mode == "eval" else {"eval": 0.1}
    layer.kernel = k = AutoKernel(layer, thresholds=table(
        {"Dense 50x30": {"small": dict(modes, **{m: 0.01 for m in thresholds.AUTO_MODES if m not in modes})}}))
    assert k.dense_modes == dense_mode and not k.all_dense
    x = rng.standard_normal((7, 50)).astype(np.float32)
    dout = rng.standard_normal((7, 30)).astype(np.float32)
    y_eval = np.array(layer.forward(x, train=False))
    y, dx, gw, gb = run_layer(layer, x, dout, k)
    assert set(key[1] for key in k.decisions) == {dense_mode == "eval"}    # only the other mode
    assert k.decisions and all(v["use"] for v in k.decisions.values())
    ref = run_layer(layer, x, dout, None)
    if dense_mode == "train":
        for a, b in zip((y, dx, gw, gb), ref):
            np.testing.assert_array_equal(a, b)                # the very same code
    else:
        layer.kernel = None
        np.testing.assert_array_equal(y_eval, layer.forward(x, train=False))
        for a, b in zip((y, dx, gw, gb), ref):
            close(a, b)


@pytest.mark.parametrize("train", [False, True])
def test_auto_uses_the_feature_major_threshold_for_f_ordered_input(train):
    # the plain modes say never, the _f modes say yes: C-ordered input runs dense, F-ordered input
    # (as a sparse predecessor leaves it) runs the kernel -- each remembered under its own key,
    # also on the fast path (same batch size, both orders, twice each)
    rng = np.random.default_rng(21)
    layer = Dense(50, 30, rng)
    layer.set_mask("W", rng.random((50, 30)) < 0.05)
    layer.need_dx = True
    modes = {m: None for m in thresholds.AUTO_MODES}
    modes.update({m: 0.1 for m in thresholds.FMAJOR_MODES})
    layer.kernel = k = AutoKernel(layer, thresholds=table({"Dense 50x30": {"small": modes}}))
    assert not k.all_dense and k.dense_modes is None
    xc = rng.standard_normal((7, 50)).astype(np.float32)
    xf = np.asfortranarray(xc)
    dout = rng.standard_normal((7, 30)).astype(np.float32)
    outs = {}
    for x, want in ((xc, False), (xf, True), (xc, False), (xf, True)):
        y = np.array(layer.forward(x, train=train))
        assert k.last_plan["use_kernel"] is want
        outs.setdefault(want, []).append(y)
        if train:
            dx = layer.backward(dout)
            assert dx.shape == xc.shape
    assert k.decisions[("small", train, True)]["use"] is False
    assert k.decisions[("small", train, True, "F")]["use"] is True
    assert k.decisions[("small", train, True, "F")]["mode"] == thresholds.mode_key(train, True) + "_f"
    np.testing.assert_array_equal(outs[False][0], outs[False][1])
    close(outs[True][0], outs[False][0])
    # batch 1 is never "feature-major" (both orders are the same memory)
    layer.forward(xc[:1], train=train)
    assert k.last_plan["use_kernel"] is False


@pytest.mark.parametrize("choice", ["sparse", "auto"])
def test_dense_kernel_takes_a_nested_list(choice):
    rng = np.random.default_rng(22)
    layer = Dense(6, 4, rng)
    layer.set_mask("W", rng.random((6, 4)) < 0.5)
    x = rng.standard_normal((3, 6)).astype(np.float32)
    layer.kernel = make_kernel(layer, choice)
    for _ in range(2):                          # before and after the fast-path cache is filled
        close(np.array(layer.forward(x.tolist(), train=False)), np.array(layer.forward(x, train=False)))


def test_auto_through_the_model_and_kernel_report():
    rng = np.random.default_rng(16)
    model = nets.build("lenet300", np.random.default_rng(0))
    masks = {"fc1.W": rng.random((784, 300)) < 0.02, "fc2.W": rng.random((300, 100)) < 0.2,
             "fc3.W": rng.random((100, 10)) < 0.02}
    model.set_masks(masks)
    t = table({"Dense 784x300": {"small": {"train": 0.03, "eval": 0.03}},
               "Dense 300x100": {"small": {"train_dx": 0.1, "eval": 0.1}}})   # no fc3 entry
    apply_kernel(model, "auto", thresholds=t)
    assert model.layers[5].kernel is None                   # fc3: no threshold at all -> no kernel
    x = rng.random((16, 1, 28, 28)).astype(np.float32)
    model.loss_and_grads(x, rng.integers(0, 10, 16))
    rep = {r["layer"]: r for r in kernel_report(model)}
    assert rep["fc1"]["kernel"] == "auto" and rep["fc1"]["use_kernel"]            # 2% <= 3%
    assert rep["fc1"]["decisions"]["small/train"]["threshold"] == 0.03
    assert rep["fc2"]["kernel"] == "auto" and not rep["fc2"]["use_kernel"]        # 20% > 10%
    assert rep["fc2"]["dense_everywhere"] and not rep["fc1"]["dense_everywhere"]
    assert rep["fc3"] == {"layer": "fc3", "kernel": "dense", "use_kernel": False, "decisions": {},
                          "density": pytest.approx(masks["fc3.W"].mean())}


def test_auto_conv_key_includes_the_input_size():
    rng = np.random.default_rng(17)
    layer = Conv2D(3, 8, 3, rng, padding=1)
    layer.set_mask("W", rng.random(layer.params["W"].shape) < 0.05)
    key = "Conv2D 3x8x3x3 stride 1 pad 1"
    assert thresholds.shape_key(layer) == key
    layer.kernel = k = AutoKernel(layer, thresholds=table({key + " input 9x9": {"small": {"eval": 0.1}}}))
    x = rng.standard_normal((4, 3, 9, 9)).astype(np.float32)
    y = layer.forward(x, train=False)
    assert k.last_plan["use_kernel"]
    layer.forward(rng.standard_normal((4, 3, 10, 10)).astype(np.float32), train=False)
    assert not k.last_plan["use_kernel"]                    # 10x10 input: no entry -> dense
    layer.kernel = None
    close(y, layer.forward(x, train=False))


def _auto_train(t, steps=30):
    rng = np.random.default_rng(18)
    model = nets.build("lenet300", np.random.default_rng(0))
    model.set_masks({n: rng.random(p.shape) < d for (n, p), d in zip(
        [(n, p) for n, p in model.params().items() if n.endswith(".W")], (0.03, 0.03, 0.5))})
    apply_kernel(model, "auto", thresholds=t)
    opt = Adam(model, 1e-2)
    x = rng.random((64, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, 64)
    for s in range(steps):
        model.loss_and_grads(x[(s % 4) * 16:(s % 4 + 1) * 16], y[(s % 4) * 16:(s % 4 + 1) * 16])
        opt.step()
    return model, predict(model, x)


def test_auto_same_seed_same_bits_twice():
    t = table({"Dense 784x300": {"small": {"train": 0.05, "eval": 0.05}},
               "Dense 300x100": {"small": {"train_dx": 0.05, "eval": 0.05}}})
    m1, z1 = _auto_train(t)
    m2, z2 = _auto_train(t)
    assert [r["use_kernel"] for r in kernel_report(m1)] == [True, True, False]
    np.testing.assert_array_equal(z1, z2)
    for n, p in m1.params().items():
        np.testing.assert_array_equal(m2.params()[n], p)


def _train_params(net, masks, opt_name, compact, steps, choice="dense", wd=0.0):
    model = nets.build(net, np.random.default_rng(0))
    model.set_masks(masks)
    apply_kernel(model, choice)
    if opt_name == "adam":
        opt = Adam(model, 1e-2, weight_decay=wd, compact=compact)
    else:
        opt = SGD(model, 0.05, momentum=0.9, weight_decay=wd, compact=compact)
    rng = np.random.default_rng(3)
    x = rng.random((64, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, 64)
    for s in range(steps):
        i = (s * 16) % 48
        model.loss_and_grads(x[i:i + 16], y[i:i + 16])
        opt.step()
    return model, opt


@pytest.mark.parametrize("opt_name", ["adam", "sgd"])
@pytest.mark.parametrize("wd", [0.0, 1e-3])
def test_compact_optimizer_equals_dense_optimizer(opt_name, wd):
    # same kernels (dense), optimiser compact vs dense: every live entry goes through the same float32
    # operations, so the parameters are identical; pruned entries stay exactly 0 (==) after 50 steps
    rng = np.random.default_rng(13)
    model = nets.build("lenet300", np.random.default_rng(0))
    masks = {n: rng.random(p.shape) < d for (n, p), d in
             zip([(n, p) for n, p in model.params().items() if n.endswith(".W")], (0.02, 0.05, 0.6))}
    md, od = _train_params("lenet300", masks, opt_name, False, 50, wd=wd)
    mc, oc = _train_params("lenet300", masks, opt_name, None, 50, wd=wd)
    assert oc._group is not None and set(oc._group["names"]) == {"fc1.W", "fc2.W", "fc1.b", "fc2.b",
                                                                  "fc3.b"}
    assert od._group is None
    for n, p in md.params().items():
        np.testing.assert_allclose(mc.params()[n], p, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(mc.params()[n], p)
    for n, m in masks.items():
        assert np.all(mc.params()[n][~m] == 0)


@pytest.mark.parametrize("opt_name", ["adam", "sgd"])
def test_compact_optimizer_with_sparse_kernels_mask_invariant(opt_name):
    rng = np.random.default_rng(14)
    model = nets.build("lenet300", np.random.default_rng(0))
    masks = {n: rng.random(p.shape) < 0.02 for n, p in model.params().items() if n.endswith(".W")}
    md, _ = _train_params("lenet300", masks, opt_name, False, 50, choice="dense")
    ms, _ = _train_params("lenet300", masks, opt_name, None, 50, choice="sparse")
    for n, m in masks.items():
        assert np.all(ms.params()[n][~m] == 0)
        assert np.count_nonzero(ms.params()[n][m]) > 0.9 * m.sum()
    for n, p in md.params().items():   # different gradient rounding only (float32 tolerance)
        np.testing.assert_allclose(ms.params()[n], p, rtol=0, atol=5e-3 * max(1, np.abs(p).max()))


def test_compact_optimizer_state_carried_over_mask_change():
    rng = np.random.default_rng(15)
    model = nets.build("lenet300", np.random.default_rng(0))
    m1 = {n: rng.random(p.shape) < 0.1 for n, p in model.params().items() if n.endswith(".W")}
    model.set_masks(m1)
    opt = Adam(model, 1e-2)
    x = rng.random((16, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, 16)
    model.loss_and_grads(x, y)
    opt.step()
    idx, a, b = opt._group["names"]["fc1.W"]
    full = np.zeros(784 * 300, np.float32)
    full[idx] = opt._group["state"]["m"][a:b]
    m2 = dict(m1)
    m2["fc1.W"] = m1["fc1.W"] & (rng.random((784, 300)) < 0.5)
    model.set_masks(m2)
    model.loss_and_grads(x, y)
    g = opt._compact_group(model.params(), model.masks())   # rebuilt: state carried over
    idx2, a2, b2 = g["names"]["fc1.W"]
    np.testing.assert_array_equal(g["state"]["m"][a2:b2], full[idx2])
    model.set_masks({"fc1.W": None})                        # leaves the group: full-size state
    model.loss_and_grads(x, y)
    opt.step()
    assert opt.state["fc1.W"]["m"].shape == (784, 300)
    assert np.all(np.isfinite(model.params()["fc1.W"]))


def _synthetic(rng, n=1200):
    protos = rng.random((10, 784)).astype(np.float32)
    y = rng.integers(0, 10, n)
    x = protos[y] + 0.3 * rng.standard_normal((n, 784)).astype(np.float32)
    return x.reshape(n, 1, 28, 28).astype(np.float32), y


def _train_acc(choice, masks, x, y, xt, yt, steps=150):
    model = nets.build("lenet300", np.random.default_rng(0))
    model.set_masks(masks)
    apply_kernel(model, choice)
    opt = Adam(model, 1.2e-3)
    rng = np.random.default_rng(1)
    for _ in range(steps):
        idx = rng.integers(0, len(x), 60)
        model.loss_and_grads(x[idx], y[idx])
        opt.step()
    for n, m in masks.items():
        assert np.all(model.params()[n][~m] == 0)
    return evaluate(model, xt, yt)[1]


def test_short_training_same_accuracy_sparse_vs_dense():
    rng = np.random.default_rng(10)
    x, y = _synthetic(rng)
    xt, yt = _synthetic(np.random.default_rng(10), 600)  # same prototypes, fresh noise draw
    model = nets.build("lenet300", np.random.default_rng(0))
    mrng = np.random.default_rng(2)
    masks = {n: mrng.random(p.shape) < 0.05 for n, p in model.params().items() if n.endswith(".W")}
    acc = {c: _train_acc(c, masks, x, y, xt, yt) for c in ("dense", "sparse", "auto")}
    assert acc["dense"] > 0.5
    assert abs(acc["sparse"] - acc["dense"]) <= 0.02
    assert abs(acc["auto"] - acc["dense"]) <= 0.02
