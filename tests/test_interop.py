"""keras.distribution objects on TensorFlow through tfshard.

* Keras meshes (device names as TensorFlow spells them) map onto tfshard meshes.
* LayoutMap semantics, with Keras's own ``layout_map[path]`` as the oracle:
  exact key first, ``re.fullmatch``, the ambiguity error, tuple or
  ``TensorLayout`` values, ``"<layer path>/output"`` activation keys.
* ``StrategyBuilder.from_keras`` for ModelParallel, DataParallel, LayoutMap
  and DeviceMesh; ``set_distribution`` / ``distribution.scope()`` directly.
* Weights split over both axes (FSDP-style ``("model", "batch")``) on stock
  Dense / EinsumDense / Embedding train like plain Keras and stay split.
* Layouts that cannot fit a model are reported before work starts.
* The same Keras script on JAX (Keras's own distribution) and on TensorFlow
  (tfshard) gives the same sharding specs, predictions and losses.
"""

import gc
import importlib.util
import json
import os
import subprocess
import sys
import weakref

import keras
import numpy as np
import pytest
import tensorflow as tf
import tfshard
from tfshard import interop

from test_fit_common import assert_history_close, assert_weights_close

DEVICES = [f"CPU:{i}" for i in range(8)]
FIT = dict(batch_size=8, shuffle=False, verbose=0)


def keras_mesh(shape=(2, 4), names=("batch", "model"), devices=None):
    n = int(np.prod(shape))
    return keras.distribution.DeviceMesh(shape, list(names), devices or DEVICES[:n])


# ------------------------------------------------------------------ meshes
@pytest.mark.parametrize(
    "devices",
    [
        [f"cpu:{i}" for i in range(8)],  # keras.distribution.list_devices() on TF
        [f"CPU:{i}" for i in range(8)],
        [f"/job:localhost/replica:0/task:0/device:CPU:{i}" for i in range(8)],
        [f"CPU:{i}" for i in reversed(range(8))],
    ],
    ids=["list_devices", "short", "full", "reversed"],
)
def test_keras_mesh_maps_onto_a_tfshard_mesh(devices):
    mesh = interop.mesh_from_keras(keras_mesh(devices=devices))
    assert mesh.axes == {"batch": 2, "model": 4}
    indices = [tf.DeviceSpec.from_string(d).device_index for d in devices]
    assert mesh.devices == tuple(
        f"/job:localhost/replica:0/task:0/device:CPU:{i}" for i in indices
    )
    assert keras.distribution.list_devices() == [f"cpu:{i}" for i in range(8)]


def test_keras_mesh_of_mixed_device_types_is_a_mesh_error():
    with pytest.raises(tfshard.MeshError, match="'GPU:0' is a GPU device"):
        interop.mesh_from_keras(keras_mesh(devices=DEVICES[:7] + ["GPU:0"]))


# ------------------------------------------------- LayoutMap semantics
def semantics_map():
    layouts = keras.distribution.LayoutMap(keras_mesh())
    layouts["dense/kernel"] = ("model", None)  # exact key
    layouts[".*dense.*/kernel"] = (None, "model")  # regex (also matches dense/kernel)
    layouts["block_\\d+/ffn/kernel"] = keras.distribution.TensorLayout(("batch", "model"))
    layouts["enc/.*"] = ("batch",)
    layouts["head/output"] = ("batch", "model")
    return layouts


LOOKUP_PATHS = [
    "dense/kernel",  # exact key wins over the regex that also matches
    "x/dense_1/kernel",  # regex, matched in full
    "dense/kernel_1",  # "dense/kernel" is not a prefix match
    "block_3/ffn/kernel",  # TensorLayout value
    "block_x/ffn/kernel",
    "enc/bias",
    "enc/dense/kernel",  # matches "enc/.*" and ".*dense.*/kernel": ambiguous
    "head/output",
    "head/kernel",
]


def keras_lookup(layouts, path):
    try:
        layout = layouts[path]
    except ValueError:
        return "ambiguous"
    return None if layout is None else tuple(layout.axes)


def tfshard_lookup(plan, path):
    try:
        return plan.variable_spec(path)
    except tfshard.ShardingError:
        return "ambiguous"


