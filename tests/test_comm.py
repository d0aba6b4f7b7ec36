"""tfshard.comm: counting DTensor collectives from its SPMD dumps.

The parser is tested on MLIR text in DTensor's format; the counts of real
programs (MLP, embedding, loss, norms) are measured in one child process,
because DTensor only dumps when TensorFlow starts with the logging flag."""

import os
import subprocess

import numpy as np
import pytest
import tensorflow as tf
import tfshard
from tfshard import comm

from conftest import make_strategy

DEVICES = ",".join(f"/job:localhost/replica:0/task:0/device:CPU:{i}" for i in range(8))
MESH = f"|batch=2,model=4|0,1,2,3,4,5,6,7|0,1,2,3,4,5,6,7|{DEVICES}"


def layout(specs):
    return f"sharding_specs:{specs}, mesh:{MESH}"


def all_reduce(name, operand, group):
    return (
        f'      %{name} = "tf.DTensorAllReduce"(%x, %{group}) <{{device_type = '
        f'"/job:localhost/replica:0/task:0/device:CPU", reduce_op = "Add"}}> '
        f'{{_layout = ["{layout("batch,unsharded")}"]}} : (tensor<4x8xf32>, '
        f"tensor<2x4xi32>) -> tensor<4x8xf32>"
    )


def const(name, value, shape):
    return (
        f'      %{name} = "tf.Const"() <{{value = dense<{value}> : tensor<{shape}xi32>}}> '
        f": () -> tensor<{shape}xi32>"
    )


def relayout_op(op, before, after):
    return (
        f'      %y = "tf.{op}"(%x) <{{input_layout = #dtensor.layout<{layout(before)}>, '
        f'output_layout = #dtensor.layout<{layout(after)}>}}> {{_layout = ["{layout(after)}"]}} '
        ": (tensor<4x4xf32>) -> tensor<8x4xf32>"
    )


def module(*lines):
    return "\n".join(
        ['module attributes {tf._default_mesh = "' + MESH + '"} {', "  func.func @main() {"]
        + list(lines)
        + ["  }", "}"]
    )


def test_group_assignment_names_the_mesh_axis():
    text = module(
        const("cst", "[[0, 1, 2, 3], [4, 5, 6, 7]]", "2x4"),
        all_reduce("a", "x", "cst"),
        const("cst_1", "[[0, 4], [1, 5], [2, 6], [3, 7]]", "4x2"),
        all_reduce("b", "x", "cst_1"),
        const("cst_2", "[[0, 1, 2, 3, 4, 5, 6, 7]]", "1x8"),
        all_reduce("c", "x", "cst_2"),
        # Hex-encoded constant (MLIR prints large ones this way): model groups.
        const("cst_3", '"0x' + np.array([[0, 1, 2, 3], [4, 5, 6, 7]], "<i4").tobytes().hex() + '"', "2x4"),
        all_reduce("d", "x", "cst_3"),
        # The same SSA name defined again later (another function) wins.
        const("cst", "[[0, 4], [1, 5], [2, 6], [3, 7]]", "4x2"),
        all_reduce("e", "x", "cst"),
    )
    counts = comm.parse_module_text(text)
    assert counts == {
        ("all_reduce", "model"): 2,
        ("all_reduce", "batch"): 2,
        ("all_reduce", ("batch", "model")): 1,
    }
    assert counts.total("all_reduce") == 5 and counts.total(axis="batch") == 2


def test_layout_changing_collectives():
    text = module(
        relayout_op("DTensorAllGather", "batch,model", "batch,unsharded"),
        relayout_op("DTensorAllGather", "batch,model", "unsharded,unsharded"),
        relayout_op("DTensorAllScatter", "unsharded,unsharded", "unsharded,model"),
        relayout_op("DTensorAllToAll", "model,unsharded", "unsharded,model"),
    )
    counts = comm.parse_module_text(text)
    assert counts == {
        ("all_gather", "model"): 1,
        ("all_gather", ("batch", "model")): 1,
        ("all_scatter", "model"): 1,
        ("all_to_all", "model"): 1,
    }
    assert comm.CollectiveCounts.from_list(counts.as_list()) == counts
    assert "all_gather" in repr(counts)


