"""The two networks: architecture, weight counts, shapes, and that every strategy's reinit draws
come from each layer's own initialiser."""
import numpy as np
import pytest

from nprune import nets
from nprune.kernels import apply_kernel


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
    apply_kernel(m, kernel)
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
    apply_kernel(m, "auto")                     # 100% density: auto routes every layer to dense
    assert m._chunk_size() == m.dense_eval_chunk
    m.set_masks({k: rng.random(v.shape) < 0.01 for k, v in m.bool_masks().items()})
    assert m._chunk_size() == m.eval_chunk      # now fc1 may take the kernel
    apply_kernel(m, "dense")
    assert m._chunk_size() == m.dense_eval_chunk
    apply_kernel(m, "sparse")
    assert m._chunk_size() == m.eval_chunk
    assert m.eval_chunk != m.dense_eval_chunk
    assert nets.build("lenet5", rng)._chunk_size() == nets.build("lenet5", rng).conv_eval_batch


# -- feature-major evaluation sets ----------------------------------------------------------------
from nprune.model import FeatureMajor  # noqa: E402


@pytest.mark.parametrize("shape", [(1100, 1, 28, 28), (7, 784), (512, 3)])
def test_feature_major_holds_the_same_samples(shape):
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    f = FeatureMajor(x, 512)
    assert len(f) == shape[0]
    starts, sizes = [], []
    for s, v in f.batches():
        assert v.shape[1:] == shape[1:] and v.dtype == np.float32
        assert v.shape[0] == 1 or v.strides[0] == v.itemsize          # samples side by side
        np.testing.assert_array_equal(v, x[s:s + len(v)])
        starts.append(s)
        sizes.append(len(v))
    assert starts == list(range(0, shape[0], 512)) and sum(sizes) == shape[0]
    np.testing.assert_array_equal(f.to_array(), x)
    assert len(FeatureMajor(x[:0], 512)) == 0 and list(FeatureMajor(x[:0], 512).batches()) == []
    with pytest.raises(ValueError, match="FeatureMajor"):
        FeatureMajor(np.zeros(5, np.float32), 4)


@pytest.mark.parametrize("kernel", ["dense", "sparse", "auto"])
@pytest.mark.parametrize("net", ["lenet300", "lenet5"])
def test_evaluate_and_predict_from_feature_major_are_bit_identical(kernel, net):
    rng = np.random.default_rng(3)
    m = nets.build(net, rng)
    m.set_masks({k: rng.random(v.shape) < 0.02 for k, v in m.bool_masks().items()})
    apply_kernel(m, kernel)
    n = 700 if net == "lenet300" else 90
    x = rng.random((n, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, n)
    # blocks = the row chunks of evaluate(x, y, 300): chunks restart at every batch of 300
    m.eval_chunk = m.dense_eval_chunk = 128
    f = m.feature_major(x, batch_size=300)
    want = [128, 128, 44, 128, 128, 44, 100] if net == "lenet300" else [90]   # conv: 256-image batches
    assert [len(v) for _, v in f.batches()] == want
    assert m.evaluate(f, y, batch_size=300) == m.evaluate(x, y, batch_size=300)
    np.testing.assert_array_equal(m.predict(f), m.predict(x, batch_size=300))


def test_sparse_first_layer_reads_feature_major_blocks_without_a_copy():
    rng = np.random.default_rng(4)
    m = nets.build("lenet300", rng)
    m.set_masks({k: rng.random(v.shape) < 0.02 for k, v in m.bool_masks().items()})
    apply_kernel(m, "sparse")
    x = rng.random((600, 1, 28, 28), dtype=np.float32)
    fc1 = m.layers[m.names.index("fc1")]
    m.predict(m.feature_major(x))
    assert "xT" not in fc1.kernel._bufs and "xc" not in fc1.kernel._bufs
    m.predict(x)                                    # a C-ordered input is transposed into a buffer
    assert "xT" in fc1.kernel._bufs or "xc" in fc1.kernel._bufs


def test_wants_feature_major_only_for_a_first_dense_layer_that_may_run_sparse():
    rng = np.random.default_rng(5)
    m = nets.build("lenet300", rng)
    assert not m.wants_feature_major()              # no kernel: the dense code
    apply_kernel(m, "auto")
    assert not m.wants_feature_major()              # 100% density: auto routes fc1 to dense
    m.set_masks({k: rng.random(v.shape) < 0.01 for k, v in m.bool_masks().items()})
    assert m.wants_feature_major()
    assert m.feature_major(np.zeros((3, 1, 28, 28), np.float32)).block == m.eval_chunk
    assert m.feature_major(np.zeros((3, 1, 28, 28), np.float32), batch_size=100).block == 100
    m5 = nets.build("lenet5", rng)
    apply_kernel(m5, "sparse")
    assert not m5.wants_feature_major()             # conv nets: no


def test_loss_and_grads_flushes_subnormal_logit_gradients():
    """A memorised batch makes softmax put ~1e-39 on the wrong classes; dL/dlogits entries below
    GRAD_FLUSH_BELOW (1e-30) reach backward as exact zeros (float32 subnormals are ~100x slower);
    every other entry is untouched."""
    from nprune.losses import softmax_cross_entropy
    from nprune.model import GRAD_FLUSH_BELOW
    rng = np.random.default_rng(6)
    m = nets.build("lenet300", rng)
    x = rng.random((8, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, 8)
    seen = []
    inner = m.backward
    m.backward = lambda d: seen.append(d.copy()) or inner(d)
    logits0 = m.forward(x, train=False)
    m.layers[-1].params["W"] *= 60.0 / np.abs(logits0).max()    # logits ~100 apart
    m.layers[-1].params["b"][:] = 0
    _, ref = softmax_cross_entropy(m.forward(x, train=False), y)
    tiny = (ref != 0) & (np.abs(ref) < GRAD_FLUSH_BELOW)
    assert tiny.any()                                 # the batch does produce such entries
    m.loss_and_grads(x, y)
    d = seen[-1]
    assert np.all(d[tiny] == 0) and np.array_equal(d[~tiny], ref[~tiny])
    assert not np.any((d != 0) & (np.abs(d) < GRAD_FLUSH_BELOW))
