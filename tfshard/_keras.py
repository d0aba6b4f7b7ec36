"""The only module that touches ``keras.src`` internals.

It checks the Keras version once, gives the rest of tfshard accessors for
the Keras internals it reads (``variable_layout``, ``layer_path``, ...), and
holds every change ``import tfshard`` makes to Keras as rows of a patch
table (:data:`CORE_PATCHES`, :data:`TRAINER_PATCHES`,
:func:`backend_op_patches` for the backend ops ``tfshard.hooks`` and
``tfshard._ops`` replace, and the distribution backend functions
``tfshard.interop`` supplies). :func:`install` applies them,
:func:`uninstall` restores Keras exactly and :func:`describe_patches` lists
them (``python -c "import tfshard, tfshard._keras as k;
print(k.describe_patches())"``); these and :data:`hooks` come from
``tfshard._patching`` and are re-exported here. Every wrapper calls a hook
that higher layers register in :data:`hooks` and is inert for plain Keras
code.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys

from tfshard._patching import (  # noqa: F401  (re-exported: the patch mechanism)
    Patch,
    chained,
    describe_patches,
    hooks,
    install,
    installed_patches,
    uninstall,
)
from tfshard._version import check_versions  # noqa: F401  (re-exported)

if "keras" not in sys.modules:
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
from keras.src.backend.common import global_state  # noqa: E402
from keras.src.backend.common import masking as _masking  # noqa: E402
from keras.src.backend.tensorflow import core as _tf_core  # noqa: E402
from keras.src.layers import layer as _layer_module  # noqa: E402


check_versions()

Variable = _tf_core.Variable
Layer = _layer_module.Layer


def current_call_context():
    """Keras's current layer call context (None outside any layer call)."""
    return global_state.get_global_attribute("current_call_ctx")


def keras_distribution():
    """The active ``keras.distribution`` distribution, or None."""
    return keras.distribution.distribution()


def layer_path(layer):
    """The name-scope path Keras gives a layer's call (``layer.path`` once
    built), the prefix of its ``"<path>/output"`` layout key."""
    path = getattr(layer, "_path", None)
    if path:
        return path
    parent = getattr(layer, "_parent_path", None)
    return f"{parent}/{layer.name}" if parent else layer.name


def enclosing_layers():
    """The layers whose calls or builds enclose this point, outermost
    first: the callers on Keras's name-scope stack (``Layer.add_weight``,
    ``build`` and ``__call__`` each open ``name_scope(layer.name,
    caller=layer)``). Inside ``add_weight`` the last one owns the weight."""
    stack = global_state.get_global_attribute("name_scope_stack") or []
    layers = []
    for entry in stack:
        caller = getattr(entry, "caller", None)
        if isinstance(caller, Layer) and (not layers or layers[-1] is not caller):
            layers.append(caller)
    return layers


def sublayers(layer):
    # Layer._layers: the layers a layer tracks directly (its children).
    return list(getattr(layer, "_layers", ()))


def own_weights(layer):
    # Layer._trainable_variables/_non_trainable_variables: the weights a
    # layer created itself, not its sublayers'.
    return list(getattr(layer, "_trainable_variables", ())) + list(
        getattr(layer, "_non_trainable_variables", ())
    )


def variable_layout(variable):
    """The ``_layout`` Keras stores on a variable (None if unset)."""
    return getattr(variable, "_layout", None)


def set_variable_layout(variable, layout):
    variable._layout = layout


def variable_shape(variable):
    # Keras's Variable._shape: the declared shape, set before any value exists.
    return variable._shape


def variable_dtype(variable):
    # Variable._dtype: the stored dtype (``.dtype`` is the autocast dtype
    # inside an autocast scope).
    return getattr(variable, "_dtype", None) or variable.dtype


def keras_mask(x):
    # keras.src.backend.get_keras_mask: the mask Keras keeps on a tensor.
    return None if x is None else _masking.get_keras_mask(x)


def set_keras_mask(x, mask):
    # keras.src.backend.set_keras_mask: Keras reads a tensor's (or loss's) mask from it.
    _masking.set_keras_mask(x, mask)


def compiled_metric_objects(model):
    """The metric objects given to ``compile(metrics=..., weighted_metrics=...)``
    (Trainer._compile_metrics keeps them, unbuilt, until the first step);
    strings and functions are left out."""
    compiled = getattr(model, "_compile_metrics", None)
    if compiled is None:
        return []
    found = []
    for given in (compiled._user_metrics, compiled._user_weighted_metrics):
        found += [m for m in keras.tree.flatten(given or []) if isinstance(m, keras.metrics.Metric)]
    return found


