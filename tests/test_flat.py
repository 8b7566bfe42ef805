"""Flat parameter buffers: every parameter and gradient of a Sequential is a view of one flat array,
the optimiser's state of another at the same offsets, and the updates over the flat arrays give the
same bits as the per-parameter updates (tests compare with ``np.array_equal``)."""
import numpy as np
import pytest

import nprune.optim
from nprune import nets
from nprune.optim import SGD, Adam
from nprune.training import train_step


def _masks(model, rng, density):
    """Random masks; ``density`` "mixed" gives the weights 0.8 and 0.3 in turn (dense and compact
    paths in one model)."""
    out = {}
    for i, n in enumerate(model.prunable()):
        d = (0.3 if i % 2 else 0.8) if density == "mixed" else density
        out[n] = rng.random(model.params()[n].shape) < d
    return out


def _optimizer(name, model):
    return {"sgd": lambda: SGD(model, 0.02),
            "sgd-momentum-wd": lambda: SGD(model, 0.02, momentum=0.9, weight_decay=1e-3),
            "adam": lambda: Adam(model, 2e-3),
            "adam-wd": lambda: Adam(model, 2e-3, weight_decay=1e-3)}[name]()


@pytest.mark.parametrize("net", ["lenet300", "lenet5"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_parameters_and_gradients_are_views_of_the_flat_buffers(net, dtype):
    model = nets.build(net, np.random.default_rng(0), dtype=dtype)
    fp, fg, layout = model.flat_params, model.flat_grads, model.flat_layout
    assert fp.dtype == fg.dtype == dtype and fp.ndim == fg.ndim == 1
    assert fp.flags.c_contiguous and fg.flags.c_contiguous
    assert list(layout) == list(model.params())
    ends = 0
    for name, p in model.params().items():
        a, b = layout[name]
        assert a == ends and b - a == p.size              # back to back, in layer order
        ends = b
        assert np.shares_memory(p, fp) and np.array_equal(p.reshape(-1), fp[a:b])
        assert np.shares_memory(model.grads()[name], fg)
    assert ends == fp.size
    w = model.fresh_params(np.random.default_rng(1))
    model.set_weights(w)                                  # writes land in the flat buffer
    for name, (a, b) in layout.items():
        assert np.array_equal(fp[a:b], w[name].reshape(-1))


@pytest.mark.parametrize("net,steps", [("lenet300", 300), ("lenet5", 40)])
@pytest.mark.parametrize("opt", ["sgd", "sgd-momentum-wd", "adam", "adam-wd"])
@pytest.mark.parametrize("density", [None, 0.7, 0.3, "mixed"])
def test_flat_updates_are_bit_identical_to_per_parameter_updates(net, steps, opt, density, synth):
    """Same model, same batches: the flat buffers (merged chunks, one gather index for the compact
    group) against separate arrays (today's per-parameter items); pruned weights stay exactly 0."""
    runs = []
    for flat in (True, False):
        rng = np.random.default_rng(3)
        model = nets.build(net, rng)
        if not flat:
            model.unflatten()
        masks = _masks(model, rng, density) if density is not None else None
        if masks:
            model.set_masks(masks)
        o = _optimizer(opt, model)
        for _ in range(steps):
            idx = rng.integers(0, len(synth.x_train), 32)
            train_step(model, synth.x_train[idx], synth.y_train[idx])
            o.step()
        for n, m in (masks or {}).items():
            assert np.all(model.params()[n][~m] == 0.0), n
        runs.append(model.get_weights())
    for n in runs[0]:
        assert np.array_equal(runs[0][n], runs[1][n]), n


@pytest.mark.parametrize("opt", ["sgd-momentum-wd", "adam"])
def test_masks_change_without_reset_state_carries_over_the_same(opt, synth):
    """Masks changed mid-run without a reset move parameters between the dense path (flat state
    views) and the compact group (its own state): the same bits as with separate arrays."""
    runs = []
    for flat in (True, False):
        rng = np.random.default_rng(4)
        model = nets.build("lenet300", rng)
        if not flat:
            model.unflatten()
        o = _optimizer(opt, model)
        for phase, density in enumerate((0.8, 0.3, 0.9, "mixed")):
            masks = _masks(model, np.random.default_rng(10 + phase), density)
            model.set_masks(masks)
            for _ in range(20):
                idx = rng.integers(0, len(synth.x_train), 32)
                train_step(model, synth.x_train[idx], synth.y_train[idx])
                o.step()
            for n, m in masks.items():
                assert np.all(model.params()[n][~m] == 0.0), n
        runs.append(model.get_weights())
    for n in runs[0]:
        assert np.array_equal(runs[0][n], runs[1][n]), n


def test_dense_path_runs_over_the_flat_buffers_in_long_chunks(synth):
    """LeNet-300-100's six parameters are one run over the flat buffers, cut into
    ceil(266,610 / CHUNK) chunks; a chunk that meets no pruned weight skips the re-mask."""
    model = nets.build("lenet300", np.random.default_rng(5))
    o = Adam(model, 1e-3)
    model.loss_and_grads(synth.x_train[:16], synth.y_train[:16])
    o.step()
    items = o._chunks[1]
    n = model.flat_params.size
    assert len(items) == -(-n // nprune.optim.CHUNK)
    assert all(np.shares_memory(it[0], model.flat_params) for it in items)
    assert all(it[2] is None for it in items)                 # no masks: no re-mask pass
    for s in o.state.values():                               # state: views of flat buffers
        assert all(np.shares_memory(v, o._flat_state[k]) for k, v in s.items())
    only_fc3 = {n: np.ones(model.params()[n].shape, bool) for n in model.prunable()}
    only_fc3["fc3.W"] = np.random.default_rng(6).random((100, 10)) < 0.9
    model.set_masks(only_fc3)
    model.loss_and_grads(synth.x_train[:16], synth.y_train[:16])
    o.step()
    masked = [it for it in o._chunks[1] if it[2] is not None]
    assert len(masked) == 1 and np.shares_memory(masked[0][0], model.params()["fc3.W"])


def test_compact_group_gathers_with_one_flat_index(synth):
    model = nets.build("lenet300", np.random.default_rng(7))
    masks = _masks(model, np.random.default_rng(8), 0.2)
    model.set_masks(masks)
    o = Adam(model, 1e-3)
    model.loss_and_grads(synth.x_train[:16], synth.y_train[:16])
    o.step()
    gidx = o._group["flat"]
    live = sum(int(m.sum()) for m in masks.values()) + sum(
        p.size for n, p in model.params().items() if n not in masks)
    assert gidx is not None and gidx.size == live == np.unique(gidx).size
