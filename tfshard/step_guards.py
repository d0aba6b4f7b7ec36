"""What keeps a sharded step's numbers right and its failures clean.

Before a model's first step on a mesh (:func:`prepare`):

* every variable the step touches is put on the mesh, including metric
  objects and optimizers made outside ``strategy.scope()`` (keras-io's
  ``run_experiment`` pattern), and the traced step is checked for variables
  still off the mesh (:func:`check_captured_variables`): DTensor runs a step
  that writes a plain variable without complaint, each device writing its
  own partial value, so the numbers would silently differ from one device;
* metrics DTensor cannot run raise a clear error first
  (:func:`check_metrics`);
* every collective group of the mesh is made complete
  (:func:`tfshard._dtensor.complete_collective_groups`), so that a failed step cannot cancel
  one for good.

When a step fails (:func:`step_failures`), the devices are settled, the
root error (not a ``CancelledError``) is raised as a :class:`StepError`
naming the op and the cause, and the model's variables are rewritten so the
next step reads what eager reads see.
"""

from __future__ import annotations

import contextlib
import re

import keras
import numpy as np
import tensorflow as tf

from tfshard import _dtensor, _keras, multi_client
from tfshard.errors import StrategyError, TfshardError, UnsupportedFeatureError
from tfshard.strategy import VariableLayout


def _metric_unsupported_reason(metric):
    if isinstance(metric, keras.metrics.IoU):
        # Every IoU metric (IoU, BinaryIoU, MeanIoU, OneHotIoU,
        # OneHotMeanIoU) builds a confusion matrix with scatter_nd on int64
        # indices, which DTensor's ScatterNd expansion rejects ("input
        # shape[0] expected type int64 != int32"; pinned by a test).
        return "builds its confusion matrix with an op DTensor cannot run (ScatterNd on int64 indices)"
    return None


# ----------------------------------------------------------------- variables
def on_mesh_of(variable, strategy):
    """True if ``variable`` is a tfshard variable on ``strategy``'s mesh."""
    layout = _keras.variable_layout(variable)
    if not isinstance(layout, VariableLayout):
        return False
    return layout.strategy is strategy or layout.strategy.mesh == strategy.mesh


def step_variables(model):
    """Every Keras variable a step of ``model`` may touch (its weights, its
    optimizer's and its metrics'), by the id of the backend variable behind
    it."""
    found = list(model.variables) + list(getattr(model, "metrics_variables", []))
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None:
        found += list(optimizer.variables)
    return {id(_keras.backend_variable(v)): v for v in found}


def leaf_metrics(model):
    """The model's metric objects, compiled ones one by one."""
    out = []

    def walk(metric):
        inner = getattr(metric, "metrics", None)
        if isinstance(inner, (list, tuple)) and not isinstance(metric, keras.Model):
            for m in inner:
                walk(m)
        else:
            out.append(metric)

    for metric in getattr(model, "metrics", []):
        walk(metric)
    return out


def prepare(model, strategy, data, kind):
    """Create, and put on ``strategy``'s mesh, every variable a ``kind``
    step of ``model`` touches, before the step is traced.

    Compiled metrics and losses are built from one batch inside the scope, as
    Keras does under a tf.distribute strategy; otherwise Keras builds them
    while tracing the first step, and metric objects made outside the scope
    would stay off the mesh. The optimizer is built eagerly, not lazily in
    the first trace: DTensor reads a slot created during that trace as its
    initial value even after the step has written it. Variables Keras made
    outside the scope (optimizer iteration count and learning rate, metric
    totals) and metric or optimizer variables a model on another mesh used
    are moved onto this mesh, replicated. (Weights off the mesh were already
    refused by ``tfshard.training.strategy_of_model``.)
    """
    _dtensor.complete_collective_groups(strategy.mesh._dtensor_mesh)
    if kind in ("train", "test"):
        with strategy._ensure_scope():
            _keras.symbolic_build(model, data)
        check_metrics(model)
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and not optimizer.built:
        with strategy._ensure_scope():
            optimizer.build(model.trainable_variables)
    weights = {id(w) for w in model.weights}
    for variable in step_variables(model).values():
        if on_mesh_of(variable, strategy):
            continue
        if id(variable) in weights:  # laid out, but for another mesh
            raise StrategyError(
                f"Weight {variable.path!r} of model {model.name!r} lives on "
                f"another mesh than the model's strategy ({strategy.mesh!r}). "
                "Create every layer of the model under one strategy."
            )
        strategy.adopt_variable(variable)