def set_initial_epoch(model, epoch):
    # Trainer._initial_epoch: fit starts at this epoch when set (as
    # keras.callbacks.BackupAndRestore resumes); None clears it.
    model._initial_epoch = epoch


def symbolic_build(model, data_batch):
    """Create a compiled model's metric variables from one batch, as Keras
    does before a tf.distribute run (Trainer._symbolic_build). False when
    this Keras has no such method."""
    build = getattr(model, "_symbolic_build", None)
    if build is None:
        return False
    build(data_batch=data_batch)
    return True


# ------------------------------------------------------------- the wrappers
# Each wrapper factory takes the original Keras object and returns its
# replacement, which calls a hook (``tfshard._patching.hooks``) and is inert
# (calls the original) unless a hook says otherwise. The tables below pair
# them with their owners as ``Patch`` rows.
def _initialize(original):
    @functools.wraps(original)
    def _initialize(self, value):
        if hooks.make_variable is not None and not isinstance(value, _tf_core.tf.Variable):
            made = hooks.make_variable(self, value)
            if made is not None:
                value = made
        return original(self, value)

    return _initialize


def _numpy(original):
    @functools.wraps(original)
    def numpy(self):
        out = hooks.to_numpy(self._value) if hooks.to_numpy else None
        return original(self) if out is None else out

    return numpy


def _array(original):
    @functools.wraps(original)
    def __array__(self, dtype=None, copy=None):
        out = hooks.to_numpy(self._value) if hooks.to_numpy else None
        if out is None:
            return original(self, dtype)
        return out if dtype is None else out.astype(dtype)

    return __array__


def _tf_tensor(original):
    @functools.wraps(original)
    def __tf_tensor__(self, dtype=None, name=None):
        out = original(self, dtype=dtype, name=name)
        if hooks.read_variable is not None:
            out = hooks.read_variable(self, out)
        return out

    return __tf_tensor__


def _getitem(original):
    @functools.wraps(original)
    def __getitem__(self, idx):
        if hooks.read_variable is not None:
            value = self.value
            read = hooks.read_variable(self, value)
            if read is not value:
                return read[idx]
        return original(self, idx)

    return __getitem__


def _new(original):
    @functools.wraps(original)
    def __new__(cls, *args, **kwargs):
        obj = original(cls, *args, **kwargs)
        if hooks.layer_created is not None:
            hooks.layer_created(obj)
        return obj

    return __new__


def _call(original):
    @functools.wraps(original)
    def __call__(self, *args, **kwargs):
        def run(*args, **kwargs):
            if hooks.layer_inputs is not None:
                args, kwargs = hooks.layer_inputs(self, args, kwargs)
            out = original(self, *args, **kwargs)
            if hooks.layer_output is not None:
                out = hooks.layer_output(self, out)
            return out

        scope = hooks.call_scope(self) if hooks.call_scope is not None else None
        with scope if scope is not None else contextlib.nullcontext():
            if hooks.entry_call is not None:
                out = hooks.entry_call(self, run, args, kwargs)
                if out is not NotImplemented:
                    return out
            return run(*args, **kwargs)

    return __call__


def _make_step_function(kind):
    def wrap(original):
        @functools.wraps(original)
        def make(self, force=False):
            if hooks.make_step_function is not None:
                out = hooks.make_step_function(self, kind, original, force)
                if out is not NotImplemented:
                    return out
            return original(self, force=force)

        return make

    return wrap


def _run_trainer_method(name):
    def wrap(original):
        @functools.wraps(original)
        def method(self, *args, **kwargs):
            if hooks.run_trainer_method is not None:
                out = hooks.run_trainer_method(self, name, original, args, kwargs)
                if out is not NotImplemented:
                    return out
            return original(self, *args, **kwargs)

        return method

    return wrap


def _optimizer_apply(original):
    @functools.wraps(original)
    def apply(self, grads, trainable_variables=None):
        if hooks.pin_gradients is not None and grads:
            variables = (
                trainable_variables
                if trainable_variables is not None
                else getattr(self, "_trainable_variables", None)
            )
            if variables is not None:
                grads = hooks.pin_gradients(list(grads), list(variables))
        return original(self, grads, trainable_variables)

    return apply


def _backend_op(key):
    def wrap(original):
        @functools.wraps(original)
        def op(*args, **kwargs):
            replacement = hooks.backend_ops.get(key)
            if replacement is None:
                return original(*args, **kwargs)
            return replacement(original, *args, **kwargs)

        return op

    return wrap


