"""``model.fit`` / ``evaluate`` / ``predict`` for models on a mesh.

Keras 3's TensorFlow trainer pulls batches inside a ``tf.function`` through
``tf.experimental.Optional``, which DTensor cannot lay out. For a sharded
model tfshard replaces the three step functions and nothing else: callbacks,
the progress bar, metrics, validation and History stay Keras's own.

* Batches are pulled in Python from Keras's own epoch iterator, so every
  input Keras accepts (numpy, dicts, ``tf.data``, generators, ``PyDataset``)
  works unchanged.
* Each tensor of a batch is split over the data axis on the host; each device
  receives only its slice (``dtensor.pack``).
* One ``tf.function`` per step kind, traced once with a batch-agnostic
  signature, runs Keras's own ``train_step`` / ``test_step`` /
  ``predict_step``.
* A final partial batch that the data axis cannot split evenly is replicated
  over the data axis instead: the same loss as plain Keras, no sample dropped.
  A batch *size* that can never split is an error (see ``check_batch_size``).
* Before a step first runs, everything it touches is put on the mesh, metric
  objects and optimizers made outside the scope included; a step that fails
  raises its root error and leaves the process usable
  (``tfshard.step_guards``).
"""

from __future__ import annotations

import inspect
import weakref

import numpy as np
import tensorflow as tf
from keras import tree
from keras.utils import unpack_x_y_sample_weight as _unpack

from tfshard import _dtensor, _keras, context_parallel, multi_client, step_guards
from tfshard.errors import StrategyError
from tfshard.strategy import VariableLayout, current_strategy, strategy_of_layer


def strategy_of_model(model):
    """The strategy a model's variables live under, or None for plain models.

    Raises ``StrategyError`` for a model that is only partly on a mesh, or a
    plain model used inside a strategy scope.
    """
    strategy = strategy_of_layer(model)
    if strategy is None:
        if current_strategy() is not None and model.weights:
            raise StrategyError(
                f"Model {model.name!r} was built outside strategy.scope(), so "
                "its variables are not on the mesh, yet it is being run inside "
                "a strategy scope as if sharded. Create the model (and its "
                "layers) inside `with strategy.scope():`."
            )
        return None
    off_mesh = [
        v.path for v in model.weights if not isinstance(_keras.variable_layout(v), VariableLayout)
    ]
    if off_mesh:
        more = " ..." if len(off_mesh) > 5 else ""
        raise StrategyError(
            f"Model {model.name!r} mixes sharded and unsharded weights; these "
            f"were created outside strategy.scope(): {off_mesh[:5]}{more}. "
            "Create every layer of the model inside `with strategy.scope():`."
        )
    return strategy


# ---------------------------------------------------------------- batch size
def _is_array_like(x):
    leaves = tree.flatten(x)
    return bool(leaves) and all(
        leaf is None or isinstance(leaf, (np.ndarray, tf.Tensor, list)) for leaf in leaves
    )


