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


@pytest.mark.parametrize("kernel", ["dense", "sparse", "auto"])
def test_inference_in_chunks_equals_one_pass(kernel):
    """Sequential.forward(train=False) runs large batches through the whole net in row chunks; every
    sample's logits are exactly those of one unchunked pass (dense, sparse and auto kernels)."""
    rng = np.random.default_rng(0)
    m = nets.build("lenet300", rng)
    m.set_masks({k: rng.random(v.shape) < 0.03 for k, v in m.bool_masks().items()})
    m.set_kernel(kernel)
    x = rng.random((1000, 784), dtype=np.float32)
    m.eval_chunk = m.dense_eval_chunk = 300     # 300, 300, 300, 100 (batch class "large" all but 1)
    sizes = []
    inner = m._forward
    m._forward = lambda xb, train: sizes.append(len(xb)) or inner(xb, train)
    chunked = m.forward(x, train=False)
    assert sizes == [300, 300, 300, 100]
    del m._forward
    m.eval_chunk = m.dense_eval_chunk = 10 ** 6
    whole = m.forward(x, train=False)
    assert chunked.shape == (1000, 10) and chunked.dtype == np.float32
    np.testing.assert_array_equal(chunked[:900], whole[:900])
    if kernel != "auto":                        # auto may choose differently for the small last chunk
        np.testing.assert_array_equal(chunked, whole)
    else:
        np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-6)


def test_conv_net_inference_in_chunks_equals_one_pass():
    rng = np.random.default_rng(1)
    m = nets.build("lenet5", rng)
    x = rng.random((70, 1, 28, 28), dtype=np.float32)
    m.conv_eval_batch = 32                      # 32, 32, 6
    sizes = []
    inner = m._forward
    m._forward = lambda xb, train: sizes.append(len(xb)) or inner(xb, train)
    chunked = m.forward(x, train=False)
    assert sizes == [32, 32, 6]
    del m._forward
    m.conv_eval_batch = 10 ** 6
    np.testing.assert_array_equal(chunked, m.forward(x, train=False))


def test_inference_chunk_follows_the_kernels():
    # rows per chunk: eval_chunk when a layer may run its sparse kernel, dense_eval_chunk when every
    # layer runs dense (no kernel, or auto above every threshold), conv_eval_batch for conv nets
    rng = np.random.default_rng(2)
    m = nets.build("lenet300", rng)
    assert m._chunk_size() == m.dense_eval_chunk
    m.set_kernel("auto")                        # 100% density: auto routes every layer to dense
    assert m._chunk_size() == m.dense_eval_chunk
    m.set_masks({k: rng.random(v.shape) < 0.01 for k, v in m.bool_masks().items()})
    assert m._chunk_size() == m.eval_chunk      # now fc1 may take the kernel
    m.set_kernel("dense")
    assert m._chunk_size() == m.dense_eval_chunk
    m.set_kernel("sparse")
    assert m._chunk_size() == m.eval_chunk
    assert m.eval_chunk != m.dense_eval_chunk
    assert nets.build("lenet5", rng)._chunk_size() == nets.build("lenet5", rng).conv_eval_batch
