"""nprune.sparse: sparse/compacted kernels give the dense masked path's results; auto follows its
thresholds table (no timing here)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from nprune import nets, sparse
from nprune.evaluate import evaluate, predict
from nprune.layers import Conv2D, Dense
from nprune.optim import SGD, Adam
from nprune.sparse import (ConvKernelSparse, DenseKernelSparse, SparseMatrix, ThresholdsError,
                           apply_kernel, kernel_report)


@pytest.fixture(autouse=True)
def _no_user_thresholds(tmp_path, monkeypatch):
    """Hermetic: no user calibration file (auto uses the shipped table unless a test gives one)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


def table(entries: dict) -> dict:
    """A thresholds table from ``{shape: {class: {mode: threshold}}}``."""
    return {"format": sparse.THRESHOLDS_FORMAT, "source": "test", "thresholds": entries}

MODES = [
    None,  # default (Dense: CSR + SDDMM, dX by the CSR of W; Conv2D: cost-model choice per product)
    {"fwd": "sparse", "dx": "sparse", "dw": "sparse"},
    {"fwd": "sparse", "dx": "csc", "dw": "sparse"},       # Dense: dX by the CSC reading of A
    {"fwd": "compact", "dx": "compact", "dw": "compact"},  # dense GEMMs on the live block
]
DENSITIES = [1.0, 0.5, 0.2, 0.05, 0.01, 0.0]


def _close(a, b, scale=None):
    scale = max(1.0, float(np.abs(b).max()) if b.size else 1.0) if scale is None else scale
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * scale)


def _random_mask(rng, shape, d, dead_axis0=(), dead_axis1=()):
    m = rng.random(shape) < d
    m[list(dead_axis0)] = False
    if dead_axis1:
        m[:, list(dead_axis1)] = False
    return m


def _run(layer, x, dout, kernel):
    layer.kernel = kernel
    y = layer.forward(x, train=True)
    dx = layer.backward(dout)
    return (np.array(y), None if dx is None else np.array(dx),
            layer.grads["W"].copy(), layer.grads["b"].copy())


def _compare(layer, x, dout, cls, modes):
    ref = _run(layer, x, dout, None)
    got = _run(layer, x, dout, cls(layer, "sparse", modes))
    for r, g in zip(ref, got):
        if r is None:
            assert g is None
            continue
        assert g.dtype == np.float32 and g.shape == r.shape
        _close(g, r)
    # the pruned entries of the gradient are exactly zero
    m = layer.masks["W"]
    if m is not None:
        assert np.all(got[2][m == 0] == 0)
    # eval mode forward
    layer.kernel = None
    y0 = layer.forward(x, train=False)
    layer.kernel = cls(layer, "sparse", modes)
    _close(layer.forward(x, train=False), y0)


@pytest.mark.parametrize("modes", MODES)
@pytest.mark.parametrize("d", DENSITIES)
@pytest.mark.parametrize("need_dx", [True, False])
def test_dense_matches_masked_dense(modes, d, need_dx):
    rng = np.random.default_rng(int(d * 1000) + 7)
    layer = Dense(64, 40, rng)
    layer.need_dx = need_dx
    layer.params["b"][:] = rng.standard_normal(40)
    layer.set_mask("W", _random_mask(rng, (64, 40), d, dead_axis0=range(0, 10),
                                     dead_axis1=range(30, 35)))
    x = rng.standard_normal((23, 64)).astype(np.float32)
    dout = rng.standard_normal((23, 40)).astype(np.float32)
    dcopy = dout.copy()
    _compare(layer, x, dout, DenseKernelSparse, modes)
    np.testing.assert_array_equal(dout, dcopy)  # dout never mutated


@pytest.mark.parametrize("modes", MODES[:2])
def test_dense_large_batch_chunked_and_forder_input(modes):
    rng = np.random.default_rng(3)
    layer = Dense(30, 20, rng)
    layer.set_mask("W", _random_mask(rng, (30, 20), 0.1, dead_axis0=[0, 1]))
    x = rng.standard_normal((2500, 30)).astype(np.float32)  # > CHUNK, not a multiple of it
    dout = rng.standard_normal((2500, 20)).astype(np.float32)
    _compare(layer, x, dout, DenseKernelSparse, modes)
    _compare(layer, np.asfortranarray(x), np.asfortranarray(dout), DenseKernelSparse, modes)


