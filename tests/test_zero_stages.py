"""ZeRO-2 and ZeRO-3 over the data axis (``shard_optimizer_state("batch",
stage=2|3)``): one-device numbers, per-device bytes read from the shards,
reduce-scatters in the compiled step, checkpoints across stages, bad input.

ZeRO-1 (stage 1) has its own tests in test_zero.py and test_checkpoint.py."""

import contextlib

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import SHARDED_MESH_SHAPES, mesh_id

import tfshard
from tfshard import _dtensor, comm
from tfshard.checkpoint import restore_checkpoint, save_checkpoint
from tfshard.errors import StrategyError
from tfshard.layers import ColumnParallelDense, RowParallelDense

STEPS = 10
BATCH = 8
TOL = {"rtol": 1e-5, "atol": 1e-6}


def zero_strategy(shape, stage):
    builder = (tfshard.StrategyBuilder(tfshard.Mesh({"batch": shape[0], "model": shape[1]}))
               .data_parallel("batch").tensor_parallel("model"))
    if stage:
        builder.shard_optimizer_state("batch", stage=stage)
    return builder.build()


def mlp(strategy=None):
    """Column-parallel up (16 -> 32), a LayerNorm, row-parallel down (-> 8)."""
    sharded = strategy is not None
    column = ColumnParallelDense if sharded else keras.layers.Dense
    row = RowParallelDense if sharded else keras.layers.Dense
    with strategy.scope() if sharded else contextlib.nullcontext():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((16,)), column(32, activation="relu", name="ffn_in"),
                                  keras.layers.LayerNormalization(name="norm"), row(8, name="ffn_out")],
                                 name="mlp")
        optimizer = keras.optimizers.Adam(1e-2)
        optimizer.build(model.trainable_variables)
    return model, optimizer


def train(model, optimizer, strategy, x, y):
    """``STEPS`` Adam steps, each traced once: ``(outputs, held gradients)``
    per step, as numpy, and the last step's gradients as tensors."""
    variables = model.trainable_variables

    @tf.function
    def step(x, y):
        with strategy.scope() if strategy else contextlib.nullcontext():
            with tf.GradientTape() as tape:
                out = model(x, training=True)
                loss = tf.reduce_mean(tf.square(out - y))
            grads = tape.gradient(loss, variables)
            if strategy is not None:
                grads = strategy.hold_gradients(grads, variables)
            optimizer.apply(grads, variables)
        return out, grads

    history = []
    for n in range(STEPS):
        xs, ys = x[n * BATCH:(n + 1) * BATCH], y[n * BATCH:(n + 1) * BATCH]
        if strategy is not None:
            xs, ys = strategy.place(xs, ("batch", None)), strategy.place(ys, ("batch", None))
        out, grads = step(xs, ys)
        history.append((tfshard.to_numpy(out) if strategy else out.numpy(),
                        [tfshard.to_numpy(g) if strategy else g.numpy() for g in grads]))
    return history, grads


@pytest.fixture(scope="module")
def data():
    rng = np.random.RandomState(0)
    return rng.randn(STEPS * BATCH, 16).astype("float32"), rng.randn(STEPS * BATCH, 8).astype("float32")


@pytest.fixture(scope="module")
def plain_run(data):
    model, optimizer = mlp()
    history, _ = train(model, optimizer, None, *data)
    return history, [w.numpy() for w in model.weights]


_RUNS = {}


def zero_run(data, shape, stage):
    """The sharded MLP trained ``STEPS`` steps at ``stage`` on ``shape``
    (trained once per module)."""
    key = (shape, stage)
    if key not in _RUNS:
        strategy = zero_strategy(shape, stage)
        model, optimizer = mlp(strategy)
        history, grads = train(model, optimizer, strategy, *data)
        _RUNS[key] = {"strategy": strategy, "model": model, "optimizer": optimizer,
                      "history": history, "grads": grads}
    return _RUNS[key]