def check_metrics(model):
    """Raise for compiled metrics DTensor cannot run, naming them."""
    for metric in leaf_metrics(model):
        reason = _metric_unsupported_reason(metric)
        if reason is not None:
            raise UnsupportedFeatureError(
                f"Metric {metric.name!r} ({type(metric).__name__}) of model "
                f"{model.name!r} cannot run on a mesh: it {reason}. Remove it "
                "from compile() for the sharded model and compute it on one "
                "device from model.predict(...) outputs (e.g. "
                f"keras.metrics.{type(metric).__name__}(...).update_state(y, "
                "model.predict(x)))."
            )


def check_captured_variables(model, strategy, kind, concrete):
    """Every variable the traced step (``concrete``) reads or writes must be
    on ``strategy``'s mesh. A metric or optimizer variable of the model is
    moved onto it and True returned (the caller retraces); any other is an
    error naming it."""
    known = step_variables(model)
    weights = {id(w) for w in model.weights}
    adopted, foreign = False, []
    for variable in concrete.graph.variables:
        kvar = known.get(id(variable))
        if kvar is None and _dtensor.is_dtensor(variable):
            continue  # on a mesh, not the model's: e.g. a SeedGenerator's state
        if kvar is not None and on_mesh_of(kvar, strategy):
            continue
        if kvar is not None and id(kvar) not in weights:
            strategy.adopt_variable(kvar)
            adopted = True
        else:
            foreign.append(kvar.path if kvar is not None else variable.name)
    if foreign:
        raise StrategyError(
            f"The {kind} step of model {model.name!r} reads or writes "
            f"variable(s) {foreign} that are not on the strategy's mesh "
            f"{strategy.mesh!r}: they were created outside strategy.scope() "
            "(or under another strategy) and are not the model's, its "
            "optimizer's or its metrics' variables. DTensor would give each "
            "device its own copy of them, silently changing the numbers. "
            "Create them inside `with strategy.scope():`, or track them on "
            "the model (a metric in the model's `metrics`)."
        )
    return adopted


def release_metrics(model):
    """Move the variables of metric objects compiled into the plain
    ``model`` off any mesh: the same objects may have served a sharded model
    before (metrics made once, then a sharded and a one-device run), and a
    plain step cannot run on mesh variables."""
    for metric in _keras.compiled_metric_objects(model):
        for variable in metric.variables:
            if isinstance(_keras.variable_layout(variable), VariableLayout):
                value = variable.numpy()
                with _dtensor.on_host():
                    plain = tf.Variable(
                        value, trainable=variable.trainable, name=variable.name,
                        dtype=_keras.variable_dtype(variable),
                    )
                _keras.replace_variable_value(variable, plain)
                _keras.set_variable_layout(variable, None)


def resync(kvar):
    """Rewrite a variable on a mesh in place from its own value, every copy
    of a shard taking the one on the first local device that holds it; True
    when the copies disagreed (NaNs compare equal).

    After a failed step, a variable the step wrote on some devices can read,
    inside the next function, other values than eager reads return (seen
    with TF 2.21: the optimizer's iteration count then differed between
    devices in the next step). An eager write of the value puts it right.
    """
    variable = _keras.backend_variable(kvar)
    if variable is None or not _dtensor.is_dtensor(variable):
        return False
    layout = _dtensor.layout_of(variable)
    sharded = [axis for axis in _dtensor.spec_of_layout(layout) if axis is not None]
    first, parts, diverged = {}, [], False
    for part, location in zip(_dtensor.unpack(variable), layout.mesh.local_device_locations()):
        shard = tuple(location[axis] for axis in sharded)
        if shard in first:
            diverged = diverged or not np.array_equal(
                first[shard].numpy(), part.numpy(), equal_nan=True
            )
            part = first[shard]
        else:
            first[shard] = part
        parts.append(part)
    variable.assign(_dtensor.pack(parts, layout))
    return diverged


# ------------------------------------------------------------------ failures
_COLLECTIVE_FAILURES = (
    tf.errors.UnavailableError, tf.errors.AbortedError,
    tf.errors.DeadlineExceededError, tf.errors.CancelledError,
)


@contextlib.contextmanager
def step_failures(model, strategy, kind):
    """A step that fails on the mesh raises its root error as a
    :class:`StepError` and leaves the devices ready for the next op.

    DTensor runs steps asynchronously: the failing device cancels the
    others, the caller often gets only a ``CancelledError``, and the root
    error stays queued until some later op (even a plain Keras one) reports
    it. The devices are settled at once (:func:`tfshard._dtensor.settle`),
    and the model's variables rewritten in place (:func:`resync`). In a
    multi-client job, a step whose collectives fail because another process
    is gone raises ``ProcessLostError`` instead.
    """
    try:
        yield
    except tf.errors.OutOfRangeError:
        raise  # the end of a tf.data input: Keras ends the epoch
    except tf.errors.OpError as err:
        if multi_client.is_multi_client() and isinstance(err, _COLLECTIVE_FAILURES):
            raise multi_client.process_lost_error("A step's collectives", err) from err
        root, diverged = err, []
        try:  # recovery must never hide the root error
            queued = _dtensor.settle(strategy.mesh._dtensor_mesh)
            if queued is not None and isinstance(err, tf.errors.CancelledError):
                root = queued
            diverged = [v.path for v in step_variables(model).values() if resync(v)]
        except Exception:  # noqa: BLE001
            pass
        raise step_error(model, strategy, kind, root, diverged) from root


