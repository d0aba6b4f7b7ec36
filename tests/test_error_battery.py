"""A battery of malformed inputs across the public API and the CLI, tried as
a new user would: every one ends in one clear error of the expected class
whose message names the culprit, with no raw TensorFlow or MLIR text, and
the process keeps working.

Each case is ``(id, call, error class, culprits)``: ``call(ctx, tmp_path)``
must raise the class, and every culprit string must be in the message. The
shared objects (a 2x4 strategy, a small compiled sharded MLP, one saved
checkpoint) are built once for the module.
"""

import json
import os
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
import tfshard
from tfshard import mesh as mesh_lib
from tfshard import multi_client
from tfshard.app import cli
from tfshard.app.config import ConfigError
from tfshard.callbacks import ShardedCheckpoint
from tfshard.errors import (
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    MeshError,
    MultiClientError,
    ShardingError,
    StrategyError,
    TfshardError,
    UnsupportedFeatureError,
    VirtualDeviceError,
)

import _checkpoint_worker as worker
from conftest import make_strategy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "transformer_2x4.yaml")
# What a raw TensorFlow / DTensor error looks like; none may reach a user.
RAW = ("UnknownError", "InvalidArgumentError", "errors_impl", "MLIR", "root error(s)", "[Op:")


def assert_clear(error, kind, culprits):
    assert isinstance(error, kind), f"{type(error).__name__}: {error}"
    text = str(error)
    for culprit in culprits:
        assert culprit in text, f"{culprit!r} not in: {text}"
    for raw in RAW:
        assert raw not in text, f"raw {raw!r} in: {text}"


# ------------------------------------------------------------- shared state
class Context:
    def __init__(self, base):
        self.base = base
        self.strategy = make_strategy(2, 4)
        self.mesh = self.strategy.mesh
        self.model = worker.sharded_mlp(tfshard, keras, 2, 4, seed=1)
        x, y = worker.training_data()
        self.x, self.y = x, y
        self.model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        self.saved = tfshard.save_checkpoint(self.model, base / "saved")

    def builder(self):
        return tfshard.StrategyBuilder(self.mesh).data_parallel("batch").tensor_parallel("model")

    def copy(self, tmp_path, edit=None):
        """A copy of the saved checkpoint (ckpt-<step> under tmp_path/ckpts),
        changed by ``edit(path)``."""
        path = tmp_path / "ckpts" / os.path.basename(self.saved)
        shutil.copytree(self.saved, path)
        if edit is not None:
            edit(path)
        return str(path)

    def restore(self, path, **kwargs):
        return tfshard.restore_checkpoint(self.model, path, **kwargs)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    keras.backend.clear_session()
    return Context(tmp_path_factory.mktemp("battery"))


# ------------------------------------------------------------ file faults
def data_file(path):
    return os.path.join(path, sorted(n for n in os.listdir(path) if ".data-" in n)[-1])


