"""``keras.distribution`` on TensorFlow, through tfshard.

Keras 3 describes a sharded model with backend-neutral objects: a
``DeviceMesh`` (named axes over devices), a ``LayoutMap`` (variable-path
regex -> ``TensorLayout``) and a ``Distribution`` (``DataParallel``,
``ModelParallel``). Only the JAX backend acts on them; on TensorFlow they do
nothing (``keras/src/backend/tensorflow/distribution_lib.py`` is a "DO NOT
USE" prototype). This module maps them onto tfshard:

* :func:`builder_from_keras` (``tfshard.StrategyBuilder.from_keras``) turns
  any of them into a :class:`tfshard.StrategyBuilder`;
* :func:`enable_keras_distribution` (on by default when tfshard is imported)
  makes ``keras.distribution.set_distribution(d)`` and ``d.scope()`` act as
  ``strategy.scope()`` of the strategy converted from ``d``, and supplies the
  TensorFlow backend functions Keras calls (``distribute_tensor`` for
  ``"<layer>/output"`` layouts, ``num_processes``, ...);
* :func:`check_layout` reports every variable of a model that a layout
  cannot fit, before any weight is created.

``LayoutMap`` semantics are kept exactly: a key equal to the path wins,
otherwise keys are regexes matched with ``re.fullmatch`` and a path matched
by two keys is an error; values are ``TensorLayout`` objects or tuples; keys
ending in ``/output`` lay out that layer's output.

This module uses only the public ``keras.distribution`` API; the one hook
into ``keras.src`` (the TensorFlow distribution backend module) lives in
``tfshard._keras``.
"""

from __future__ import annotations

import weakref

import keras
import numpy as np
import tensorflow as tf
from keras import tree

from tfshard import _dtensor, _keras
from tfshard import strategy as _strategy
from tfshard.errors import ShardingError, StrategyError, UnsupportedFeatureError
from tfshard.layout import KEEP, fitting_spec, validate_spec
from tfshard.mesh import Mesh
from tfshard.plans import Plan, weight_owners
from tfshard.plans import spec_of_layout as _spec_of

__all__ = [
    "mesh_from_keras",
    "builder_from_keras",
    "strategy_from_keras",
    "check_layout",
    "enable_keras_distribution",
    "keras_distribution_enabled",
]

_KERAS_KINDS = "keras.distribution.ModelParallel, DataParallel, LayoutMap or DeviceMesh"


# ---------------------------------------------------------------- meshes
class _Cache:
    """Values cached per Keras object, held weakly (a LayoutMap is a
    mutable mapping, so it cannot be a dict key). A value must not refer to
    its object, or the object is never released."""

    def __init__(self):
        self._entries = {}

    def get(self, obj):
        entry = self._entries.get(id(obj))
        return entry[1] if entry is not None and entry[0]() is obj else None

    def __setitem__(self, obj, value):
        key = id(obj)
        self._entries[key] = (weakref.ref(obj, lambda _: self._entries.pop(key, None)), value)


_meshes = _Cache()


def mesh_from_keras(device_mesh) -> Mesh:
    """The tfshard :class:`~tfshard.Mesh` for a ``keras.distribution.DeviceMesh``.

    Device names are TensorFlow's: ``"cpu:0"`` (what
    ``keras.distribution.list_devices()`` gives on TensorFlow), ``"CPU:3"``
    or ``"/job:localhost/replica:0/task:0/device:CPU:3"``. The device array
    is read row-major, as Keras lays it out.
    """
    if not isinstance(device_mesh, keras.distribution.DeviceMesh):
        raise StrategyError(
            f"mesh_from_keras: expected a keras.distribution.DeviceMesh, got "
            f"{type(device_mesh).__name__}."
        )
    mesh = _meshes.get(device_mesh)
    if mesh is None:
        devices = [str(d) for d in np.asarray(device_mesh.devices).reshape(-1)]
        axes = list(zip(device_mesh.axis_names, (int(n) for n in device_mesh.shape)))
        mesh = Mesh(axes, devices=devices)
        _meshes[device_mesh] = mesh
    return mesh


def _other_axis(mesh, data_axis):
    """On a 2-D mesh, the axis that is not the data axis: tfshard's own
    layers (which name logical dims) shard over it. None otherwise."""
    rest = [a for a in mesh.axis_names if a != data_axis]
    return rest[0] if len(mesh.axis_names) == 2 and len(rest) == 1 else None