def test_dense_unpruned_and_all_pruned():
    rng = np.random.default_rng(4)
    layer = Dense(20, 10, rng)
    x = rng.standard_normal((5, 20)).astype(np.float32)
    dout = rng.standard_normal((5, 10)).astype(np.float32)
    _compare(layer, x, dout, DenseKernelSparse, None)           # mask None
    layer.set_mask("W", np.zeros((20, 10), bool))
    layer.params["b"][:] = 1.5
    layer.kernel = DenseKernelSparse(layer, "sparse")
    y = layer.forward(x)
    np.testing.assert_array_equal(y, np.full((5, 10), 1.5, np.float32))
    dx = layer.backward(dout)
    assert np.all(dx == 0) and np.all(layer.grads["W"] == 0)


@pytest.mark.parametrize("modes", MODES)
@pytest.mark.parametrize("d", [1.0, 0.3, 0.05, 0.0])
def test_conv_matches_masked_dense(modes, d):
    rng = np.random.default_rng(int(d * 100) + 11)
    layer = Conv2D(3, 8, 3, rng, padding=1)
    layer.params["b"][:] = rng.standard_normal(8)
    m = rng.random(layer.params["W"].shape) < d
    m[[1, 5]] = False          # dead filters
    m[:, 2] = False            # dead input channel
    layer.set_mask("W", m)
    x = rng.standard_normal((4, 3, 9, 9)).astype(np.float32)
    dout = rng.standard_normal((4, 8, 9, 9)).astype(np.float32)
    _compare(layer, x, dout, ConvKernelSparse, modes)
    layer.need_dx = False
    _compare(layer, x, dout, ConvKernelSparse, modes)


def test_mask_change_after_attach_rebuilds():
    rng = np.random.default_rng(5)
    layer = Dense(50, 30, rng)
    layer.kernel = DenseKernelSparse(layer, "sparse", {"fwd": "sparse", "dx": "sparse", "dw": "sparse"})
    x = rng.standard_normal((7, 50)).astype(np.float32)
    dout = rng.standard_normal((7, 30)).astype(np.float32)
    for d in (0.5, 0.1, 0.02):
        mask = rng.random((50, 30)) < d
        mask[:5] = False
        layer.set_mask("W", mask)                     # kernel.mask_changed via the layer
        y, dx, gw, gb = _run(layer, x, dout, layer.kernel)
        w = layer.params["W"]
        _close(y, x @ w + layer.params["b"])
        _close(dx, dout @ w.T)
        _close(gw, (x.T @ dout) * mask)
    layer.set_mask("W", None)
    y, dx, gw, gb = _run(layer, x, dout, layer.kernel)
    _close(gw, x.T @ dout)


def test_values_refresh_after_adam_step_and_mask_invariant():
    rng = np.random.default_rng(6)
    model = nets.build("lenet300", np.random.default_rng(0))
    masks = {n: rng.random(p.shape) < 0.1 for n, p in model.params().items() if n.endswith(".W")}
    model.set_masks(masks)
    model.set_kernel("sparse")
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
    model.set_kernel("dense")
    _close(logits_sparse, model.forward(x, train=False))


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
    model.set_kernel("dense")
    l0, z0 = model.loss_and_grads(x, y)
    g0 = {k: v.copy() for k, v in model.grads().items()}
    model.set_kernel(choice)
    l1, z1 = model.loss_and_grads(x, y)
    _close(np.asarray(z1), np.asarray(z0))
    assert abs(l1 - l0) < 1e-4 * max(1, abs(l0))
    for k, v in model.grads().items():
        _close(v, g0[k])
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
    layer.kernel = k = DenseKernelSparse(layer, "auto", thresholds=t)
    x = rng.random((60, 784)).astype(np.float32)
    dout = rng.standard_normal((60, 300)).astype(np.float32)
    y = np.array(layer.forward(x))
    layer.backward(dout)
    gw = layer.grads["W"].copy()
    d = k.decisions[("small", True, True)]
    assert d["use"] and d["threshold"] == 0.05 and d["shape"] == "Dense 784x300"
    assert d["mode"] == "train_dx" and abs(d["density"] - 0.02) < 0.002
    assert k.last_plan["use_kernel"] and isinstance(k._cache, tuple) and k._cache[0] == "sparse"
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
    ref = _run(layer, x, dout, None)                        # the kernel's results = dense path's
    _close(y, ref[0])
    _close(gw, ref[2])
    layer.kernel = k
    assert not k.all_dense
    layer.set_mask("W", rng.random((784, 300)) < 0.5)       # above every threshold: plain dense
    assert k.decisions == {} and k.all_dense
    assert k.forward is Dense.dense_forward and k.backward is Dense.dense_backward
    y = np.array(layer.forward(x))
    assert k.decisions == {} and k._cache is None
    layer.kernel = None
    np.testing.assert_array_equal(y, layer.forward(x))      # the very same code
    layer.kernel = k
    layer.set_mask("W", rng.random((784, 300)) < 0.01)      # below again: the lookup is back
    assert not k.all_dense and "forward" not in vars(k)
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
    layer.kernel = k = DenseKernelSparse(layer, "auto", thresholds=table(
        {"Dense 50x30": {"small": dict(modes, **{m: 0.01 for m in sparse.AUTO_MODES if m not in modes})}}))
    assert k.dense_modes == dense_mode and not k.all_dense
    x = rng.standard_normal((7, 50)).astype(np.float32)
    dout = rng.standard_normal((7, 30)).astype(np.float32)
    y_eval = np.array(layer.forward(x, train=False))
    y, dx, gw, gb = _run(layer, x, dout, k)
    assert set(key[1] for key in k.decisions) == {dense_mode == "eval"}    # only the other mode
    assert k.decisions and all(v["use"] for v in k.decisions.values())
    ref = _run(layer, x, dout, None)
    if dense_mode == "train":
        for a, b in zip((y, dx, gw, gb), ref):
            np.testing.assert_array_equal(a, b)                # the very same code
    else:
        layer.kernel = None
        np.testing.assert_array_equal(y_eval, layer.forward(x, train=False))
        for a, b in zip((y, dx, gw, gb), ref):
            _close(a, b)


