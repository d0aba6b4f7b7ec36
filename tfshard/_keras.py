"""The only module that touches ``keras.src`` internals.

It checks the Keras version once, and installs a few small hooks into the
Keras 3 TensorFlow backend. Each hook is inert unless tfshard put a variable
or layer on a mesh, so plain Keras code behaves exactly as before.

Hooks (all reversible by :func:`uninstall_hooks`, used in tests):

* ``Variable._initialize``: a variable whose layout is a tfshard layout, or
  that is created inside ``Strategy.scope()``, is created as a DTensor
  ``DVariable`` from the *global* initial value (so it equals the unsharded
  initializer's value for the same seed). Keras optimizers pass a reference
  variable's ``_layout`` to their slots, so slots inherit the layout.
* ``Variable.numpy`` / ``__array__``: global values out, so ``get_weights``
  works (writes of global values are handled by the DVariable subclass in
  ``tfshard._dtensor``).
* ``Layer.__new__``: a layer constructed inside a strategy scope remembers
  the strategy and builds inside it, even when Keras builds it lazily.
* ``Layer.__call__``: the outermost eager call of a sharded layer or model
  on plain inputs places them on the mesh, and returns plain tensors.
"""

from __future__ import annotations

import functools
import os
import sys

from tfshard._version import KERAS_MAX_EXCLUSIVE, KERAS_MIN

if "keras" not in sys.modules:
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
from keras.src.backend.common import global_state  # noqa: E402
from keras.src.backend.common import masking as _masking  # noqa: E402
from keras.src.backend.tensorflow import core as _tf_core  # noqa: E402
from keras.src.layers import layer as _layer_module  # noqa: E402


def _parse_version(text):
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts + [0] * (3 - len(parts)))


def check_versions():
    """Fail clearly outside the Keras range tfshard is tested against."""
    version = _parse_version(keras.version())
    if not (KERAS_MIN <= version < KERAS_MAX_EXCLUSIVE):
        lo = ".".join(map(str, KERAS_MIN))
        hi = ".".join(map(str, KERAS_MAX_EXCLUSIVE))
        raise ImportError(
            f"tfshard supports keras>={lo},<{hi} (it uses Keras internals); "
            f"found keras {keras.version()}. Install a supported version: "
            f"pip install 'keras>={lo},<{hi}'."
        )
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise ImportError(
            f"tfshard needs the Keras TensorFlow backend, but Keras is using "
            f"{backend!r}. Set KERAS_BACKEND=tensorflow before importing keras "
            "(or import tfshard before keras)."
        )


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


# ---------------------------------------------------------------- the hooks
class _Hooks:
    """Callbacks supplied by higher layers (tfshard.strategy)."""

    make_variable = None  # (keras_variable, value_or_callable) -> tf.Variable | None
    to_numpy = None  # (tf_variable) -> np.ndarray | None
    layer_created = None  # (layer) -> None
    entry_call = None  # (layer, call, args, kwargs) -> outputs | NotImplemented
    gathered_op = None  # (op, inputs, args, kwargs) -> op output on replicated weights
    pin_gradients = None  # (grads, variables) -> grads laid out like their variables
    make_step_function = None  # (model, kind, original, force) -> fn | NotImplemented
    read_variable = None  # (keras_variable, tensor) -> the tensor laid out for the op reading it
    take = None  # (original, x, indices, axis) -> lookup result | NotImplemented
    layer_output = None  # (layer, outputs) -> outputs, constrained by "<layer path>/output" rules
    run_trainer_method = None  # (model, name, original, args, kwargs) -> result | NotImplemented


hooks = _Hooks()
_originals = {}


def _patch(owner, name, make):
    raw = owner.__dict__.get(name)
    _originals[(owner, name)] = raw  # None: inherited, delete to restore
    if raw is None:
        setattr(owner, name, make(getattr(owner, name)))
    elif isinstance(raw, staticmethod):
        setattr(owner, name, staticmethod(make(raw.__func__)))
    else:
        setattr(owner, name, make(raw))


