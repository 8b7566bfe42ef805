"""Forward/backward parity with PyTorch (float64). Skipped when torch is not installed."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from nprune.layers import Conv2D, Dense, ReLU  # noqa: E402
from nprune.pooling import MaxPool2D  # noqa: E402
from nprune.losses import softmax_cross_entropy  # noqa: E402

pytestmark = pytest.mark.torch
F64 = np.float64
KW = dict(rtol=1e-10, atol=1e-10)


def _t(a, grad=True):
    return torch.tensor(a, dtype=torch.float64, requires_grad=grad)


@pytest.fixture
def rng():
    return np.random.default_rng(99)


def test_dense_parity(rng):
    layer = Dense(7, 4, rng, dtype=F64)
    layer.params["b"][...] = rng.standard_normal(4)
    x = rng.standard_normal((5, 7))
    y = layer.forward(x)
    dout = rng.standard_normal(y.shape)
    dx = layer.backward(dout)
    xt, Wt, bt = _t(x), _t(layer.params["W"].T.copy()), _t(layer.params["b"])
    yt = F.linear(xt, Wt, bt)
    yt.backward(torch.tensor(dout))
    np.testing.assert_allclose(y, yt.detach().numpy(), **KW)
    np.testing.assert_allclose(dx, xt.grad.numpy(), **KW)
    np.testing.assert_allclose(layer.grads["W"], Wt.grad.numpy().T, **KW)
    np.testing.assert_allclose(layer.grads["b"], bt.grad.numpy(), **KW)


@pytest.mark.parametrize("c,k,s,p,h,w", [
    (1, 5, 1, 0, 12, 12),
    (3, 3, 1, 1, 8, 9),
    (3, 3, 2, 1, 9, 7),
    (2, (3, 2), 2, 2, 7, 8),
    (4, 5, 1, 2, 10, 10),
])
def test_conv_parity(rng, c, k, s, p, h, w):
    layer = Conv2D(c, 5, k, rng, stride=s, padding=p, dtype=F64)
    layer.params["b"][...] = rng.standard_normal(5)
    x = rng.standard_normal((3, c, h, w))
    y = layer.forward(x)
    dout = rng.standard_normal(y.shape)
    dx = layer.backward(dout)
    xt, Wt, bt = _t(x), _t(layer.params["W"]), _t(layer.params["b"])
    yt = F.conv2d(xt, Wt, bt, stride=s, padding=p)
    yt.backward(torch.tensor(dout))
    np.testing.assert_allclose(y, yt.detach().numpy(), **KW)
    np.testing.assert_allclose(dx, xt.grad.numpy(), **KW)
    np.testing.assert_allclose(layer.grads["W"], Wt.grad.numpy(), **KW)
    np.testing.assert_allclose(layer.grads["b"], bt.grad.numpy(), **KW)


@pytest.mark.parametrize("size,stride,h,w", [(2, 2, 8, 8), (2, 2, 7, 9), (3, 2, 9, 9), (3, 1, 6, 6)])
@pytest.mark.parametrize("ties", [False, True])
def test_maxpool_parity(rng, size, stride, h, w, ties):
    if ties:  # post-ReLU style exact ties; both route to the first max in row-major order
        x = np.maximum(rng.integers(-2, 2, (2, 3, h, w)), 0).astype(F64)
    else:
        x = rng.standard_normal((2, 3, h, w))
    layer = MaxPool2D(size, stride)
    y = layer.forward(x)
    dout = rng.standard_normal(y.shape)
    dx = layer.backward(dout)
    xt = _t(x)
    yt = F.max_pool2d(xt, size, stride)
    yt.backward(torch.tensor(dout))
    np.testing.assert_allclose(y, yt.detach().numpy(), **KW)
    np.testing.assert_allclose(dx, xt.grad.numpy(), **KW)


def test_relu_parity(rng):
    x = rng.standard_normal((4, 3, 5, 5))
    layer = ReLU()
    y = layer.forward(x)
    dout = rng.standard_normal(y.shape)
    dx = layer.backward(dout)
    xt = _t(x)
    yt = F.relu(xt)
    yt.backward(torch.tensor(dout))
    np.testing.assert_allclose(y, yt.detach().numpy(), **KW)
    np.testing.assert_allclose(dx, xt.grad.numpy(), **KW)


def test_softmax_ce_parity(rng):
    logits = rng.standard_normal((16, 10)) * 3
    y = rng.integers(0, 10, 16)
    loss, d = softmax_cross_entropy(logits, y)
    lt = _t(logits)
    lossT = F.cross_entropy(lt, torch.tensor(y), reduction="mean")
    lossT.backward()
    assert loss == pytest.approx(lossT.item(), rel=1e-12)
    np.testing.assert_allclose(d, lt.grad.numpy(), **KW)
