"""Short training runs on the real MNIST files (skipped, with the reason, when they are not found)."""
import numpy as np
import pytest

from nprune import nets
from nprune.data.datasets import load_dataset, prepare
from nprune.training import TrainConfig, train


@pytest.fixture(scope="module")
def mnist(request):
    from conftest import real_mnist
    return prepare(load_dataset("mnist", data_dir=real_mnist()), n_val=5000, seed=0)


def test_real_mnist_splits(mnist):
    assert mnist.x_train.shape == (55000, 1, 28, 28) and mnist.x_val.shape == (5000, 1, 28, 28)
    assert mnist.x_test.shape == (10000, 1, 28, 28) and mnist.x_train.dtype == np.float32
    assert 0.0 <= mnist.x_train.min() and mnist.x_train.max() <= 1.0


def test_lenet300_one_epoch(mnist):
    model = nets.build("lenet300", np.random.default_rng(0))
    cfg = TrainConfig(optimizer="adam", lr=1.2e-3, batch_size=60, iterations=916, eval_every=458)
    res, _ = train(model, mnist, cfg, np.random.default_rng(1))
    assert res.final_test_acc >= 0.95, res.test_acc
    assert res.final_val_acc >= 0.94


def test_lenet5_short(mnist):
    model = nets.build("lenet5", np.random.default_rng(0))
    cfg = TrainConfig(optimizer="sgd", lr=0.01, momentum=0.9, batch_size=64, iterations=300, eval_every=300)
    res, _ = train(model, mnist, cfg, np.random.default_rng(1))
    assert res.final_test_acc >= 0.95, res.test_acc