@pytest.mark.parametrize("kind", ["layout_map", "model_parallel"])
def test_rule_lookup_equals_keras_layout_map_lookup(kind):
    layouts = semantics_map()
    source = layouts if kind == "layout_map" else keras.distribution.ModelParallel(layout_map=layouts)
    strategy = tfshard.StrategyBuilder.from_keras(source).build()
    got = {p: tfshard_lookup(strategy.plan, p) for p in LOOKUP_PATHS}
    assert got == {p: keras_lookup(layouts, p) for p in LOOKUP_PATHS}
    assert got["dense/kernel"] == ("model", None)
    assert got["x/dense_1/kernel"] == (None, "model")
    assert got["dense/kernel_1"] is None
    assert got["block_3/ffn/kernel"] == ("batch", "model")
    assert got["enc/dense/kernel"] == "ambiguous"
    assert strategy.plan.output_spec("head/output") == ("batch", "model")


def test_a_variable_matching_two_keys_is_a_sharding_error():
    strategy = tfshard.StrategyBuilder.from_keras(semantics_map()).build()
    with strategy.scope(), pytest.raises(tfshard.ShardingError) as err:
        Block(inner_name="dense", name="enc").build((None, 4))  # enc/dense/kernel
    text = str(err.value)
    assert "'enc/dense/kernel'" in text and "enc/.*" in text and ".*dense.*/kernel" in text


def test_tuple_and_tensor_layout_values_give_the_same_layout():
    mesh = keras_mesh()
    as_tuple = keras.distribution.LayoutMap(mesh)
    as_tuple["dense/kernel"] = (None, "model")
    as_layout = keras.distribution.LayoutMap(mesh)
    as_layout["dense/kernel"] = keras.distribution.TensorLayout((None, "model"), mesh)
    for layouts in (as_tuple, as_layout):
        with tfshard.StrategyBuilder.from_keras(layouts).build().scope():
            layer = keras.layers.Dense(8, name="dense")
            layer.build((None, 4))
        assert tfshard.layout_of(layer.kernel) == (None, "model")
        assert tfshard.local_shape(layer.kernel) == (4, 2)


# ------------------------------------------------------- from_keras kinds
def test_from_keras_model_parallel_uses_its_batch_dim_name():
    layouts = keras.distribution.LayoutMap(keras_mesh(names=("model", "data")))
    strategy = tfshard.StrategyBuilder.from_keras(
        keras.distribution.ModelParallel(layout_map=layouts, batch_dim_name="data")
    ).build()
    assert strategy.mesh.axes == {"model": 2, "data": 4}
    assert (strategy.data_axis, strategy.tensor_axis) == ("data", "model")


def test_from_keras_data_parallel_replicates_every_variable():
    strategy = tfshard.StrategyBuilder.from_keras(
        keras.distribution.DataParallel(devices=DEVICES)
    ).build()
    assert strategy.mesh.axes == {"batch": 8}
    assert (strategy.data_axis, strategy.tensor_axis) == ("batch", None)
    with strategy.scope():
        layer = keras.layers.Dense(8, name="dense")
        layer.build((None, 4))
    assert tfshard.layout_of(layer.kernel) == (None, None)
    # (DataParallel(device_mesh=<2-D mesh>) itself fails in Keras 3.15: its
    # warnings.warn call passes an int as the category.)


def test_from_keras_layout_map_and_device_mesh():
    layouts = keras.distribution.LayoutMap(keras_mesh())
    layouts["dense/kernel"] = (None, "model")
    from_map = tfshard.StrategyBuilder.from_keras(layouts).build()
    assert (from_map.data_axis, from_map.tensor_axis) == ("batch", "model")
    assert from_map.plan.variable_spec("dense/kernel") == (None, "model")
    from_mesh = tfshard.StrategyBuilder.from_keras(keras_mesh()).build()
    assert (from_mesh.data_axis, from_mesh.tensor_axis) == ("batch", "model")
    assert len(from_mesh.plan) == 0


def test_from_keras_rejects_other_objects_and_maps_without_a_mesh():
    with pytest.raises(tfshard.StrategyError, match="ModelParallel, DataParallel, LayoutMap or DeviceMesh"):
        tfshard.StrategyBuilder.from_keras({"dense/kernel": (None, "model")})
    with pytest.raises(tfshard.StrategyError, match="LayoutMap has no device mesh"):
        tfshard.StrategyBuilder.from_keras(keras.distribution.LayoutMap(None))


