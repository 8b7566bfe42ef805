"""Optimisers: the mask invariant (pruned weights exactly zero after any number of steps), state
reset, and the update formulas against hand-computed values (and PyTorch when installed)."""
import numpy as np
import pytest

from nprune import nets
from nprune.optim import COMPACT_DENSITY, SGD, Adam, make_optimizer
from nprune.reference import adam_step, sgd_step


def _random_masks(model, rng, density=0.3):
    return {n: rng.random(model.params()[n].shape) < density for n in model.prunable()}


@pytest.mark.parametrize("net", ["lenet300", "lenet5"])
@pytest.mark.parametrize("opt", ["sgd-momentum", "sgd-wd", "adam", "adam-wd"])
def test_pruned_weights_stay_exactly_zero(net, opt, rng, synth):
    model = nets.build(net, rng)
    masks = _random_masks(model, rng)
    model.set_masks(masks)
    if opt.startswith("sgd"):
        o = SGD(model, 0.05, momentum=0.9, weight_decay=1e-3 if opt == "sgd-wd" else 0.0)
    else:
        o = Adam(model, 1e-2, weight_decay=1e-3 if opt == "adam-wd" else 0.0)
    bs = 16
    for step in range(50):
        i = (step * bs) % (len(synth.x_train) - bs)
        model.loss_and_grads(synth.x_train[i:i + bs], synth.y_train[i:i + bs])
        o.step()
    params = model.params()
    for name, m in masks.items():
        assert np.all(params[name][~m] == 0.0)
        assert np.count_nonzero(params[name][m]) > 0.9 * m.sum()   # survivors do train
        # momentum / Adam moments never accumulate anything at pruned positions
        for key in ("m", "v"):
            slot = o.state.get(name, {}).get(key)
            if slot is not None:
                assert np.all(slot[~m] == 0.0)
    # the gradients of pruned weights are exactly zero too
    for name, m in masks.items():
        assert np.all(model.grads()[name][~m] == 0.0)


def test_optimizer_reset_clears_state(rng, synth):
    model = nets.build("lenet300", rng)
    o = Adam(model, 1e-3)
    model.loss_and_grads(synth.x_train[:8], synth.y_train[:8])
    o.step()
    assert o.state and o.t == 1
    o.reset()
    assert o.state == {} and o.t == 0


class _One:
    """A one-parameter 'model' to check update formulas by hand."""

    def __init__(self, p, g, mask=None):
        self.p, self.g, self.m = {"w": p}, {"w": g}, {"w": mask}

    def params(self):
        return self.p

    def grads(self):
        return self.g

    def masks(self):
        return self.m


def test_sgd_momentum_formula():
    p = np.array([1.0, 2.0], np.float32)
    g = np.array([0.5, -1.0], np.float32)
    o = SGD(_One(p, g), lr=0.1, momentum=0.9, weight_decay=0.01)
    o.step()   # v = g + wd p ; p -= lr v
    v1 = np.array([0.5 + 0.01, -1.0 + 0.02], np.float32)
    np.testing.assert_allclose(p, np.array([1.0, 2.0]) - 0.1 * v1, rtol=1e-6)
    p_before = p.copy()
    o.step()   # v = 0.9 v1 + g + wd p
    v2 = 0.9 * v1 + g + 0.01 * p_before
    np.testing.assert_allclose(p, p_before - 0.1 * v2, rtol=1e-6)
    assert p.dtype == np.float32


def test_adam_formula_and_bias_correction():
    p = np.array([1.0, -1.0], np.float64)
    g = np.array([0.1, -0.3], np.float64)
    o = Adam(_One(p, g), lr=0.01, betas=(0.9, 0.999), eps=1e-8)
    p0 = p.copy()
    o.step()
    # first step: m_hat = g, v_hat = g^2, update = lr * g / (|g| + eps)
    np.testing.assert_allclose(p, p0 - 0.01 * g / (np.abs(g) + 1e-8), rtol=1e-10)


