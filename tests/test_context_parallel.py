"""StrategyBuilder.context_parallel(axis): a transformer block with stock
keras.layers.MultiHeadAttention (causal, or a padding mask) gives plain
Keras's forward, gradients and weights after Adam steps, with the sequence
split over the context axis (alone, and next to data and tensor parallelism
on a 2x2x2 mesh); attention gathers keys and values (two all-gathers over
the context axis per block) and nothing else gathers the sequence."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from parity import TOL, _step_fn

import tfshard
from tfshard import comm, training
from tfshard.errors import StrategyError
from tfshard.styles import ColumnParallel, HeadParallel, RowParallel

B, S, D, HEADS, FF = 4, 8, 16, 4, 32
TP_PLAN = {".*attn": HeadParallel(), ".*ffn_in": ColumnParallel(), ".*ffn_out": RowParallel()}
MESHES = {
    "2x2x2": {"batch": 2, "context": 2, "model": 2},  # data x context x tensor
    "1x8": {"batch": 1, "context": 8},
    "2x4": {"batch": 2, "context": 4},
}


def block(mask):
    """A pre-norm transformer block; outputs (block output, attention output)."""
    x = keras.Input((S, D))
    inputs = [x]
    h = keras.layers.LayerNormalization(name="ln1")(x)
    attention = keras.layers.MultiHeadAttention(HEADS, D // HEADS, name="attn")
    if mask == "causal":
        a = attention(h, h, use_causal_mask=True)
    else:  # padding: keys past each row's length are masked, [B, T, S]
        pad = keras.Input((S,), dtype="bool")
        inputs.append(pad)
        a = attention(h, h, attention_mask=keras.ops.repeat(keras.ops.expand_dims(pad, 1), S, axis=1))
    x = x + a
    h = keras.layers.LayerNormalization(name="ln2")(x)
    h = keras.layers.Dense(FF, activation="relu", name="ffn_in")(h)
    return keras.Model(inputs, [x + keras.layers.Dense(D, name="ffn_out")(h), a])


def context_strategy(axes, recompute=None):
    builder = (tfshard.StrategyBuilder(tfshard.Mesh(axes))
               .data_parallel("batch").context_parallel("context"))
    if recompute:
        builder.recompute(recompute)
    if "model" in axes:
        builder.tensor_parallel("model").plan(TP_PLAN)
    return builder.build()


def batch(mask):
    rng = np.random.RandomState(0)
    values = [rng.randn(B, S, D).astype("float32")]
    if mask == "padding":
        pad = np.ones((B, S), bool)
        pad[0, 5:] = pad[2, 3:] = False
        values.append(pad)
    return values


@pytest.mark.parametrize("mask,mesh,recompute", [
    ("causal", "2x2x2", None), ("padding", "2x2x2", None),
    ("causal", "1x8", "selective"),  # composes with recomputing the attention core
    # (padding on 2x4, context on the tensor-parallel-free axis: its layouts
    # are checked by test_attention_gathers_keys_and_values_once_each)
])
def test_parity_with_keras_and_the_sequence_split(mask, mesh, recompute):
    axes = MESHES[mesh]
    keras.utils.set_random_seed(0)
    plain = block(mask)
    strategy = context_strategy(axes, recompute)
    with strategy.scope():
        sharded = block(mask)
    sharded.set_weights(plain.get_weights())
    inputs = batch(mask)
    placed = [strategy.place(x, strategy.batch_spec(x.shape)) for x in inputs]
    assert tfshard.spec_of(placed[0]) == ("batch", "context", None)

    plain_opt = keras.optimizers.Adam(1e-3)
    with strategy.scope():
        sharded_opt = keras.optimizers.Adam(1e-3)
        sharded_opt.build(sharded.trainable_variables)
    plain_opt.build(plain.trainable_variables)
    call = lambda model, *xs: model(list(xs))  # noqa: E731
    plain_step = _step_fn(plain, plain_opt, call)
    sharded_step = _step_fn(sharded, sharded_opt, call, strategy)
    for n in range(2):
        (out_p, attn_p), grads_p = plain_step(*inputs)
        (out_s, attn_s), grads_s = sharded_step(*placed)
        if n:
            continue
        np.testing.assert_allclose(tfshard.to_numpy(out_s), out_p.numpy(), err_msg="forward", **TOL)
        np.testing.assert_allclose(tfshard.to_numpy(attn_s), attn_p.numpy(), err_msg="attention", **TOL)
        for v, gp, gs in zip(sharded.trainable_variables, grads_p, grads_s):
            assert tfshard.spec_of(gs) == tfshard.spec_of(v), v.path
            np.testing.assert_allclose(tfshard.to_numpy(gs), gp.numpy(), err_msg=v.path, **TOL)
        # Per device: batch/dp rows, sequence/cp positions, the whole width.
        for y in (out_s, attn_s):
            assert tfshard.spec_of(y) == ("batch", "context", None)
            assert tfshard.local_shape(y) == (B // axes["batch"], S // axes["context"], D)
    for p, s in zip(plain.weights, sharded.weights):
        np.testing.assert_allclose(s.numpy(), p.numpy(), err_msg=f"{s.path} after 2 Adam steps", **TOL)
    if "model" in axes:  # tensor parallelism composed: heads split over 'model'
        kernel = sharded.get_layer("attn").query_dense.kernel
        assert tfshard.spec_of(kernel) == (None, "model", None)


# ------------------------------------------------------------- collectives
def block_step_collectives():
    """Collectives of one forward + backward pass of the block (no update),
    per (mesh, mask), in DTensor's expanded and optimized programs (run in a
    child process with DTensor's pass dumps on)."""
    out = {}
    for mesh, mask in (("2x2x2", "causal"), ("2x4", "padding")):
        strategy = context_strategy(MESHES[mesh])
        with strategy.scope():
            model = block(mask)
        placed = [strategy.place(x, strategy.batch_spec(x.shape)) for x in batch(mask)]

        @tf.function(autograph=False)
        def step(*xs):
            with strategy.scope(), tf.GradientTape() as tape:
                loss = tf.reduce_sum(model(list(xs))[0] ** 2)
            return tape.gradient(loss, model.trainable_variables)

        with comm.dump_dir() as directory:
            step(*placed)
            out[f"{mesh}-{mask}"] = {s: comm.parse_dump_dir(directory, s)[0]
                                     for s in ("expanded", "optimized")}
    return out


