"""model.fit / evaluate / predict on sharded models give plain Keras's numbers.

Column/row MLP on every sharded mesh shape, a transformer built from stock
Keras layers, the three ways of writing a Keras model, eager calls on plain
inputs, and one trace per step kind.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
import tfshard

from conftest import mesh_id
from test_fit_common import (
    BATCH,
    D_OUT,
    N,
    PREFIXED_MLP_RULES,
    TOL,
    assert_history_close,
    assert_mlp_is_sharded,
    assert_weights_close,
    functional_mlp,
    mesh_strategy,
    plain_and_sharded,
    regression_compile,
    regression_data,
    sequential_mlp,
    subclassed_mlp,
    weight,
)

EPOCHS = 3
FIT = dict(batch_size=BATCH, shuffle=False, verbose=0)


# ------------------------------------------------------- column/row MLP
@pytest.fixture(scope="module")
def mlp_reference():
    """Plain Keras: initial weights, history, evaluate and predict results."""
    x, y = regression_data()
    model = regression_compile(functional_mlp())
    initial = {w.path: w.numpy() for w in model.weights}
    history = model.fit(x, y, epochs=EPOCHS, **FIT).history
    return dict(
        initial=initial,
        history=history,
        evaluation=model.evaluate(x, y, batch_size=BATCH, verbose=0, return_dict=True),
        predictions=model.predict(x, batch_size=BATCH, verbose=0),
        weights={w.path: w.numpy() for w in model.weights},
    )


@pytest.mark.parametrize("shape", [(1, 8), (2, 4), (4, 2), (8, 1)], ids=mesh_id)
def test_mlp_fit_evaluate_predict_match_plain_keras(shape, mlp_reference):
    x, y = regression_data()
    assert N % BATCH and (N % BATCH) % 2  # a partial last batch 2 data shards cannot split
    strategy = mesh_strategy(shape)
    with strategy.scope():
        model = regression_compile(functional_mlp())

    tp = shape[1]
    assert_mlp_is_sharded(model, tp)
    for w in model.weights:
        np.testing.assert_array_equal(w.numpy(), mlp_reference["initial"][w.path], err_msg=w.path)

    history = model.fit(x, y, epochs=EPOCHS, **FIT).history
    assert sorted(history) == ["loss", "mae"]
    assert len(history["loss"]) == EPOCHS
    assert_history_close(history, mlp_reference["history"])

    evaluation = model.evaluate(x, y, batch_size=BATCH, verbose=0, return_dict=True)
    assert sorted(evaluation) == sorted(mlp_reference["evaluation"])
    for key, value in mlp_reference["evaluation"].items():
        np.testing.assert_allclose(evaluation[key], value, err_msg=key, **TOL)

    predictions = model.predict(x, batch_size=BATCH, verbose=0)
    assert type(predictions) is np.ndarray
    assert predictions.shape == (N, D_OUT) and predictions.dtype == np.float32
    np.testing.assert_allclose(predictions, mlp_reference["predictions"], **TOL)
    # Rows come back in input order: permuting the input permutes the output.
    order = np.random.RandomState(3).permutation(N)
    np.testing.assert_allclose(
        model.predict(x[order], batch_size=BATCH, verbose=0), predictions[order], **TOL
    )

    for w in model.weights:
        np.testing.assert_allclose(
            w.numpy(), mlp_reference["weights"][w.path], rtol=1e-5, atol=1e-5, err_msg=w.path
        )
    assert_mlp_is_sharded(model, tp)  # training kept the layouts


# ------------------------------------------------- stock-layer transformer
VOCAB, SEQ, DIM, HEADS, KEY_DIM, FF = 32, 8, 16, 4, 4, 32
LM_EPOCHS = 2


def tiny_transformer(seed=0, causal=True):
    keras.utils.set_random_seed(seed)
    tokens = keras.Input((SEQ,), dtype="int32", name="tokens")
    h = keras.layers.Embedding(VOCAB, DIM, name="embed")(tokens)
    a = keras.layers.MultiHeadAttention(HEADS, KEY_DIM, name="attn")(h, h, use_causal_mask=causal)
    h = keras.layers.LayerNormalization(name="ln1")(keras.layers.Add()([h, a]))
    f = keras.layers.EinsumDense(
        "btd,df->btf", output_shape=(None, FF), bias_axes="f", activation="relu", name="ffn_in"
    )(h)
    f = keras.layers.EinsumDense(
        "btf,fd->btd", output_shape=(None, DIM), bias_axes="d", name="ffn_out"
    )(f)
    h = keras.layers.LayerNormalization(name="ln2")(keras.layers.Add()([h, f]))
    logits = keras.layers.Dense(VOCAB, name="head")(h)
    return keras.Model(tokens, logits, name="tiny_lm")


def transformer_rules(embedding_spec=(None, "model")):
    return (
        (".*embed/embeddings", embedding_spec),
        (".*attn/(query|key|value)/kernel", (None, "model", None)),
        (".*attn/(query|key|value)/bias", ("model", None)),
        (".*attn/attention_output/kernel", ("model", None, None)),
        (".*ffn_in/kernel", (None, "model")),
        (".*ffn_in/bias", ("model",)),
        (".*ffn_out/kernel", ("model", None)),
    )


def lm_compile(model):
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def lm_data():
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, VOCAB, size=(N, SEQ)).astype("int32")
    return tokens, np.roll(tokens, -1, axis=1)


@pytest.fixture(scope="module")
def lm_reference():
    x, y = lm_data()
    model = lm_compile(tiny_transformer())
    history = model.fit(x, y, epochs=LM_EPOCHS, **FIT).history
    return dict(
        history=history,
        predictions=model.predict(x, batch_size=BATCH, verbose=0),
        weights={w.path: w.numpy() for w in model.weights},
    )


def _check_transformer_layouts(model, embedding_spec, tp):
    expected = {
        "embed/embeddings": embedding_spec,
        "attn/query/kernel": (None, "model", None),
        "attn/key/bias": ("model", None),
        "attn/value/kernel": (None, "model", None),
        "attn/attention_output/kernel": ("model", None, None),
        "attn/attention_output/bias": (None,),
        "ffn_in/kernel": (None, "model"),
        "ffn_in/bias": ("model",),
        "ffn_out/kernel": ("model", None),
        "head/kernel": (None, None),
    }
    for suffix, spec in expected.items():
        w = weight(model, suffix)
        assert tfshard.layout_of(w) == spec, w.path
        want = tuple(d // tp if s == "model" else d for d, s in zip(w.shape, spec))
        assert tfshard.local_shape(w) == want, w.path


@pytest.mark.parametrize(
    "shape, embedding_spec",
    [((2, 4), (None, "model")), ((2, 4), ("model", None))],
    ids=["2x4-embed-dim", "2x4-embed-vocab"],
)
def test_stock_layer_transformer_trains_like_plain_keras(shape, embedding_spec, lm_reference):
    x, y = lm_data()
    strategy = mesh_strategy(shape, transformer_rules(embedding_spec))
    with strategy.scope():
        model = lm_compile(tiny_transformer())
    _check_transformer_layouts(model, embedding_spec, shape[1])

    history = model.fit(x, y, epochs=LM_EPOCHS, **FIT).history
    assert_history_close(history, lm_reference["history"])
    predictions = model.predict(x, batch_size=BATCH, verbose=0)
    assert type(predictions) is np.ndarray and predictions.shape == (N, SEQ, VOCAB)
    np.testing.assert_allclose(predictions, lm_reference["predictions"], **TOL)
    for w in model.weights:
        np.testing.assert_allclose(
            w.numpy(), lm_reference["weights"][w.path], **TOL, err_msg=w.path
        )
    _check_transformer_layouts(model, embedding_spec, shape[1])


# The causal mask MultiHeadAttention builds eagerly is a plain tensor that must
# meet the DTensor activations (it failed with "LogicalAnd got a regular tensor
# ... but was expecting a DTensor" before tfshard ran mask-building ops on the
# mesh).
@pytest.mark.parametrize("causal", [False, True], ids=["no-mask", "causal-mask"])
def test_eager_call_on_numpy_returns_plain_tensor_equal_to_plain_model(causal):
    plain = tiny_transformer(causal=causal)
    with mesh_strategy((2, 4), transformer_rules()).scope():
        sharded = tiny_transformer(causal=causal)
    tokens, _ = lm_data()
    for batch in (tokens[:8], tokens[:5]):  # splits over the data axis / does not
        out = sharded(batch)
        assert isinstance(out, tf.Tensor)
        assert not tfshard._dtensor.is_dtensor(out)
        assert tfshard.layout_of(out) is None
        assert tuple(out.shape) == (len(batch), SEQ, VOCAB)
        np.testing.assert_allclose(out.numpy(), plain(batch).numpy(), rtol=1e-5, atol=1e-5)


# -------------------------------------- Sequential / functional / subclassed
# (The functional MLP is covered on every mesh above.)
@pytest.mark.parametrize("build", [sequential_mlp, subclassed_mlp], ids=lambda f: f.__name__)
def test_every_kind_of_keras_model_trains_like_plain_keras(build):
    x, y = regression_data()
    plain, sharded = plain_and_sharded(build, mesh_strategy((2, 4), PREFIXED_MLP_RULES))
    expected = plain.fit(x, y, epochs=2, **FIT).history
    history = sharded.fit(x, y, epochs=2, **FIT).history
    assert_history_close(history, expected)
    assert_weights_close(sharded, plain)
    assert_mlp_is_sharded(sharded, 4)
    np.testing.assert_allclose(
        sharded.predict(x, batch_size=BATCH, verbose=0),
        plain.predict(x, batch_size=BATCH, verbose=0),
        **TOL,
    )


# ----------------------------------------------------------- no retracing
def test_each_step_is_traced_once_across_partial_batches_epochs_and_fits():
    x, y = regression_data()
    x_val, y_val = regression_data(seed=1, n=13)  # 8 + a partial 5
    with mesh_strategy((2, 4)).scope():
        model = regression_compile(functional_mlp())
    model.fit(x, y, epochs=3, validation_data=(x_val, y_val), **FIT)
    train_function, test_function = model.train_function, model.test_function
    assert train_function.step.trace_count == 1
    assert test_function.step.trace_count == 1

    model.fit(x, y, epochs=2, validation_data=(x_val, y_val), **FIT)
    model.evaluate(x, y, batch_size=BATCH, verbose=0)
    assert model.train_function is train_function
    assert model.test_function is test_function
    assert train_function.step.trace_count == 1
    assert test_function.step.trace_count == 1

    model.predict(x, batch_size=BATCH, verbose=0)
    model.predict(x[:13], batch_size=BATCH, verbose=0)
    assert model.predict_function.step.trace_count == 1


# ------------------------------------------- small inputs and *_on_batch
def test_train_on_batch_and_test_on_batch_match_plain_keras():
    x, y = regression_data()
    plain, sharded = plain_and_sharded(functional_mlp, mesh_strategy((2, 4)))
    for model in (plain, sharded):
        model.logs = [
            model.train_on_batch(x[i : i + BATCH], y[i : i + BATCH], return_dict=True)
            for i in range(0, N, BATCH)  # the last batch is a partial 5
        ]
        model.logs.append(model.test_on_batch(x[:5], y[:5], return_dict=True))
    for got, want in zip(sharded.logs, plain.logs):
        assert sorted(got) == sorted(want)
        for key in want:
            np.testing.assert_allclose(got[key], want[key], err_msg=key, **TOL)
    assert_weights_close(sharded, plain)
    assert sharded.train_function.step.trace_count == 1


def test_predict_on_an_input_smaller_than_one_batch():
    x, _ = regression_data()
    n = 5
    plain, sharded = plain_and_sharded(functional_mlp, mesh_strategy((2, 4)))
    predictions = sharded.predict(x[:n], batch_size=BATCH, verbose=0)
    assert type(predictions) is np.ndarray and predictions.shape == (n, D_OUT)
    np.testing.assert_allclose(predictions, plain.predict(x[:n], verbose=0), **TOL)


def test_predict_on_batch():
    x, _ = regression_data()
    plain, sharded = plain_and_sharded(functional_mlp, mesh_strategy((2, 4)))
    predictions = sharded.predict_on_batch(x[:BATCH])
    assert type(predictions) is np.ndarray and predictions.shape == (BATCH, D_OUT)
    np.testing.assert_allclose(predictions, plain.predict_on_batch(x[:BATCH]), **TOL)


# ------------------------------------------------------------- metrics
def test_auc_metric_under_fit():
    """AUC interpolates its thresholds with tf.reverse, which DTensor has no
    layout rule for; tfshard runs that op replicated (step_guards.REPLICATED_OPS)."""
    x, y = regression_data()
    labels = (y > 0).astype("float32")

    def compile_with_auc(model):
        model.compile(keras.optimizers.Adam(0.01), "mse", metrics=[keras.metrics.AUC(name="auc")])
        return model

    plain, sharded = plain_and_sharded(functional_mlp, mesh_strategy((2, 4)), compile_with_auc)
    expected = plain.fit(x, labels, epochs=1, **FIT).history
    history = sharded.fit(x, labels, epochs=1, **FIT).history
    assert_history_close(history, expected)