def _global_value(weight):
    """A sharded variable's global value (numpy); anything else unchanged."""
    value = getattr(weight, "_value", None)
    out = hooks.to_numpy(value) if hooks.to_numpy and value is not None else None
    return weight if out is None else out


class _GlobalValueSummary:
    """``tf.summary`` whose ``histogram`` takes sharded variables' global values."""

    def __init__(self, summary):
        self._summary = summary

    def __getattr__(self, name):
        return getattr(self._summary, name)

    def histogram(self, name, data, *args, **kwargs):
        return self._summary.histogram(name, _global_value(data), *args, **kwargs)


def _tensorboard_log_weights(original):
    @functools.wraps(original)
    def _log_weights(self, epoch):
        summary = self.summary
        self._summary_module = _GlobalValueSummary(summary)
        try:
            return original(self, epoch)
        finally:
            self._summary_module = summary

    return _log_weights


def _tensorboard_log_weight_as_image(original):
    @functools.wraps(original)
    def _log_weight_as_image(self, weight, weight_name, epoch):
        return original(self, _global_value(weight), weight_name, epoch)

    return _log_weight_as_image


_VARIABLE = "keras.src.backend.tensorflow.core:Variable"
_LAYER = "keras.src.layers.layer:Layer"
_TRAINER = "keras.src.backend.tensorflow.trainer:TensorFlowTrainer"

CORE_PATCHES = (
    Patch(_VARIABLE, "_initialize", _initialize,
          "a variable created under a strategy becomes a DTensor variable laid out by "
          "its rules, from the global initial value (optimizer slots inherit the layout)"),
    Patch(_VARIABLE, "numpy", _numpy, "global values out of sharded variables"),
    Patch(_VARIABLE, "__array__", _array, "global values out of sharded variables"),
    Patch(_VARIABLE, "__tf_tensor__", _tf_tensor,
          "a weight split over the data axis (FSDP) is read whole inside a layer call"),
    Patch(_VARIABLE, "__getitem__", _getitem,
          "... also when sliced, e.g. a position table (ZeRO-3, FSDP)"),
    Patch(_LAYER, "__new__", _new,
          "a layer created under a strategy remembers it and builds under it"),
    Patch(_LAYER, "__call__", _call,
          "calls of a sharded layer compute on its mesh; the outermost eager call takes "
          "plain values in and gives plain values out; output layout rules apply"),
)
_TENSORBOARD = "keras.src.callbacks.tensorboard:TensorBoard"
TRAINER_PATCHES = (
    Patch("keras.src.optimizers.base_optimizer:BaseOptimizer", "apply", _optimizer_apply,
          "with ZeRO, gradients are laid out like their parameters before the update"),
    Patch(_TENSORBOARD, "_log_weights", _tensorboard_log_weights,
          "weight histograms (histogram_freq) of sharded weights show their global values"),
    Patch(_TENSORBOARD, "_log_weight_as_image", _tensorboard_log_weight_as_image,
          "weight images (write_images) of sharded weights show their global values"),
    *(
        Patch(_TRAINER, f"make_{kind}_function", _make_step_function(kind),
              f"a sharded model's {kind} step runs batches placed on the mesh")
        for kind in ("train", "test", "predict")
    ),
    *(
        Patch(_TRAINER, name, _run_trainer_method(name),
              f"{name} of a sharded model checks batch sizes and runs in its strategy scope")
        for name in ("fit", "evaluate", "predict")
    ),
)

def layer_method_patches(purposes):
    """Patches for ``{(class path, method name): purpose}``: the method
    calls ``hooks.backend_ops[(class path, method name)]`` as
    ``replacement(original, self, *args, **kwargs)`` when one is registered
    (the same mechanism as :func:`backend_op_patches`, for the few layer
    methods whose own code, not a backend function, DTensor cannot expand)."""
    return tuple(
        Patch(owner, name, _backend_op((owner, name)), purpose)
        for (owner, name), purpose in purposes.items()
    )


# Keras TensorFlow-backend functions that tfshard replaces on a mesh.
# Keras's op layer (``keras.ops``), its layers and keras-hub reach the
# backend through these module attributes, looked up at call time, so one
# wrapper per function covers every caller. The wrapper calls the
# replacement registered in ``hooks.backend_ops[(module, name)]`` as
# ``replacement(original, *args, **kwargs)``; the replacement decides, per
# call, whether the op runs on a mesh and otherwise calls ``original``.
def backend_op_patches(purposes):
    """Patches for ``{(backend module, function name): purpose}``, e.g.
    ``{("nn", "max_pool"): "pooling on split channels"}``."""
    return tuple(
        Patch(f"keras.src.backend.tensorflow.{module}", name, _backend_op((module, name)), purpose)
        for (module, name), purpose in purposes.items()
    )