def truncate(path):
    name = data_file(path)
    with open(name, "r+b") as f:
        f.truncate(os.path.getsize(name) // 2)


def flip_bytes(path, name=None):
    name = name or data_file(path)
    raw = bytearray(open(name, "rb").read())
    for i in range(len(raw) // 3, len(raw) // 3 + 8):
        raw[i] ^= 0xFF
    open(name, "wb").write(bytes(raw))


def write_manifest(text):
    def edit(path):
        with open(os.path.join(path, "manifest.json"), "w") as f:
            f.write(text)
    return edit


def edit_manifest(change):
    def edit(path):
        name = os.path.join(path, "manifest.json")
        manifest = json.load(open(name))
        change(manifest)
        json.dump(manifest, open(name, "w"))
    return edit


def other_model_shapes():
    return worker.sharded_mlp(tfshard, keras, 2, 4, d_ff=64, seed=2)


def overlapping_rules(ctx):
    strategy = ctx.builder().shard(".*ffn_in/kernel", (None, "model")).shard(
        ".*ffn_.*/kernel", ("model", None)).build()
    with strategy.scope():
        worker.build_mlp(keras)


def variable_rule(ctx, spec, d_ff=32):
    with ctx.builder().shard(".*ffn_in/kernel", spec).build().scope():
        worker.build_mlp(keras, d_ff=d_ff)


def fit_plain_in_scope(ctx):
    plain = worker.build_mlp(keras)
    with ctx.strategy.scope():
        plain.fit(ctx.x, ctx.y, batch_size=8, verbose=0)


def in_tf_function(ctx, tmp_path):
    @tf.function(autograph=False)  # AutoGraph would wrap any error in its StagingError
    def restore():
        tfshard.restore_checkpoint(ctx.model, ctx.saved)
        return 0

    restore()


def save_into_a_file(ctx, tmp_path):
    target = tmp_path / "a-file"
    target.write_text("not a directory")
    tfshard.save_checkpoint(ctx.model, target / "ckpts")


def multi_client_mesh_too_large(ctx, monkeypatch):
    """This process posing as one of 2 processes of 2 CPUs each."""
    from tfshard import _dtensor

    monkeypatch.setattr(mesh_lib, "_num_clients", lambda: 2)
    monkeypatch.setattr(_dtensor, "logical_devices", lambda kind: [f"{kind}:{i}" for i in range(2)])
    tfshard.Mesh({"batch": 2, "model": 4})


# (id, call(ctx, tmp_path), error class, culprits in the message)
CASES = [
    # ---- meshes
    ("mesh-empty", lambda c, t: tfshard.Mesh({}), MeshError, ["axes is empty"]),
    ("mesh-zero-size", lambda c, t: tfshard.Mesh({"batch": 0}), MeshError, ["'batch'", "size 0"]),
    ("mesh-bad-axis-name", lambda c, t: tfshard.Mesh({"1x": 2}), MeshError, ["'1x'"]),
    ("mesh-axis-twice", lambda c, t: tfshard.Mesh([("a", 2), ("a", 2)]), MeshError, ["'a'", "twice"]),
    ("mesh-too-many-devices", lambda c, t: tfshard.Mesh({"batch": 2, "model": 8}), MeshError,
     ["16", "only 8", "use_virtual_devices(16)"]),
    ("mesh-device-type", lambda c, t: tfshard.Mesh({"b": 2}, device_type="FPGA"), MeshError, ["'FPGA'"]),
    ("mesh-device-count", lambda c, t: tfshard.Mesh({"b": 2}, devices=["CPU:0"]), MeshError,
     ["2 positions", "lists 1"]),
    ("mesh-device-twice", lambda c, t: tfshard.Mesh({"b": 2}, devices=["CPU:0", "CPU:0"]), MeshError,
     ["twice"]),
    ("mesh-axes-string", lambda c, t: tfshard.Mesh("batch"), MeshError, ["'batch'", "(name, size)"]),
    ("mesh-unknown-axis", lambda c, t: c.mesh.axis_size("nope"), MeshError, ["'nope'", "'batch'"]),
    ("mesh-mixed-types", lambda c, t: tfshard.Mesh({"b": 1}, devices=["GPU:0"], device_type="CPU"),
     MeshError, ["'GPU:0'", "GPU"]),
    ("virtual-devices-zero", lambda c, t: tfshard.use_virtual_devices(0), MeshError, ["0", "positive int"]),
    ("virtual-devices-too-late", lambda c, t: tfshard.use_virtual_devices(16), VirtualDeviceError,
     ["use_virtual_devices(16)", "already started", "first thing"]),
    # ---- Strategy.place and specs
    ("place-indivisible-rows", lambda c, t: c.strategy.place(np.ones((5, 4)), ("batch", None)),
     ShardingError, ["size 5", "'batch'", "(None, None) fits"]),
    ("place-wrong-rank", lambda c, t: c.strategy.place(np.ones((4, 4)), ("batch",)), ShardingError,
     ["('batch',)", "rank 2"]),
    ("place-unknown-axis", lambda c, t: c.strategy.place(np.ones((4, 4)), ("tensor", None)), ShardingError,
     ["'tensor'", "['batch', 'model']"]),
    ("place-axis-twice", lambda c, t: c.strategy.place(np.ones((4, 4)), ("model", "model")), ShardingError,
     ["'model'", "dimension 0 and dimension 1"]),
    ("place-spec-string", lambda c, t: c.strategy.place(np.ones(4), "batch"), ShardingError,
     ["'batch'", "a tuple"]),
    ("place-spec-entry", lambda c, t: c.strategy.place(np.ones(4), (3,)), ShardingError, ["entry 3"]),
    ("place-indivisible-columns", lambda c, t: c.strategy.place(np.ones((4, 6)), (None, "model")),
     ShardingError, ["size 6", "'model'", "multiple of 4"]),
    ("place-dtensor-bad-relayout",
     lambda c, t: c.strategy.place(c.strategy.place(np.ones((4, 4)), (None, None)), ("batch", "batch")),
     ShardingError, ["'batch'"]),
    ("validate-spec-rank", lambda c, t: tfshard.validate_spec(("model",), (3, 8), c.mesh, name="w"),
     ShardingError, ["w: spec ('model',)", "rank 2"]),
    ("validate-spec-indivisible", lambda c, t: tfshard.validate_spec((None, "model"), (3, 6), c.mesh, name="w"),
     ShardingError, ["w: dimension 1", "size 6"]),
    # ---- strategy builder and rules
    ("builder-not-a-mesh", lambda c, t: tfshard.StrategyBuilder("mesh"), StrategyError, ["str", "tfshard.Mesh"]),
    ("data-parallel-axis", lambda c, t: tfshard.StrategyBuilder(c.mesh).data_parallel("data"), StrategyError,
     ["'data'", "['batch', 'model']"]),
    ("tensor-parallel-axis", lambda c, t: tfshard.StrategyBuilder(c.mesh).tensor_parallel("tp"), StrategyError,
     ["'tp'"]),
    ("same-axis-twice",
     lambda c, t: tfshard.StrategyBuilder(c.mesh).data_parallel("model").tensor_parallel("model").build(),
     StrategyError, ["'model'", "both"]),
    ("rules-malformed", lambda c, t: c.builder().rules("heads:model:x"), ShardingError, ["'heads:model:x'"]),
    ("rules-no-colon", lambda c, t: c.builder().rules("heads"), ShardingError, ["'heads'", "logical_dim:mesh_axis"]),
    ("rules-unknown-axis", lambda c, t: c.builder().rules({"heads": "tensor"}), ShardingError,
     ["'heads'", "'tensor'"]),
    ("rules-empty-dim", lambda c, t: c.builder().rules({"": "model"}), ShardingError, ["''"]),
    ("rules-axis-type", lambda c, t: c.builder().rules({"heads": 3}), ShardingError, ["'heads'", "3"]),
    ("rules-type", lambda c, t: c.builder().rules(5), ShardingError, ["5"]),
    ("shard-bad-regex", lambda c, t: c.builder().shard("(", (None,)), ShardingError, ["'('"]),
    ("shard-spec-string", lambda c, t: c.builder().shard("x", "model"), ShardingError, ["'model'", "a tuple"]),
    ("shard-axis-twice", lambda c, t: c.builder().shard("x", ("model", "model")), ShardingError,
     ["'model'", "more than one dimension"]),
    ("shard-unknown-axis", lambda c, t: c.builder().shard("x", (None, "tp")), ShardingError, ["'tp'"]),
    ("shard-pattern-twice", lambda c, t: c.builder().shard("x", (None,)).shard("x", (None,)), ShardingError,
     ["'x'", "already exists"]),
    ("shard-output-axis", lambda c, t: c.builder().shard_output("x/output", ("nope",)), ShardingError, ["'nope'"]),
    ("shard-output-not-an-output", lambda c, t: c.builder().shard_output("x", (None,)), StrategyError,
     ["'x'", "'/output'"]),
    ("variable-rule-rank", lambda c, t: variable_rule(c, ("model",)), ShardingError,
     ["ffn_in/kernel", "rank 2"]),
    ("variable-rule-indivisible", lambda c, t: variable_rule(c, (None, "model"), d_ff=6), ShardingError,
     ["ffn_in/kernel", "size 6", "multiple of 4"]),
    ("variable-rules-overlap", lambda c, t: overlapping_rules(c), ShardingError,
     ["ffn_in/kernel", "two plan entries"]),
    # ---- fit
    ("fit-batch-size", lambda c, t: c.model.fit(c.x, c.y, batch_size=3, verbose=0), StrategyError,
     ["batch_size=3", "'batch'", "batch_size=2 or 4"]),
    ("fit-validation-batch-size",
     lambda c, t: c.model.fit(c.x, c.y, batch_size=8, validation_data=(c.x, c.y),
                              validation_batch_size=3, verbose=0),
     StrategyError, ["validation_batch_size=3"]),
    ("plain-model-in-scope", lambda c, t: fit_plain_in_scope(c), StrategyError,
     ["'mlp'", "built outside strategy.scope()"]),
    ("fit-wrong-feature-size",
     lambda c, t: c.model.fit(np.ones((16, 12), "float32"), c.y[:16], batch_size=8, verbose=0),
     ValueError, ["ffn_in", "16", "12"]),
    # ---- checkpoints
    ("save-not-a-model", lambda c, t: tfshard.save_checkpoint("model", t), CheckpointError, ["str"]),
    ("save-unbuilt", lambda c, t: tfshard.save_checkpoint(keras.Sequential([keras.layers.Dense(2)]), t),
     CheckpointError, ["has no variables yet"]),
    ("save-max-to-keep", lambda c, t: tfshard.save_checkpoint(c.model, t, max_to_keep=0), CheckpointError,
     ["max_to_keep", "0"]),
    ("save-step", lambda c, t: tfshard.save_checkpoint(c.model, t, step=-1), CheckpointError, ["step", "-1"]),
    ("save-existing-step",
     lambda c, t: tfshard.save_checkpoint(c.model, os.path.dirname(c.saved), step=int(c.saved.split("-")[-1])),
     CheckpointError, ["already exists", "step="]),
    ("save-into-a-file", save_into_a_file, CheckpointWriteError, ["a-file", "Nothing was committed"]),
    ("restore-missing-dir", lambda c, t: c.restore(t / "nope"), CheckpointNotFoundError, ["nope", "does not exist"]),
    ("restore-empty-dir", lambda c, t: c.restore(t), CheckpointNotFoundError, ["No committed checkpoint"]),
    ("restore-uncommitted", lambda c, t: c.restore(c.copy(t, lambda p: os.remove(os.path.join(p, "COMMITTED")))),
     CheckpointError, ["never committed"]),
    ("restore-other-model", lambda c, t: tfshard.restore_checkpoint(other_model_shapes(), c.saved),
     CheckpointMismatchError, ["shape mismatch", "ffn_in"]),
    ("restore-in-tf-function", in_tf_function, CheckpointError, ["eagerly"]),
    ("manifest-json-syntax", lambda c, t: c.restore(c.copy(t, write_manifest('{"format": '))), CheckpointError,
     ["manifest.json", "corrupt or incomplete", "not valid JSON", "line 1"]),
    ("manifest-is-a-list", lambda c, t: c.restore(c.copy(t, write_manifest("[1, 2]"))), CheckpointError,
     ["manifest.json", "corrupt or incomplete", "list"]),
    ("manifest-lacks-keys", lambda c, t: c.restore(c.copy(t, write_manifest('{"format": "tfshard.checkpoint"}'))),
     CheckpointError, ["manifest.json", "lacks", "'variables'"]),
    ("manifest-bad-variable", lambda c, t: c.restore(c.copy(t, edit_manifest(lambda m: m["variables"][0].pop("shape")))),
     CheckpointError, ["manifest.json", "variables[0]", "'shape'"]),
    ("manifest-other-format", lambda c, t: c.restore(c.copy(t, edit_manifest(lambda m: m.update(format="x")))),
     CheckpointError, ["manifest.json", "'x'"]),
    ("manifest-future-version",
     lambda c, t: c.restore(c.copy(t, edit_manifest(lambda m: m.update(format_version=99)))),
     CheckpointError, ["format version 99", "Upgrade tfshard"]),
    ("data-file-truncated", lambda c, t: c.restore(c.copy(t, truncate)), CheckpointError,
     ["variables.data-", "corrupt or incomplete", "truncated", "not changed"]),
    ("data-file-corrupt", lambda c, t: c.restore(c.copy(t, flip_bytes)), CheckpointError,
     ["variables.data-", "corrupt or incomplete", "CRC-32"]),
    ("index-corrupt",
     lambda c, t: c.restore(c.copy(t, lambda p: flip_bytes(p, os.path.join(p, "variables.index")))),
     CheckpointError, ["variables.index", "CRC-32"]),
    ("index-missing", lambda c, t: c.restore(c.copy(t, lambda p: os.remove(os.path.join(p, "variables.index")))),
     CheckpointError, ["variables.index", "is missing", "corrupt or incomplete"]),
    ("data-file-missing", lambda c, t: c.restore(c.copy(t, lambda p: os.remove(data_file(p)))), CheckpointError,
     ["variables.data-", "is missing"]),
    ("callback-save-freq", lambda c, t: ShardedCheckpoint(t, save_freq=0), CheckpointError, ["save_freq=0"]),
    ("callback-max-to-keep", lambda c, t: ShardedCheckpoint(t, max_to_keep=0), CheckpointError, ["max_to_keep=0"]),
    # ---- multi-client settings and input
    ("multi-client-no-jobs", lambda c, t: tfshard.initialize_multi_client(num_clients=2), MultiClientError,
     ["num_clients=2", "no jobs"]),
    ("multi-client-bad-job", lambda c, t: tfshard.initialize_multi_client(jobs=["localhost"], client_id=0),
     MultiClientError, ["'localhost'", "host:port"]),
    ("process-local-type", lambda c, t: multi_client.process_local(5), MultiClientError, ["int"]),
    ("input-context-batch", lambda c, t: multi_client.InputContext(2, 0, 2).local_batch_size(6),
     MultiClientError, ["global_batch_size=6", "multiple of 4"]),
    ("keras-initialize-processes",
     lambda c, t: keras.distribution.initialize(num_processes=2, process_id=0, job_addresses="a:1,b:2"),
     UnsupportedFeatureError, ["num_processes=2", "tfshard launch"]),
]


@pytest.fixture
def clean_cluster_env(monkeypatch):
    for name in ("DTENSOR_CLIENT_ID", "DTENSOR_NUM_CLIENTS", "DTENSOR_JOB_NAME", "DTENSOR_JOBS",
                 "TFSHARD_DEVICES_PER_PROCESS", "TFSHARD_DEVICE_TYPE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(multi_client, "_CLUSTER", None)
    return monkeypatch


@pytest.mark.parametrize("call, kind, culprits", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_input_gives_a_clear_error(ctx, tmp_path, clean_cluster_env, call, kind, culprits):
    with pytest.raises(Exception) as info:
        call(ctx, tmp_path)
    assert_clear(info.value, kind, culprits)


def test_multi_client_mesh_larger_than_the_job(ctx, monkeypatch):
    with pytest.raises(MeshError) as info:
        multi_client_mesh_too_large(ctx, monkeypatch)
    assert_clear(info.value, MeshError, [
        '{"batch": 2, "model": 4} has 8 devices', "each of the 2 processes", "this process has 2",
        "--devices-per-process 4",
    ])


def test_the_process_keeps_working_after_the_battery(ctx):
    """After every failure above: the battery's model still fits, saves and
    restores, and a new sharded model's fit equals one device."""
    ctx.model.fit(ctx.x, ctx.y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    path = tfshard.save_checkpoint(ctx.model, ctx.base / "after")
    assert tfshard.restore_checkpoint(ctx.model, path) == path
    sharded = worker.sharded_mlp(tfshard, keras, 2, 4, seed=8)
    plain = worker.build_mlp(keras, seed=9)
    plain.set_weights([v.numpy() for v in sharded.weights])
    for m in (sharded, plain):
        m.fit(ctx.x, ctx.y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    for got, want in zip(sharded.weights, plain.weights):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)


def test_a_fit_on_the_right_size_after_one_on_the_wrong_size_retraces(ctx):
    model = worker.sharded_mlp(tfshard, keras, 2, 4, seed=3)
    with pytest.raises(ValueError, match="expected axis -1 of input shape to have value 16"):
        model.fit(np.ones((16, 12), "float32"), ctx.y[:16], batch_size=8, verbose=0)
    history = model.fit(ctx.x, ctx.y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    # One trace per input signature; the one that failed is not kept.
    assert len(model.train_function.step._functions) == 1


def test_an_empty_mesh_axis_in_a_rule_string_replicates(ctx):
    """The decision on Mesh-TF's ``"heads:"``: it maps heads to no mesh axis
    (replicated), overriding tensor_parallel's default, as Mesh-TF reads it."""
    assert tfshard.LogicalRules("heads:,d_ff:model").as_dict() == {"heads": None, "d_ff": "model"}
    strategy = (tfshard.StrategyBuilder(ctx.mesh).data_parallel("batch").tensor_parallel("model")
                .rules("heads:").build())
    assert strategy.logical_rules.axis_for("heads") is None
    assert strategy.logical_rules.axis_for("d_ff") == "model"
    with strategy.scope():
        layer = tfshard.layers.HeadParallelAttention(num_heads=4, key_dim=8)
        layer.build((2, 4, 16), (2, 4, 16))
    assert len(layer.weights) == 8
    for weight in layer.weights:
        assert "model" not in (tfshard.layout_of(weight) or ()), weight.path


# --------------------------------------------------------------------- CLI
CLI_CASES = [
    ("missing-file", ["inspect", "nope.yaml"], ["'nope.yaml'", "does not exist"]),
    ("a-directory", ["inspect", REPO], ["is not a file"]),
    ("invalid-yaml", ["inspect", "{bad}"], ["not valid YAML", "line 3"]),
    ("top-level-list", ["inspect", "{list}"], ["top level", "list"]),
    ("unknown-section", ["inspect", CONFIG, "--set", "modle.heads=4"], ["'modle'"]),
    ("unknown-key", ["inspect", CONFIG, "--set", "model.hedas=4"], ["'hedas'"]),
    ("wrong-type", ["inspect", CONFIG, "--set", "train.steps=many"], ["train.steps", "'many'"]),
    ("rules-unknown-axis", ["inspect", CONFIG, "--set", "layout.rules=d_ff:tp"], ["layout.rules", "'tp'"]),
    ("rules-malformed", ["inspect", CONFIG, "--set", "layout.rules=heads:model:x"],
     ["layout.rules", "'heads:model:x'"]),
    ("rules-yaml-unknown-axis", ["inspect", "{tensor_rules}"], ["layout.rules", "'tensor'"]),
    ("set-without-equals", ["inspect", CONFIG, "--set", "train.steps"], ["--set", "section.key=value"]),
    ("set-bad-yaml", ["inspect", CONFIG, "--set", "train.steps=["], ["--set", "not valid YAML"]),
    ("batch-size", ["inspect", CONFIG, "--set", "train.batch_size=3"], ["train.batch_size=3", "mesh.batch=2"]),
    ("heads-vs-mesh", ["inspect", CONFIG, "--set", "model.heads=6"], ["model.heads=6", "mesh.model=4"]),
    ("launch-processes", ["launch", "--processes", "0", "--", "true"], ["--processes=0"]),
    ("launch-no-command", ["launch", "--processes", "2"], ["no command given"]),
    ("resume-corrupt-checkpoint", ["train", CONFIG, "--set", "output.dir={corrupt_run}"],
     ["corrupt or incomplete", "manifest.json"]),
]


@pytest.fixture
def cli_files(tmp_path, ctx):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  heads: [4\n")
    as_list = tmp_path / "list.yaml"
    as_list.write_text("- model\n- mesh\n")
    rules = tmp_path / "rules.yaml"
    rules.write_text("layout:\n  rules: 'heads:tensor'\n")
    run = tmp_path / "run"
    shutil.copytree(ctx.saved, run / "checkpoints" / "ckpt-4")
    (run / "checkpoints" / "ckpt-4" / "manifest.json").write_text("[")
    return {"bad": str(bad), "list": str(as_list), "tensor_rules": str(rules), "corrupt_run": str(run)}


def run_cli(argv, capsys):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.err


@pytest.mark.parametrize("argv, culprits", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_prints_one_line_and_exits_2(cli_files, capsys, clean_cluster_env, argv, culprits):
    argv = [a.format(**cli_files) for a in argv]
    code, err = run_cli(argv, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tfshard: error: "), err
    for culprit in culprits:
        assert culprit in lines[0], lines[0]
    for raw in RAW + ("Traceback",):
        assert raw not in err


def test_cli_debug_shows_the_traceback(cli_files, capsys, clean_cluster_env):
    code, err = run_cli(["inspect", CONFIG, "--set", "layout.rules=d_ff:tp", "--debug"], capsys)
    assert code == 2
    assert "Traceback" in err and "ConfigError" in err
    assert err.strip().splitlines()[-1].startswith("tfshard: error: ")


def test_cli_mesh_larger_than_the_job_names_the_keys(capsys, clean_cluster_env):
    """Under `tfshard launch --processes 2 --devices-per-process 2`, a 2x4
    config is refused before TensorFlow's runtime starts."""
    clean_cluster_env.setenv("DTENSOR_JOBS", "127.0.0.1:1,127.0.0.1:2")
    clean_cluster_env.setenv("DTENSOR_CLIENT_ID", "0")
    clean_cluster_env.setenv("TFSHARD_DEVICES_PER_PROCESS", "2")
    code, err = run_cli(["inspect", CONFIG], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("tfshard: error: ")
    for culprit in ("mesh.batch x mesh.model = 2 x 4 = 8", "2 processes x 2 devices = 4",
                    "--devices-per-process 4"):
        assert culprit in err, err


def test_cli_error_under_launch_is_printed_once(tmp_path):
    """Every process of the job meets the same bad config: one line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DTENSOR_", "TFSHARD_"))}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=os.pathsep.join(filter(None, (REPO, env.get("PYTHONPATH")))))
    command = [
        sys.executable, "-m", "tfshard.app.cli", "launch", "--processes", "2", "--devices-per-process", "2",
        "--timeout", "300", "--grace", "5", "--", sys.executable, "-m", "tfshard.app.cli", "train", CONFIG,
        "--set", f"output.dir={tmp_path}",
    ]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400, cwd=REPO)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    errors = [line for line in output.splitlines() if "tfshard: error:" in line]
    assert len(errors) == 1, output[-3000:]
    assert "--devices-per-process 4" in errors[0]
    assert "Traceback" not in output


def test_mesh_larger_than_a_real_multi_client_job(tmp_path):
    """2 processes x 2 CPUs: each process counts only its own devices, so a
    2x4 mesh is a MeshError (not a DTensor 'unknown device' error inside
    dtensor.pack), the same in both, and a 2x2 mesh then works."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DTENSOR_", "TFSHARD_"))}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=os.pathsep.join(filter(None, (REPO, env.get("PYTHONPATH")))))
    worker_script = os.path.join(REPO, "tests", "_fault_worker.py")
    command = [
        sys.executable, "-m", "tfshard.app.cli", "launch", "--processes", "2", "--devices-per-process", "2",
        "--timeout", "300", "--grace", "5", "--", sys.executable, worker_script, "mesh", str(tmp_path),
    ]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400, cwd=REPO)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    records = [json.load(open(tmp_path / f"mesh-{rank}.json")) for rank in (0, 1)]
    assert records[0] == records[1]
    kind, message = records[0]["error"]
    assert kind == "MeshError"
    for culprit in ('{"batch": 2, "model": 4} has 8 devices', "this process has 2", "the job 4 in all",
                    "--devices-per-process 4"):
        assert culprit in message, message
    assert records[0]["sum"] == 28.0