def test_builder_rules_added_after_from_keras_join_the_lookup():
    layouts = keras.distribution.LayoutMap(keras_mesh())
    layouts["dense/kernel"] = (None, "model")
    builder = tfshard.StrategyBuilder.from_keras(layouts).shard("other/kernel", ("model", None))
    strategy = builder.build()
    assert strategy.plan.variable_spec("other/kernel") == ("model", None)
    assert strategy.plan.variable_spec("dense/kernel") == (None, "model")
    clash = tfshard.StrategyBuilder.from_keras(layouts).shard(".*/kernel", (None, None)).build()
    with pytest.raises(tfshard.ShardingError, match="matches both LayoutMap key 'dense/kernel'"):
        clash.plan.variable_spec("dense/kernel")


@pytest.mark.parametrize("kind", ["model_parallel", "layout_map"])
def test_converted_strategy_is_released_with_its_keras_object(kind):
    """strategy_from_keras caches per Keras object without keeping it (nor
    the strategy and its DTensor mesh) alive once the caller drops it."""
    gc.collect()  # entries of earlier tests' dropped objects (the suite collects every 20 tests)
    meshes_before = len(interop._meshes._entries)
    layouts = keras.distribution.LayoutMap(keras_mesh())
    layouts["dense/kernel"] = (None, "model")
    obj = layouts if kind == "layout_map" else keras.distribution.ModelParallel(layout_map=layouts)
    strategy = interop.strategy_from_keras(obj)
    assert interop.strategy_from_keras(obj) is strategy
    with strategy.scope():  # works while the object is alive
        layer = keras.layers.Dense(8, name="dense")
        layer.build((None, 4))
    assert tfshard.layout_of(layer.kernel) == (None, "model")
    layouts["dense/bias"] = ("model",)  # the rules stay a live view
    assert strategy.plan.variable_spec("dense/bias") == ("model",)

    obj_ref, strategy_ref = weakref.ref(obj), weakref.ref(strategy)
    del obj, layouts, strategy, layer
    gc.collect()
    assert obj_ref() is None
    assert strategy_ref() is None
    assert len(interop._meshes._entries) == meshes_before


# ------------------------------------------------------- "/output" keys
class Probe(keras.layers.Layer):
    """Identity that records the layout of what it receives (eager calls)."""

    seen = []

    def call(self, x):
        Probe.seen.append(tfshard.layout_of(x))
        return x


class Block(keras.layers.Layer):
    """A layer with a sublayer: its output path is ``block/inner/output``."""

    def __init__(self, inner_name="inner", **kwargs):
        super().__init__(**kwargs)
        self.inner = keras.layers.Dense(16, name=inner_name)

    def build(self, input_shape):
        self.inner.build(input_shape)

    def call(self, x):
        return self.inner(x)


def probed_model():
    keras.utils.set_random_seed(0)
    x = keras.Input((8,))
    h = keras.layers.Dense(16, name="ffn_in")(x)
    h = Probe(name="probe_a")(h)
    h = Block(name="block")(h)
    h = Probe(name="probe_b")(h)
    return keras.Model(x, keras.layers.Dense(4, name="ffn_out")(h))


def output_map(**outputs):
    layouts = keras.distribution.LayoutMap(keras_mesh())
    for key, spec in outputs.items():
        layouts[key.replace("__", "/")] = spec
    return layouts


@pytest.mark.parametrize("mode", ["from_keras", "keras_scope"])
def test_output_keys_lay_out_layer_outputs(mode):
    layouts = output_map(ffn_in__output=("batch", "model"), block__inner__output=("batch", "model"))
    plain = probed_model()
    if mode == "from_keras":
        scope = tfshard.StrategyBuilder.from_keras(layouts).build().scope()
    else:
        scope = keras.distribution.ModelParallel(layout_map=layouts).scope()
    x = np.random.RandomState(0).randn(8, 8).astype("float32")
    with scope:
        model = probed_model()
        Probe.seen = []
        out = model(x)
    # The batch keeps its split over 'batch'; the features follow the keys.
    assert Probe.seen == [("batch", "model"), ("batch", "model")]
    np.testing.assert_allclose(np.asarray(out), plain(x).numpy(), rtol=1e-5, atol=1e-5)

    unconstrained = tfshard.StrategyBuilder.from_keras(output_map()).build()
    with unconstrained.scope():
        model = probed_model()
        Probe.seen = []
        model(x)
    assert Probe.seen == [("batch", None), ("batch", None)]


