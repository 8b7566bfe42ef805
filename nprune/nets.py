"""The two networks of the lottery-ticket experiments, and a registry by name.

* ``lenet300``: LeNet-300-100, 784-300-100-10 fully connected with ReLU; 266,200 weights.
* ``lenet5``: the Caffe LeNet that Han et al. (2015) prune: conv 20@5x5, max-pool 2, conv 50@5x5,
  max-pool 2, fc 500 + ReLU, fc 10 (no activation after the convolutions, as in Caffe's
  ``lenet_train_test.prototxt``); 430,500 weights.

Both take NCHW images ``(N, 1, 28, 28)`` and return logits ``(N, 10)``.
"""
from __future__ import annotations

import numpy as np

from .layers import Conv2D, Dense, Flatten, ReLU
from .model import Sequential
from .pooling import MaxPool2D


def lenet300(rng: np.random.Generator, init: str = "glorot_normal", dtype=np.float32) -> Sequential:
    """LeNet-300-100 with weights drawn from ``init`` using ``rng`` (biases zero)."""
    return Sequential([
        ("flat", Flatten()),
        ("fc1", Dense(784, 300, rng, init=init, dtype=dtype)),
        ("relu1", ReLU()),
        ("fc2", Dense(300, 100, rng, init=init, dtype=dtype)),
        ("relu2", ReLU()),
        ("fc3", Dense(100, 10, rng, init=init, dtype=dtype)),
    ])


def lenet5(rng: np.random.Generator, init: str = "glorot_normal", dtype=np.float32) -> Sequential:
    """Caffe LeNet-5 with weights drawn from ``init`` using ``rng`` (biases zero)."""
    return Sequential([
        ("conv1", Conv2D(1, 20, 5, rng, init=init, dtype=dtype)),
        ("pool1", MaxPool2D(2)),
        ("conv2", Conv2D(20, 50, 5, rng, init=init, dtype=dtype)),
        ("pool2", MaxPool2D(2)),
        ("flat", Flatten()),
        ("fc1", Dense(800, 500, rng, init=init, dtype=dtype)),
        ("relu1", ReLU()),
        ("fc2", Dense(500, 10, rng, init=init, dtype=dtype)),
    ])


NETS = {"lenet300": lenet300, "lenet5": lenet5}


def fuse_conv_pool(model: Sequential) -> Sequential:
    """Fuse every Conv2D that needs no dx with a tiling MaxPool2D right after it (size = stride > 1;
    in LeNet-5: conv1 + pool1) by setting ``conv.pool_fuse`` (see :class:`~nprune.layers.Conv2D`):
    the same values, without the pool's strided passes. Returns ``model``."""
    for a, b in zip(model.layers, model.layers[1:]):
        if isinstance(a, Conv2D) and isinstance(b, MaxPool2D) and b.stride == b.size > 1 \
                and not a.need_dx:
            a.pool_fuse = b.size
    return model


def build(name: str, rng: np.random.Generator, init: str = "glorot_normal", dtype=np.float32) -> Sequential:
    """Build a network by name (``lenet300`` or ``lenet5``), with :func:`fuse_conv_pool` applied."""
    try:
        fn = NETS[name]
    except KeyError:
        raise ValueError(f"unknown net {name!r}; choose from {', '.join(NETS)}") from None
    return fuse_conv_pool(fn(rng, init=init, dtype=dtype))