def check_batch_size(strategy, batch_size, x, *, argument="batch_size"):
    """Reject a batch size that can never split over the data axis.

    Only array inputs have a batch size known up front (Keras's default is
    32). For datasets and generators, batches that do not split run
    replicated over the data axis instead.
    """
    dp = strategy.data_parallel_size
    if dp == 1 or not _is_array_like(x):
        return
    size = 32 if batch_size is None else int(batch_size)
    n = None
    for leaf in tree.flatten(x):
        if leaf is not None and getattr(leaf, "shape", None) is not None and len(np.shape(leaf)):
            n = int(np.shape(leaf)[0])
            break
    if n is not None and n <= size:
        return  # a single (partial) batch: replicated, never an error
    if size % dp:
        lower, upper = (size // dp) * dp, (size // dp + 1) * dp
        suggestion = f"{lower} or {upper}" if lower else f"{upper}"
        raise StrategyError(
            f"{argument}={size} cannot be split over data axis "
            f"{strategy.data_axis!r} of size {dp}; every batch would have to be "
            f"replicated. Use a multiple of {dp}, e.g. {argument}={suggestion}."
        )


# --------------------------------------------------------------- batch split
def _leading_dim(data):
    for x in tree.flatten(data):
        shape = getattr(x, "shape", None)
        if shape is not None and len(shape):
            return shape[0]
    return None


def shard_batch(strategy, data, process_local=False):
    """Place a host batch on the mesh, split over the data axis if it can.

    In a multi-client job each process packs only its local devices' slices.
    With ``process_local`` the batch holds only this process's rows of the
    global batch (see ``tfshard.multi_client.InputContext``).
    """
    if process_local and multi_client.is_multi_client():
        return _shard_process_batch(strategy, data)
    n = _leading_dim(data)
    split = (
        strategy.data_axis is not None
        and n is not None
        and int(n) % strategy.data_parallel_size == 0
    )

    def place(x):
        if x is None:
            return None
        array = x.numpy() if hasattr(x, "numpy") else np.asarray(x)
        spec = ((strategy.data_axis if split else None),) + (None,) * (array.ndim - 1)
        if array.ndim > 1:  # context parallelism: dim 1 (the sequence) split
            spec = (spec[0], context_parallel.sequence_axis(strategy, array.shape)) + spec[2:]
        return _dtensor.distribute(array, strategy.dtensor_layout(spec[: array.ndim]))

    return tree.map_structure(place, data)


def _shard_process_batch(strategy, data):
    context = multi_client.input_context(strategy)
    rows = _leading_dim(data)
    if rows is None or int(rows) == 0 or int(rows) % context.local_data_parallel:
        raise StrategyError(
            f"A per-process batch of {rows} rows cannot be split over the "
            f"{context.local_data_parallel} data-parallel position(s) of this process "
            f"(data axis {strategy.data_axis!r}). Every process must yield batches "
            "of one size that divides evenly: batch with drop_remainder=True, or "
            "use InputContext.shard_dataset."
        )
    rows = int(rows)
    origin = context.input_shard_index * rows
    global_rows = context.num_input_shards * rows

    def place(x):
        if x is None:
            return None
        array = x.numpy() if hasattr(x, "numpy") else np.asarray(x)
        spec = (strategy.data_axis,) + (None,) * (array.ndim - 1)
        layout = strategy.dtensor_layout(spec[: array.ndim])
        return _dtensor.distribute_local(array, layout, origin, global_rows)

    return tree.map_structure(place, data)


# Per model, which step kinds ("train", "test", "predict") get per-process
# batches in the current fit/evaluate/predict call.
_PROCESS_LOCAL_INPUT = weakref.WeakKeyDictionary()


def _process_local(model, kind):
    return _PROCESS_LOCAL_INPUT.get(model, {}).get(kind, False)


def _to_host(outputs):
    return tree.map_structure(
        lambda y: _dtensor.to_numpy(y) if _dtensor.is_dtensor(y) else y, outputs
    )


class _Step:
    """One compiled step per input signature, traced once for every batch
    size (the batch dimension is left unknown).

    A batch of another feature shape or structure gets its own function, as
    plain Keras retraces, so a failed call on a wrong input does not leave a
    function bound to that input. Before a function runs for the first time,
    every variable it reads or writes must be on the mesh (see
    :func:`tfshard.step_guards.check_captured_variables`).
    """

    def __init__(self, model, step_fn, strategy, kind):
        self._model = model
        self._step_fn = step_fn
        self._strategy = strategy
        self._kind = kind
        self._functions = {}
        self.trace_count = 0

    def _trace(self, data):
        leaves = tree.flatten(data)
        present = [leaf is not None for leaf in leaves]
        structure = data

        def run(*flat):
            self.trace_count += 1
            it = iter(flat)
            rebuilt = [next(it) if p else None for p in present]
            with self._strategy._ensure_scope():
                return self._step_fn(tree.pack_sequence_as(structure, rebuilt))

        if self._model.run_eagerly:
            return run
        compiled = tf.function(
            run, input_signature=_signature(data), jit_compile=False, autograph=False
        )
        return compiled, compiled.get_concrete_function()

    def _build(self, data):
        model, strategy, kind = self._model, self._strategy, self._kind
        _ensure_built(model, strategy, data)
        step_guards.prepare(model, strategy, data, kind)
        if model.run_eagerly:
            return self._trace(data)
        compiled, concrete = self._trace(data)
        if step_guards.check_captured_variables(model, strategy, kind, concrete):
            compiled, concrete = self._trace(data)  # now on the mesh
            step_guards.check_captured_variables(model, strategy, kind, concrete)
        return compiled

    def __call__(self, data):
        key = _signature_key(data)
        function = self._functions.get(key)
        if function is None:
            function = self._build(data)
            self._functions[key] = function
        flat = [leaf for leaf in tree.flatten(data) if leaf is not None]
        return function(*flat)


def _signature(data):
    return [
        tf.TensorSpec((None,) + tuple(leaf.shape[1:]), leaf.dtype)
        if len(leaf.shape)
        else tf.TensorSpec((), leaf.dtype)
        for leaf in tree.flatten(data)
        if leaf is not None
    ]


def _signature_key(data):
    structure = tree.map_structure(lambda leaf: leaf is not None, data)
    return repr(structure), tuple(_signature(data))


def _ensure_built(model, strategy, data):
    """Build a model Keras could not build symbolically (a subclassed model
    whose layers build on first call) with one eager forward pass, so that
    every variable exists before the optimizer is built for them."""
    if getattr(model, "built", False) and model.weights:
        return
    x, _, _ = _unpack(data)
    with strategy._ensure_scope():
        model(x, training=False)


def _iterator_function(model, strategy, step_fn, kind):
    """Keras's ``train_function``/``test_function`` contract: pull up to
    ``steps_per_execution`` batches from the iterator, run the step on each,
    return the last logs (``StopIteration`` when the iterator is empty)."""
    step = _Step(model, step_fn, strategy, kind)

    def function(iterator):
        outputs = None
        local = _process_local(model, kind)
        for _, data in zip(range(model.steps_per_execution), iterator):
            with step_guards.step_failures(model, strategy, kind):
                outputs = step(shard_batch(strategy, data, local))
        if outputs is None:
            raise StopIteration
        with step_guards.step_failures(model, strategy, kind):
            return _to_host(outputs)

    function.step = step
    return function


def make_train_function(model, strategy):
    return _iterator_function(model, strategy, model.train_step, "train")


def make_test_function(model, strategy):
    return _iterator_function(model, strategy, model.test_step, "test")


def make_predict_function(model, strategy):
    step = _Step(model, model.predict_step, strategy, "predict")

    def function(data):
        local = _process_local(model, "predict")
        with step_guards.step_failures(model, strategy, "predict"):
            outputs = [_to_host(step(shard_batch(strategy, d, local))) for d in data]
        if len(outputs) > 1:
            outputs = [tree.map_structure(lambda *parts: np.concatenate(parts), *outputs)]
        # Keras's predict loop expects tensors (it calls .numpy() on them).
        with _dtensor.on_host():
            return tree.map_structure(tf.convert_to_tensor, outputs[0])

    function.step = step
    return function


_MAKERS = {
    "train": make_train_function,
    "test": make_test_function,
    "predict": make_predict_function,
}


def _make_function(model, kind, original, force):
    strategy = strategy_of_model(model)
    if strategy is None:
        step_guards.release_metrics(model)
        return NotImplemented
    attr = f"{kind}_function"
    if getattr(model, attr) is not None and not force:
        return getattr(model, attr)
    setattr(model, attr, _MAKERS[kind](model, strategy))
    return getattr(model, attr)


def _bind(original, model, args, kwargs):
    bound = inspect.signature(original).bind(model, *args, **kwargs)
    return bound.arguments


def _run(model, method, original, args, kwargs):
    """Wraps fit/evaluate/predict of a sharded model: check, enter scope."""
    strategy = strategy_of_model(model)
    if strategy is None:
        return NotImplemented
    arguments = _bind(original, model, args, kwargs)
    x = arguments.get("x")
    check_batch_size(strategy, arguments.get("batch_size"), x)
    if method == "fit":
        validation = arguments.get("validation_data")
        if validation is not None:
            check_batch_size(
                strategy,
                arguments.get("validation_batch_size") or arguments.get("batch_size"),
                validation[0] if isinstance(validation, tuple) else validation,
                argument="validation_batch_size",
            )
    # Which batches hold only this process's rows (multi_client.process_local).
    validation = arguments.get("validation_data") if method == "fit" else None
    kind = {"fit": "train", "evaluate": "test", "predict": "predict"}.get(method)
    modes = dict(_PROCESS_LOCAL_INPUT.get(model, {}))
    nested = (arguments.get("kwargs") or {}).get("_use_cached_eval_dataset")
    if kind is not None and not nested:  # fit's own validation keeps fit's mode
        modes[kind] = multi_client.is_process_local(x)
    if method == "fit":
        modes["test"] = multi_client.is_process_local(validation)
    previous = _PROCESS_LOCAL_INPUT.get(model)
    _PROCESS_LOCAL_INPUT[model] = modes
    if not multi_client.is_chief() and arguments.get("verbose", "auto") != 0:
        # Progress bars and per-epoch logs from process 0 only.
        bound = inspect.signature(original).bind(model, *args, **kwargs)
        bound.arguments["verbose"] = 0
        args, kwargs = bound.args[1:], bound.kwargs
    try:
        with strategy._ensure_scope():
            return original(model, *args, **kwargs)
    finally:
        if previous is None:
            _PROCESS_LOCAL_INPUT.pop(model, None)
        else:
            _PROCESS_LOCAL_INPUT[model] = previous


def install():
    _keras.hooks.make_step_function = _make_function
    _keras.hooks.run_trainer_method = _run
    _keras.install(_keras.TRAINER_PATCHES)