@pytest.fixture(scope="module")
def collectives():
    return comm.run_in_subprocess(block_step_collectives)


@pytest.mark.parametrize("case", ["2x2x2-causal", "2x4-padding"])
def test_attention_gathers_keys_and_values_once_each(collectives, case):
    expanded, optimized = collectives[case]["expanded"], collectives[case]["optimized"]
    # Forward: one all-gather of the keys and one of the values over the
    # context axis; no other tensor (no Dense, bias add or norm) gathers
    # the sequence, in either direction.
    assert expanded[("all_gather", "context")] == 2, expanded
    assert expanded.total("all_gather") == 2, expanded
    # Backward: the key and value gradients (partial sums over each
    # device's query rows) are reduce-scattered back over the context axis.
    assert optimized[("reduce_scatter", "context")] == 2, optimized
    if case.startswith("2x2x2"):
        # Tensor parallelism unchanged: Megatron's 4 all-reduces over the
        # tensor axis per block (attention out and ffn_out forward, their
        # inputs' gradients backward).
        assert optimized[("all_reduce", "model")] == 4, optimized
    else:
        # The [B, T, S] mask built from a [B, S] padding mask split over the
        # keys is moved to the query split: one all-to-all.
        assert expanded[("all_to_all", "context")] == 1, expanded


# ------------------------------------------------------------ bad input
def test_a_sequence_the_axis_cannot_split_is_a_clear_error():
    strategy = context_strategy(MESHES["2x4"])
    with strategy.scope():
        layer = keras.layers.MultiHeadAttention(2, 4, name="attn")
        layer.build((2, 6, 8), (2, 6, 8))
        x = strategy.place(np.zeros((2, 6, 8), "float32"), ("batch", None, None))

        @tf.function(autograph=False)
        def call(x):
            return layer(x, x, use_causal_mask=True)

        with pytest.raises(StrategyError, match=r"'attn'.*sequence of 6 positions.*'context'.*multiple of 4"):
            call(x)


def test_unknown_or_shared_context_axis_is_a_clear_error():
    mesh = tfshard.Mesh({"batch": 2, "model": 4})
    with pytest.raises(tfshard.TfshardError, match=r"context_parallel\('ctx'\).*no axis 'ctx'"):
        tfshard.StrategyBuilder(mesh).context_parallel("ctx")
    with pytest.raises(StrategyError, match="same mesh axis"):
        tfshard.StrategyBuilder(mesh).tensor_parallel("model").context_parallel("model").build()


def test_batches_enter_the_mesh_split_over_the_sequence():
    strategy = context_strategy(MESHES["2x2x2"])
    ids = np.zeros((4, 8), "int32")
    odd = np.zeros((4, 3), "float32")  # dim 1 the axis cannot divide: whole
    weights = np.ones((4,), "float32")
    placed = training.shard_batch(strategy, (ids, odd, weights))
    assert [tfshard.spec_of(x) for x in placed] == [
        ("batch", "context"), ("batch", None), ("batch",)]
    assert strategy.batch_spec((4, 8, 16)) == ("batch", "context", None)
    assert context_strategy(MESHES["2x4"]).context_axis == "context"


def test_checkpoints_restore_with_and_without_context_parallelism(tmp_path):
    """Context parallelism splits activations, not weights: a checkpoint saved
    on 2x2x2 restores bit-exact into plain Keras, and one saved there restores
    under context parallelism on 2x4."""
    from tfshard.checkpoint import restore_checkpoint, save_checkpoint

    keras.utils.set_random_seed(0)
    with context_strategy(MESHES["2x2x2"]).scope():
        source = block("causal")
    values = source.get_weights()
    keras.utils.set_random_seed(1)
    plain = block("causal")
    restore_checkpoint(plain, save_checkpoint(source, tmp_path / "context"))
    keras.utils.set_random_seed(2)
    with context_strategy(MESHES["2x4"]).scope():
        back = block("causal")
    restore_checkpoint(back, save_checkpoint(plain, tmp_path / "plain"))
    for model in (plain, back):
        for got, want in zip(model.get_weights(), values):
            np.testing.assert_array_equal(got, want)
