"""Module boundaries and error kinds.

* Dependencies point one way: the import graph of tfshard's modules (every
  import, lazy ones in functions included) has no cycle; ``tensors`` and
  ``report`` sit below ``strategy`` (the builder, and ``_strategy``, the
  Strategy class it re-exports), which sits below ``layers`` and
  ``interop``.
* The application (``tfshard.app``) sits on the library, which never
  imports it.
* Only the ``tfshard._dtensor`` package imports DTensor, and the rest of
  tfshard reaches it through the package, never a submodule.
* Only ``tfshard._keras`` imports ``keras.src`` or touches the Keras
  internals tfshard relies on; the rest goes through its accessors.
* Unsupported requests and bad per-process input raise tfshard errors that
  name the value and the fix; indivisible sizes are classified.
"""

import ast
import os
import pathlib
import subprocess
import sys

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


# ------------------------------------------------------------ import graph
def module_name(path):
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULE_NAMES = {module_name(path): path for path in MODULES}


def _owner(name):
    """The module or package ``name`` lives in (its longest prefix that is one)."""
    while name and name not in MODULE_NAMES:
        name = name.rpartition(".")[0]
    return name


def imports_of(name):
    """The tfshard modules ``name`` imports, anywhere in the file (lazy
    imports in functions included). ``from p import m`` depends on module
    ``p.m`` when there is one, else on ``p`` itself (a name defined there);
    importing ``p.m`` initializes package ``p`` too, which is not counted as
    a dependency of its own submodules."""
    path = MODULE_NAMES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree_of(path)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULE_NAMES else base
                for alias in node.names
            ]
        else:
            continue
        found |= {_owner(t) for t in targets if t == "tfshard" or t.startswith("tfshard.")}
    found.discard(name)
    return found


IMPORT_GRAPH = {name: imports_of(name) for name in MODULE_NAMES}


def boundary_modules(package):
    """``package`` (a module or a package) and every module inside it."""
    return {name for name in MODULE_NAMES if name == package or name.startswith(package + ".")}