def distribution_backend_patches(functions):
    """Patches that complete Keras's TensorFlow distribution backend
    (``keras/src/backend/tensorflow/distribution_lib.py``, a prototype that
    lacks ``distribute_tensor`` and friends) with ``functions`` (name ->
    (callable, purpose))."""
    return tuple(
        Patch("keras.src.backend.tensorflow.distribution_lib", name,
              lambda original, f=function: f, purpose)
        for name, (function, purpose) in functions.items()
    )


@contextlib.contextmanager
def values_as_initializers():
    """Inside, a Keras variable made from a value in a stateless scope (which
    Keras's ``Variable.__init__`` refuses; optimizers make their iteration
    count and learning rate so) is left uninitialized, the value as its
    initializer: nothing is materialised, a read returns the value."""
    from keras.src.backend.common.stateless_scope import in_stateless_scope

    cls, own = _tf_core.Variable, _tf_core.Variable.__dict__.get("__init__")
    original = cls.__init__

    @functools.wraps(original)
    def __init__(self, initializer=None, shape=None, dtype=None, *args, **kwargs):
        if in_stateless_scope() and initializer is not None and not callable(initializer) \
                and not isinstance(initializer, str):
            value = _tf_core.convert_to_tensor(initializer, dtype=dtype)
            shape, dtype = tuple(value.shape), dtype or value.dtype.name
            initializer = lambda shape, dtype=None: value  # noqa: E731
        original(self, initializer, shape, dtype, *args, **kwargs)

    cls.__init__ = __init__
    try:
        yield
    finally:
        if own is None:
            del cls.__init__
        else:
            cls.__init__ = own


def draw_random_seed(seed):
    """The int32 seed pair Keras's TensorFlow random ops pass to
    ``tf.random.stateless_*`` for ``seed`` (an int, a SeedGenerator or a
    tensor), advancing a SeedGenerator exactly as Keras does."""
    from keras.src.backend.tensorflow import random as tf_random
    from keras.src.random.seed_generator import draw_seed

    return tf_random._cast_seed(draw_seed(seed))


def backend_variable(x):
    # Variable._value: the backend tf.Variable behind a Keras variable (None
    # for anything else; ``.value`` would autocast or run the initializer).
    inner = getattr(x, "_value", None)
    return inner if isinstance(inner, _tf_core.tf.Variable) else None


def has_attention_core(layer):
    """Whether ``layer`` has an attention core :func:`wrap_attention_core`
    can wrap: Keras's attention layers and keras-hub's (every keras-hub
    attention layer computes its core in ``_compute_attention``)."""
    return callable(getattr(type(layer), "_compute_attention", None))


def wrap_attention_core(layer, wrap):
    # MultiHeadAttention/GroupQueryAttention._compute_attention(query, key,
    # value, attention_mask=None, training=None, ...) -> (output, scores)
    # (keras-hub's: (query, key, value, attention_mask=None) -> output):
    # the attention core (scores, softmax, dropout, weighted values), replaced
    # on this instance by wrap(the bound original).
    object.__setattr__(layer, "_compute_attention", wrap(layer._compute_attention))


def replace_variable_value(variable, value):
    """Point a Keras variable at another backend tf.Variable."""
    variable._value = value


# keras-hub's RWKV-7 time mixing (``RWKV7TimeMix``, keras-hub 0.32) calls its
# recurrence through three instance attributes set in ``__init__``, each
# ``rwkv7_layer.rnn_generalized_delta_rule(r, w, k, v, a, b,
# initial_state=None, output_final_state=True, head_first=False)`` on the
# TensorFlow backend (CUDA kernels from ``rwkv_ops`` on torch/jax).
_RECURRENCE_SCANS = ("RWKV7_OP", "RWKV7_OP_RNN", "RWKV7_OP_INFERENCE")
_RECURRENCE_FUNCTION = "rnn_generalized_delta_rule"


def wrap_recurrence_scans(layer, wrap):
    """Replace, on this instance, each of keras-hub's RWKV-7 recurrence
    functions ``layer`` holds by ``wrap(the original)`` (once; nothing for
    any other layer)."""
    for name in _RECURRENCE_SCANS:
        scan = layer.__dict__.get(name)
        if getattr(scan, "__name__", None) != _RECURRENCE_FUNCTION or getattr(scan, "_tfshard_wrapped", False):
            continue
        wrapped = functools.wraps(scan)(wrap(scan))
        wrapped._tfshard_wrapped = True
        object.__setattr__(layer, name, wrapped)
