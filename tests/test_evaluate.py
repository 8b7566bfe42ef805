"""Inference over data sets (nprune.evaluate): chunked logits equal one pass, the chunk size follows
the kernels, and feature-major copies give the same bits."""
import numpy as np
import pytest

from nprune import evaluate as ev
from nprune import nets
from nprune.kernels import apply_kernel
from nprune.evaluate import (FeatureMajor, chunk_size, chunked_logits, evaluate, evaluation_copy,
                             feature_major, predict, wants_feature_major)


def _spy_forward(m, sizes):
    """Record the number of rows of every forward call of model ``m``."""
    inner = m.forward
    m.forward = lambda xb, train=True: sizes.append(len(xb)) or inner(xb, train)


@pytest.mark.parametrize("kernel", ["dense", "sparse", "auto"])
def test_inference_in_chunks_equals_one_pass(kernel, monkeypatch):
    """chunked_logits runs large batches through the whole net in row chunks; every sample's logits
    are exactly those of one unchunked pass (dense, sparse and auto kernels)."""
    rng = np.random.default_rng(0)
    m = nets.build("lenet300", rng)
    m.set_masks({k: rng.random(v.shape) < 0.03 for k, v in m.bool_masks().items()})
    apply_kernel(m, kernel)
    x = rng.random((1000, 784), dtype=np.float32)
    monkeypatch.setattr(ev, "EVAL_CHUNK", 300)  # 300, 300, 300, 100 (batch class "large" all but 1)
    monkeypatch.setattr(ev, "DENSE_EVAL_CHUNK", 300)
    sizes = []
    _spy_forward(m, sizes)
    chunked = chunked_logits(m, x)
    assert sizes == [300, 300, 300, 100]
    del m.forward
    monkeypatch.setattr(ev, "EVAL_CHUNK", 10 ** 6)
    monkeypatch.setattr(ev, "DENSE_EVAL_CHUNK", 10 ** 6)
    whole = chunked_logits(m, x)
    assert chunked.shape == (1000, 10) and chunked.dtype == np.float32
    np.testing.assert_array_equal(chunked[:900], whole[:900])
    if kernel != "auto":                        # auto may choose differently for the small last chunk
        np.testing.assert_array_equal(chunked, whole)
    else:
        np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(whole, m.forward(x, train=False))


def test_conv_net_inference_in_chunks_equals_one_pass(monkeypatch):
    rng = np.random.default_rng(1)
    m = nets.build("lenet5", rng)
    x = rng.random((70, 1, 28, 28), dtype=np.float32)
    monkeypatch.setattr(ev, "CONV_EVAL_BATCH", 32)        # 32, 32, 6
    sizes = []
    _spy_forward(m, sizes)
    chunked = chunked_logits(m, x)
    assert sizes == [32, 32, 6]
    del m.forward
    monkeypatch.setattr(ev, "CONV_EVAL_BATCH", 10 ** 6)
    np.testing.assert_array_equal(chunked, chunked_logits(m, x))


def test_inference_chunk_follows_the_kernels():
    # rows per chunk: EVAL_CHUNK when a layer may run its sparse kernel, DENSE_EVAL_CHUNK when every
    # layer runs dense (no kernel, or auto above every threshold), CONV_EVAL_BATCH for conv nets
    rng = np.random.default_rng(2)
    m = nets.build("lenet300", rng)
    assert chunk_size(m) == ev.DENSE_EVAL_CHUNK
    apply_kernel(m, "auto")                      # 100% density: auto routes every layer to dense
    assert chunk_size(m) == ev.DENSE_EVAL_CHUNK
    m.set_masks({k: rng.random(v.shape) < 0.01 for k, v in m.bool_masks().items()})
    assert chunk_size(m) == ev.EVAL_CHUNK       # now fc1 may take the kernel
    apply_kernel(m, "dense")
    assert chunk_size(m) == ev.DENSE_EVAL_CHUNK
    apply_kernel(m, "sparse")
    assert chunk_size(m) == ev.EVAL_CHUNK
    assert ev.EVAL_CHUNK != ev.DENSE_EVAL_CHUNK
    assert chunk_size(nets.build("lenet5", rng)) == ev.CONV_EVAL_BATCH