@pytest.fixture(scope="module", autouse=True)
def _release_runs():
    yield
    _RUNS.clear()


# ------------------------------------------------------------------ parity
@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("shape", SHARDED_MESH_SHAPES, ids=mesh_id)
def test_stage_trains_like_one_device(data, plain_run, shape, stage):
    """Forward, gradients and weights after each of 10 Adam steps equal plain
    Keras's on one device."""
    run = zero_run(data, shape, stage)
    want_history, want_weights = plain_run
    for n, ((out_s, grads_s), (out_p, grads_p)) in enumerate(zip(run["history"], want_history)):
        np.testing.assert_allclose(out_s, out_p, err_msg=f"forward, step {n}", **TOL)
        for v, gs, gp in zip(run["model"].trainable_variables, grads_s, grads_p):
            np.testing.assert_allclose(gs, gp, err_msg=f"{v.path} gradient, step {n}", **TOL)
    for w, want in zip(run["model"].weights, want_weights):
        np.testing.assert_allclose(w.numpy(), want, err_msg=f"{w.path} after {STEPS} steps", **TOL)


# ------------------------------------------------------------------- bytes
def local_elements(x):
    return int(np.prod(_dtensor.unpack(x)[0].shape))


def state_by_variable(run):
    """``{path: (parameter, gradient, [slots])}`` per-device elements, read
    from the shards device 0 holds (``dtensor.unpack``)."""
    slots = {}
    for slot in run["optimizer"].variables:
        for v in run["model"].trainable_variables:
            if slot.path.endswith(v.path.replace("/", "_") + "_momentum") or slot.path.endswith(
                    v.path.replace("/", "_") + "_velocity"):
                slots.setdefault(v.path, []).append(local_elements(slot))
    return {
        v.path: (local_elements(v), local_elements(g), slots[v.path])
        for v, g in zip(run["model"].trainable_variables, run["grads"])
    }


KERNELS = ("mlp/ffn_in/kernel", "mlp/ffn_out/kernel")  # the tensor-parallel weights


def test_stage3_holds_global_over_dp_tp_of_every_tensor_parallel_weight(data):
    run = zero_run(data, (2, 4), 3)
    state = state_by_variable(run)
    for v in run["model"].trainable_variables:
        parameter, gradient, slots = state[v.path]
        assert len(slots) == 2, v.path  # Adam's momentum and velocity
        assert gradient == parameter and slots == [parameter] * 2, (v.path, state[v.path])
        if v.path in KERNELS:
            assert parameter * 2 * 4 == int(np.prod(v.shape)), (v.path, parameter)
    assert tfshard.spec_of(run["model"].get_layer("ffn_in").kernel) == ("batch", "model")
    assert tfshard.spec_of(run["model"].get_layer("ffn_out").kernel) == ("model", "batch")
    # Byte for byte, per device (float32): ffn_in kernel 16x32/8 = 64, bias
    # 32/4 = 8 (split over 'model' already, no whole dim left), norm gamma
    # and beta 32/2 = 16 each, ffn_out kernel 32x8/8 = 32, bias 8/2 = 4:
    # 140 elements each of parameters, gradients, momentum and velocity.
    per_kind = sum(p for p, _, _ in state.values())
    assert per_kind == 140
    assert 4 * sum(p + g + sum(s) for p, g, s in state.values()) == 4 * 140 * 4 == 2240


def test_stage2_splits_gradients_and_slots_not_parameters(data):
    run = zero_run(data, (2, 4), 2)
    state = state_by_variable(run)
    for path in KERNELS:
        parameter, gradient, slots = state[path]
        size = int(np.prod(run["model"].get_layer(path.split("/")[1]).kernel.shape))
        assert parameter == size // 4  # global / tp
        assert gradient == size // 8 and slots == [size // 8] * 2  # global / (dp x tp)
    spec = {v.path: tfshard.spec_of(g) for v, g in zip(run["model"].trainable_variables, run["grads"])}
    assert spec["mlp/ffn_in/kernel"] == ("batch", "model")
    assert spec["mlp/ffn_out/kernel"] == ("model", "batch")
    assert tfshard.spec_of(run["model"].get_layer("ffn_in").kernel) == (None, "model")


