"""Performance gates that do not depend on the clock: collectives per
training step, per-device bytes, trace counts; and the bench command runs.

Timings are only printed (by ``tfshard bench``), never asserted."""

import importlib.util
import os

import numpy as np
import pytest
from tfshard import bench, comm
from tfshard import config as config_lib
from tfshard import jobs

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
TINY = [
    "model.d_model=32",
    "model.heads=8",
    "model.d_ff=64",
    "model.vocab=64",
    "model.seq_len=16",
    "train.batch_size=8",
    "data.max_bytes=200000",
    "data.eval_batches=1",
]


def tiny_transformer(*overrides):
    return config_lib.load(os.path.join(CONFIGS, "transformer_2x4.yaml"), TINY + list(overrides))


def mlp_step_collectives(blocks):
    """Collectives of one training step of ``blocks`` Megatron MLP blocks
    (column-parallel up, row-parallel down) on 2x4, by stage."""
    import keras
    import tfshard
    from tfshard.layers import ColumnParallelDense, RowParallelDense

    mesh = tfshard.Mesh({"batch": 2, "model": 4})
    strategy = tfshard.StrategyBuilder(mesh).data_parallel("batch").tensor_parallel("model").build()
    with strategy.scope():
        layers = [keras.Input((16,))]
        for i in range(blocks):
            layers += [ColumnParallelDense(64, activation="relu", name=f"up{i}"),
                       RowParallelDense(16, name=f"down{i}")]
        model = keras.Sequential(layers)
        model.compile(optimizer="adam", loss="mse")
    x = np.random.RandomState(0).randn(8, 16).astype("float32")
    with comm._dump_dir() as directory:
        model.fit(x, x, batch_size=8, epochs=1, verbose=0)
        return {
            stage: comm.parse_dump_dir(directory, stage, program=bench.TRAIN_STEP_PROGRAM)[0]
            for stage in ("expanded", "optimized")
        }


def measure_block_collectives():
    """Runs in a child process with DTensor's pass dumps on."""
    out = {f"mlp{n}": mlp_step_collectives(n) for n in (1, 2)}
    for layers in (1, 2):
        config = tiny_transformer(f"model.layers={layers}")
        for shape in ((2, 4), (8, 1)):
            out[f"{layers}@{shape[0]}x{shape[1]}"] = bench.count_step_collectives(config, shape)
    return out


@pytest.fixture(scope="module")
def block_collectives():
    return comm.run_in_subprocess(measure_block_collectives)


def test_a_transformer_block_costs_megatrons_four_all_reduces(block_collectives):
    one, two = block_collectives["1@2x4"], block_collectives["2@2x4"]
    block = two["optimized"].copy()
    block.subtract(one["optimized"])
    block = {k: n for k, n in block.items() if n}
    # 2 forward (attention output, FFN output), 2 backward (the input
    # gradients of the column-parallel QKV and FFN-in projections).
    assert block == {("all_reduce", "model"): 4}, block


def test_an_mlp_block_costs_two_all_reduces(block_collectives):
    """Column -> row MLP block: identity forward / all-reduce backward at the
    column layer's input, all-reduce forward at the row layer's output."""
    block = block_collectives["mlp2"]["optimized"].copy()
    block.subtract(block_collectives["mlp1"]["optimized"])
    assert {k: n for k, n in block.items() if n} == {("all_reduce", "model"): 2}, block
    one = block_collectives["mlp1"]["optimized"]
    # The first block's input needs no gradient: only its forward all-reduce,
    # plus the one combined data-parallel gradient all-reduce.
    assert one == {("all_reduce", "model"): 1, ("all_reduce", "batch"): 1}, one


def test_no_hidden_gathers_and_one_combined_gradient_all_reduce(block_collectives):
    for name in ("1@2x4", "2@2x4"):
        launched = block_collectives[name]["optimized"]
        for kind in ("all_gather", "all_to_all", "reduce_scatter", "collective_permute"):
            assert launched.total(kind) == 0, (name, launched)
        # DTensor combines every data-parallel gradient all-reduce into one.
        assert launched[("all_reduce", "batch")] == 1, (name, launched)
        # ... which SPMD expansion emitted one per gradient.
        assert block_collectives[name]["expanded"][("all_reduce", "batch")] > 1