def test_adam_matches_torch(rng):
    torch = pytest.importorskip("torch")
    p = rng.standard_normal(20)
    grads = [rng.standard_normal(20) for _ in range(5)]
    mine = p.copy()
    g = np.zeros(20)
    o = Adam(_One(mine, g), lr=1e-2, weight_decay=0.01)
    tp = torch.tensor(p, requires_grad=True)
    to = torch.optim.Adam([tp], lr=1e-2, weight_decay=0.01)
    for gr in grads:
        g[...] = gr
        o.step()
        tp.grad = torch.tensor(gr)
        to.step()
    np.testing.assert_allclose(mine, tp.detach().numpy(), rtol=1e-12, atol=1e-14)


def test_sgd_matches_torch(rng):
    torch = pytest.importorskip("torch")
    p = rng.standard_normal(20)
    mine, g = p.copy(), np.zeros(20)
    o = SGD(_One(mine, g), lr=0.05, momentum=0.9, weight_decay=1e-3)
    tp = torch.tensor(p, requires_grad=True)
    to = torch.optim.SGD([tp], lr=0.05, momentum=0.9, weight_decay=1e-3)
    for _ in range(5):
        gr = rng.standard_normal(20)
        g[...] = gr
        o.step()
        tp.grad = torch.tensor(gr)
        to.step()
    np.testing.assert_allclose(mine, tp.detach().numpy(), rtol=1e-12, atol=1e-14)


def test_bad_settings():
    with pytest.raises(ValueError):
        make_optimizer("rmsprop", None, 0.1)
    with pytest.raises(ValueError):
        SGD(None, lr=0.0)
    with pytest.raises(ValueError):
        SGD(None, lr=0.1, momentum=1.0)


@pytest.mark.parametrize("opt", ["sgd-momentum-wd", "adam", "adam-wd"])
@pytest.mark.parametrize("density", [None, 0.7])
def test_chunked_updates_are_bit_identical(opt, density, synth, monkeypatch):
    """The dense path updates big parameters chunk by chunk; element-wise float32 arithmetic does
    not depend on the chunking, so any chunk size must give exactly the same parameters and state
    (also after a reset, when the state arrays are new)."""
    import nprune.optim
    runs = []
    for chunk in (10 ** 9, 1 << 16, 1000):
        monkeypatch.setattr(nprune.optim, "CHUNK", chunk)
        model = nets.build("lenet300", np.random.default_rng(7))
        if density is not None:
            model.set_masks(_random_masks(model, np.random.default_rng(8), density))
        if opt.startswith("sgd"):
            o = SGD(model, 0.05, momentum=0.9, weight_decay=1e-3)
        else:
            o = Adam(model, 1e-2, weight_decay=1e-3 if opt == "adam-wd" else 0.0)
        for step in range(6):
            if step == 3:
                o.reset()
            i = step * 16
            model.loss_and_grads(synth.x_train[i:i + 16], synth.y_train[i:i + 16])
            o.step()
        runs.append((model.get_weights(), {n: {k: a.copy() for k, a in s.items()} for n, s in o.state.items()}))
    w1, s1 = runs[0]
    for w, s in runs[1:]:
        for n in w1:
            assert np.array_equal(w[n], w1[n]), n
        assert s.keys() == s1.keys()
        for n in s1:
            for k in s1[n]:
                assert np.array_equal(s[n][k], s1[n][k]), (n, k)


