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
    "shape, eager", [((1, 8), False), ((2, 4), True)],
    ids=["1x8-traced", "2x4-eager"],
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


# ------------------------------------------- the stock Keras loss on a mesh
# keras.losses.SparseCategoricalCrossentropy(from_logits=True) (as keras-hub
# compiles its CausalLMs) on logits a column-parallel head splits by
# vocabulary runs as the vocab-parallel formula in a traced step
# (tfshard._ops.cross_entropy), not as TensorFlow's fused op, whose DTensor
# expander gathers the logits.
STOCK_PLAN = {".*head": tfshard.styles.ColumnParallel(dim="vocab", gather_output=True)}


def stock_lm(seed=0, ignore_class=None):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((SEQ,), dtype="int32"),
        keras.layers.Embedding(VOCAB, 16),
        keras.layers.Dense(16, activation="tanh"),
        keras.layers.Dense(VOCAB, name="head"),
    ])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=ignore_class)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=loss, weighted_metrics=[])
    return model


def stock_lm_data():
    rng = np.random.RandomState(3)
    x = rng.randint(0, VOCAB, size=(16, SEQ)).astype("int32")
    y = rng.randint(0, VOCAB, size=(16, SEQ)).astype("int32")
    y[:, -1] = 3  # the ignored class in one case
    return x, y


def stock_strategy(shape):
    mesh = tfshard.Mesh({"batch": shape[0], "model": shape[1]})
    return tfshard.StrategyBuilder(mesh).data_parallel("batch").tensor_parallel("model").plan(STOCK_PLAN).build()


def test_stock_loss_trains_like_keras_on_vocab_split_logits():
    """2x4, with an ignored class: fit losses and weights as plain Keras's;
    an out-of-range label fails the step as TensorFlow's fused op does."""
    from tfshard._ops import cross_entropy

    x, y = stock_lm_data()
    plain = stock_lm(ignore_class=3)
    strategy = stock_strategy((2, 4))
    with strategy.scope():
        sharded = stock_lm(ignore_class=3)
    assert tfshard.spec_of(sharded.get_layer("head").kernel) == (None, "model")
    assert cross_entropy.split_class_axis(strategy, VOCAB) == "model"
    assert cross_entropy.split_class_axis(strategy, VOCAB // 2) is None  # a classifier's whole logits
    expected = plain.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0).history["loss"]
    got = sharded.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0).history["loss"]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    for p, s in zip(plain.weights, sharded.weights):
        np.testing.assert_allclose(tfshard.to_numpy(s), p.numpy(), rtol=1e-5, atol=1e-5, err_msg=s.path)
    bad = y.copy()
    bad[2, 1] = VOCAB
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"is not in \[0, 32\)"):
        sharded.fit(x, bad, batch_size=8, epochs=1, shuffle=False, verbose=0)


def measure_stock_loss_step():
    """In a child process: the collectives of one 2x4 train step of
    ``stock_lm`` as launched (DTensor's optimized stage) and as expanded,
    with the shapes of the expanded model-axis all-reduces."""
    import re

    from tfshard import _spmd_dumps, comm
    from tfshard.app.bench import TRAIN_STEP_PROGRAM
    from tfshard.auto_plan import auto_plan

    x, y = stock_lm_data()
    mesh = tfshard.Mesh({"batch": 2, "model": 4})
    plan = auto_plan(stock_lm, mesh, inputs=x[:8])
    keras.backend.clear_session()
    with plan.builder(mesh).build().scope():
        model = stock_lm()
    assert tfshard.spec_of(model.get_layer("head").kernel) == (None, "model")
    with comm.dump_dir() as directory:
        model.fit(x[:8], y[:8], batch_size=8, epochs=1, verbose=0)
        launched, _ = comm.parse_dump_dir(directory, "optimized", program=TRAIN_STEP_PROGRAM)
        expanded, _ = comm.parse_dump_dir(directory, "expanded", program=TRAIN_STEP_PROGRAM)
        text = next(_spmd_dumps._program_texts(directory, "expanded", TRAIN_STEP_PROGRAM))
    shapes = re.findall(r'"tf\.DTensorAllReduce".*:\s*\(tensor<([^>]*)>, tensor<2x4xi32>\)', text)
    keep = lambda counts: comm.CollectiveCounts(  # noqa: E731
        {k: n for k, n in counts.items() if n and k[0] != "all_scatter"})
    return keep(launched), keep(expanded), shapes, plan.estimate_collectives()


def test_stock_loss_on_vocab_split_logits_never_gathers_them():
    """The model laid out by auto_plan (the head column-parallel by
    vocabulary). Pinned from DTensor's dump of the fit step on 2x4 (4 x 8 tokens per
    device, 32 classes). TensorFlow's fused op would all-gather the logits
    (4x8x32); here nothing is gathered: the model-axis all-reduces are the
    max (4x8x1), the sum of exponentials and the label's logit (4x8 each,
    launched together) and the gradient reaching the replicated layers
    (32x16), 3 launches in all."""
    from tfshard import comm

    launched, expanded, shapes, estimate = comm.run_in_subprocess("test_losses:measure_stock_loss_step")
    assert expanded.total("all_gather") == 0, expanded
    assert sorted(shapes) == ["32x16xf32", "4x8x1xf32", "4x8xf32", "4x8xf32"], shapes
    assert launched == {("all_reduce", "model"): 3, ("all_reduce", "batch"): 1}, launched
    assert estimate == launched  # auto_plan's cost model follows the vocab-parallel path
