"""StrategyBuilder.recompute("selective" | "full"): the gradients of the plain
step, and the activation bytes tfshard.memory measures drop by exactly what
is recomputed."""

import contextlib

import keras
import numpy as np
import pytest
import tensorflow as tf
from test_memory import F32, FF, A, H, S, V, block_activation_bytes

import tfshard
from tfshard.app import config as config_lib
from tfshard.app import data as data_lib
from tfshard.app import models
from tfshard.errors import StrategyError
from tfshard.memory import memory_by_kind

B, LAYERS, SHAPE = 8, 2, (2, 4)


@pytest.fixture(scope="module")
def batch():
    return data_lib.lm_examples(data_lib.stdlib_bytes(100_000), S, B, seed=0)


def config(dropout=0.0):
    return {**config_lib.defaults()["model"], "d_model": H, "heads": A, "d_ff": FF, "vocab": V,
            "layers": LAYERS, "seq_len": S, "dropout": dropout}


def build(mode=None, shape=SHAPE, dropout=0.0):
    strategy = None
    if shape is not None:
        builder = (tfshard.StrategyBuilder(tfshard.Mesh({"batch": shape[0], "model": shape[1]}))
                   .data_parallel("batch").tensor_parallel("model"))
        if mode:
            builder.recompute(mode)
        strategy = builder.build()
    with strategy.scope() if strategy else contextlib.nullcontext():
        return models.build(config(dropout), seed=0), strategy


def gradients(model, strategy, x, y):
    @tf.function
    def step(x, y):
        with strategy.scope() if strategy else contextlib.nullcontext():
            with tf.GradientTape() as tape:
                loss = model.compute_loss(x=x, y=y, y_pred=model(x, training=True))
            return loss, tape.gradient(loss, model.trainable_variables)

    if strategy is not None:
        x, y = strategy.place(x, ("batch", None)), strategy.place(y, ("batch", None))
    loss, grads = step(x, y)
    dense = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]
    return (tfshard.to_numpy(loss) if strategy else loss.numpy(),
            [tfshard.to_numpy(g) if strategy else g.numpy() for g in dense])


@pytest.fixture(scope="module")
def plain(batch):
    model, _ = build(shape=None)
    return gradients(model, None, *batch)


@pytest.fixture(scope="module")
def without_recompute(batch):
    model, _ = build()
    return memory_by_kind(model, batch)


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_recompute_gives_the_plain_gradients_and_keeps_less(batch, plain, without_recompute, mode):
    model, strategy = build(mode)
    loss, grads = gradients(model, strategy, *batch)
    want_loss, want_grads = plain
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    for v, got, want in zip(model.trainable_variables, grads, want_grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=v.path)
    kept = memory_by_kind(model, batch)
    saved = without_recompute.activations - kept.activations
    b, t = B // SHAPE[0], SHAPE[1]
    if mode == "selective":
        # Megatron's selective recomputation: each block's attention scores
        # (a*s^2*b/t per device) are no longer kept, nor what Keras keeps
        # beyond Megatron's count (test_memory.block_activation_bytes): each
        # norm's broadcast rsqrt(var)*gamma and statistics (sbh + 3sb, the
        # final norm's too) and the erf-GELU's two extra d_ff tensors.
        norm = S * b * H + 3 * S * b
        per_block = A * S * S * b // t + 2 * norm + 2 * S * b * FF // t
        assert saved == F32 * (LAYERS * per_block + norm)
        assert not any(k.op_type in ("Softmax", "Erfc", "Rsqrt") for k in kept.kept), kept.kept
    else:
        # Each block keeps only its input (s*b*h, whole on the tensor axis).
        assert saved == LAYERS * (block_activation_bytes(S, b, H, A, FF, t) - F32 * S * b * H)
    assert (kept.parameters, kept.gradients, kept.optimizer) == (
        without_recompute.parameters, without_recompute.gradients, without_recompute.optimizer)


@pytest.mark.parametrize("shape", [(1, 8), (4, 2)], ids=["1x8", "4x2"])
def test_selective_recompute_gives_the_plain_gradients_on_other_meshes(batch, plain, shape):
    model, strategy = build("selective", shape=shape)
    loss, grads = gradients(model, strategy, *batch)
    np.testing.assert_allclose(loss, plain[0], rtol=1e-6)
    for v, got, want in zip(model.trainable_variables, grads, plain[1]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=v.path)


def test_keras_remat_scope_fails_in_a_compiled_step():
    """Why tfshard has its own wrapper: Keras's RematScope on TensorFlow
    hands a layer call with keyword arguments to tf.custom_gradient, which
    refuses them in a tf.function. (If a Keras release fixes this, this test
    fails: tfshard could then use RematScope.)"""
    with keras.RematScope(mode="full"):
        layer = keras.layers.Dense(4)

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
        return tape.gradient(y, x)

    with pytest.raises(ValueError, match="keywords arguments only when eager"):
        step(tf.ones((2, 3)))


def test_bad_mode_and_dropout_are_errors(batch):
    builder = tfshard.StrategyBuilder(tfshard.Mesh({"batch": 2, "model": 4}))
    with pytest.raises(StrategyError, match=r"recompute\('attention'\).*'selective'.*'full'"):
        builder.recompute("attention")
    model, _ = build("full", dropout=0.1)
    with pytest.raises(StrategyError, match=r"layer 'block_0'.*dropout.*rate to 0"):
        model.train_on_batch(*batch)