# -------------------------------------------------------------- builders
def builder_from_keras(obj):
    """A :class:`tfshard.StrategyBuilder` equivalent to a Keras
    distribution object.

    * ``ModelParallel(layout_map=..., batch_dim_name=b)``: the layout map's
      mesh; batches split over ``b``; variables and ``"<layer>/output"``
      tensors laid out by the map (through the distribution's own
      ``get_tensor_layout``).
    * ``DataParallel(...)``: its mesh; batches split over its first axis;
      every variable replicated.
    * ``LayoutMap``: as ``ModelParallel(layout_map=m)`` (batch over the
      mesh's first axis, Keras's default).
    * ``DeviceMesh``: batches over its first axis, no rules.

    On a 2-D mesh the other axis (not for ``DataParallel``) is also the
    tensor-parallel axis, so tfshard layers in the same model shard their
    logical dims over it.
    """
    plan = None
    if isinstance(obj, keras.distribution.ModelParallel):
        device_mesh, data_axis = obj.device_mesh, obj.batch_dim_name
        plan = Plan().add_layout_map(obj.get_tensor_layout, source="ModelParallel")
    elif isinstance(obj, keras.distribution.DataParallel):
        device_mesh, data_axis = obj.device_mesh, obj.batch_dim_name
    elif isinstance(obj, keras.distribution.LayoutMap):
        device_mesh = obj.device_mesh
        if device_mesh is None:
            raise StrategyError(
                "StrategyBuilder.from_keras(layout_map): the LayoutMap has no "
                "device mesh; create it as keras.distribution.LayoutMap("
                "keras.distribution.DeviceMesh(shape, axis_names, devices))."
            )
        data_axis = device_mesh.axis_names[0]
        plan = Plan().add_layout_map(obj.__getitem__, layout_map=obj)
    elif isinstance(obj, keras.distribution.DeviceMesh):
        device_mesh, data_axis = obj, obj.axis_names[0]
    else:
        raise StrategyError(
            f"StrategyBuilder.from_keras: expected a {_KERAS_KINDS}; got "
            f"{type(obj).__name__}."
        )
    mesh = mesh_from_keras(device_mesh)
    builder = _strategy.StrategyBuilder(mesh).data_parallel(data_axis)
    if not isinstance(obj, keras.distribution.DataParallel):
        tensor_axis = _other_axis(mesh, data_axis)
        if tensor_axis is not None:
            builder.tensor_parallel(tensor_axis)
    if plan is not None:
        builder.plan(plan)
    return builder


_strategy.set_keras_converter(builder_from_keras)  # StrategyBuilder.from_keras


# The strategy converted from a Keras object is cached on the object itself:
# its rules call the object's lookup, so a cache outside the object would
# keep the object (and the strategy's DTensor mesh) alive for ever.
_STRATEGY_ATTR = "_tfshard_converted_strategy"


def strategy_from_keras(obj):
    """The built strategy for a Keras distribution object, cached on the
    object (its rules are a live view of the object's layout map), so both
    are released together."""
    if isinstance(obj, _strategy.Strategy):
        return obj
    strategy = getattr(obj, _STRATEGY_ATTR, None)
    if strategy is None:
        strategy = builder_from_keras(obj).build()
        setattr(obj, _STRATEGY_ATTR, strategy)
    return strategy


# ------------------------------------------------------------ validation
def _fitting_spec_if_fixable(spec, shape, mesh):
    """The spec that fits ``shape`` when ``spec`` fails only because some
    mesh axes do not divide their dimensions; None when it fails otherwise
    (rank, unknown axis): the rule itself is then wrong, not its fit."""
    if len(spec) != len(shape):
        return None
    fit = fitting_spec(spec, shape, mesh)
    try:
        validate_spec(fit, shape, mesh, name="fitting spec")
    except ShardingError:
        return None
    return fit if fit != tuple(spec) else None


def _describe_fix(path, rule, fit):
    if rule.endswith("layout map"):
        return f"give {path!r} the spec {fit!r} in the {rule}"
    if rule == path:
        return f"set layout_map[{path!r}] = {fit!r}"
    return (
        f"add layout_map[{path!r}] = {fit!r} (an exact key takes precedence "
        f"over the regex key {rule!r})"
    )


def check_layout(layout, model):
    """Raise one :class:`tfshard.ShardingError` that lists every variable of
    ``model`` the layout cannot lay out (unknown axes, rank, dimensions the
    mesh does not divide), each with the rule it came from and a spec that
    fits. ``layout`` is anything :func:`builder_from_keras` accepts, a
    builder or a Strategy.

    ``model`` needs only shapes: build it inside
    ``keras.StatelessScope(initialize_variables=False)`` and no weight is
    allocated, so a layout map is checked before any work starts::

        with keras.StatelessScope(initialize_variables=False):
            abstract = keras_hub.models.GemmaBackbone(**config)
        tfshard.interop.check_layout(layout_map, abstract)
    """
    if isinstance(layout, _strategy.StrategyBuilder):
        strategy = layout.build()
    elif isinstance(layout, _strategy.Strategy):
        strategy = layout
    else:
        strategy = strategy_from_keras(layout)
    problems = []
    owners = weight_owners(model)
    for variable in model.weights:
        path = variable.path
        shape = tuple(int(d) for d in variable.shape)
        layer, parents = owners.get(id(variable), (None, []))
        try:
            strategy.variable_spec(path, shape, name=variable.name, layer=layer, parents=parents)
        except ShardingError as err:
            line = f"- {err}"
            try:
                rule = strategy.plan.variable_rule(path)
            except ShardingError:  # ambiguous: the message says so
                rule = None
            fit = None if rule is None else _fitting_spec_if_fixable(rule[1], shape, strategy.mesh)
            if fit is not None:
                line += f" Fix: {_describe_fix(path, rule[0], fit)}."
            problems.append(line)
    if problems:
        raise ShardingError(
            f"The layout cannot lay out {len(problems)} variable(s) of model "
            f"{model.name!r} on mesh {strategy.mesh!r}:\n" + "\n".join(problems)
        )


