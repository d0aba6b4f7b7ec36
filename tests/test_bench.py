"""Performance gates that do not depend on the clock: collectives per
training step, per-device bytes, trace counts; and the bench command runs.

Timings are only printed (by ``tfshard bench``), never asserted."""

import importlib.util
import os

import numpy as np
import pytest
from tfshard import comm
from tfshard.app import bench, bench_random
from tfshard.app import config as config_lib
from tfshard.app import jobs

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


def tiny_transformer(*overrides, name="transformer_2x4"):
    return config_lib.load(os.path.join(CONFIGS, f"{name}.yaml"), TINY + list(overrides))


def tiny_moe_transformer(*overrides):
    """configs/transformer_moe_2x4.yaml, small: 2 blocks, each FFN a mixture
    of 8 experts over 'batch' with d_ff over 'model'."""
    return tiny_transformer(*overrides, name="transformer_moe_2x4")


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
    with comm.dump_dir() as directory:
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
    out["moe@2x4"] = bench.count_step_collectives(tiny_moe_transformer(), (2, 4))
    config = tiny_transformer("model.layers=1")
    out["random"] = {
        streams: bench_random.count_random_elements(bench_random.variant(config, 0.1, streams))
        for streams in ("global", "per_device")
    }
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
        # README: "Pure data parallel (8x1) launches one all-reduce."
        assert launched.total("all_reduce") == 1, launched
        assert launched[("all_reduce", "batch")] == 1, launched


def without_local_slices(counts):
    """Counts minus the all-scatters (local slices, no data moved)."""
    return {k: n for k, n in counts.items() if n and k[0] != "all_scatter"}


def test_readme_figures_of_the_reference_transformer_step(block_collectives):
    """README, Performance: the 2-block reference transformer on 2x4
    launches 12 model-axis all-reduces and one data-axis all-reduce, which
    SPMD expansion emitted as 38 gradient all-reduces."""
    step = block_collectives["2@2x4"]
    assert without_local_slices(step["optimized"]) == {
        ("all_reduce", "model"): 12,
        ("all_reduce", "batch"): 1,
    }, step["optimized"]
    assert step["expanded"][("all_reduce", "batch")] == 38, step["expanded"]
    assert step["expanded"].total("all_reduce", "model") == 17, step["expanded"]


def test_moe_transformer_step_is_all_to_alls_over_the_expert_axis(block_collectives):
    """configs/transformer_moe_2x4.yaml (experts over 'batch', d_ff over
    'model'): each MoE block routes by 4 all-to-alls over 'batch'; its d_ff
    all-reduces replace the dense FFN's on 'model' one for one; the
    load-balancing loss adds one scalar all-reduce over 'batch'. Nothing is
    gathered."""
    step = block_collectives["moe@2x4"]
    assert without_local_slices(step["optimized"]) == {
        ("all_to_all", "batch"): 8,
        ("all_reduce", "model"): 12,
        ("all_reduce", "batch"): 2,  # the combined gradients + the aux-loss mean
    }, step["optimized"]
    # Expanded: 4 fewer gradient all-reduces per block than the dense model
    # (the expert kernels are split over 'batch'; the router's remains) and
    # one aux-loss mean per block.
    dense = block_collectives["2@2x4"]["expanded"][("all_reduce", "batch")]
    assert step["expanded"][("all_reduce", "batch")] == dense - 2 * (4 - 1) + 2, step["expanded"]


@pytest.mark.parametrize("name", ["1@2x4", "2@2x4", "1@8x1", "2@8x1", "moe@2x4"])
def test_communication_estimate_agrees_with_the_measured_step(name, block_collectives):
    """``tfshard inspect``'s estimate (app.estimate.estimate_collectives) is what
    DTensor launches, kind by kind and axis by axis."""
    from tfshard.app.estimate import communication_estimate, estimate_collectives

    layers, _, shape = name.partition("@")
    mesh = tuple(int(n) for n in shape.split("x"))
    config = tiny_moe_transformer() if layers == "moe" else tiny_transformer(f"model.layers={layers}")
    config = bench.with_mesh(config, mesh)
    measured = without_local_slices(block_collectives[name]["optimized"])
    assert estimate_collectives(config) == measured, (estimate_collectives(config), measured)
    text = communication_estimate(config)
    if layers == "moe":
        assert "8 all-to-alls" in text and "MoE dispatch + combine" in text, text
        assert "FFN output fwd" not in text, text  # no dense FFN block here


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


def test_random_draws_per_device_read_from_the_spmd_dump(block_collectives):
    """One tiny block (batch 8, seq 16, d_model 32, 8 heads) with dropout on
    2x4: the attention-probability mask (b, h, s, s) and the two residual
    masks (b, s, d). Drawn globally (one device's numbers) every device draws
    them whole; per device, DTensor draws each device's slice: the scores
    split over batch (2) and heads (4), the residuals over batch (2)."""
    b, s, d, h = 8, 16, 32, 8
    masks = {"scores": b * h * s * s, "residuals": 2 * b * s * d}
    drawn = block_collectives["random"]
    assert drawn["global"] == masks["scores"] + masks["residuals"]
    assert drawn["per_device"] == masks["scores"] // 8 + masks["residuals"] // 2