def import_cycles(graph):
    """The strongly connected components of ``graph`` with more than one
    module (each holds at least one cycle), as sorted tuples (Tarjan)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(tuple(sorted(component)))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


# Cycles allowed, in the application's op sweep (owned there), both through
# lazy imports: catalog imports samples.make_array while samples imports
# catalog, and sweep starts worker processes while worker runs sweep's
# cells. Remove an entry once it is fixed.
KNOWN_CYCLES = [
    ("tfshard.app.opsweep.catalog", "tfshard.app.opsweep.samples"),
    ("tfshard.app.opsweep.sweep", "tfshard.app.opsweep.worker"),
]


def test_import_graph_finds_every_import_kind():
    graph = IMPORT_GRAPH
    assert "tfshard.layers.base" in graph["tfshard.layers.dense"]  # module level
    assert "tfshard.app.launch" in graph["tfshard.app.cli"]  # lazy, in a function
    assert "tfshard._dtensor" in graph["tfshard.checkpoint"]  # `from tfshard import _dtensor`
    assert "tfshard" in graph["tfshard.app.examples.mlp"]  # `import tfshard`: the package
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [("a", "b", "c")]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_import_graph_has_no_cycle():
    cycles = import_cycles(IMPORT_GRAPH)
    library = [c for c in cycles if not any(m.startswith("tfshard.app") for m in c)]
    assert not library, "import cycles in the library: " + "; ".join(" <-> ".join(c) for c in library)
    new = [c for c in cycles if c not in KNOWN_CYCLES]
    assert not new, "import cycles: " + "; ".join(" <-> ".join(c) for c in new)


def test_the_library_never_imports_the_application():
    upward = {
        name: sorted(t for t in targets if t == "tfshard.app" or t.startswith("tfshard.app."))
        for name, targets in IMPORT_GRAPH.items()
        if not (name == "tfshard.app" or name.startswith("tfshard.app."))
    }
    assert not {name: targets for name, targets in upward.items() if targets}
    code = "import sys, tfshard; print(sorted(m for m in sys.modules if m.startswith('tfshard.app')))"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(PACKAGE.parent))
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, timeout=300, check=True).stdout.strip()
    assert loaded == "[]"


@pytest.mark.parametrize("module", ["strategy.py", "_strategy.py"])  # the builder; the Strategy class
def test_strategy_imports_no_higher_module(module):
    tree = tree_of(PACKAGE / module)
    top = set(imported_modules(tree, module_level_only=True))
    assert not {m for m in top if m.startswith(("tfshard.interop", "tfshard.layers", "tfshard.training"))}
    anywhere = set(imported_modules(tree, module_level_only=False))
    assert not {m for m in anywhere if m.startswith(("tfshard.layers", "tfshard.interop"))}


def test_report_sits_below_strategy():
    assert IMPORT_GRAPH["tfshard.report"] <= {
        "tfshard._dtensor", "tfshard._scope", "tfshard.errors", "tfshard.layout", "tfshard.tensors",
    }
    assert "tfshard.report" in IMPORT_GRAPH["tfshard._strategy"]  # Strategy.describe
    assert "tfshard._strategy" in IMPORT_GRAPH["tfshard.strategy"]  # which re-exports Strategy
    assert "tfshard.strategy" not in IMPORT_GRAPH["tfshard._strategy"]


def test_from_keras_and_describe_keep_working_without_upward_imports():
    assert strategy_module._keras_converter is interop.builder_from_keras  # registered by interop
    device_mesh = keras.distribution.DeviceMesh((2, 4), ["batch", "model"], [f"CPU:{i}" for i in range(8)])
    strategy = tfshard.StrategyBuilder.from_keras(device_mesh).build()
    assert (strategy.data_axis, strategy.tensor_axis) == ("batch", "model")
    with strategy.scope():
        layer = tfshard.layers.ColumnParallelDense(8, name="ffn_in")
        layer.build((None, 4))
    table = strategy.describe()
    assert "ffn_in/kernel" in table and "(-, model)" in table and "(4, 2)" in table, table
    strategy_module.set_keras_converter(None)
    try:
        with pytest.raises(tfshard.StrategyError, match="import tfshard.interop"):
            tfshard.StrategyBuilder.from_keras(device_mesh)
    finally:
        strategy_module.set_keras_converter(interop.builder_from_keras)


def test_tensors_sits_below_strategy():
    tfshard_imports = {
        m for m in imported_modules(tree_of(PACKAGE / "tensors.py"), module_level_only=False)
        if m.startswith("tfshard")
    }
    assert tfshard_imports <= {"tfshard", "tfshard._dtensor", "tfshard._keras"}
    assert strategy_module.VariableLayout is tfshard.tensors.VariableLayout


def test_only_the_dtensor_boundary_imports_dtensor():
    def dtensor_imports(tree):
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            yield from (n for n in names if n.startswith(("tensorflow.experimental.dtensor",
                                                          "tensorflow.dtensor")))
            if isinstance(node, ast.Attribute) and node.attr == "dtensor":  # tf.experimental.dtensor
                owner = node.value
                if isinstance(owner, ast.Attribute) and owner.attr == "experimental":
                    yield "tf.experimental.dtensor"

    boundary = boundary_modules("tfshard._dtensor")
    assert {"tfshard._dtensor", "tfshard._dtensor.layouts"} <= boundary
    for name in boundary - {"tfshard._dtensor"}:  # the check sees every submodule's imports
        assert list(dtensor_imports(tree_of(MODULE_NAMES[name]))), name
    users = {name: sorted(set(dtensor_imports(tree_of(path))))
             for name, path in MODULE_NAMES.items() if name not in boundary}
    assert not {name: found for name, found in users.items() if found}
    reaching_in = {name: sorted(IMPORT_GRAPH[name] & (boundary - {"tfshard._dtensor"}))
                   for name in MODULE_NAMES if name not in boundary}
    assert not {name: found for name, found in reaching_in.items() if found}


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


def test_keras_private_members_tfshard_reads_exist_in_the_installed_keras():
    """Pins every private Keras member _keras.py reads or wraps by name (not
    through the patch table, whose install checks its own attributes): a Keras
    release that renames one fails here, not in a user's model."""
    import inspect

    from keras.src.callbacks.tensorboard import TensorBoard

    for attention in (keras.layers.MultiHeadAttention, keras.layers.GroupQueryAttention):
        params = list(inspect.signature(attention._compute_attention).parameters)
        assert params[:4] == ["self", "query", "key", "value"], (attention, params)
    board = TensorBoard(log_dir="unused")
    assert board._summary_module is None and board.summary is not None
    assert board._summary_module is board.summary  # the property caches the module here
    crop = keras.layers.RandomCrop(2, 2)
    assert crop.height_axis in (-3, -2) and crop.width_axis in (-2, -1)