@pytest.mark.parametrize("net,opt", [("lenet300", "adam"), ("lenet5", "sgd-momentum-wd")])
def test_all_ones_masks_skip_the_mask_passes_and_change_nothing(net, opt, synth):
    """The dense round of an experiment sets masks that keep every weight. Backward and the
    optimiser then skip their multiplications by 1.0: the run is bit-identical to one without masks,
    and a later real mask (a new array) is applied in full again."""
    def build(masks):
        model = nets.build(net, np.random.default_rng(9))
        if masks:
            model.set_masks({n: np.ones(model.params()[n].shape, bool) for n in model.prunable()})
        o = (SGD(model, 0.05, momentum=0.9, weight_decay=1e-3) if opt.startswith("sgd")
             else Adam(model, 1e-2))
        return model, o

    runs = []
    for masks in (False, True):
        model, o = build(masks)
        for step in range(4):
            i = step * 16
            model.loss_and_grads(synth.x_train[i:i + 16], synth.y_train[i:i + 16])
            o.step()
        runs.append((model, o))
    (m0, _), (m1, o1) = runs
    for n, p in m0.params().items():
        assert np.array_equal(p, m1.params()[n]), n
        assert np.array_equal(m0.grads()[n], m1.grads()[n]), n
    layer = m1.layers[m1.names.index(m1.prunable()[0].split(".")[0])]
    assert layer._mask_to_apply("W") is None                # the pass was skipped for this mask
    # now prune (a new mask object): the passes are back, pruned weights and gradients are exactly 0
    masks = _random_masks(m1, np.random.default_rng(10), 0.6)
    m1.set_masks(masks)
    assert layer._mask_to_apply("W") is layer.masks["W"]
    for step in range(4, 8):
        i = step * 16
        m1.loss_and_grads(synth.x_train[i:i + 16], synth.y_train[i:i + 16])
        o1.step()
    for n, m in masks.items():
        assert np.all(m1.params()[n][~m] == 0.0) and np.all(m1.grads()[n][~m] == 0.0), n
    # a mask array put into ``masks`` directly (not through set_mask) is applied as well
    fresh = np.zeros_like(layer.masks["W"])
    layer.masks["W"] = fresh
    m1.loss_and_grads(synth.x_train[:16], synth.y_train[:16])
    assert not np.any(layer.grads["W"])


@pytest.mark.parametrize("opt", ["adam-wd", "sgd-momentum-wd", "sgd"])
def test_dense_path_scratch_is_one_shared_chunk_sized_buffer(opt, synth):
    """The dense path's scratch (tmp, and wd with weight decay) is not per-parameter state: every
    chunk of every parameter works in the same buffers of at most CHUNK entries."""
    import nprune.optim
    model = nets.build("lenet300", np.random.default_rng(11))
    o = (Adam(model, 1e-3, weight_decay=1e-3) if opt == "adam-wd"
         else SGD(model, 0.05, momentum=0.9 if "momentum" in opt else 0.0,
                  weight_decay=1e-3 if "wd" in opt else 0.0))
    model.loss_and_grads(synth.x_train[:16], synth.y_train[:16])
    o.step()
    keep = {"adam-wd": {"m", "v"}, "sgd-momentum-wd": {"v"}, "sgd": set()}[opt]
    assert all(set(s) == keep for s in o.state.values())
    items = o._chunks[1]
    n_state = len(keep)
    scratch = [it[3 + n_state:] for it in items]        # (p, g, mask, *state, *scratch)
    assert all(len(s) == len(scratch[0]) >= 1 for s in scratch)
    for k in range(len(scratch[0])):
        views = [s[k] for s in scratch]
        assert all(np.shares_memory(v, views[0]) or v.size == 0 for v in views)
        assert all(v.size <= nprune.optim.CHUNK for v in views)
        if k:                                          # different scratch slots never overlap
            assert not np.shares_memory(views[0], scratch[0][0])


# -- the fast optimisers against the textbook steps of nprune.reference ------------------------------

def _textbook(opt):
    """The reference step with ``opt``'s hyper-parameters: step(w, g, state, mask) at opt.t."""
    if isinstance(opt, SGD):
        return lambda w, g, s, m: sgd_step(w, g, s, opt.lr, opt.t, opt.momentum, opt.weight_decay, m)
    return lambda w, g, s, m: adam_step(w, g, s, opt.lr, opt.b1, opt.b2, opt.eps, opt.t,
                                        opt.weight_decay, m)


