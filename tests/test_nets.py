"""The two networks: architecture, weight counts, shapes, and that every strategy's reinit draws
come from each layer's own initialiser."""
import numpy as np
import pytest

from nprune import nets


def test_lenet300_architecture():
    m = nets.build("lenet300", np.random.default_rng(0))
    assert m.prunable() == ["fc1.W", "fc2.W", "fc3.W"]
    assert [m.params()[n].shape for n in m.prunable()] == [(784, 300), (300, 100), (100, 10)]
    assert m.n_weights() == 266_200
    assert m.forward(np.zeros((2, 1, 28, 28), np.float32), train=False).shape == (2, 10)


def test_lenet5_is_the_caffe_variant():
    m = nets.build("lenet5", np.random.default_rng(0))
    assert [type(l).__name__ for l in m.layers] == [
        "Conv2D", "MaxPool2D", "Conv2D", "MaxPool2D", "Flatten", "Dense", "ReLU", "Dense"]
    shapes = [m.params()[n].shape for n in m.prunable()]
    assert shapes == [(20, 1, 5, 5), (50, 20, 5, 5), (800, 500), (500, 10)]
    assert m.n_weights() == 430_500
    assert m.forward(np.zeros((3, 1, 28, 28), np.float32), train=False).shape == (3, 10)


def test_unknown_net():
    with pytest.raises(ValueError, match="unknown net"):
        nets.build("vgg", np.random.default_rng(0))


def test_fresh_params_follow_the_initialiser():
    m = nets.build("lenet300", np.random.default_rng(0))
    fresh = m.fresh_params(np.random.default_rng(1))
    w0 = m.params()["fc1.W"]
    w1 = fresh["fc1.W"]
    assert w1.shape == w0.shape and w1.dtype == np.float32
    assert not np.array_equal(w0, w1)
    assert abs(w1.std() / np.sqrt(2 / (784 + 300)) - 1) < 0.02     # Glorot normal
    assert np.all(fresh["fc1.b"] == 0)