# ------------------------------------------------------------- collectives
def zero_step_collectives():
    """Collectives of one ``fit`` step of a column -> row MLP on 2x4 per
    ZeRO stage (run in a child process with DTensor's dumps on)."""
    from tfshard.app import bench

    out = {}
    for stage in (1, 2, 3):
        strategy = zero_strategy((2, 4), stage)
        with strategy.scope():
            model = keras.Sequential([keras.Input((16,)), ColumnParallelDense(64, activation="relu", name="up"),
                                      RowParallelDense(16, name="down")])
            model.compile(optimizer="adam", loss="mse")
        x = np.random.RandomState(0).randn(8, 16).astype("float32")
        with comm.dump_dir() as directory:
            model.fit(x, x, batch_size=8, epochs=1, verbose=0)
            out[str(stage)] = {
                s: comm.parse_dump_dir(directory, s, program=bench.TRAIN_STEP_PROGRAM)[0]
                for s in ("expanded", "optimized")
            }
    return out


@pytest.fixture(scope="module")
def stage_collectives():
    return comm.run_in_subprocess(zero_step_collectives)


def test_stage2_reduce_scatters_the_gradients_it_splits(stage_collectives):
    """Three weights split over 'batch' (up kernel, down kernel, down bias;
    the up bias is split over 'model' already): their data-parallel gradient
    sums become three reduce-scatters. ZeRO-1 all-reduces them instead."""
    one, two = stage_collectives["1"]["optimized"], stage_collectives["2"]["optimized"]
    assert one[("reduce_scatter", "batch")] == 0, one
    assert two[("reduce_scatter", "batch")] == 3, two
    # The tensor-parallel forward all-reduce of the row layer is unchanged.
    assert two[("all_reduce", "model")] == one[("all_reduce", "model")] == 1


def test_stage3_gathers_parameters_when_used_and_reduce_scatters_gradients(stage_collectives):
    three = stage_collectives["3"]
    # One all-gather over 'batch' per parameter stored split over it, where
    # a layer reads it; ZeRO-1/2 instead gather the updated slices back
    # into the replicated parameters (4: one more, the down bias's, read by
    # the add after its update).
    assert three["expanded"][("all_gather", "batch")] == 3, three["expanded"]
    assert three["optimized"][("reduce_scatter", "batch")] == 3, three["optimized"]
    # No update slice to scatter: parameters are updated where they live.
    assert three["optimized"][("all_scatter", "batch")] == 0, three["optimized"]
    assert stage_collectives["2"]["optimized"][("all_scatter", "batch")] > 0


# ------------------------------------------------------------- checkpoints
def set_known_state(model, optimizer, seed):
    rng = np.random.RandomState(seed)
    for v in model.weights + optimizer.variables:
        if np.issubdtype(np.dtype(v.dtype), np.integer):
            v.assign(np.asarray(seed + 7, np.dtype(v.dtype)))
        else:
            v.assign(rng.standard_normal(tuple(v.shape)).astype(np.dtype(v.dtype)))
    return [np.array(v.numpy()) for v in model.weights + optimizer.variables]


def compiled_mlp(strategy):
    model, optimizer = mlp(strategy)
    model.compile(optimizer=optimizer, loss="mse")  # save_checkpoint saves model.optimizer
    return model


