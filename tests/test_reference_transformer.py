"""The reference transformer (tfshard.app.models): its tied output projection
reads the live embedding table, so it trains, checkpoints and restores, and
the sharded model trains like plain Keras with Adam."""

import contextlib

import keras
import numpy as np
import pytest

import tfshard
from tfshard.app import config as config_lib
from tfshard.app import data, models

from conftest import make_strategy

MODEL = {**config_lib.defaults()["model"], "d_model": 32, "heads": 8, "d_ff": 64, "layers": 1, "seq_len": 16}
BATCH = 8


@pytest.fixture(scope="module")
def batches():
    x, y = data.lm_examples(data.stdlib_bytes(100_000), MODEL["seq_len"], 4 * BATCH, seed=0)
    return x, y


def build(strategy=None, seed=0):
    with strategy.scope() if strategy else contextlib.nullcontext():
        model = models.build(MODEL, seed=seed)
        model.optimizer.build(model.trainable_variables)
    return model


def test_tied_logits_read_the_live_table(batches):
    x, _ = batches
    model = build()
    table = model.get_layer("token_embedding").embeddings
    table.assign(np.zeros(table.shape, "float32"))
    # logits = hidden @ table.T: a zero table gives zero logits. (An op on
    # the variable outside a layer call would have baked the initial table
    # into the functional graph as a constant.)
    np.testing.assert_array_equal(model.predict(x[:2], verbose=0), 0.0)
    clone = keras.models.model_from_json(model.to_json())
    clone.set_weights(model.get_weights())
    np.testing.assert_array_equal(clone.predict(x[:2], verbose=0), 0.0)


def test_restored_model_computes_what_the_saved_one_did(batches, tmp_path):
    x, y = batches
    source = build(make_strategy(2, 4))
    source.train_on_batch(x[:BATCH], y[:BATCH])
    tfshard.save_checkpoint(source, tmp_path)
    for strategy in (make_strategy(1, 8), None):
        restored = build(strategy, seed=1)  # other initial weights, table included
        tfshard.restore_checkpoint(restored, tmp_path)
        np.testing.assert_allclose(
            restored.predict(x[BATCH:2 * BATCH], verbose=0),
            source.predict(x[BATCH:2 * BATCH], verbose=0),
            rtol=1e-5, atol=1e-5,
        )


def test_sharded_transformer_trains_like_plain_keras_with_adam(batches):
    x, y = batches
    plain, sharded = build(), build(make_strategy(2, 4))
    for step in range(3):
        batch = slice(step * BATCH, (step + 1) * BATCH)
        want = plain.train_on_batch(x[batch], y[batch])
        got = sharded.train_on_batch(x[batch], y[batch])
        np.testing.assert_allclose(got, want, rtol=1e-5)
    for got, want in zip(sharded.get_weights(), plain.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert tfshard.layout_of(sharded.get_layer("token_embedding").embeddings) == ("model", None)