def test_pure_data_parallel_only_reduces_gradients(block_collectives):
    for name in ("1@8x1", "2@8x1"):
        launched = block_collectives[name]["optimized"]
        assert launched.total(axis="model") == 0, launched
        assert launched.total("all_gather") == 0, launched
        assert launched[("all_reduce", "batch")] >= 1, launched


def test_per_device_bytes_of_tensor_parallel_weights_are_global_over_tp():
    """Parameters and Adam slots: sharded ones hold exactly global/tp per
    device, replicated ones the full size; nothing else."""
    from tfshard.report import variable_rows

    config = tiny_transformer("model.layers=1")
    strategy = jobs.build_strategy(bench.with_mesh(config, (1, 8)))
    model = jobs.build_model(config, strategy)
    rows = variable_rows(list(model.variables) + list(model.optimizer.variables))
    sharded = [r for r in rows if r["spec"] and "model" in r["spec"]]
    assert sharded and any("adam" in r["path"] or "optimizer" in r["path"] or "momentum" in r["path"]
                           for r in sharded), [r["path"] for r in sharded]
    for r in rows:
        expected = r["global_bytes"] // 8 if r in sharded else r["global_bytes"]
        assert r["per_device_bytes"] == expected, r
    # The embedding table, every FFN and attention kernel is split.
    kernels = [r for r in rows if r["path"].endswith(("kernel", "embeddings")) and "position" not in r["path"]]
    assert all(r in sharded for r in kernels if len(r["shape"]) >= 2), kernels


def test_bench_times_every_mesh_with_one_trace(capsys):
    config = tiny_transformer("model.layers=1")
    results = bench.bench(config, meshes=[(1, 1), (2, 4)], steps=3, rounds=1, collectives=False)
    printed = capsys.readouterr().out
    for name in ("plain keras 1 device", "tfshard 1x1", "tfshard 2x4"):
        assert name in printed
        run = results["runs"][name]
        assert run["ms_per_step"] > 0
    assert results["runs"]["tfshard 1x1"]["trace_count"] == 1
    assert results["runs"]["tfshard 2x4"]["trace_count"] == 1
    plain = results["runs"]["plain keras 1 device"]["per_device_bytes"]
    assert results["runs"]["tfshard 1x1"]["per_device_bytes"] == plain
    assert results["runs"]["tfshard 2x4"]["per_device_bytes"] < plain / 2


def test_results_serialize_to_json():
    import json

    counts = comm.CollectiveCounts({("all_reduce", "model"): 4, ("all_gather", ("batch", "model")): 1})
    text = json.dumps(bench.to_json({"collectives": {"2x4": {"optimized": counts}}, "steps": 3}))
    back = json.loads(text)["collectives"]["2x4"]["optimized"]
    assert comm.CollectiveCounts.from_list(back) == counts


def test_mesh_list_errors_name_the_value():
    assert bench.parse_meshes("1x1, 2x4") == [(1, 1), (2, 4)]
    for bad in ("2x", "2*4", "0x8", "two"):
        with pytest.raises(config_lib.ConfigError, match="DATAxMODEL"):
            bench.parse_meshes(bad)


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="JAX is not installed")
def test_jax_reference_is_the_same_model():
    config = tiny_transformer("model.layers=1")
    reference = bench.run_jax_reference(config, (2, 4), steps=3)
    strategy = jobs.build_strategy(bench.with_mesh(config, (2, 4)))
    from tfshard.report import per_device_bytes

    model = jobs.build_model(config, strategy)
    ours = per_device_bytes(list(model.variables) + list(model.optimizer.variables))
    # Same parameters, same Megatron split: the same bytes per device, up to
    # the optimizer's scalar counters.
    assert abs(reference["per_device_bytes"] - ours) <= 64, (reference, ours)
    assert np.isfinite(reference["ms_per_step"])