def test_random_cost_rate_must_be_a_dropout_rate():
    for rate in (0.0, 1.0, -0.1, 2.0):
        with pytest.raises(config_lib.ConfigError, match="--random-cost"):
            bench_random.random_cost(tiny_transformer(), rate=rate, steps=3)


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


def test_jax_reference_refuses_models_it_cannot_build():
    """The JAX reference is the dense transformer: a MoE or CNN config would
    be timed against a different model, so it is an error (before any
    timing), whether or not JAX is installed."""
    moe = tiny_moe_transformer()
    with pytest.raises(config_lib.ConfigError, match=r"model.moe_experts=8.*model.moe_experts=0"):
        bench.run_jax_reference(moe, (2, 4), steps=3)
    with pytest.raises(config_lib.ConfigError, match=r"model.moe_experts=8"):
        bench.bench(moe, meshes=[(2, 4)], steps=3, rounds=1, collectives=False, jax=True)
    cnn = config_lib.load(os.path.join(CONFIGS, "cnn_2x4_channels.yaml"))
    with pytest.raises(config_lib.ConfigError, match=r"model.kind='cnn'"):
        bench.run_jax_reference(cnn, (2, 4), steps=3)
    # The dense model of the same config is accepted.
    bench.check_jax_reference_config(tiny_moe_transformer("model.moe_experts=0"))


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


@pytest.mark.skipif(importlib.util.find_spec("keras_hub") is None, reason="keras-hub is not installed")
def test_llama_case_runs_three_stacks_on_the_same_training_run(tmp_path):
    """``tfshard bench --llama`` at tiny settings: TF on one device, tfshard
    2x4 and (with JAX) Keras-JAX ModelParallel 2x4 train the same model from
    the same weights on the same batches, so every step's loss agrees; the
    JSON holds each run's times, losses and bytes, and the ratios."""
    import json

    from tfshard.app import bench_llama

    config = bench_llama.case_config("tiny")
    has_jax = importlib.util.find_spec("jax") is not None
    results = bench_llama.bench_llama(config, meshes=[(2, 4)], jax_meshes=[(2, 4)] if has_jax else [],
                                      steps=3, rounds=2, out=lambda *_: None)
    results = json.loads(json.dumps(results))  # what --json writes
    names = ["tf 1 device", "tfshard 2x4"] + (["jax ModelParallel 2x4"] if has_jax else [])
    assert sorted(results["runs"]) == sorted(names)
    for name in names:
        run = results["runs"][name]
        assert len(run["losses"]) == 6 and len(run["round_ms"]) == 2, run
        assert run["ms_per_step"] > 0 and run["cpu_ms_per_step"] > 0 and run["per_device_bytes"] > 0
        np.testing.assert_allclose(run["losses"], results["runs"]["tf 1 device"]["losses"], rtol=1e-4)
    assert results["loss_max_rel_diff"] < 1e-4
    assert results["runs"]["tfshard 2x4"]["per_device_bytes"] < results["runs"]["tf 1 device"]["per_device_bytes"]
    expected = {"tfshard 2x4 / tf 1 device"} | ({"tfshard 2x4 / jax ModelParallel 2x4"} if has_jax else set())
    assert set(results["ratios"]) == set(results["cpu_ratios"]) == expected
    if has_jax:  # the same split of the same weights (Adam's slots differ: JAX's are counted too)
        jax, ours = results["runs"]["jax ModelParallel 2x4"], results["runs"]["tfshard 2x4"]
        assert abs(jax["per_device_bytes"] - ours["per_device_bytes"]) <= 64, (jax, ours)


def test_llama_case_settings_are_checked():
    from tfshard.app import bench_llama

    assert bench_llama.case_config("small", ["hidden_dim=128"])["hidden_dim"] == 128
    with pytest.raises(config_lib.ConfigError, match="KEY=INT"):
        bench_llama.case_config("small", ["hidden=128"])
    with pytest.raises(config_lib.ConfigError, match="unknown case"):
        bench_llama.case_config("huge")


@pytest.mark.skipif(importlib.util.find_spec("keras_hub") is None, reason="keras-hub is not installed")
def test_llama_breakdown_reads_the_profile():
    """``bench --llama --breakdown`` at tiny settings: the profile yields
    per-device op counts by kind on both runs; the sharded step runs ops
    DTensor inserted and collectives; tfshard's host timers are removed."""
    from tfshard import training
    from tfshard.app import bench_llama, breakdown

    call = training._Step.__call__
    results = breakdown.breakdown_llama(bench_llama.case_config("tiny"), (2, 4), steps=3,
                                        out=lambda *_: None)
    assert training._Step.__call__ is call
    plain, sharded = results["runs"]["tf 1 device"], results["runs"]["tfshard 2x4"]
    for run in (plain, sharded):
        assert run["profile"]["ops_per_device_step"] > 50, run["profile"]
        assert run["profile"]["by_kind"]["matmuls/einsums"]["ops"] > 0
    kinds = sharded["profile"]["by_kind"]
    assert kinds["inserted by DTensor (relayouts, gathers, slices)"]["ops"] > 0, kinds
    assert kinds["collectives (launch)"]["ops"] > 0, kinds
    assert "collectives (launch)" not in plain["profile"]["by_kind"]
    assert set(sharded["host_ms_per_step"]) >= {"batch packing (shard_batch)", "compiled step call, until done"}
    assert sharded["graph"]["layout_ops"].get("Relayout", 0) > 0