_STEP_ERROR_CLASSES = {}


def _step_error_class(tf_class, tfshard_class):
    """``StepError``: a subclass of both the root error's TensorFlow class
    (``except tf.errors.InvalidArgumentError`` works as with plain Keras)
    and a tfshard error class."""
    key = (tf_class, tfshard_class)
    if key not in _STEP_ERROR_CLASSES:
        _STEP_ERROR_CLASSES[key] = type(
            "StepError",
            (tf_class, tfshard_class),
            {"__module__": __name__, "__doc__": "A step failed on the mesh."},
        )
    return _STEP_ERROR_CLASSES[key]


def is_step_error(err):
    return type(err) in _STEP_ERROR_CLASSES.values()


_NODE = re.compile(r"\{\{node ([^}]+)\}\}")
_OP = re.compile(r"'tf\.(\w+)' op")
_NOISE = re.compile(
    r"\{\{function_node [^}]*\}\}\s*|^\s*\(\d+\) [A-Z_]+:\s*|^\S+:\d+:\d+: error: "
)
_SKIP = re.compile(r"^(\[\[|Encountered when executing|\d+ (root error|successful|derived))")


def _root_summary(err):
    """The first line of ``err``'s own message, and the graph node (or, for
    a DTensor compile error, the op) it names."""
    nodes = _NODE.findall(err.message)
    ops = _OP.findall(err.message)
    where = None
    if nodes:
        where = f"node {nodes[0].split('StatefulPartitionedCall/')[-1]!r}"
    elif ops:
        where = f"op {ops[0]!r}"
    for line in err.message.splitlines():
        line = _NOISE.sub("", line).strip()
        if line and not _SKIP.match(line):
            return line, where
    return type(err).__name__, where


# Root-error texts tfshard can name a cause and a fix for:
# (text, tfshard error class, hint).
_KNOWN_CAUSES = (
    (
        "does not implement layout propagation",
        UnsupportedFeatureError,
        "DTensor has no layout rule for this op, so it cannot run in a sharded "
        "step. Replace the op, or compute the layer or metric that uses it "
        "outside fit.",
    ),
    ("had NaN values", TfshardError, "A NaN reached a numerics check: check the batch and the learning rate."),
    ("had Inf values", TfshardError, "An Inf reached a numerics check: check the batch and the learning rate."),
    (
        "tfshard_label_range_check",  # tfshard.losses.LABEL_CHECK
        TfshardError,
        "A label of the sparse categorical cross-entropy is not a class id below the number of "
        "logits (the step's lookup of the labels failed on it): check the batch's labels, or "
        "pass ignore_class for a padding id.",
    ),
    ("outside the valid range", TfshardError, "A label or index is out of range: check the batch."),
)


def step_error(model, strategy, kind, root, diverged=()):
    """The :class:`StepError` for a ``kind`` step of ``model`` that failed
    with TensorFlow error ``root``; ``diverged`` names variables whose
    copies the failure left different on different devices."""
    summary, where = _root_summary(root)
    tfshard_class, hint = TfshardError, ""
    for text, error_class, fix in _KNOWN_CAUSES:
        if text in root.message:
            tfshard_class, hint = error_class, " " + fix
            break
    at = f" at {where}" if where else ""
    message = (
        f"The {kind} step of model {model.name!r} failed on mesh "
        f"{strategy.mesh!r}{at}: {type(root).__name__}: {summary.rstrip('.')}.{hint} "
        "tfshard has cleared the failure from the devices: the process, the "
        "strategy and the model remain usable (as in plain Keras, a failed "
        "step may have advanced some state, e.g. the optimizer's iteration "
        "count)."
    )
    if diverged:
        message += (
            f" The failure left different copies of {diverged} on different "
            "devices; each device now holds the copy of the first device of its "
            "shard. Restore them from a checkpoint if that is not the copy to keep."
        )
    error_class = _step_error_class(type(root), tfshard_class)
    extra = (root.error_code,) if type(root) is tf.errors.OpError else ()
    return error_class(None, None, message, *extra)