def test_lookup_feature_major_mode_falls_back_to_the_plain_mode():
    t = table({"Dense 50x30": {"small": {"eval": 0.1, "train": None, "train_f": 0.3}}})
    assert sparse.lookup_threshold(t, "Dense 50x30", "small", "eval_f") == 0.1     # missing: eval's
    assert sparse.lookup_threshold(t, "Dense 50x30", "small", "train_f") == 0.3
    t["thresholds"]["Dense 50x30"]["small"]["eval_f"] = None                       # present: never
    assert sparse.lookup_threshold(t, "Dense 50x30", "small", "eval_f") is None


@pytest.mark.parametrize("train", [False, True])
def test_auto_uses_the_feature_major_threshold_for_f_ordered_input(train):
    # the plain modes say never, the _f modes say yes: C-ordered input runs dense, F-ordered input
    # (as a sparse predecessor leaves it) runs the kernel -- each remembered under its own key,
    # also on the fast path (same batch size, both orders, twice each)
    rng = np.random.default_rng(21)
    layer = Dense(50, 30, rng)
    layer.set_mask("W", rng.random((50, 30)) < 0.05)
    layer.need_dx = True
    modes = {m: None for m in sparse.AUTO_MODES}
    modes.update({m: 0.1 for m in sparse.FMAJOR_MODES})
    layer.kernel = k = DenseKernelSparse(layer, "auto", thresholds=table({"Dense 50x30": {"small": modes}}))
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
    assert k.decisions[("small", train, True, "F")]["mode"] == sparse.mode_key(train, True) + "_f"
    np.testing.assert_array_equal(outs[False][0], outs[False][1])
    _close(outs[True][0], outs[False][0])
    # batch 1 is never "feature-major" (both orders are the same memory)
    layer.forward(xc[:1], train=train)
    assert k.last_plan["use_kernel"] is False


@pytest.mark.parametrize("choice", ["sparse", "auto"])
def test_dense_kernel_takes_a_nested_list(choice):
    rng = np.random.default_rng(22)
    layer = Dense(6, 4, rng)
    layer.set_mask("W", rng.random((6, 4)) < 0.5)
    x = rng.standard_normal((3, 6)).astype(np.float32)
    layer.kernel = sparse._kernel_for(layer, choice)
    for _ in range(2):                          # before and after the fast-path cache is filled
        _close(np.array(layer.forward(x.tolist(), train=False)), np.array(layer.forward(x, train=False)))