def test_output_keys_apply_inside_fit():
    layouts = output_map(ffn_in__output=("batch", "model"))
    rng = np.random.RandomState(0)
    x, y = rng.randn(16, 8).astype("float32"), rng.randn(16, 4).astype("float32")
    plain = probed_model()
    plain.compile(keras.optimizers.SGD(0.1), "mse")
    with tfshard.StrategyBuilder.from_keras(layouts).build().scope():
        model = probed_model()
        model.compile(keras.optimizers.SGD(0.1), "mse")
    assert_history_close(model.fit(x, y, **FIT).history, plain.fit(x, y, **FIT).history)


def test_output_key_of_the_wrong_rank_names_the_output():
    layouts = output_map(ffn_in__output=("batch", None, "model"))
    with tfshard.StrategyBuilder.from_keras(layouts).build().scope():
        model = probed_model()
        with pytest.raises(tfshard.ShardingError, match=r"'ffn_in/output'.*rank 2"):
            model(np.ones((8, 8), "float32"))


# ----------------------------------- keras.distribution directly on TF
def fsdp_map(mesh=None):
    """Stock-layer rules as keras-hub writes them: weights split over both
    axes (vocab x data, data x model, model x data)."""
    layouts = keras.distribution.LayoutMap(mesh or keras_mesh())
    layouts["embed/embeddings"] = ("model", "batch")
    layouts["ffn_in/kernel"] = ("batch", "model")
    layouts["ffn_in/bias"] = ("model",)
    layouts["proj/kernel"] = ("model", "batch", None)
    layouts["ffn_out/kernel"] = ("model", "batch")
    layouts["norm/gamma"] = ("batch",)
    return layouts


VOCAB, SEQ, N = 32, 6, 37  # 37: four batches of 8 and a partial 5


def fsdp_model():
    keras.utils.set_random_seed(0)
    tokens = keras.Input((SEQ,), dtype="int32")
    h = keras.layers.Embedding(VOCAB, 16, name="embed")(tokens)
    h = keras.layers.Dense(32, activation="relu", name="ffn_in")(h)
    h = keras.layers.EinsumDense("bsf,fhd->bshd", (SEQ, 4, 4), name="proj")(h)
    h = keras.layers.Reshape((SEQ, 16))(h)
    h = keras.layers.LayerNormalization(name="norm")(h)
    logits = keras.layers.Dense(VOCAB, name="ffn_out")(h)
    model = keras.Model(tokens, logits, name="fsdp_lm")
    model.compile(
        keras.optimizers.Adam(0.01),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def lm_data():
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, VOCAB, size=(N, SEQ)).astype("int32")  # repeated ids
    return tokens, np.roll(tokens, -1, axis=1)


@pytest.fixture(scope="module")
def fsdp_reference():
    x, y = lm_data()
    model = fsdp_model()
    history = model.fit(x, y, epochs=2, **FIT).history
    return model, history