# -- feature-major evaluation sets ----------------------------------------------------------------

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
def test_evaluate_and_predict_from_feature_major_are_bit_identical(kernel, net, monkeypatch):
    rng = np.random.default_rng(3)
    m = nets.build(net, rng)
    m.set_masks({k: rng.random(v.shape) < 0.02 for k, v in m.bool_masks().items()})
    apply_kernel(m, kernel)
    n = 700 if net == "lenet300" else 90
    x = rng.random((n, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, n)
    # blocks = the row chunks of evaluate(m, x, y, 300): chunks restart at every batch of 300
    monkeypatch.setattr(ev, "EVAL_CHUNK", 128)
    monkeypatch.setattr(ev, "DENSE_EVAL_CHUNK", 128)
    f = feature_major(m, x, batch_size=300)
    want = [128, 128, 44, 128, 128, 44, 100] if net == "lenet300" else [90]   # conv: 256-image batches
    assert [len(v) for _, v in f.batches()] == want
    assert evaluate(m, f, y, batch_size=300) == evaluate(m, x, y, batch_size=300)
    np.testing.assert_array_equal(predict(m, f), predict(m, x, batch_size=300))


def test_sparse_first_layer_reads_feature_major_blocks_without_a_copy():
    rng = np.random.default_rng(4)
    m = nets.build("lenet300", rng)
    m.set_masks({k: rng.random(v.shape) < 0.02 for k, v in m.bool_masks().items()})
    apply_kernel(m, "sparse")
    x = rng.random((600, 1, 28, 28), dtype=np.float32)
    fc1 = m.layers[m.names.index("fc1")]
    predict(m, feature_major(m, x))
    assert "xT" not in fc1.kernel._bufs and "xc" not in fc1.kernel._bufs
    predict(m, x)                                   # a C-ordered input is transposed into a buffer
    assert "xT" in fc1.kernel._bufs or "xc" in fc1.kernel._bufs


def test_wants_feature_major_only_for_a_first_dense_layer_that_may_run_sparse():
    rng = np.random.default_rng(5)
    m = nets.build("lenet300", rng)
    assert not wants_feature_major(m)               # no kernel: the dense code
    apply_kernel(m, "auto")
    assert not wants_feature_major(m)               # 100% density: auto routes fc1 to dense
    m.set_masks({k: rng.random(v.shape) < 0.01 for k, v in m.bool_masks().items()})
    assert wants_feature_major(m)
    assert feature_major(m, np.zeros((3, 1, 28, 28), np.float32)).block == ev.EVAL_CHUNK
    assert feature_major(m, np.zeros((3, 1, 28, 28), np.float32), batch_size=100).block == 100
    m5 = nets.build("lenet5", rng)
    apply_kernel(m5, "sparse")
    assert not wants_feature_major(m5)              # conv nets: no


def test_evaluation_copy_is_feature_major_only_when_it_pays():
    rng = np.random.default_rng(6)
    m = nets.build("lenet300", rng)
    x = rng.random((40, 1, 28, 28), dtype=np.float32)
    assert evaluation_copy(m, x, 16) is x                          # dense: the array itself
    m.set_masks({k: rng.random(v.shape) < 0.01 for k, v in m.bool_masks().items()})
    apply_kernel(m, "sparse")
    f = evaluation_copy(m, x, 16)
    assert isinstance(f, FeatureMajor) and [len(v) for _, v in f.batches()] == [16, 16, 8]
    assert evaluation_copy(m, x[:0], 16) is not None and len(evaluation_copy(m, x[:0], 16)) == 0


def test_empty_data_set():
    m = nets.build("lenet300", np.random.default_rng(7))
    x = np.zeros((0, 1, 28, 28), np.float32)
    assert all(np.isnan(v) for v in evaluate(m, x, np.zeros(0, int)))
    assert predict(m, x).shape == (0, 0)
