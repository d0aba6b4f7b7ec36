"""VocabParallelSparseCategoricalCrossentropy on vocab-split logits against
keras.losses.SparseCategoricalCrossentropy(from_logits=True) on the whole
logits: values, gradients, reductions, sample weights, ignore_class."""

import keras
import numpy as np
import pytest
import tensorflow as tf
import tfshard
from tfshard.losses import (
    VocabParallelSparseCategoricalCrossentropy,
    vocab_parallel_sparse_categorical_crossentropy,
)

from conftest import SHARDED_MESH_SHAPES, make_strategy, mesh_id

BATCH, SEQ, VOCAB = 4, 8, 32
TOL = dict(rtol=1e-5, atol=1e-6)

CASES = [
    pytest.param({}, False, id="mean"),
    pytest.param({"reduction": "sum"}, True, id="sum-weighted"),
    pytest.param({"reduction": None}, False, id="none"),
    pytest.param({"ignore_class": 3}, True, id="ignore-weighted"),
]


@pytest.fixture(scope="module")
def data():
    rng = np.random.RandomState(1)
    logits = (rng.randn(BATCH, SEQ, VOCAB) * 4).astype("float32")
    labels = rng.randint(0, VOCAB, size=(BATCH, SEQ)).astype("int32")
    labels[0, :4] = [0, VOCAB - 1, VOCAB // 2, 3]  # shard edges, ignored class
    weights = rng.rand(BATCH, SEQ).astype("float32")
    return logits, labels, weights


def reference(logits, labels, weights, config):
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, **config)
    logits = tf.constant(logits)
    with tf.GradientTape() as tape:
        tape.watch(logits)
        value = loss(labels, logits, sample_weight=weights)
    return value.numpy(), tape.gradient(value, logits).numpy()


@pytest.mark.parametrize("config, weighted", CASES)
@pytest.mark.parametrize("shape", SHARDED_MESH_SHAPES, ids=mesh_id)
def test_parity_on_vocab_split_logits(shape, config, weighted, data):
    logits, labels, weights = data
    weights = weights if weighted else None
    expected, expected_grad = reference(logits, labels, weights, config)

    strategy = make_strategy(*shape)
    loss = VocabParallelSparseCategoricalCrossentropy(**config)
    split = strategy.place(logits, ("batch", None, "model"))
    labels_d = strategy.place(labels, ("batch", None))
    extra = {} if weights is None else {"sample_weight": strategy.place(weights, ("batch", None))}

    @tf.function(autograph=False)
    def value_and_grad(logits, labels, extra):
        with tf.GradientTape() as tape:
            tape.watch(logits)
            value = loss(labels, logits, **extra)
        return value, tape.gradient(value, logits)

    with strategy.scope():
        value, grad = value_and_grad(split, labels_d, extra)
    np.testing.assert_allclose(tfshard.to_numpy(value), expected, **TOL)
    # The gradient (softmax - one_hot) stays split like the logits.
    assert tfshard.layout_of(grad) == ("batch", None, "model")
    np.testing.assert_allclose(tfshard.to_numpy(grad), expected_grad, **TOL)


def test_eager_on_split_logits_and_plain_tensors(data):
    logits, labels, _ = data
    expected, expected_grad = reference(logits, labels, None, {})
    strategy = make_strategy(2, 4)
    split = strategy.place(logits, ("batch", None, "model"))
    loss = VocabParallelSparseCategoricalCrossentropy()
    with tf.GradientTape() as tape:
        tape.watch(split)
        value = loss(strategy.place(labels, ("batch", None)), split)
    np.testing.assert_allclose(tfshard.to_numpy(value), expected, **TOL)
    np.testing.assert_allclose(tfshard.to_numpy(tape.gradient(value, split)), expected_grad, **TOL)
    # Off the mesh it is the same formula on plain tensors.
    np.testing.assert_allclose(loss(labels, logits).numpy(), expected, **TOL)
    per_token = vocab_parallel_sparse_categorical_crossentropy(labels[..., None], logits)
    np.testing.assert_allclose(
        per_token.numpy(),
        keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True).numpy(),
        **TOL,
    )