# ------------------------------------ keras.distribution on TensorFlow
def _active_strategy():
    distribution = keras.distribution.distribution()
    if distribution is None:
        return None
    return strategy_from_keras(distribution)


def distribute_tensor(tensor, layout):
    """Keras's backend ``distribute_tensor`` for TensorFlow: lay ``tensor``
    (or each tensor of a structure) out as ``layout`` on the active
    distribution's mesh. Inside a traced step this is a DTensor relayout;
    an eager plain value is split on the host."""
    strategy = _strategy.current_strategy()
    if strategy is None:
        strategy = strategy_from_keras(
            layout.device_mesh if getattr(layout, "device_mesh", None) is not None
            else keras.distribution.distribution()
        )

    wanted = _spec_of(layout, "distribute_tensor")
    name = f"distribute_tensor(layout={wanted!r})"

    def one(x):
        if isinstance(x, keras.KerasTensor) or not isinstance(x, (tf.Tensor, np.ndarray)):
            return x
        shape = tuple(x.shape)
        spec = strategy.activation_spec(wanted, shape, name=name)
        if tf.executing_eagerly() and not _dtensor.is_dtensor(x):
            spec = tuple(strategy.batch_spec(shape)[0] if s == KEEP else s for s in spec)
        return strategy.place(x, spec)

    return tree.map_structure(one, tensor)


def distribute_variable(value, layout):
    """Keras's backend ``distribute_variable``: a value laid out as ``layout``."""
    return distribute_tensor(value, layout)


def distribute_data_input(per_process_batch, layout, batch_dim_name):
    """Keras's backend ``distribute_data_input`` (single process): the
    batch laid out as ``layout``."""
    return distribute_tensor(per_process_batch, layout)


def get_device_count(device_type=None):
    return len(keras.distribution.list_devices(device_type))


def num_processes():
    return _dtensor.num_clients()


def process_id():
    return _dtensor.client_id()


def initialize(job_addresses=None, num_processes=None, process_id=None):
    """Keras's backend ``initialize``: a no-op for one process. Several
    processes are started through tfshard's own multi-client set-up."""
    if num_processes not in (None, 1):
        raise UnsupportedFeatureError(
            "keras.distribution.initialize(num_processes="
            f"{num_processes}) is not supported on TensorFlow: start the processes with "
            "tfshard's multi-client set-up instead (tfshard.initialize_multi_client() "
            "or `tfshard launch`), then use keras.distribution as usual."
        )


def _to_backend_mesh(device_mesh):
    return mesh_from_keras(device_mesh)._dtensor_mesh


_enabled = False


def _distribution_backend_patches():
    """What tfshard supplies to Keras's TensorFlow distribution backend."""
    served = "keras.distribution on TensorFlow, through tfshard"
    return _keras.distribution_backend_patches(dict(
        distribute_tensor=(distribute_tensor, "'<layer>/output' layouts lay out activations"),
        distribute_variable=(distribute_variable, served),
        distribute_data_input=(distribute_data_input, served),
        get_device_count=(get_device_count, served),
        num_processes=(num_processes, served),
        process_id=(process_id, served),
        initialize=(initialize, served),
        _to_backend_mesh=(_to_backend_mesh, "DeviceMesh.backend_mesh is a DTensor mesh"),
    ))


def enable_keras_distribution(enabled=True):
    """Make ``keras.distribution`` work on the TensorFlow backend (on by
    default once tfshard is imported).

    While a distribution is active (``keras.distribution.set_distribution``
    or ``distribution.scope()``) and no ``Strategy.scope()`` is, models are
    created, sharded and trained as under the strategy converted from it
    (:func:`strategy_from_keras`). Keras's backend calls are served too:
    ``distribute_tensor`` (``"<layer>/output"`` layouts), ``num_processes``,
    ``process_id``, ``get_device_count`` and ``DeviceMesh.backend_mesh``.
    ``enable_keras_distribution(False)`` restores Keras's own (inert)
    behaviour.
    """
    global _enabled
    if enabled:
        _strategy.set_keras_distribution_resolver(_active_strategy)
        _keras.install(_distribution_backend_patches())
    else:
        _strategy.set_keras_distribution_resolver(None)
        _keras.uninstall(_distribution_backend_patches())
    _enabled = bool(enabled)


def keras_distribution_enabled():
    return _enabled