def test_feature_major_modes_validated_and_shown():
    sparse.check_thresholds(table({"Dense 50x30": {"small": {"eval_f": 0.2}}}), "t")
    with pytest.raises(ThresholdsError, match="unknown mode 'eval_g'"):
        sparse.check_thresholds(table({"Dense 50x30": {"small": {"eval_g": 0.2}}}), "t")
    txt = sparse.format_thresholds(table({"Dense 50x30": {"small": {"eval": 0.1, "eval_f": 0.2}},
                                          "Dense 9x9": {"small": {"eval": 0.1}}}))
    assert txt.count("feature-major input") == 1 and "-/-/0.2" in txt


def test_calibration_modes_per_layer():
    specs = {s["key"]: s for s in sparse.calibration_layers()}
    assert sparse._cal_modes(specs["Dense 784x300"]) == sparse.AUTO_MODES        # first layer
    assert sparse._cal_modes(specs["Dense 300x100"]) == sparse.ALL_MODES
    conv = next(s for k, s in specs.items() if k.startswith("Conv2D 20x50"))
    assert sparse._cal_modes(conv) == sparse.AUTO_MODES
    assert sparse._cal_modes(specs["Dense 300x100"], sparse.FMAJOR_MODES) == sparse.FMAJOR_MODES


def test_auto_through_the_model_and_kernel_report():
    rng = np.random.default_rng(16)
    model = nets.build("lenet300", np.random.default_rng(0))
    masks = {"fc1.W": rng.random((784, 300)) < 0.02, "fc2.W": rng.random((300, 100)) < 0.2,
             "fc3.W": rng.random((100, 10)) < 0.02}
    model.set_masks(masks)
    t = table({"Dense 784x300": {"small": {"train": 0.03, "eval": 0.03}},
               "Dense 300x100": {"small": {"train_dx": 0.1, "eval": 0.1}}})   # no fc3 entry
    model.set_kernel("auto", thresholds=t)
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
    assert sparse.shape_key(layer) == key
    layer.kernel = k = ConvKernelSparse(layer, "auto",
                                        thresholds=table({key + " input 9x9": {"small": {"eval": 0.1}}}))
    x = rng.standard_normal((4, 3, 9, 9)).astype(np.float32)
    y = layer.forward(x, train=False)
    assert k.last_plan["use_kernel"]
    layer.forward(rng.standard_normal((4, 3, 10, 10)).astype(np.float32), train=False)
    assert not k.last_plan["use_kernel"]                    # 10x10 input: no entry -> dense
    layer.kernel = None
    _close(y, layer.forward(x, train=False))


def _auto_train(t, steps=30):
    rng = np.random.default_rng(18)
    model = nets.build("lenet300", np.random.default_rng(0))
    model.set_masks({n: rng.random(p.shape) < d for (n, p), d in zip(
        [(n, p) for n, p in model.params().items() if n.endswith(".W")], (0.03, 0.03, 0.5))})
    model.set_kernel("auto", thresholds=t)
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


def test_shipped_table_is_valid_and_covers_the_nets():
    t = sparse.SHIPPED_THRESHOLDS
    assert sparse.check_thresholds(t, "shipped") is t and t["source"] == "shipped"
    keys = {s["key"] for s in sparse.calibration_layers()}
    assert keys <= set(t["thresholds"])
    inner = {s["key"] for s in sparse.calibration_layers() if sparse._cal_modes(s) == sparse.ALL_MODES}
    for shape, classes in t["thresholds"].items():
        assert set(classes) == set(sparse.BATCH_CLASSES)
        want = sparse.ALL_MODES if shape in inner else sparse.AUTO_MODES
        assert all(set(m) == set(want) for m in classes.values()), shape
    assert "machine" in t and "command" in t
    assert sparse.active_thresholds() is t                  # no user file (fixture)


def test_user_calibration_file_is_used(tmp_path, monkeypatch):
    # the calibration command writes the user cache file and auto picks it up (measurement stubbed)
    entries = {"Dense 784x300": {c: {m: 0.5 for m in sparse.AUTO_MODES} for c in sparse.BATCH_CLASSES}}
    monkeypatch.setattr(sparse, "measure_thresholds", lambda **k: (entries, []))
    path = sparse.calibrate_thresholds(verbose=False)
    assert path == tmp_path / "xdg-cache" / "nprune" / "kernel_thresholds.json"
    active = sparse.active_thresholds()
    assert active["thresholds"] == entries and active["source"] == str(path)
    model = nets.build("lenet300", np.random.default_rng(0))
    model.set_masks({"fc1.W": np.random.default_rng(0).random((784, 300)) < 0.4})
    model.set_kernel("auto")
    model.forward(np.zeros((8, 1, 28, 28), np.float32))
    assert [r["use_kernel"] for r in kernel_report(model)] == [True, False, False]


