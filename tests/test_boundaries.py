"""Module boundaries and error kinds.

* Dependencies point down: ``tensors`` below ``strategy`` below ``layers``
  and ``interop``; ``strategy`` imports neither at module level.
* Only ``tfshard._keras`` imports ``keras.src`` or touches the Keras
  internals tfshard relies on; the rest goes through its accessors.
* Unsupported requests and bad per-process input raise tfshard errors that
  name the value and the fix; indivisible sizes are classified.
"""

import ast
import pathlib

import keras
import numpy as np
import pytest
import tensorflow as tf
import tfshard
from tfshard import _dtensor, _keras, interop, strategy as strategy_module
from tfshard.errors import ShardingError, UnsupportedFeatureError
from tfshard.layout import KEEP

from conftest import make_strategy

PACKAGE = pathlib.Path(tfshard.__file__).parent
MODULES = sorted(PACKAGE.rglob("*.py"))
# Keras internals tfshard uses, reached only through tfshard._keras.
KERAS_INTERNALS = {
    "_keras_mask", "_initial_epoch", "_symbolic_build", "_shape", "_dtype", "_value", "_layout",
}


def tree_of(path):
    return ast.parse(path.read_text(), filename=str(path))


def imported_modules(tree, module_level_only):
    nodes = tree.body if module_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def test_strategy_imports_no_higher_module():
    tree = tree_of(PACKAGE / "strategy.py")
    top = set(imported_modules(tree, module_level_only=True))
    assert not {m for m in top if m.startswith(("tfshard.interop", "tfshard.layers", "tfshard.training"))}
    anywhere = set(imported_modules(tree, module_level_only=False))
    assert not {m for m in anywhere if m.startswith("tfshard.layers")}


def test_tensors_sits_below_strategy():
    tfshard_imports = {
        m for m in imported_modules(tree_of(PACKAGE / "tensors.py"), module_level_only=False)
        if m.startswith("tfshard")
    }
    assert tfshard_imports <= {"tfshard", "tfshard._dtensor", "tfshard._keras"}
    assert strategy_module.VariableLayout is tfshard.tensors.VariableLayout


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_only_the_keras_boundary_touches_keras_internals(path):
    if path.name == "_keras.py":
        return
    tree = tree_of(path)
    assert not [m for m in imported_modules(tree, module_level_only=False) if m.startswith("keras.src")]
    touched = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in KERAS_INTERNALS:
            owner = node.value
            if not (isinstance(owner, ast.Name) and owner.id == "self"):  # a class's own state
                touched.append((node.lineno, node.attr))
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "hasattr", "setattr"):
            if len(node.args) > 1 and getattr(node.args[1], "value", None) in KERAS_INTERNALS:
                touched.append((node.lineno, node.args[1].value))
    assert not touched, f"{path.name}: use tfshard._keras accessors for {touched}"


def test_keras_accessors():
    seen = []

    class Probe(keras.layers.Layer):
        def build(self, input_shape):
            self.w = self.add_weight(shape=(2, 3), initializer="ones")

        def call(self, x):  # mixed precision: reads autocast to float16
            seen.append((self.w.dtype, _keras.variable_dtype(self.w)))
            return x

    probe = Probe(dtype="mixed_float16")
    probe(np.ones((1, 2), "float32"))
    assert seen == [("float16", "float32")]
    assert tuple(_keras.variable_shape(probe.w)) == (2, 3)
    assert isinstance(_keras.backend_variable(probe.w), tf.Variable)
    assert _keras.backend_variable(np.ones(2)) is None
    x = keras.ops.ones((2,))
    assert _keras.keras_mask(x) is None and _keras.keras_mask(None) is None
    _keras.set_keras_mask(x, keras.ops.ones((2,), "bool"))
    assert _keras.keras_mask(x) is not None


# ------------------------------------------------------------------ strategy
def test_keras_distribution_resolver_is_registered_not_written():
    mine = make_strategy(2, 4)
    assert strategy_module.current_strategy() is None
    strategy_module.set_keras_distribution_resolver(lambda: mine)
    try:
        assert tfshard.current_strategy() is mine
    finally:
        tfshard.enable_keras_distribution(True)  # interop registers its own again
    assert tfshard.current_strategy() is None
    tfshard.enable_keras_distribution(False)
    try:
        with keras.distribution.DataParallel(devices=[f"CPU:{i}" for i in range(8)]).scope():
            assert tfshard.current_strategy() is None
    finally:
        tfshard.enable_keras_distribution(True)


def test_activation_spec_is_shared_by_output_rules_and_distribute_tensor():
    mesh = tfshard.Mesh({"batch": 2, "model": 4})
    strategy = (
        tfshard.StrategyBuilder(mesh).data_parallel("batch").tensor_parallel("model")
        .shard_output("ffn/output", ("batch", None, "model")).build()
    )
    assert strategy.activation_spec(("batch", None, "model"), (None, 3, 8), name="t") == (KEEP, None, "model")
    assert strategy.output_spec("ffn/output", (None, 3, 8)) == (KEEP, None, "model")
    assert strategy.output_spec("other/output", (None, 3, 8)) is None
    with strategy.scope(), pytest.raises(ShardingError, match="distribute_tensor.*rank"):
        interop.distribute_tensor(np.ones((8, 4), "float32"), ("batch", None, "model"))


# -------------------------------------------------------------------- errors
def test_multi_process_keras_initialize_is_an_unsupported_feature_error():
    with pytest.raises(UnsupportedFeatureError) as err:
        interop.initialize(num_processes=2)
    assert isinstance(err.value, NotImplementedError) and isinstance(err.value, tfshard.TfshardError)
    assert "num_processes=2" in str(err.value) and "tfshard launch" in str(err.value)
    interop.initialize(num_processes=1)  # one process: nothing to do


def test_rows_of_another_process_are_a_multi_client_error_with_the_fix():
    layout = make_strategy(2, 4).dtensor_layout(("batch", None))
    with pytest.raises(tfshard.MultiClientError) as err:
        _dtensor.distribute_local(np.zeros((4, 3), "float32"), layout, origin=4, global_rows=8)
    text = str(err.value)
    assert "rows 0..4" in text and "rows 4..8" in text and "shard_dataset" in text


def test_indivisible_sizes_are_classified():
    with make_strategy(1, 8).scope():
        embedding = tfshard.layers.VocabParallelEmbedding(30, 8, name="embed")
        with pytest.raises(ShardingError) as err:
            embedding.build()
    assert (err.value.kind, err.value.axis, err.value.axis_size) == (ShardingError.INDIVISIBLE, "model", 8)
    with make_strategy(1, 8).scope():
        attention = tfshard.layers.HeadParallelAttention(num_heads=6, key_dim=4)
        with pytest.raises(ShardingError) as err:
            attention.build((2, 3, 16), (2, 3, 16))
    assert err.value.kind == ShardingError.INDIVISIBLE
    assert ShardingError("plain message").kind is None
