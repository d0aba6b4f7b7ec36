"""Sharded checkpoints: resharding restore, atomic commits, kill during save,
mismatch errors, Keras file interop."""

import os
import re
import signal
import subprocess
import sys
import time
import zipfile

import h5py
import keras
import numpy as np
import pytest
import tfshard
from tfshard import _checkpoint_store, checkpoint
from tfshard.checkpoint import (
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    latest_checkpoint,
    list_checkpoints,
    read_manifest,
    restore_checkpoint,
    save_checkpoint,
)

import _checkpoint_worker as worker
from conftest import mesh_id

WORKER = os.path.join(os.path.dirname(__file__), "_checkpoint_worker.py")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = [(1, 8), (2, 4), (4, 2), (8, 1)]


# ----------------------------------------------------------------- helpers
def plain_mlp(**kwargs):
    return worker.build_mlp(keras, **kwargs)


def sharded_mlp(shape=(2, 4), rules=worker.MEGATRON, **kwargs):
    return worker.sharded_mlp(tfshard, keras, *shape, rules=rules, **kwargs)


def state(model):
    """Every variable a checkpoint holds: weights, then optimizer state."""
    return [np.array(v.numpy()) for v in model.weights + model.optimizer.variables]


def set_known_state(model, seed):
    """Distinct known values in every weight and optimizer variable (no
    training needed): slots, iteration count and learning rate included."""
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    rng = np.random.RandomState(seed)
    for v in model.weights + model.optimizer.variables:
        dtype = np.dtype(v.dtype)
        if np.issubdtype(dtype, np.integer):
            v.assign(np.asarray(seed + 7, dtype))
        else:
            v.assign(rng.standard_normal(tuple(v.shape)).astype(dtype))
    return state(model)


