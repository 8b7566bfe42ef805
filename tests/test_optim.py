"""Optimisers: the mask invariant (pruned weights exactly zero after any number of steps), state
reset, and the update formulas against hand-computed values (and PyTorch when installed)."""
import numpy as np
import pytest

from nprune import nets
from nprune.optim import SGD, Adam, make_optimizer


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
