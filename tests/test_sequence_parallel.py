"""StrategyBuilder.sequence_parallel() (Megatron-SP, tfshard.sequence_parallel):
one device's numbers for stock Keras blocks under a plan and for the
reference transformer (with dropout, selective recomputation and ZeRO-3);
the norm/residual activations split over the sequence; all-gathers and
reduce-scatters in place of the block's all-reduces; clear errors."""

import contextlib

import keras
import numpy as np
import pytest
import tensorflow as tf
from parity import check_parity, strategy_for
from test_bench import tiny_transformer

import tfshard
from tfshard import comm
from tfshard.app import config as config_lib
from tfshard.app import data as data_lib
from tfshard.app import models
from tfshard.errors import ShardingError
from tfshard.memory import memory_by_kind
from tfshard.styles import ColumnParallel, HeadParallel, RowParallel

B, S, D, HEADS, FF = 4, 8, 16, 8, 32
PLAN = {"attn": HeadParallel(), "ffn_in": ColumnParallel(), "ffn_out": RowParallel()}


def stock_block(seq=S):
    """A pre-norm transformer block of stock Keras layers, as a user writes it."""
    x = keras.Input((seq, D))
    h = keras.layers.LayerNormalization(name="ln1")(x)
    a = keras.layers.MultiHeadAttention(HEADS, D // HEADS, name="attn")(h, h, use_causal_mask=True)
    x1 = keras.layers.Add(name="res1")([x, a])
    h2 = keras.layers.LayerNormalization(name="ln2")(x1)
    f = keras.layers.Dense(FF, activation="gelu", name="ffn_in")(h2)
    f = keras.layers.Dense(D, name="ffn_out")(f)
    return keras.Model(x, keras.layers.Add(name="res2")([x1, f]))


@pytest.mark.parametrize("shape", [(2, 4), (1, 8)], ids=["2x4", "1x8"])
def test_stock_block_equals_one_device(shape):
    x = np.random.RandomState(0).randn(B, S, D).astype("float32")
    _, sharded, strategy = check_parity(
        stock_block, shape, x, plan=PLAN, sequence_parallel=True,
        input_specs=[("batch", "model", None)],
        expect_specs={"attn/query/kernel": (None, "model", None), "ffn_out/kernel": ("model", None)},
    )
    # The residual stream leaves the block split over the sequence: each
    # device holds S / tp tokens of it.
    out = sharded(strategy.place(x, ("batch", "model", None)))
    assert tfshard.layout_of(out) == ("batch", "model", None)
    assert tfshard._dtensor.unpack(out)[0].shape == (B // shape[0], S // shape[1], D)


def test_padding_mask_and_bias_free_projections():
    """A padding mask (keras-hub style) and projections without biases."""
    def build():
        x = keras.Input((S, D))
        mask = keras.Input((S, S), dtype="bool")
        h = keras.layers.LayerNormalization(name="ln1")(x)
        a = keras.layers.MultiHeadAttention(HEADS, D // HEADS, use_bias=False, name="attn")(
            h, h, attention_mask=mask)
        x1 = keras.layers.Add()([x, a])
        f = keras.layers.Dense(FF, use_bias=False, activation="relu", name="ffn_in")(x1)
        f = keras.layers.Dense(D, use_bias=False, name="ffn_out")(f)
        return keras.Model([x, mask], keras.layers.Add()([x1, f]))

    rng = np.random.RandomState(1)
    x = rng.randn(B, S, D).astype("float32")
    keep = (np.arange(S)[None, :] < rng.randint(3, S + 1, size=(B, 1)))
    mask = np.repeat(keep[:, None, :], S, axis=1)
    check_parity(build, (2, 4), x, mask, plan=PLAN, sequence_parallel=True,
                 call=lambda model, x, mask: model([x, mask]),
                 input_specs=[("batch", "model", None), ("batch", None, None)])


def _lm(shape, *, dropout=0.0, recompute=None, zero=0, layers=1):
    cfg = {**config_lib.defaults()["model"], "d_model": 32, "heads": 8, "d_ff": 64, "layers": layers,
           "seq_len": 16, "dropout": dropout}
    strategy = None
    if shape is not None:
        builder = (tfshard.StrategyBuilder(tfshard.Mesh({"batch": shape[0], "model": shape[1]}))
                   .data_parallel("batch").tensor_parallel("model").sequence_parallel())
        if recompute:
            builder.recompute(recompute)
        if zero:
            builder.shard_optimizer_state("batch", stage=zero)
        strategy = builder.build()
    with strategy.scope() if strategy else contextlib.nullcontext():
        model = models.build(cfg, seed=0)
        model.optimizer.build(model.trainable_variables)
    return model


@pytest.fixture(scope="module")
def lm_batches():
    return data_lib.lm_examples(data_lib.stdlib_bytes(100_000), 16, 24, seed=0)


@pytest.mark.parametrize("shape, dropout, recompute", [((2, 4), 0.1, None), ((4, 2), 0.0, "selective")],
                         ids=["2x4-dropout", "4x2-selective"])
def test_reference_transformer_trains_like_one_device_with_zero3(lm_batches, shape, dropout, recompute):
    """With seeded dropout (drawn as one device draws it), or with selective
    recomputation (which refuses dropout), and ZeRO-3 over the data axis."""
    x, y = lm_batches
    plain = _lm(None, dropout=dropout)
    sharded = _lm(shape, dropout=dropout, recompute=recompute, zero=3)
    for step in range(10):  # 10 Adam steps over the 3 batches
        batch = slice(8 * (step % 3), 8 * (step % 3 + 1))
        keras.utils.set_random_seed(step)
        want = plain.train_on_batch(x[batch], y[batch])
        keras.utils.set_random_seed(step)
        got = sharded.train_on_batch(x[batch], y[batch])
        np.testing.assert_allclose(got, want, rtol=1e-5)
    for got, want in zip(sharded.get_weights(), plain.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_checkpoints_restore_onto_meshes_with_and_without_the_options(lm_batches, tmp_path):
    """Saved with sequence parallelism + selective recomputation + ZeRO-3 on
    2x4 (after an Adam step), restored onto 4x2 without them and into plain
    Keras; saved without them, restored with them: weights and Adam state
    bit-exact (the options change activations and where state lives, not
    what is saved)."""
    from tfshard.checkpoint import restore_checkpoint, save_checkpoint

    x, y = lm_batches
    source = _lm((2, 4), recompute="selective", zero=3)
    source.train_on_batch(x[:8], y[:8])
    state = [np.array(v.numpy()) for v in source.weights + source.optimizer.variables]
    path = save_checkpoint(source, tmp_path / "options")
    cfg = {**config_lib.defaults()["model"], "d_model": 32, "heads": 8, "d_ff": 64, "layers": 1, "seq_len": 16}
    tp_only = (tfshard.StrategyBuilder(tfshard.Mesh({"batch": 4, "model": 2}))
               .data_parallel("batch").tensor_parallel("model").build())
    for strategy in (tp_only, None):
        with strategy.scope() if strategy else contextlib.nullcontext():
            target = models.build(cfg, seed=1)
            target.optimizer.build(target.trainable_variables)
        restore_checkpoint(target, path)
        for got, want in zip([np.array(v.numpy()) for v in target.weights + target.optimizer.variables], state):
            np.testing.assert_array_equal(got, want)
    back = _lm((4, 2), recompute="selective", zero=3)
    restore_checkpoint(back, save_checkpoint(target, tmp_path / "plain"))
    for got, want in zip([np.array(v.numpy()) for v in back.weights + back.optimizer.variables], state):
        np.testing.assert_array_equal(got, want)


def test_norm_and_residual_activations_are_split_over_the_sequence(lm_batches, grappler_on):
    """What the training step keeps for backward: with sequence parallelism
    every norm and residual tensor holds S / tp tokens per device (without
    it, all S), and the step keeps fewer bytes."""
    x, y = lm_batches
    plain = memory_by_kind(_lm((2, 4)), (x[:8], y[:8]))
    kept = [k for k in plain.kept if "norm" in k.name or "/add" in k.name]
    assert kept and all(k.local_shape[1] == 16 // 4 for k in kept), kept
    builder = (tfshard.StrategyBuilder(tfshard.Mesh({"batch": 2, "model": 4}))
               .data_parallel("batch").tensor_parallel("model"))
    with builder.build().scope():
        without = models.build({**config_lib.defaults()["model"], "d_model": 32, "heads": 8,
                                "d_ff": 64, "layers": 1, "seq_len": 16}, seed=0)
    before = memory_by_kind(without, (x[:8], y[:8]))
    assert any(k.local_shape[1] == 16 for k in before.kept if "norm" in k.name)
    assert plain.activations < before.activations


def test_with_selective_recomputation_a_block_keeps_megatrons_count_split_over_tp(lm_batches):
    """Sequence parallelism + selective recomputation on 2x4: per block the
    step keeps its input, the two norm outputs and the residual (4sbh/t),
    query/key/value and the attention output (4sbh/t), and the feed-forward's
    pre-activation (s*b*d_ff/t): the activation is recomputed in the
    row-parallel edge's backward pass, so its output is not kept. Every
    tensor holds 1/(dp*tp) of one device's: Megatron's sbh*34/t (half-
    precision, with dropout masks) in float32 without dropout, less the
    activation's output."""
    x, y = lm_batches
    one, two = (memory_by_kind(_lm((2, 4), recompute="selective", layers=n), (x[:8], y[:8])).activations
                for n in (1, 2))
    s, b, h, ff, t = 16, 8 // 2, 32, 64, 4
    assert two - one == 4 * (s * b // t) * (8 * h + ff)


def test_keras_hub_llama_under_its_automatic_plan_trains_like_one_device():
    """Code nobody here wrote: keras-hub's LlamaCausalLM (RMS norms, rotary
    embeddings, gated feed-forward, bias-free projections, tied logits),
    split by tfshard.auto_plan plus sequence_parallel(), with selective
    recomputation of keras-hub's own attention core."""
    keras_hub = pytest.importorskip("keras_hub")
    from tfshard.auto_plan import auto_plan

    def build():
        keras.utils.set_random_seed(0)
        backbone = keras_hub.models.LlamaBackbone(
            vocabulary_size=64, num_layers=1, hidden_dim=16, intermediate_dim=32,
            num_query_heads=4, num_key_value_heads=4)
        model = keras_hub.models.LlamaCausalLM(backbone=backbone, preprocessor=None)
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), weighted_metrics=[],
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return model

    rng = np.random.RandomState(0)
    x = {"token_ids": rng.randint(0, 64, (16, S)).astype("int32"), "padding_mask": np.ones((16, S), "int32")}
    y = rng.randint(0, 64, (16, S)).astype("int32")
    mesh = tfshard.Mesh({"batch": 2, "model": 4})
    plan = auto_plan(build, mesh, inputs={k: v[:8] for k, v in x.items()})
    plain = build()
    strategy = plan.builder(mesh).sequence_parallel().recompute("selective").build()
    with strategy.scope():
        sharded = build()
    sharded.set_weights(plain.get_weights())
    for step in range(2):
        batch = {k: v[8 * step:8 * (step + 1)] for k, v in x.items()}
        want = plain.train_on_batch(batch, y[8 * step:8 * (step + 1)])
        got = sharded.train_on_batch(batch, y[8 * step:8 * (step + 1)])
        np.testing.assert_allclose(got, want, rtol=1e-5)
    for got, want in zip(sharded.get_weights(), plain.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # The decoder's residual stream is split over the sequence.
    hidden = sharded.backbone({k: strategy.place(v[:8], ("batch", None)) for k, v in x.items()})
    assert tfshard.layout_of(hidden) == ("batch", "model", None)
    # keras-hub's attention core is recomputed: its scores are not kept.
    kept = memory_by_kind(sharded, ({k: v[:8] for k, v in x.items()}, y[:8])).kept
    assert not any(k.op_type == "Softmax" for k in kept), kept


# ------------------------------------------------------------ collectives
def measure_block_collectives():
    """Runs in a child process with DTensor's pass dumps on."""
    from tfshard.app import bench

    return {f"{sp}/{layers}": bench.count_step_collectives(
        tiny_transformer(f"model.layers={layers}", f"layout.sequence_parallel={sp}"), (2, 4))
        for sp in ("true",) for layers in (1, 2)}


def _one_block(measured, sp, stage):
    """One block's model-axis collectives per training step: 2 blocks minus 1."""
    block = measured[f"{sp}/2"][stage].copy()
    block.subtract(measured[f"{sp}/1"][stage])
    return {k: n for k, n in block.items() if n and k[1] == "model"}


def test_a_block_trades_its_all_reduces_for_gathers_and_reduce_scatters():
    measured = comm.run_in_subprocess(measure_block_collectives)
    # Without sequence parallelism: 4 all-reduces (test_bench pins them).
    # Expanded: 2 all-gathers forward (attention and FFN inputs), 2 backward
    # (the row-parallel outputs' gradients) and 2 backward re-gathers of the
    # inputs (kept split, not whole); 6 partial sums summed and scattered over
    # the sequence: the 2 row-parallel outputs forward, the input gradients
    # of query, key, value and ffn_in backward. (The norms' weight gradients
    # are summed over (batch, model), with the data-parallel ones.)
    assert _one_block(measured, "true", "expanded") == {
        ("all_gather", "model"): 6, ("all_reduce", "model"): 6, ("all_scatter", "model"): 6}
    # After DTensor's optimizations each all-reduce + scatter pair is one
    # reduce-scatter; the model-axis all-reduces left are the all-gathers,
    # which DTensor lowers on CPU to all-reduces of zero-filled buffers
    # (docs/performance.md): 6 gathers in 4 combined buffers.
    assert _one_block(measured, "true", "optimized") == {
        ("reduce_scatter", "model"): 6, ("all_reduce", "model"): 4}


# ----------------------------------------------------------------- errors
def test_a_sequence_the_tensor_axis_does_not_divide_is_a_clear_error():
    strategy = strategy_for((2, 4), plan=PLAN, sequence_parallel=True)
    with strategy.scope():
        model = stock_block(seq=6)
    x = strategy.place(np.zeros((B, 6, D), "float32"), ("batch", None, None))
    with pytest.raises(ShardingError, match=r"'attn/query'.* 6 tokens.*size 4.*Pad the sequence"):
        tf.function(model, autograph=False)(x)


def test_sequence_parallel_off_by_default_and_on_a_one_device_mesh():
    strategy = strategy_for((2, 4), plan=PLAN)
    assert strategy.sequence_parallel is False
    x = np.random.RandomState(0).randn(B, S, D).astype("float32")
    check_parity(stock_block, (1, 1), x, plan=PLAN, sequence_parallel=True)