def assert_state_equal(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        np.testing.assert_array_equal(g, w)  # bit-exact


def subprocess_env():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    return env


# ------------------------------------------------------ resharding matrix
@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Two checkpoints with known values: one saved sharded (2x4, kernels
    sharded over both mesh axes), one saved from a plain Keras model."""
    keras.backend.clear_session()
    base = tmp_path_factory.mktemp("references")
    sharded = sharded_mlp((2, 4), worker.LAYOUTS["both"], seed=1)
    sharded_values = set_known_state(sharded, seed=11)
    sharded_path = save_checkpoint(sharded, base / "sharded")
    plain = plain_mlp(seed=2)
    plain_values = set_known_state(plain, seed=22)
    plain_path = save_checkpoint(plain, base / "plain")
    return {"sharded": (sharded_path, sharded_values), "plain": (plain_path, plain_values)}


def expected_spec(rules, variable):
    for pattern, spec in rules.items():
        if re.fullmatch(pattern, variable.path):
            return tuple(spec)
    return (None,) * len(variable.shape)


@pytest.mark.parametrize("layout", list(worker.LAYOUTS))
@pytest.mark.parametrize("shape", MESHES, ids=mesh_id)
def test_resharding_matrix(shape, layout, references, tmp_path):
    rules = worker.LAYOUTS[layout]
    model = sharded_mlp(shape, rules, seed=3)

    # Saved on 2x4 (kernels split over both axes) -> this mesh and layout.
    path, values = references["sharded"]
    restore_checkpoint(model, path)
    assert_state_equal(state(model), values)
    mesh = dict(zip(("batch", "model"), shape))
    for v in model.weights:
        spec = expected_spec(rules, v)
        assert tfshard.layout_of(v) == spec  # the target keeps its own layout
        local = tuple(
            d // (mesh[a] if a else 1) for d, a in zip(v.shape, spec)
        )
        assert tfshard.local_shape(v) == local
        assert tuple(tfshard._dtensor.unpack(v)[0].shape) == local
    slots = [s for s in model.optimizer.variables if len(s.shape) == 2]
    assert {tfshard.layout_of(s) for s in slots} == {
        tfshard.layout_of(v) for v in model.weights if len(v.shape) == 2
    }

    # Saved from a plain Keras model -> this mesh and layout.
    path, values = references["plain"]
    restore_checkpoint(model, path)
    assert_state_equal(state(model), values)

    # This mesh and layout -> a plain Keras model.
    values = set_known_state(model, seed=sum(shape) + len(layout))
    saved = save_checkpoint(model, tmp_path / "ckpts")
    manifest = read_manifest(saved)
    assert manifest["mesh"]["axes"] == mesh
    assert {e["path"]: e["spec"] for e in manifest["variables"] if e["group"] == "model"} == {
        v.path: list(expected_spec(rules, v)) for v in model.weights
    }
    plain = plain_mlp(seed=4)
    restore_checkpoint(plain, saved)
    assert_state_equal(state(plain), values)
    assert all(tfshard.layout_of(v) is None for v in plain.weights)


def test_sharded_save_writes_each_shard_once(tmp_path):
    """Each distinct shard is written once, by its own device: on 2x4 with
    Megatron layouts the column-sharded kernel is 4 files' worth of slices,
    not one gathered tensor, and the replicas over "batch" write nothing."""
    with worker.make_strategy(tfshard, 2, 4, {r".*ffn_in/kernel": (None, "model")}).scope():
        big = keras.Sequential(
            [keras.Input((64,)), keras.layers.Dense(256, use_bias=False, name="ffn_in")],
            name="mlp",
        )
    path = save_checkpoint(big, tmp_path)
    data = sorted(f for f in os.listdir(path) if ".data-" in f)
    sizes = sorted(os.path.getsize(os.path.join(path, f)) for f in data)
    shard_bytes = 64 * 256 * 4 // 4
    assert sizes.count(shard_bytes) == 4, sizes
    assert max(sizes) == shard_bytes


@pytest.mark.skipif(
    not hasattr(tfshard.StrategyBuilder, "shard_optimizer_state"),
    reason="needs optimizer-state sharding (ZeRO-1)",
)
def test_optimizer_state_sharded_over_data_axis_reshards(tmp_path):
    """Slots split over both mesh axes (ZeRO-1) restore onto a strategy
    without it, and back."""
    builder = (
        tfshard.StrategyBuilder(tfshard.Mesh({"batch": 2, "model": 4}))
        .data_parallel("batch")
        .tensor_parallel("model")
        .shard_optimizer_state("batch")
    )
    for pattern, spec in worker.MEGATRON.items():
        builder.shard(pattern, spec)
    zero = builder.build()
    with zero.scope():
        model = plain_mlp(seed=1)
    values = set_known_state(model, seed=3)
    kernel_slot = model.optimizer.variables[2]
    assert tfshard.layout_of(kernel_slot) == ("batch", "model")
    plain_layout = sharded_mlp((4, 2), seed=2)
    restore_checkpoint(plain_layout, save_checkpoint(model, tmp_path / "zero"))
    assert_state_equal(state(plain_layout), values)
    assert tfshard.layout_of(plain_layout.optimizer.variables[2]) == (None, "model")
    with zero.scope():
        back = plain_mlp(seed=4)
    restore_checkpoint(back, save_checkpoint(plain_layout, tmp_path / "plain-layout"))
    assert_state_equal(state(back), values)
    assert tfshard.layout_of(back.optimizer.variables[2]) == ("batch", "model")


# --------------------------------------------------------- atomic commits
def test_save_layout_manifest_and_listing(tmp_path):
    model = sharded_mlp((2, 4))
    model.optimizer.build(model.trainable_variables)
    directory = tmp_path / "ckpts"
    assert latest_checkpoint(directory) is None and list_checkpoints(directory) == []
    first = save_checkpoint(model, directory)  # step: the iteration count
    assert os.path.basename(first) == "ckpt-0"
    assert sorted(f for f in os.listdir(first) if not f.startswith("variables.data")) == [
        "COMMITTED",
        "manifest.json",
        "variables.index",
    ]
    manifest = read_manifest(first)
    assert manifest["step"] == 0
    assert manifest["versions"] == {
        "tfshard": tfshard.__version__,
        "keras": keras.version(),
        "tensorflow": __import__("tensorflow").__version__,
    }
    assert manifest["mesh"] == {
        "axes": {"batch": 2, "model": 4},
        "device_type": "CPU",
        "data_axis": "batch",
        "tensor_axis": "model",
    }
    by_path = {e["path"]: e for e in manifest["variables"]}
    assert by_path["mlp/ffn_in/kernel"]["shape"] == [16, 32]
    assert by_path["mlp/ffn_in/kernel"]["dtype"] == "float32"
    assert by_path["mlp/ffn_in/kernel"]["spec"] == [None, "model"]
    assert by_path["mlp/ffn_out/kernel"]["spec"] == ["model", None]
    optimizer = [e for e in manifest["variables"] if e["group"] == "optimizer"]
    assert len(optimizer) == 2 + 2 * 4  # iteration, learning rate, 2 slots each
    assert manifest["optimizer"]["class"] == "Adam"

    model.optimizer.iterations.assign(5)
    second = save_checkpoint(model, directory, metadata={"note": "hi"})
    assert os.path.basename(second) == "ckpt-5"
    assert read_manifest(second)["metadata"] == {"note": "hi"}
    assert list_checkpoints(directory) == [first, second]
    assert latest_checkpoint(directory) == second
    with pytest.raises(CheckpointError, match=r"ckpt-5.*already exists.*another step="):
        save_checkpoint(model, directory)

    # No optimizer: the step counts on from the latest.
    bare = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    assert os.path.basename(save_checkpoint(bare, tmp_path / "bare")) == "ckpt-0"
    assert os.path.basename(save_checkpoint(bare, tmp_path / "bare")) == "ckpt-1"


def test_max_to_keep_deletes_oldest_after_commit(tmp_path):
    model = plain_mlp()
    seen = []

    def check_old_still_there(path):
        seen.append(list_checkpoints(tmp_path))

    checkpoint._HOOKS["renamed"] = check_old_still_there
    try:
        for step in range(5):
            save_checkpoint(model, tmp_path, step=step, max_to_keep=2)
    finally:
        checkpoint._HOOKS.clear()
    assert [os.path.basename(p) for p in list_checkpoints(tmp_path)] == ["ckpt-3", "ckpt-4"]
    # While ckpt-4 was being committed, ckpt-2 and ckpt-3 were both kept.
    assert [os.path.basename(p) for p in seen[-1]] == ["ckpt-2", "ckpt-3"]
    assert sorted(os.listdir(tmp_path)) == ["ckpt-3", "ckpt-4"]
    with pytest.raises(CheckpointError, match="max_to_keep"):
        save_checkpoint(model, tmp_path, step=9, max_to_keep=0)


@pytest.mark.parametrize("stage", ["written", "renamed"])
def test_failed_save_leaves_previous_checkpoint(stage, tmp_path):
    model = plain_mlp()
    values = set_known_state(model, seed=1)
    first = save_checkpoint(model, tmp_path, step=1)
    set_known_state(model, seed=2)

    def fail(path):
        raise OSError("disk full")

    checkpoint._HOOKS[stage] = fail
    try:
        with pytest.raises(OSError, match="disk full"):
            save_checkpoint(model, tmp_path, step=2, max_to_keep=1)
    finally:
        checkpoint._HOOKS.clear()
    assert list_checkpoints(tmp_path) == [first]
    assert os.listdir(tmp_path) == ["ckpt-1"]  # nothing left behind
    fresh = plain_mlp(seed=5)
    assert restore_checkpoint(fresh, tmp_path) == first
    assert_state_equal(state(fresh), values)


def test_save_killed_before_rename_is_ignored_and_cleaned(tmp_path, monkeypatch):
    """What a kill before the rename leaves (a complete temporary directory)
    is never listed, and the next save deletes it."""
    model = plain_mlp()
    values = set_known_state(model, seed=1)
    first = save_checkpoint(model, tmp_path, step=1)
    set_known_state(model, seed=2)

    def killed(path):
        raise KeyboardInterrupt

    monkeypatch.setitem(checkpoint._HOOKS, "written", killed)
    monkeypatch.setattr(_checkpoint_store, "remove", lambda path: None)  # no cleanup, as in a kill
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(model, tmp_path, step=2)
    monkeypatch.undo()
    names = sorted(os.listdir(tmp_path))
    assert names[0].startswith(".tmp-ckpt-2-") and names[1:] == ["ckpt-1"]
    assert "variables.index" in os.listdir(tmp_path / names[0])
    assert list_checkpoints(tmp_path) == [first]
    fresh = plain_mlp(seed=3)
    assert restore_checkpoint(fresh, tmp_path) == first
    assert_state_equal(state(fresh), values)
    save_checkpoint(model, tmp_path, step=3)
    assert sorted(os.listdir(tmp_path)) == ["ckpt-1", "ckpt-3"]


def test_uncommitted_checkpoints_are_ignored_and_cleaned(tmp_path):
    model = plain_mlp()
    values = set_known_state(model, seed=1)
    first = save_checkpoint(model, tmp_path, step=1)
    # What a crash leaves: a renamed checkpoint without its marker, and a
    # temporary directory.
    set_known_state(model, seed=2)
    partial = save_checkpoint(model, tmp_path, step=7)
    os.remove(os.path.join(partial, "COMMITTED"))
    os.makedirs(tmp_path / ".tmp-ckpt-8-deadbeef" / "junk")
    assert latest_checkpoint(tmp_path) == first
    assert list_checkpoints(tmp_path) == [first]
    with pytest.raises(CheckpointError, match="never committed.*interrupted"):
        restore_checkpoint(model, partial)
    fresh = plain_mlp(seed=3)
    restore_checkpoint(fresh, tmp_path)
    assert_state_equal(state(fresh), values)
    save_checkpoint(model, tmp_path, step=2)
    assert sorted(os.listdir(tmp_path)) == ["ckpt-1", "ckpt-2"]


def test_not_found_errors(tmp_path):
    model = plain_mlp()
    with pytest.raises(CheckpointNotFoundError, match="No committed checkpoint in") as err:
        restore_checkpoint(model, tmp_path)
    assert isinstance(err.value, FileNotFoundError)
    assert isinstance(err.value, ValueError) and isinstance(err.value, tfshard.TfshardError)
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        restore_checkpoint(model, tmp_path / "nowhere")
    unbuilt = keras.Sequential([keras.layers.Dense(2)])
    with pytest.raises(CheckpointError, match="has no variables yet.*Build it"):
        save_checkpoint(unbuilt, tmp_path)


# -------------------------------------------------------- kill during save
def wait_for(path, proc, timeout):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            return False
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path):
    """A process saving ckpt-2 is SIGKILLed after renaming it into place but
    before its commit marker: the worst moment, when the partial checkpoint
    already has a checkpoint's name."""
    directory = tmp_path / "ckpts"
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, WORKER, "kill-during-save", str(directory), "renamed"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=subprocess_env(),
        )
        try:
            paused = wait_for(tmp_path / "paused", proc, timeout=120)
            assert paused, log.read_text()[-4000:]
            os.kill(proc.pid, signal.SIGKILL)  # in the middle of saving ckpt-2
            assert proc.wait(timeout=30) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)

    first = str(directory / "ckpt-1")
    assert sorted(os.listdir(directory)) == ["ckpt-1", "ckpt-2"]
    written = os.listdir(directory / "ckpt-2")
    assert "manifest.json" in written and "variables.index" in written
    assert "COMMITTED" not in written
    assert latest_checkpoint(directory) == first
    assert list_checkpoints(directory) == [first]
    with pytest.raises(CheckpointError, match="never committed"):
        restore_checkpoint(plain_mlp(), directory / "ckpt-2")

    # The previous checkpoint loads, onto another mesh.
    expected = np.load(tmp_path / "expected.npz")
    model = sharded_mlp((4, 2))
    assert restore_checkpoint(model, directory) == first
    assert len(expected.files) == len(model.weights)
    for i, v in enumerate(model.weights):
        np.testing.assert_array_equal(v.numpy(), expected[f"arr_{i}"])

    # The next save removes the remains of the killed one.
    save_checkpoint(model, directory, step=3)
    assert sorted(os.listdir(directory)) == ["ckpt-1", "ckpt-3"]


