"""StrategyBuilder.sequence_parallel() (Megatron-SP): a transformer block of
stock Keras layers under a tensor-parallel plan gives plain Keras's forward,
gradients and weights after Adam steps, with the residual stream split over
the sequence on the tensor axis; a bias-free block (Llama's projections)
reduce-scatters where tensor parallelism alone all-reduces."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from parity import TOL, _step_fn

import tfshard
from tfshard import comm
from tfshard.errors import StrategyError
from tfshard.styles import ColumnParallel, HeadParallel, RowParallel

B, S, D, HEADS, FF = 4, 8, 16, 4, 32
PLAN = {".*attn": HeadParallel(), ".*ffn_in": ColumnParallel(), ".*ffn_out": RowParallel()}


def block(mask, bias=True):
    """A pre-norm transformer block; outputs (block output, attention output)."""
    x = keras.Input((S, D))
    inputs = [x]
    h = keras.layers.LayerNormalization(name="ln1")(x)
    attention = keras.layers.MultiHeadAttention(HEADS, D // HEADS, use_bias=bias, name="attn")
    if mask == "causal":
        a = attention(h, h, use_causal_mask=True)
    else:
        pad = keras.Input((S,), dtype="bool")
        inputs.append(pad)
        a = attention(h, h, attention_mask=keras.ops.repeat(keras.ops.expand_dims(pad, 1), S, axis=1))
    x = x + a
    h = keras.layers.LayerNormalization(name="ln2")(x)
    h = keras.layers.Dense(FF, activation="relu", name="ffn_in")(h)
    return keras.Model(inputs, [x + keras.layers.Dense(D, use_bias=bias, name="ffn_out")(h), a])


def sp_strategy(shape, sequence_parallel=True):
    builder = (tfshard.StrategyBuilder(tfshard.Mesh({"batch": shape[0], "model": shape[1]}))
               .data_parallel("batch").tensor_parallel("model").plan(PLAN))
    if sequence_parallel:
        builder.sequence_parallel()
    return builder.build()


def batch(mask):
    rng = np.random.RandomState(0)
    values = [rng.randn(B, S, D).astype("float32")]
    if mask == "padding":
        pad = np.ones((B, S), bool)
        pad[0, 5:] = pad[2, 3:] = False
        values.append(pad)
    return values


@pytest.mark.parametrize("mask,shape,bias", [("causal", (2, 4), True), ("padding", (4, 2), False)])
def test_parity_with_keras_and_the_residual_split_over_the_tensor_axis(mask, shape, bias):
    keras.utils.set_random_seed(0)
    plain = block(mask, bias)
    strategy = sp_strategy(shape)
    with strategy.scope():
        sharded = block(mask, bias)
    sharded.set_weights(plain.get_weights())
    inputs = batch(mask)
    placed = [strategy.place(x, strategy.batch_spec(x.shape)) for x in inputs]
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
        # The attention output and the residual stream: sequence/tp per device.
        for y in (out_s, attn_s):
            assert tfshard.spec_of(y) == ("batch", "model", None)
            assert tfshard.local_shape(y) == (B // shape[0], S // shape[1], D)
    for p, s in zip(plain.weights, sharded.weights):
        np.testing.assert_allclose(s.numpy(), p.numpy(), err_msg=f"{s.path} after 2 Adam steps", **TOL)


def forward_collectives():
    """Forward collectives of the bias-free block on 2x4, with and without
    sequence parallelism, its input split like a previous block's output
    (run in a child process with DTensor's pass dumps on)."""
    out = {}
    for name, sp in (("sp", True), ("tp", False)):
        strategy = sp_strategy((2, 4), sp)
        with strategy.scope():
            model = block("causal", bias=False)
        x = strategy.place(batch("causal")[0], ("batch", "model" if sp else None, None))

        @tf.function(autograph=False)
        def forward(x):
            with strategy.scope():
                return model(x)[0]

        with comm.dump_dir() as directory:
            forward(x)
            out[name] = {s: comm.parse_dump_dir(directory, s)[0] for s in ("expanded", "optimized")}
    return out


@pytest.fixture(scope="module")
def collectives():
    return comm.run_in_subprocess(forward_collectives)


def test_reduce_scatters_replace_the_forward_all_reduces(collectives):
    sp, tp = collectives["sp"], collectives["tp"]
    # Tensor parallelism alone: Megatron's 2 forward all-reduces per block.
    assert tp["optimized"][("all_reduce", "model")] == 2, tp
    assert tp["optimized"][("reduce_scatter", "model")] == 0, tp
    # Sequence parallelism: leaving each tensor-parallel region
    # reduce-scatters (2), and nothing all-reduces the partial sums.
    assert sp["optimized"][("reduce_scatter", "model")] == 2, sp
    # Entering one all-gathers the sequence: one gather per projection that
    # reads its input whole (query, key, value, ffn_in) as DTensor expands
    # them; after CSE, one per region (2). DTensor lowers an all-gather on
    # CPU to an all-reduce of a zero-padded buffer: those 2 are the only
    # all-reduces over 'model' left.
    assert sp["expanded"][("all_gather", "model")] == 4, sp
    assert sp["optimized"][("all_reduce", "model")] == 2, sp
    assert sp["optimized"].total("all_gather") == 0, sp


def test_sequence_parallel_needs_a_tensor_axis_and_no_context_axis():
    mesh = tfshard.Mesh({"batch": 2, "context": 2, "model": 2})
    with pytest.raises(StrategyError, match="tensor_parallel"):
        tfshard.StrategyBuilder(mesh).data_parallel("batch").sequence_parallel().build()
    with pytest.raises(StrategyError, match="use one of them"):
        (tfshard.StrategyBuilder(mesh).tensor_parallel("model").context_parallel("context")
         .sequence_parallel().build())
    assert sp_strategy((2, 4)).sequence_parallel and not sp_strategy((2, 4), False).sequence_parallel