def test_logits_are_never_gathered():
    """The per-token loss and the gradient keep the vocabulary split:
    nothing of shape (..., vocab) is replicated."""
    strategy = make_strategy(2, 4)
    logits = strategy.place(np.zeros((BATCH, SEQ, VOCAB), "float32"), ("batch", None, "model"))
    labels = strategy.place(np.zeros((BATCH, SEQ), "int32"), ("batch", None))
    with tf.GradientTape() as tape:
        tape.watch(logits)
        per_token = vocab_parallel_sparse_categorical_crossentropy(labels, logits)
    upstream = strategy.place(np.ones((BATCH, SEQ), "float32"), ("batch", None))
    grad = tape.gradient(per_token, logits, output_gradients=upstream)
    assert tfshard.layout_of(per_token) == ("batch", None)
    assert tfshard.layout_of(grad) == ("batch", None, "model")
    assert tfshard.local_shape(grad) == (BATCH // 2, SEQ, VOCAB // 4)
    np.testing.assert_allclose(tfshard.to_numpy(grad)[..., 1:], 1.0 / VOCAB, rtol=1e-5)
    np.testing.assert_allclose(tfshard.to_numpy(per_token), np.log(VOCAB), rtol=1e-6)


def test_from_logits_false_is_refused_and_config_round_trips():
    with pytest.raises(ValueError, match="from_logits=True"):
        VocabParallelSparseCategoricalCrossentropy(from_logits=False)
    loss = VocabParallelSparseCategoricalCrossentropy(ignore_class=0, reduction="sum", name="lm")
    clone = VocabParallelSparseCategoricalCrossentropy.from_config(loss.get_config())
    assert (clone.ignore_class, clone.reduction, clone.name) == (0, "sum", "lm")
    assert isinstance(keras.losses.deserialize(keras.losses.serialize(loss)), type(loss))


# ------------------------------------------------------- out-of-range labels
# TensorFlow's fused cross-entropy raises InvalidArgumentError on a label
# outside [0, classes) (on CPU); the vocab-parallel loss raises the same
# class (in fit, tfshard's StepError, a subclass of it), never a silent loss.
OUT_OF_RANGE = r"label value of (37|-1) which is outside the valid range of \[0, 32\)"


@pytest.mark.parametrize("bad", [VOCAB + 5, -1], ids=["above", "negative"])
def test_out_of_range_label_fails_eagerly(bad, data):
    logits, labels, _ = data
    labels = labels.copy()
    labels[1, 2] = bad
    strategy = make_strategy(2, 4)
    loss = VocabParallelSparseCategoricalCrossentropy()
    with pytest.raises(tf.errors.InvalidArgumentError, match=OUT_OF_RANGE + r".*labels\[1, 2\]"):
        loss(strategy.place(labels, ("batch", None)), strategy.place(logits, ("batch", None, "model")))
    with pytest.raises(tf.errors.InvalidArgumentError, match=OUT_OF_RANGE):
        loss(labels, logits)  # off the mesh too
    # An ignored class may lie outside the vocabulary (a padding id).
    ignored = VocabParallelSparseCategoricalCrossentropy(ignore_class=bad)
    expected, _ = reference(logits, labels, None, {"ignore_class": bad})
    np.testing.assert_allclose(tfshard.to_numpy(ignored(labels, logits)), expected, **TOL)


def _vocab_split_model(strategy, eager):
    with strategy.scope():
        model = keras.Sequential([
            keras.Input((SEQ, 16)), keras.layers.Dense(16),
            tfshard.layers.ColumnParallelDense(VOCAB, logical_dim="vocab"),
        ])
        model.compile(optimizer="sgd", loss=VocabParallelSparseCategoricalCrossentropy(), run_eagerly=eager)
    return model


@pytest.mark.parametrize(
    "shape, eager", [((2, 4), False), ((1, 8), False), ((2, 4), True)],
    ids=["2x4-traced", "1x8-traced", "2x4-eager"],
)
def test_out_of_range_label_fails_a_fit_step(shape, eager):
    """In fit: a StepError (an InvalidArgumentError and a TfshardError)
    saying a label is out of range; the next step with good labels trains."""
    rng = np.random.RandomState(2)
    x = rng.randn(8, SEQ, 16).astype("float32")
    y = rng.randint(0, VOCAB, size=(8, SEQ)).astype("int32")
    bad = y.copy()
    bad[5, 1] = VOCAB + 5
    model = _vocab_split_model(make_strategy(*shape), eager)
    text = OUT_OF_RANGE if eager else r"is not in \[0, 32\).*not a class id below the number of logits"
    with pytest.raises(tf.errors.InvalidArgumentError, match=text) as failure:
        model.fit(x, bad, batch_size=8, epochs=1, verbose=0)
    assert isinstance(failure.value, tfshard.TfshardError)
    assert np.isfinite(model.fit(x, y, batch_size=8, epochs=1, verbose=0).history["loss"][0])