# ----------------------------------------------------------- mismatches
@pytest.fixture
def saved_plain(tmp_path):
    """A plain MLP's checkpoint (Adam state included)."""

    def save(**kwargs):
        model = plain_mlp(seed=1, **kwargs)
        set_known_state(model, seed=1)
        return save_checkpoint(model, tmp_path / "ckpts")

    return save


def assert_unchanged_after(fn, model):
    before = state(model)
    fn()
    assert_state_equal(state(model), before)


def target_model():
    model = sharded_mlp((2, 4), seed=8)
    set_known_state(model, seed=8)
    return model


def test_mismatch_variables_missing_from_checkpoint(saved_plain):
    path = saved_plain()
    model = sharded_mlp((2, 4), seed=8, head=True)
    set_known_state(model, seed=8)

    def restore():
        with pytest.raises(CheckpointMismatchError) as err:
            restore_checkpoint(model, path)
        message = str(err.value)
        assert "does not match model 'mlp'; the model was not changed" in message
        assert "in the model but not in the checkpoint: mlp/head/kernel, mlp/head/bias" in message
        assert err.value.missing == ["mlp/head/kernel", "mlp/head/bias"]
        assert isinstance(err.value, ValueError) and isinstance(err.value, tfshard.TfshardError)

    assert_unchanged_after(restore, model)