@pytest.mark.parametrize("net", ["lenet300", "lenet5"])
@pytest.mark.parametrize("opt_name", ["sgd-momentum-wd", "adam", "adam-wd"])
@pytest.mark.parametrize("density", [0.6, 0.05])
def test_200_steps_match_the_textbook_step(net, opt_name, density):
    """200 steps of the fast optimiser on a model, and of the textbook step of nprune.reference on
    copies of its parameters, from the same gradients (random images and labels). Density 0.6 runs
    the dense path (chunks), 0.05 the compact path (survivors only, biases fused in).

    SGD: the same float32 operations in the same order, so ``==`` (parameters and velocity).
    Adam: the fast update folds the bias corrections into two scalars and keeps m/(1-b1) and
    v/(1-b2), so it rounds differently: an update (size <= ~lr) differs by a few float32 roundings,
    and a weight (size < 1) can end one rounding apart after a step, differences that add up over
    the steps. Measured: at most 1.8e-7 (3 float32 ulps of the largest weights) after 200 steps;
    asserted, with margin, |fast - textbook| <= 2e-6 + 1e-5 |textbook| at every step. Every pruned
    weight is exactly 0 after every step, in both."""
    rng = np.random.default_rng(20)
    model = nets.build(net, np.random.default_rng(21))
    masks = {n: rng.random(model.params()[n].shape) < density for n in model.prunable()}
    model.set_masks(masks)
    if opt_name.startswith("sgd"):
        o = SGD(model, 0.01, momentum=0.9, weight_decay=1e-3)
    else:
        o = Adam(model, 1.2e-3, weight_decay=1e-3 if opt_name == "adam-wd" else 0.0)
    step = _textbook(o)
    ref = model.get_weights()
    states = {n: {} for n in ref}
    layer_masks = model.masks()
    bs = 16 if net == "lenet300" else 8
    x = rng.random((4 * bs, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, 4 * bs)
    exact = isinstance(o, SGD)
    pruned = {n: np.flatnonzero(~m) for n, m in masks.items()}
    for t in range(200):
        i = (t % 4) * bs
        model.loss_and_grads(x[i:i + bs], y[i:i + bs])
        o.step()
        for n, g in model.grads().items():
            step(ref[n], g, states[n], layer_masks.get(n))
        params = model.params()
        for n, idx in pruned.items():
            assert not np.any(params[n].ravel()[idx]) and not np.any(ref[n].ravel()[idx]), (t, n)
        for n, p in params.items():
            if exact:
                assert np.array_equal(p, ref[n]), (t, n)
            else:
                err = np.abs(p - ref[n]) - 1e-5 * np.abs(ref[n])
                assert err.max() <= 2e-6, (t, n, err.max())
    group = o._group
    if density < COMPACT_DENSITY:
        assert group is not None and set(masks) <= set(group["names"])
    else:
        assert group is None
    for n, p in model.params().items():
        assert np.all(np.isfinite(p)) and not np.array_equal(p, model.fresh_params(rng)[n])
        if exact:
            np.testing.assert_array_equal(o._full_state(n, "v", p).reshape(p.shape),
                                          states[n]["velocity"])
        else:
            for key, scale in (("m", 1 - o.b1), ("v", 1 - o.b2)):   # sums that cancel: atol
                want = states[n][key]
                np.testing.assert_allclose(o._full_state(n, key, p).reshape(p.shape) * scale, want,
                                           rtol=1e-4, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_state_flush_matches_the_textbook_step(opt_name):
    """A gradient that stops: momentum and moments decay towards the subnormal range and are
    flushed to exactly 0 at the same step as the textbook step flushes them."""
    p = np.array([0.5, -0.25, 0.125], np.float32)
    g = np.array([1e-3, -2.0, 0.0], np.float32)
    o = SGD(_One(p, g), 0.01, momentum=0.9) if opt_name == "sgd" else Adam(_One(p, g), 1e-3)
    step = _textbook(o)
    w, state = p.copy(), {}
    for t in range(1, 800):
        o.step()
        step(w, g, state, None)
        g[...] = 0.0
        fast = o.state["w"]
        if opt_name == "sgd":
            assert np.array_equal(p, w) and np.array_equal(fast["v"], state["velocity"]), t
        else:
            np.testing.assert_allclose(p, w, rtol=1e-6, atol=1e-9)
            for key in ("m", "v"):
                assert np.array_equal(fast[key] == 0, state[key] == 0), (t, key)
    zeros = fast["v"] if opt_name == "sgd" else fast["m"]
    assert np.all(zeros == 0)                           # flushed (0.9**700 ~ 1e-32 of the start)
