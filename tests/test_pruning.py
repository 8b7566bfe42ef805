"""Pruning engine: exact counts, nesting, smallest-magnitude choice, tie rule, global vs layer-wise,
random control."""
import numpy as np
import pytest

from nprune.pruning import (magnitude_global, magnitude_layerwise, n_to_prune, prune, random_layerwise,
                          sparsity_report)


def _setup(rng, shapes=(("a", (30, 20)), ("b", (20, 10)), ("c", (10,)))):
    w = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes}
    m = {n: np.ones(s, bool) for n, s in shapes}
    return w, m


def test_rounding_rule_is_half_up():
    assert n_to_prune(0.2, 10) == 2
    assert n_to_prune(0.25, 10) == 3      # 2.5 -> 3 (half up, not banker's 2)
    assert n_to_prune(0.1, 4) == 0        # 0.4 -> 0
    assert n_to_prune(0.15, 10) == 2      # 1.5 -> 2
    with pytest.raises(ValueError):
        n_to_prune(1.0, 10)


@pytest.mark.parametrize("rate", [0.09, 0.2, 0.5])
def test_layerwise_exact_counts_and_nesting(rng, rate):
    w, m = _setup(rng)
    rates = {"a": rate, "b": rate / 2, "c": rate}
    for _ in range(6):
        new = magnitude_layerwise(w, m, rates)
        for n in m:
            before, after = m[n].sum(), new[n].sum()
            assert before - after == n_to_prune(rates[n], before)
            assert not np.any(new[n] & ~m[n])          # nesting: nothing comes back
            # every pruned-this-round weight is no larger than any survivor
            gone = m[n] & ~new[n]
            if gone.any() and new[n].any():
                assert np.abs(w[n][gone]).max() <= np.abs(w[n][new[n]]).min()
        m = new
        w = {n: v * m[n] + rng.standard_normal(v.shape).astype(np.float32) * 0.01 * m[n]
             for n, v in w.items()}


def test_tie_rule_lower_index_first():
    w = {"a": np.array([3.0, 1.0, -1.0, 1.0, 2.0, -1.0])}
    m = {"a": np.ones(6, bool)}
    new = magnitude_layerwise(w, m, {"a": 0.5})       # k = 3 of the four |w| == 1 entries
    assert new["a"].tolist() == [True, False, False, False, True, True]


def test_pruned_weights_are_never_candidates_even_if_large():
    w = {"a": np.array([100.0, 0.1, 0.2, 0.3])}
    m = {"a": np.array([False, True, True, True])}
    new = magnitude_layerwise(w, m, {"a": 0.34})       # k = 1 of 3 survivors
    assert new["a"].tolist() == [False, False, True, True]


def test_global_uses_one_threshold(rng):
    w = {"big": rng.standard_normal((50, 50)) * 10, "small": rng.standard_normal((50, 50))}
    m = {n: np.ones(v.shape, bool) for n, v in w.items()}
    new = magnitude_global(w, m, 0.5)
    total_removed = sum((m[n] & ~new[n]).sum() for n in m)
    assert total_removed == n_to_prune(0.5, 5000)
    thr_pruned = max(np.abs(w[n][m[n] & ~new[n]]).max() for n in m)
    thr_kept = min(np.abs(w[n][new[n]]).min() for n in m)
    assert thr_pruned <= thr_kept
    # the small-magnitude tensor loses much more than the large one; layer-wise would be even
    assert (~new["small"]).sum() > 3 * (~new["big"]).sum()


def test_global_dispatch_matches_layerwise_total(rng):
    w, m = _setup(rng)
    rates = {"a": 0.2, "b": 0.2, "c": 0.1}
    lw = prune(w, m, rates, "layer")
    gl = prune(w, m, rates, "global")
    assert sum(v.sum() for v in lw.values()) == sum(v.sum() for v in gl.values())


def test_random_control_same_counts_different_positions(rng):
    w, m = _setup(rng)
    rates = {"a": 0.3, "b": 0.3, "c": 0.3}
    mag = magnitude_layerwise(w, m, rates)
    r1 = random_layerwise(m, rates, np.random.default_rng(1))
    r2 = random_layerwise(m, rates, np.random.default_rng(1))
    for n in m:
        assert r1[n].sum() == mag[n].sum()
        np.testing.assert_array_equal(r1[n], r2[n])          # seeded
    assert any(not np.array_equal(r1[n], mag[n]) for n in m)
    with pytest.raises(ValueError):
        prune(w, m, rates, "random")                         # needs an rng


def test_sparsity_report():
    m = {"a": np.array([1, 0, 1, 0], bool), "b": np.ones(6, bool)}
    rep = sparsity_report(m)
    assert rep["a"] == {"left": 2, "total": 4, "percent": 50.0}
    assert rep["total"]["left"] == 8 and rep["total"]["total"] == 10
    assert rep["total"]["percent"] == pytest.approx(80.0)