def test_mismatch_extra_variables_in_checkpoint(saved_plain):
    path = saved_plain(head=True)
    model = target_model()

    def restore():
        with pytest.raises(ValueError, match="the model was not changed") as err:
            restore_checkpoint(model, path)
        message = str(err.value)
        assert "in the checkpoint but not in the model: mlp/head/kernel, mlp/head/bias" in message
        assert err.value.unexpected == ["mlp/head/kernel", "mlp/head/bias"]

    assert_unchanged_after(restore, model)


def test_mismatch_shapes(saved_plain):
    path = saved_plain(d_ff=64)
    model = target_model()

    def restore():
        with pytest.raises(CheckpointMismatchError) as err:
            restore_checkpoint(model, path)
        message = str(err.value)
        assert "shape mismatch: mlp/ffn_in/kernel: checkpoint (16, 64), model (16, 32)" in message
        assert "shape mismatch: mlp/ffn_in/bias: checkpoint (64,), model (32,)" in message
        assert "shape mismatch: mlp/ffn_out/kernel: checkpoint (64, 8), model (32, 8)" in message
        assert "mlp/ffn_out/bias" not in message
        assert err.value.shape_mismatches == [
            "mlp/ffn_in/kernel",
            "mlp/ffn_in/bias",
            "mlp/ffn_out/kernel",
        ]

    assert_unchanged_after(restore, model)