def assert_split_at_rest(model, layouts, tp, dp):
    sizes = {"model": tp, "batch": dp, None: 1}
    for variable in model.weights:
        layout = layouts[variable.path]
        spec = tuple(layout.axes) if layout is not None else (None,) * len(variable.shape)
        assert tfshard.layout_of(variable) == spec, variable.path
        want = tuple(d // sizes[a] for d, a in zip(variable.shape, spec))
        assert tuple(tfshard._dtensor.unpack(variable)[0].shape) == want, variable.path
    slots = [v for v in model.optimizer.variables if "embed_embeddings" in v.path]
    assert len(slots) == 2
    for slot in slots:
        assert tfshard.layout_of(slot) == ("model", "batch")
        assert tuple(tfshard._dtensor.unpack(slot)[0].shape) == (VOCAB // tp, 16 // dp)


@pytest.mark.parametrize("shape", [(2, 4), (4, 2)], ids=["2x4", "4x2"])
def test_fsdp_specs_on_stock_layers_train_like_plain_keras(shape, fsdp_reference):
    plain, plain_history = fsdp_reference
    x, y = lm_data()
    layouts = fsdp_map(keras_mesh(shape))
    with keras.distribution.ModelParallel(layout_map=layouts).scope():
        model = fsdp_model()
    np.testing.assert_allclose(model(x[:8]).numpy(), fsdp_model()(x[:8]).numpy(), atol=1e-6)
    history = model.fit(x, y, epochs=2, **FIT).history  # outside the scope: the model remembers
    assert_history_close(history, plain_history)
    assert_weights_close(model, plain)
    assert_split_at_rest(model, layouts, tp=shape[1], dp=shape[0])


def test_data_parallel_scope_trains_like_plain_keras():
    from test_fit_common import functional_mlp, regression_compile, regression_data

    x, y = regression_data()
    plain = regression_compile(functional_mlp())
    with keras.distribution.DataParallel().scope():  # every device of list_devices()
        model = regression_compile(functional_mlp())
    assert all(tfshard.layout_of(w) == (None,) * len(w.shape) for w in model.weights)
    assert_history_close(model.fit(x, y, **FIT).history, plain.fit(x, y, **FIT).history)
    assert_weights_close(model, plain)


def test_set_distribution_globally_then_reset():
    layouts = fsdp_map()
    keras.distribution.set_distribution(keras.distribution.ModelParallel(layout_map=layouts))
    try:
        model = fsdp_model()
        assert tfshard.current_strategy() is not None
        assert tfshard.layout_of(model.get_layer("ffn_in").kernel) == ("batch", "model")
        assert keras.distribution.get_device_count() == 8
        assert keras.distribution.distribution().num_processes == 1
        tensor = keras.distribution.distribute_tensor(
            np.arange(32, dtype="float32").reshape(8, 4),
            keras.distribution.TensorLayout(("batch", "model"), keras_mesh()),
        )
        assert tfshard.layout_of(tensor) == ("batch", "model")
        np.testing.assert_array_equal(tfshard.to_numpy(tensor), np.arange(32).reshape(8, 4))
    finally:
        keras.distribution.set_distribution(None)
    assert tfshard.current_strategy() is None
    assert tfshard.layout_of(fsdp_model().get_layer("ffn_in").kernel) is None


def test_enable_keras_distribution_off_leaves_keras_inert():
    tfshard.enable_keras_distribution(False)
    try:
        with keras.distribution.ModelParallel(layout_map=fsdp_map()).scope():
            model = fsdp_model()
        assert all(tfshard.layout_of(w) is None for w in model.weights)
    finally:
        tfshard.enable_keras_distribution(True)
    assert interop.keras_distribution_enabled()


# -------------------------------------------------------------- validation
def test_check_layout_lists_every_variable_with_a_fix_before_any_work():
    layouts = keras.distribution.LayoutMap(keras_mesh())
    layouts["embed/embeddings"] = ("model", "batch")
    layouts["ffn_in/kernel"] = ("batch", "model")  # (16, 34): 34 % 4, swapped fits
    layouts["kv/kernel"] = (None, "model", None)  # one key/value head over 4 devices

    def build():
        tokens = keras.Input((SEQ,), dtype="int32")
        h = keras.layers.Embedding(VOCAB, 16, name="embed")(tokens)
        h = keras.layers.Dense(34, name="ffn_in")(h)
        return keras.Model(tokens, keras.layers.EinsumDense("bsf,fhd->bshd", (SEQ, 1, 8), name="kv")(h))

    with keras.StatelessScope(initialize_variables=False):
        abstract = build()  # shapes only: no weight is allocated
    with pytest.raises(tfshard.ShardingError) as err:
        interop.check_layout(layouts, abstract)
    text = str(err.value)
    assert "2 variable(s)" in text
    assert "'ffn_in/kernel'" in text and "dimension 1 has size 34" in text
    assert "layout_map['ffn_in/kernel'] = ('model', 'batch')" in text
    assert "'kv/kernel'" in text and "dimension 1 has size 1" in text
    assert "layout_map['kv/kernel'] = (None, None, None)" in text
    assert "embed/embeddings" not in text

    strategy = tfshard.StrategyBuilder.from_keras(layouts).build()
    with strategy.scope(), pytest.raises(tfshard.ShardingError, match="'ffn_in/kernel'.*size 34"):
        build()  # at creation too: a ShardingError, never DTensor's MLIR error


def test_check_layout_names_the_exact_key_that_overrides_a_regex():
    layouts = keras.distribution.LayoutMap(keras_mesh())
    layouts[".*(q|kv)/kernel"] = (None, "model", None)
    layer_q = keras.layers.EinsumDense("bf,fhd->bhd", (4, 8), name="q")
    layer_kv = keras.layers.EinsumDense("bf,fhd->bhd", (1, 8), name="kv")
    x = keras.Input((16,))
    model = keras.Model(x, [layer_q(x), layer_kv(x)])
    with pytest.raises(tfshard.ShardingError) as err:
        interop.check_layout(layouts, model)
    text = str(err.value)
    assert "1 variable(s)" in text
    assert "add layout_map['kv/kernel'] = (None, None, None)" in text
    assert "exact key takes precedence over the regex key '.*(q|kv)/kernel'" in text


def test_check_layout_offers_a_fix_only_where_a_spec_of_the_same_rank_fits():
    layouts = keras.distribution.LayoutMap(keras_mesh())
    layouts["wide/kernel"] = ("model", None, None)  # rank 3 for a 2-D kernel
    layouts["odd/kernel"] = (None, "model")  # 6 % 4
    x = keras.Input((16,))
    model = keras.Model(x, [keras.layers.Dense(8, name="wide")(x), keras.layers.Dense(6, name="odd")(x)])
    with pytest.raises(tfshard.ShardingError) as err:
        interop.check_layout(layouts, model)
    wide, odd = (line for line in str(err.value).splitlines() if line.startswith("- "))
    assert "'wide/kernel'" in wide and "rank 2" in wide and "Fix:" not in wide
    assert "'odd/kernel'" in odd and "Fix: set layout_map['odd/kernel'] = (None, None)" in odd


# -------------------------------------------- one script, two backends
SCRIPT = os.path.join(os.path.dirname(__file__), "_interop_script.py")


def run_jax_script():
    env = dict(
        os.environ,
        KERAS_BACKEND="jax",
        TF_CPP_MIN_LOG_LEVEL="3",
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
    )
    proc = subprocess.run(
        [sys.executable, SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, proc.stdout[-2000:]
    return json.loads(line[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def tensorflow_run():
    """The script's TensorFlow half, in this process (8 virtual devices)."""
    import _interop_script as script

    keras.backend.clear_session()
    try:
        return json.loads(json.dumps(script.run()))
    finally:
        keras.distribution.set_distribution(None)


def test_script_on_tensorflow_lays_out_variables_as_the_layout_map_says(tensorflow_run):
    import _interop_script as script

    layouts = script.layout_map(keras_mesh())
    assert tensorflow_run["backend"] == "tensorflow"
    for path, spec in tensorflow_run["specs"].items():
        layout = layouts[path]
        want = list(layout.axes) if layout is not None else [None] * len(spec)
        assert spec == want, path
    assert tensorflow_run["specs"]["embed/embeddings"] == ["model", "batch"]
    assert tensorflow_run["losses"][1] < tensorflow_run["losses"][0]


@pytest.fixture(scope="module")
def jax_run():
    """The script's JAX half (Keras's own distribution), in a subprocess."""
    if importlib.util.find_spec("jax") is None:
        pytest.skip("jax is not installed")
    return run_jax_script()


def test_same_script_on_jax_and_tensorflow_gives_the_same_specs_and_numbers(
    tensorflow_run, jax_run
):
    assert jax_run["backend"] == "jax"
    assert tensorflow_run["specs"] == jax_run["specs"]
    np.testing.assert_allclose(tensorflow_run["predictions"], jax_run["predictions"], atol=1e-5)
    np.testing.assert_allclose(tensorflow_run["losses"], jax_run["losses"], rtol=1e-5)
    for path, value in jax_run["trained_weights"].items():
        np.testing.assert_allclose(tensorflow_run["trained_weights"][path], value, atol=1e-5)


def test_same_script_lays_out_a_keras_hub_backbone_like_jax(tensorflow_run, request):
    try:
        import keras_hub  # noqa: F401
    except ImportError:
        pytest.skip("keras_hub is not importable: the script's keras-hub part cannot run")
    hub_specs = tensorflow_run.get("hub_specs")
    assert hub_specs, tensorflow_run.get("hub_error", "the script recorded no hub_specs")
    assert hub_specs["token_embedding/embeddings"] == ["model", "batch"]
    jax_run = request.getfixturevalue("jax_run")  # skips here when jax is missing
    assert jax_run.get("hub_specs"), jax_run.get("hub_error", "no hub_specs on JAX")
    assert hub_specs == jax_run["hub_specs"]