def test_measure_thresholds_runs_on_a_tiny_layer():
    # the calibration machinery end to end on a tiny shape (its numbers are not checked)
    layer = Dense(20, 10, np.random.default_rng(0))
    spec = {"key": "Dense 20x10", "layer": layer, "in_shape": (20,), "first": False}
    t, meas = sparse.measure_thresholds(specs=[spec], densities=(0.1, 1.0), repeats=1,
                                        batches={"1": (1,), "small": (4,), "large": (300,)})
    assert set(t["Dense 20x10"]) == set(sparse.BATCH_CLASSES)
    assert all(set(m) == set(sparse.ALL_MODES) for m in t["Dense 20x10"].values())   # inner layer
    assert {m["mode"] for m in meas} <= set(sparse.ALL_MODES)
    sparse.check_thresholds(table(t), "measured")
    assert meas and all(m["shape"] == "Dense 20x10" for m in meas)
    assert layer.kernel is None and layer.masks["W"] is None


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
        sparse.active_thresholds()
    msg = str(e.value)
    assert str(path) in msg and needle in msg and "\n" not in msg
    with pytest.raises(ThresholdsError):
        nets.build("lenet300", np.random.default_rng(0)).set_kernel("auto")
    nets.build("lenet300", np.random.default_rng(0)).set_kernel("dense")   # dense never reads it
    assert sparse.main(["--show"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nprune: error: kernel thresholds file")
    assert str(path) in err and "Traceback" not in err


def test_feature_major_chain_no_copies():
    # a sparse Dense returns an F-ordered (N, out) array; ReLU keeps it; the next sparse Dense reads
    # its transpose without copying, and dx comes back F-ordered too
    rng = np.random.default_rng(12)
    l1, l2 = Dense(40, 30, rng), Dense(30, 20, rng)
    for l in (l1, l2):
        l.set_mask("W", rng.random(l.params["W"].shape) < 0.3)
        l.kernel = DenseKernelSparse(l, "sparse", {"fwd": "sparse"})   # the CSR path
    x = rng.standard_normal((9, 40)).astype(np.float32)
    h = l1.forward(x)
    assert h.flags.f_contiguous and not h.flags.c_contiguous
    r = np.maximum(h, 0)
    assert r.flags.f_contiguous
    y = l2.forward(r)
    assert y.flags.f_contiguous
    assert l2.kernel._cache[1].base is r or np.shares_memory(l2.kernel._cache[1], r)
    dx = l2.backward(rng.standard_normal((9, 20)).astype(np.float32))
    assert dx.flags.f_contiguous
    w1, w2 = l1.params["W"], l2.params["W"]
    _close(y, np.maximum(x @ w1 + l1.params["b"], 0) @ w2 + l2.params["b"])


def _train_params(net, masks, opt_name, compact, steps, choice="dense", wd=0.0):
    model = nets.build(net, np.random.default_rng(0))
    model.set_masks(masks)
    model.set_kernel(choice)
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


def test_sparse_matrix_structure():
    flat = np.arange(12).reshape(3, 4)
    sm = SparseMatrix(flat)
    m = np.array([[1, 0, 0, 1], [0, 0, 0, 0], [0, 0, 1, 1]], bool)
    sm.rebuild(m)
    assert list(sm.live_r) == [0, 2] and list(sm.live_c) == [0, 2, 3]
    assert sm.nnz == 4 and sorted(sm.gidx) == [0, 3, 10, 11]
    W = np.arange(12, dtype=np.float32) * m.ravel()
    sm.refresh(W, ("csr", "csr_t", "blk"))
    np.testing.assert_array_equal(np.sort(sm.data), [0, 3, 10, 11])
    np.testing.assert_array_equal(sm.blk, W.reshape(3, 4)[np.ix_([0, 2], [0, 2, 3])])


def _synthetic(rng, n=1200):
    protos = rng.random((10, 784)).astype(np.float32)
    y = rng.integers(0, 10, n)
    x = protos[y] + 0.3 * rng.standard_normal((n, 784)).astype(np.float32)
    return x.reshape(n, 1, 28, 28).astype(np.float32), y


def _train_acc(choice, masks, x, y, xt, yt, steps=150):
    model = nets.build("lenet300", np.random.default_rng(0))
    model.set_masks(masks)
    model.set_kernel(choice)
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


def test_dense_compact_mode_drops_dead_units_and_inputs():
    """Compaction: a mask that kills whole units (columns of W) and inputs (rows) leaves a live
    block; the compact mode runs dense GEMMs on it. Dead units output exactly their bias, dead inputs
    get exactly zero gradient, pruned weights exactly zero gradient; the rest matches dense."""
    rng = np.random.default_rng(21)
    layer = Dense(50, 40, rng)
    layer.params["b"][:] = rng.standard_normal(40)
    m = rng.random((50, 40)) < 0.7
    dead_in, dead_out = [0, 1, 2, 17, 49], [3, 4, 30, 31, 32, 39]
    m[dead_in] = False
    m[:, dead_out] = False
    layer.set_mask("W", m)
    x = rng.standard_normal((33, 50)).astype(np.float32)
    dout = rng.standard_normal((33, 40)).astype(np.float32)
    k = DenseKernelSparse(layer, "sparse", {"fwd": "compact"})
    assert (k.nc, k.nr) == (45, 34) and not k.all_c and not k.all_r
    _compare(layer, x, dout, DenseKernelSparse, {"fwd": "compact"})
    layer.kernel = k
    y = layer.forward(x)
    assert k.last_plan["modes"] == "compact"
    np.testing.assert_array_equal(y[:, dead_out], np.broadcast_to(layer.params["b"][dead_out], (33, 6)))
    dx = layer.backward(dout)
    assert np.all(dx[:, dead_in] == 0) and np.all(layer.grads["W"][~m] == 0)


def test_dense_kernel_picks_compact_for_structured_masks_and_csr_for_sparse_ones():
    """The cost model (COST): a live block that is dense (whole units pruned, the rest kept) runs
    compact; an IMP-like 2% mask, whose live block is as sparse as W, runs CSR."""
    rng = np.random.default_rng(22)
    layer = Dense(784, 300, rng)
    m = np.zeros((784, 300), bool)
    m[100:700, :120] = True                       # 40% of the units, 600 of the inputs, all kept
    layer.set_mask("W", m)
    k = DenseKernelSparse(layer, "sparse")
    assert (k.nc, k.nr) == (600, 120)
    for n, train in ((60, True), (60, False), (10_000, False)):
        assert k._compact_pays(n, train, False, False), (n, train)
    layer.set_mask("W", rng.random((784, 300)) < 0.02)
    k = DenseKernelSparse(layer, "sparse")
    for n, train in ((60, True), (60, False), (10_000, False)):
        assert not k._compact_pays(n, train, False, False), (n, train)
    # forced modes win over the cost model
    assert DenseKernelSparse(layer, "sparse", {"fwd": "compact"})._compact_pays(60, True, False, False)
    layer.set_mask("W", m)
    assert not DenseKernelSparse(layer, "sparse", {"dx": "csc"})._compact_pays(60, True, False, False)


@pytest.mark.parametrize("dead", ["none", "inputs", "units", "both"])
@pytest.mark.parametrize("d", [1.0, 0.6, 0.1])
def test_dense_compact_mode_every_block_shape(dead, d):
    """The compact mode's block is W itself (nothing dead), whole rows (dead inputs only), whole
    columns (dead units only) or both; its dW is written as a block or, for a sparse block, entry by
    entry. Every case matches the masked dense path."""
    rng = np.random.default_rng(int(d * 10) + len(dead))
    layer = Dense(48, 36, rng)
    layer.params["b"][:] = rng.standard_normal(36)
    m = rng.random((48, 36)) < d
    m[:, 0] = m[0] = True                                  # nothing dead unless asked
    if dead in ("inputs", "both"):
        m[[3, 9, 40]] = False
    if dead in ("units", "both"):
        m[:, [5, 6, 35]] = False
    layer.set_mask("W", m)
    k = DenseKernelSparse(layer, "sparse", {"fwd": "compact"})
    assert k.all_c == (dead in ("none", "units")) and k.all_r == (dead in ("none", "inputs"))
    assert (k.blk is None) == (dead == "none")
    x = rng.standard_normal((21, 48)).astype(np.float32)
    dout = rng.standard_normal((21, 36)).astype(np.float32)
    _compare(layer, x, dout, DenseKernelSparse, {"fwd": "compact"})
    layer.need_dx = False
    _compare(layer, x, dout, DenseKernelSparse, {"fwd": "compact"})