def install_hooks():
    if _originals:
        return

    def initialize(original):
        @functools.wraps(original)
        def _initialize(self, value):
            if hooks.make_variable is not None and not isinstance(
                value, _tf_core.tf.Variable
            ):
                made = hooks.make_variable(self, value)
                if made is not None:
                    value = made
            return original(self, value)

        return _initialize

    def numpy(original):
        @functools.wraps(original)
        def _numpy(self):
            out = hooks.to_numpy(self._value) if hooks.to_numpy else None
            return original(self) if out is None else out

        return _numpy

    def array(original):
        @functools.wraps(original)
        def __array__(self, dtype=None, copy=None):
            out = hooks.to_numpy(self._value) if hooks.to_numpy else None
            if out is None:
                return original(self, dtype)
            return out if dtype is None else out.astype(dtype)

        return __array__

    def new(original):
        @functools.wraps(original)
        def __new__(cls, *args, **kwargs):
            obj = original(cls, *args, **kwargs)
            if hooks.layer_created is not None:
                hooks.layer_created(obj)
            return obj

        return __new__

    def call(original):
        @functools.wraps(original)
        def __call__(self, *args, **kwargs):
            if hooks.entry_call is not None:
                out = hooks.entry_call(self, original, args, kwargs)
                if out is not NotImplemented:
                    return out
            out = original(self, *args, **kwargs)
            if hooks.layer_output is not None:
                out = hooks.layer_output(self, out)
            return out

        return __call__

    def tf_tensor(original):
        @functools.wraps(original)
        def __tf_tensor__(self, dtype=None, name=None):
            out = original(self, dtype=dtype, name=name)
            if hooks.read_variable is not None:
                out = hooks.read_variable(self, out)
            return out

        return __tf_tensor__

    _patch(Variable, "_initialize", initialize)
    _patch(Variable, "numpy", numpy)
    _patch(Variable, "__array__", array)
    _patch(Layer, "__new__", new)
    _patch(Layer, "__call__", call)
    _patch(Variable, "__tf_tensor__", tf_tensor)


def install_trainer_hooks():
    """Route fit/evaluate/predict of sharded models through tfshard.training."""
    from keras.src.backend.tensorflow.trainer import TensorFlowTrainer

    if (TensorFlowTrainer, "fit") in _originals:
        return

    def make_function(kind):
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

    def run(name):
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

    from keras.src.optimizers.base_optimizer import BaseOptimizer

    def apply(original):
        @functools.wraps(original)
        def _apply(self, grads, trainable_variables=None):
            if hooks.pin_gradients is not None and grads:
                variables = (
                    trainable_variables
                    if trainable_variables is not None
                    else getattr(self, "_trainable_variables", None)
                )
                if variables is not None:
                    grads = hooks.pin_gradients(list(grads), list(variables))
            return original(self, grads, trainable_variables)

        return _apply

    _patch(BaseOptimizer, "apply", apply)
    for kind in ("train", "test", "predict"):
        _patch(TensorFlowTrainer, f"make_{kind}_function", make_function(kind))
    for name in ("fit", "evaluate", "predict"):
        _patch(TensorFlowTrainer, name, run(name))


# Backend ops whose DTensor expansion needs replicated weights ("Filter for
# convolution must have fully replicated layout"). Sharded weights passed to
# them are all-gathered first: they stay sharded at rest (parameters and
# optimizer slots), and their gradients are reduce-scattered back.
GATHERED_WEIGHT_OPS = ("conv", "depthwise_conv", "separable_conv", "conv_transpose")


def install_op_hooks():
    from keras.src.backend.tensorflow import nn as tf_nn

    if (tf_nn, "conv") in _originals:
        return

    def gather_weights(original):
        @functools.wraps(original)
        def op(inputs, *args, **kwargs):
            if hooks.gathered_op is None:
                return original(inputs, *args, **kwargs)
            return hooks.gathered_op(original, inputs, args, kwargs)

        return op

    for name in GATHERED_WEIGHT_OPS:
        _patch(tf_nn, name, gather_weights)

    from keras.src.backend.tensorflow import numpy as tf_numpy

    def take(original):
        @functools.wraps(original)
        def _take(x, indices, axis=None):
            if hooks.take is not None:
                out = hooks.take(original, x, indices, axis)
                if out is not NotImplemented:
                    return out
            return original(x, indices, axis=axis)

        return _take

    _patch(tf_numpy, "take", take)


_distribution_backend_originals = {}


def install_distribution_backend(functions):
    """Complete Keras's TensorFlow distribution backend
    (``keras/src/backend/tensorflow/distribution_lib.py``, a prototype that
    lacks ``distribute_tensor`` and friends) with ``functions`` (name ->
    callable). Reversed by :func:`uninstall_distribution_backend`."""
    from keras.src.backend.tensorflow import distribution_lib as tf_distribution_lib

    for name, function in functions.items():
        if name not in _distribution_backend_originals:
            _distribution_backend_originals[name] = tf_distribution_lib.__dict__.get(name)
        setattr(tf_distribution_lib, name, function)


def uninstall_distribution_backend():
    from keras.src.backend.tensorflow import distribution_lib as tf_distribution_lib

    for name, original in _distribution_backend_originals.items():
        if original is None:
            tf_distribution_lib.__dict__.pop(name, None)
        else:
            setattr(tf_distribution_lib, name, original)
    _distribution_backend_originals.clear()


def backend_variable(x):
    # Variable._value: the backend tf.Variable behind a Keras variable (None
    # for anything else; ``.value`` would autocast or run the initializer).
    inner = getattr(x, "_value", None)
    return inner if isinstance(inner, _tf_core.tf.Variable) else None


def replace_variable_value(variable, value):
    """Point a Keras variable at another backend tf.Variable."""
    variable._value = value


def uninstall_hooks():
    for (owner, name), original in _originals.items():
        if original is None:
            delattr(owner, name)
        else:
            setattr(owner, name, original)
    _originals.clear()