def test_dump_directory_stages(tmp_path):
    expanded = module(
        const("cst", "[[0, 1, 2, 3], [4, 5, 6, 7]]", "2x4"),
        all_reduce("a", "x", "cst"),
        all_reduce("b", "x", "cst"),
        relayout_op("DTensorAllGather", "batch,model", "batch,unsharded"),
    )
    combined = module(const("cst", "[[0, 1, 2, 3], [4, 5, 6, 7]]", "2x4"), all_reduce("a", "x", "cst"))
    files = {
        "dtensor.0001.dtensor_mlir.after_DTensorLayoutPropagationV2.__inference_f_1.mlir": module(),
        "dtensor.0002.dtensor_mlir.after_DTensorSPMDExpansion.__inference_f_1.mlir": expanded,
        "dtensor.0003.dtensor_mlir.after_DTensorAllReduceCombineOptimization.__inference_f_1.mlir": combined,
        "dtensor.0004.dtensor_mlir.after_DTensorAllReduceLowering.__inference_f_1.mlir": module(),
        # A second program in the same directory.
        "dtensor.0005.dtensor_mlir.after_DTensorSPMDExpansion.__inference_g_2.mlir": combined,
        "unrelated.txt": "",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    counts, programs = comm.parse_dump_dir(str(tmp_path))
    assert programs == 2
    assert counts == {("all_reduce", "model"): 3, ("all_gather", "model"): 1}
    counts, _ = comm.parse_dump_dir(str(tmp_path), stage="optimized")
    assert counts == {("all_reduce", "model"): 2}
    with pytest.raises(ValueError, match="stage"):
        comm.parse_dump_dir(str(tmp_path), stage="lowered")


def test_dump_dir_is_public_and_restores_the_prefix(monkeypatch):
    assert "dump_dir" in comm.__all__
    assert comm._dump_dir is comm.dump_dir  # the former private name still works
    monkeypatch.setenv("TF_DUMP_GRAPH_PREFIX", "/previous/prefix")
    with comm.dump_dir() as directory:
        assert os.path.isdir(directory)
        assert os.environ["TF_DUMP_GRAPH_PREFIX"] == directory
    assert not os.path.exists(directory)
    assert os.environ["TF_DUMP_GRAPH_PREFIX"] == "/previous/prefix"
    monkeypatch.delenv("TF_DUMP_GRAPH_PREFIX")
    with comm.dump_dir():
        pass
    assert "TF_DUMP_GRAPH_PREFIX" not in os.environ


def test_in_process_counting_needs_the_logging_flag(monkeypatch):
    monkeypatch.delenv("TF_CPP_VMODULE", raising=False)
    monkeypatch.delenv("TF_CPP_MAX_VLOG_LEVEL", raising=False)
    assert not comm.dump_logging_enabled()
    with pytest.raises(comm.CollectiveCountError, match="run_in_subprocess"):
        comm.count_collectives(lambda: tf.constant(1.0))
    monkeypatch.setenv("TF_CPP_VMODULE", "foo=2,dtensor_mlir_passes=1")
    assert comm.dump_logging_enabled()


def test_bad_targets_and_child_failures(monkeypatch):
    with pytest.raises(comm.CollectiveCountError, match="neither"):
        comm.run_in_subprocess("no-colon-here")
    with pytest.raises(comm.CollectiveCountError, match="module level"):
        comm.run_in_subprocess(lambda: None)

    # A failing child: its error comes back (without TensorFlow's log noise).
    # The child is faked: starting TensorFlow for this would cost seconds.
    seen = {}

    def fake_run(argv, env, **kwargs):
        seen.update(env)
        stderr = "I0000 noise\nTraceback ...\nRuntimeError: boom from the child\n"
        return subprocess.CompletedProcess(argv, 1, "", stderr)

    monkeypatch.setattr(comm.subprocess, "run", fake_run)
    with pytest.raises(comm.CollectiveCountError, match="boom from the child") as err:
        comm.run_in_subprocess("def main():\n    raise RuntimeError('boom')\n", devices=4)
    assert "I0000" not in str(err.value)
    assert "dtensor_mlir_passes=1" in seen["TF_CPP_VMODULE"]
    assert seen["TFSHARD_COMM_DEVICES"] == "4"
    assert seen["TFSHARD_COMM_TARGET"].startswith("source:def main")


# --------------------------------------------------- real programs, measured
def measure_layers():
    """Runs in the child process (see test below)."""
    import keras
    import tfshard
    from tfshard.layers import (
        ColumnParallelDense,
        RowParallelDense,
        ShardedLayerNormalization,
        ShardedRMSNormalization,
        VocabParallelEmbedding,
    )
    from tfshard.losses import VocabParallelSparseCategoricalCrossentropy

    mesh = tfshard.Mesh({"batch": 2, "model": 4})
    strategy = (
        tfshard.StrategyBuilder(mesh)
        .data_parallel("batch")
        .tensor_parallel("model")
        .rules({"d_model": "model"})
        .build()
    )
    rng = np.random.RandomState(0)
    with strategy.scope():
        mlp = keras.Sequential([keras.Input((16,)), ColumnParallelDense(32), RowParallelDense(8)])
        embedding = VocabParallelEmbedding(32, 16, mask_zero=True)
        layer_norm, rms_norm = ShardedLayerNormalization(), ShardedRMSNormalization()
    loss = VocabParallelSparseCategoricalCrossentropy()
    ids = rng.randint(0, 32, size=(4, 8)).astype("int32")
    hidden = rng.randn(4, 8, 16).astype("float32")
    embedding(ids), layer_norm(hidden), rms_norm(hidden)
    x = strategy.place(rng.randn(8, 16).astype("float32"), ("batch", None))
    ids = strategy.place(ids, ("batch", None))
    split_hidden = strategy.place(hidden, ("batch", None, "model"))
    logits = strategy.place(rng.randn(4, 8, 32).astype("float32"), ("batch", None, "model"))

    def embedding_train(ids):
        with tf.GradientTape() as tape:
            out = embedding(ids)
            value = tf.reduce_sum(out * out)
        return tape.gradient(value, embedding.trainable_variables)

    def loss_value(logits, labels):
        with strategy.scope():
            return loss(labels, logits)

    def gather(x):
        return strategy.place(x, (None, None))

    return {
        "mlp": comm.count_collectives(mlp, x),
        "gather": comm.count_collectives(gather, x),
        "gather_optimized": comm.count_collectives(gather, x, stage="optimized"),
        "embedding": comm.count_collectives(embedding, ids),
        "embedding_train": comm.count_collectives(embedding_train, ids),
        "loss": comm.count_collectives(loss_value, logits, ids),
        "layer_norm": comm.count_collectives(layer_norm, split_hidden),
        "rms_norm": comm.count_collectives(rms_norm, split_hidden),
    }


def test_measured_collective_counts():
    """One child process measures every program (TensorFlow starts once)."""
    measured = comm.run_in_subprocess(measure_layers)

    # Column -> Row MLP: the one all-reduce of the row-parallel output.
    assert measured["mlp"] == {("all_reduce", "model"): 1}
    # An explicit relayout batch-split -> whole is one all-gather over
    # 'batch'; on CPU DTensor lowers it to an all-reduce of a padded buffer.
    assert measured["gather"] == {("all_gather", "batch"): 1}
    assert measured["gather_optimized"] == {("all_reduce", "batch"): 1}

    # Vocab-parallel embedding: one all-reduce forward, the table is never
    # gathered; backward each device scatter-adds into its own slab (only
    # the data-parallel sum of the slab gradients, over 'batch'). The
    # all-scatters are local slices of small index tensors.
    forward, train = measured["embedding"], measured["embedding_train"]
    assert forward.total("all_reduce") == 1 and forward[("all_reduce", "model")] == 1, forward
    assert train.total("all_reduce") == 2, train
    assert train[("all_reduce", "model")] == 1 and train[("all_reduce", "batch")] == 1, train
    for counts in (forward, train):
        for kind in ("all_gather", "all_to_all", "reduce_scatter"):
            assert counts.total(kind) == 0, counts

    # Vocab-parallel loss: max, sum-exp and the target logit over the
    # vocabulary, the mean over the batch; never a gather of the logits.
    loss = measured["loss"]
    assert loss[("all_reduce", "model")] == 3 and loss[("all_reduce", "batch")] == 1, loss
    assert loss.total("all_gather") == 0 and loss.total("all_to_all") == 0, loss

    # Norms over a split hidden dim: mean and variance / the mean square.
    assert measured["layer_norm"] == {("all_reduce", "model"): 2}
    assert measured["rms_norm"] == {("all_reduce", "model"): 1}


def test_child_environment_is_not_inherited_here():
    # The measurement happens in a child; this process keeps its settings.
    assert "dtensor_mlir_passes" not in os.environ.get("TF_CPP_VMODULE", "")


ONE_AXIS = [("batch", None, None), (None, "model", None)]
TWO_AXES = [(None, "batch", "model"), ("model", "batch", None)]


def gather_and_grad(spec):
    strategy = make_strategy(2, 4)
    value = np.arange(8 * 8 * 4, dtype="float32").reshape(8, 8, 4)
    split = strategy.place(value, spec)

    @tf.function(autograph=False)
    def gather(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            whole = strategy.place(x, (None, None, None))
            total = tf.reduce_sum(whole * whole)
        return whole, tape.gradient(total, x)

    with strategy.scope():
        whole, grad = gather(split)
    assert tfshard.layout_of(whole) == (None, None, None)
    np.testing.assert_array_equal(tfshard.to_numpy(whole), value)
    assert tfshard.layout_of(grad) == spec
    np.testing.assert_allclose(tfshard.to_numpy(grad), 2 * value, rtol=1e-6)


@pytest.mark.parametrize("spec", ONE_AXIS + TWO_AXES)
def test_all_gathers_are_exact_by_default(spec):
    from tfshard import _dtensor

    if os.environ.get(_dtensor.GATHER_AS_COLLECTIVE_GATHER, "0") != "0":
        pytest.skip("this process runs with DTensor's CollectiveGatherV2 lowering")
    gather_and_grad(spec)


@pytest.mark.parametrize("spec", ONE_AXIS + TWO_AXES)
def test_collective_gather_lowering_works_over_one_mesh_axis_only(spec, monkeypatch):
    """DTensor's opt-in CollectiveGatherV2 lowering of all-gathers
    (tfshard._dtensor.GATHER_AS_COLLECTIVE_GATHER; 27% less CPU per step on
    keras-hub Llama 2x4): exact over one mesh axis, and in TF 2.21 it fails
    to compile a gather over two axes at once, which is why tfshard does not
    turn it on. If the two-axes case starts passing, DTensor fixed it and
    tfshard can make it the default."""
    from tfshard import _dtensor

    monkeypatch.setenv(_dtensor.GATHER_AS_COLLECTIVE_GATHER, "1")
    if spec in ONE_AXIS:
        gather_and_grad(spec)
    else:
        with pytest.raises(tf.errors.UnknownError, match="tf.Reshape"):
            gather_and_grad(spec)