def test_mismatch_dtypes(saved_plain):
    path = saved_plain(dtype="float16")
    model = target_model()

    def restore():
        with pytest.raises(CheckpointMismatchError) as err:
            restore_checkpoint(model, path)
        message = str(err.value)
        assert "dtype mismatch: mlp/ffn_in/kernel: checkpoint float16, model float32" in message
        assert err.value.dtype_mismatches == [v.path for v in model.weights]

    assert_unchanged_after(restore, model)


def test_mismatch_optimizer_and_weights_only(saved_plain):
    path = saved_plain()  # Adam
    model = sharded_mlp((2, 4), seed=8, optimizer="sgd")
    set_known_state(model, seed=8)

    def restore():
        with pytest.raises(CheckpointMismatchError) as err:
            restore_checkpoint(model, path)
        message = str(err.value)
        assert (
            "in the checkpoint but not in the optimizer: adam/mlp_ffn_in_kernel_momentum"
            in message
        )
        assert "optimizer (Adam) does not match the model's (SGD)" in message
        assert "weights_only=True" in message

    assert_unchanged_after(restore, model)
    restore_checkpoint(model, path, weights_only=True)
    saved = plain_mlp(seed=1)
    restore_checkpoint(saved, path)
    for got, want in zip(model.weights, saved.weights):
        np.testing.assert_array_equal(got.numpy(), want.numpy())