@pytest.mark.parametrize("stage", [2, 3])
def test_checkpoints_restore_across_stages_and_meshes(stage, tmp_path):
    """Saved at a stage on 2x4, restored bit-exact onto 4x2 without ZeRO and
    onto plain Keras; saved without ZeRO, restored at the stage."""
    source = compiled_mlp(zero_strategy((2, 4), stage))
    values = set_known_state(source, source.optimizer, seed=3)
    path = save_checkpoint(source, tmp_path / "zero")
    for strategy in (zero_strategy((4, 2), 0), None):
        target = compiled_mlp(strategy)
        target.optimizer.build(target.trainable_variables)
        restore_checkpoint(target, path)
        got = [np.array(v.numpy()) for v in target.weights + target.optimizer.variables]
        for g, w in zip(got, values):
            np.testing.assert_array_equal(g, w)
    back = compiled_mlp(zero_strategy((2, 4), stage))
    restore_checkpoint(back, save_checkpoint(target, tmp_path / "plain"))
    for g, w in zip([np.array(v.numpy()) for v in back.weights + back.optimizer.variables], values):
        np.testing.assert_array_equal(g, w)
    if stage == 3:
        assert tfshard.spec_of(back.get_layer("ffn_in").kernel) == ("batch", "model")


def test_stage3_reference_transformer_trains_like_plain_keras_and_restores(tmp_path):
    """Attention, the tied vocab-parallel embedding (its table stored split
    over 'model' and 'batch', gathered over 'batch' only for the masked
    lookup) and Adam at stage 3 give plain Keras's losses; its checkpoint
    restores into plain Keras."""
    from tfshard.app import config as config_lib
    from tfshard.app import data as data_lib
    from tfshard.app import models

    config = {**config_lib.defaults()["model"], "d_model": 32, "heads": 8, "d_ff": 64, "layers": 1,
              "seq_len": 16}
    x, y = data_lib.lm_examples(data_lib.stdlib_bytes(100_000), config["seq_len"], 3 * BATCH, seed=0)

    def build(strategy=None):
        with strategy.scope() if strategy else contextlib.nullcontext():
            return models.build(config, seed=0)

    plain, sharded = build(), build(zero_strategy((2, 4), 3))
    assert tfshard.spec_of(sharded.get_layer("token_embedding").embeddings) == ("model", "batch")
    for n in range(2):
        batch = slice(n * BATCH, (n + 1) * BATCH)
        np.testing.assert_allclose(sharded.train_on_batch(x[batch], y[batch]),
                                   plain.train_on_batch(x[batch], y[batch]), rtol=1e-5)
    restored = build()
    restore_checkpoint(restored, save_checkpoint(sharded, tmp_path))
    for got, want in zip(restored.get_weights(), plain.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------- bad input
def test_bad_stages_and_combinations_are_errors_before_any_work():
    mesh = tfshard.Mesh({"batch": 2, "model": 4})
    with pytest.raises(StrategyError, match=r"stage=4.*must be 1 .*2 .*3"):
        tfshard.StrategyBuilder(mesh).shard_optimizer_state("batch", stage=4)
    with pytest.raises(StrategyError, match=r"stage=True"):
        tfshard.StrategyBuilder(mesh).shard_optimizer_state("batch", stage=True)
    with pytest.raises(StrategyError, match=r"no axis 'data'"):
        tfshard.StrategyBuilder(mesh).shard_optimizer_state("data", stage=2)
    no_data_axis = tfshard.StrategyBuilder(mesh).tensor_parallel("model").shard_optimizer_state("batch", stage=3)
    with pytest.raises(StrategyError, match=r"stage=3\).*has none.*data_parallel\('batch'\)"):
        no_data_axis.build()
    other_axis = (tfshard.StrategyBuilder(mesh).data_parallel("batch").tensor_parallel("model")
                  .shard_optimizer_state("model", stage=2))
    with pytest.raises(StrategyError, match=r"data axis 'batch', not 'model'.*stage=1"):
        other_axis.build()
    # Stage 1 over any axis stays allowed (test_zero.py, test_checkpoint.py).
    ok = (tfshard.StrategyBuilder(mesh).data_parallel("batch").tensor_parallel("model")
          .shard_optimizer_state("model").build())
    assert ok.zero_stage == 1 and ok.optimizer_state_axis == "model"