def test_restore_without_optimizer_and_uncompiled_model(saved_plain, tmp_path):
    path = saved_plain()
    reference = plain_mlp(seed=1)
    restore_checkpoint(reference, path)
    with worker.make_strategy(tfshard, 4, 2, worker.MEGATRON).scope():
        inference = plain_mlp(seed=9, optimizer=None)
    assert restore_checkpoint(inference, path) == path
    assert_state_equal(
        [v.numpy() for v in inference.weights], [v.numpy() for v in reference.weights]
    )
    # A checkpoint without optimizer state restores the weights and warns.
    weights_only = save_checkpoint(inference, tmp_path / "no-optimizer")
    model = target_model()
    optimizer_before = [v.numpy() for v in model.optimizer.variables]
    with pytest.warns(UserWarning, match="holds no optimizer state"):
        restore_checkpoint(model, weights_only)
    assert_state_equal([v.numpy() for v in model.weights], [v.numpy() for v in reference.weights])
    assert_state_equal([v.numpy() for v in model.optimizer.variables], optimizer_before)


# ------------------------------------------------------------ Keras files
def test_keras_files_from_sharded_model_load_in_plain_keras(tmp_path):
    sharded = sharded_mlp((2, 4), seed=1)
    x, y = worker.training_data()
    sharded.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    values = state(sharded)
    weights_h5, keras_file = tmp_path / "m.weights.h5", tmp_path / "m.keras"
    sharded.save_weights(weights_h5)
    sharded.save(keras_file)

    plain = plain_mlp(seed=9)
    plain.optimizer.build(plain.trainable_variables)
    plain.load_weights(weights_h5)
    assert_state_equal(state(plain), values)
    loaded = keras.models.load_model(keras_file)
    assert_state_equal(state(loaded), values)
    assert all(tfshard.layout_of(v) is None for v in loaded.weights)

    # The files are plain Keras: nothing in them refers to tfshard.
    with zipfile.ZipFile(keras_file) as archive:
        assert "tfshard" not in archive.read("config.json").decode()
    with h5py.File(weights_h5) as h5:
        names = []
        h5.visit(names.append)
    assert names and not any("tfshard" in n for n in names)


@pytest.mark.parametrize("shape", [(4, 2), (1, 8)], ids=mesh_id)
def test_keras_files_load_into_sharded_model(shape, tmp_path):
    plain = plain_mlp(seed=1)
    x, y = worker.training_data()
    plain.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    values = state(plain)
    weights_h5, keras_file = tmp_path / "m.weights.h5", tmp_path / "m.keras"
    plain.save_weights(weights_h5)
    plain.save(keras_file)

    sharded = sharded_mlp(shape, seed=9)
    sharded.optimizer.build(sharded.trainable_variables)
    sharded.load_weights(weights_h5)
    assert_state_equal(state(sharded), values)
    assert tfshard.layout_of(sharded.weights[0]) == (None, "model")

    strategy = worker.make_strategy(tfshard, *shape, worker.MEGATRON)
    with strategy.scope():
        loaded = keras.models.load_model(keras_file)
    assert_state_equal(state(loaded), values)
    assert [tfshard.layout_of(v) for v in loaded.weights] == [
        (None, "model"),
        ("model",),
        ("model", None),
        (None,),
    ]
    slots = [v for v in loaded.optimizer.variables if len(v.shape) == 2]
    assert {tfshard.layout_of(v) for v in slots} == {(None, "model"), ("model", None)}
    # It trains on, like the plain model.
    loaded.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    plain.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(loaded.weights, plain.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
