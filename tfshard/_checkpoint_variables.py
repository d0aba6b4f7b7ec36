"""The variables a checkpoint holds: every variable of a model and of its
optimizer, keyed by its path in the object graph (as ``tf.train.Checkpoint``
matches them, so auto-generated layer names do not matter), and running a
save or restore on the model's mesh (used by :mod:`tfshard.checkpoint`).
"""

from __future__ import annotations

import collections
import contextlib

import keras
import tensorflow as tf

from tfshard import _dtensor
from tfshard.errors import CheckpointError
from tfshard._scope import current_strategy
from tfshard.tensors import spec_of


class Entry:
    """One variable of a model or optimizer, keyed by its object-graph path."""

    __slots__ = ("key", "group", "variable", "path", "shape", "dtype", "spec")

    def __init__(self, key, group, variable):
        self.key = key
        self.group = group
        self.variable = variable
        self.path = getattr(variable, "path", None) or variable.name
        self.shape = [int(d) for d in variable.shape]
        self.dtype = tf.as_dtype(variable.dtype).name
        spec = spec_of(variable)
        self.spec = None if spec is None else list(spec)

    def to_json(self):
        return {
            "key": self.key,
            "group": self.group,
            "path": self.path,
            "shape": self.shape,
            "dtype": self.dtype,
            "spec": self.spec,
        }


def _is_variable(obj):
    return isinstance(obj, (keras.Variable, tf.Variable))


def _name_order(name):
    # List positions in numeric order ("2" before "10"), then names.
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def _walk(root, prefix, group, skip_ids):
    """Every variable reachable from ``root`` through checkpoint
    dependencies, breadth first (shortest path wins, ties by name), keyed by
    the path of dependency names from ``root``. Objects in ``skip_ids`` are
    neither visited nor recorded."""
    entries = []
    recorded = set()
    visited = {id(root)}
    queue = collections.deque([(root, prefix)])
    while queue:
        obj, path = queue.popleft()
        children = tf.train.TrackableView.children(obj)
        for name in sorted(children, key=_name_order):
            child = children[name]
            if id(child) in skip_ids:
                continue
            child_path = f"{path}/{name}"
            if _is_variable(child):
                if id(child) not in recorded:
                    recorded.add(id(child))
                    entries.append(Entry(child_path, group, child))
                continue
            if id(child) not in visited:
                visited.add(id(child))
                queue.append((child, child_path))
    return entries


def optimizer_of(model):
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or not isinstance(optimizer, tf.__internal__.tracking.Trackable):
        return None
    return optimizer


def model_entries(model):
    optimizer = optimizer_of(model)
    skip = {id(optimizer)} if optimizer is not None else set()
    return _walk(model, "model", "model", skip)


def optimizer_entries(model, model_entries):
    optimizer = optimizer_of(model)
    if optimizer is None:
        return []
    skip = {id(e.variable) for e in model_entries}
    return _walk(optimizer, "optimizer", "optimizer", skip)


def scope_of(strategy):
    if strategy is None or current_strategy() is strategy:
        return contextlib.nullcontext()
    return strategy.scope()


def build_optimizer(model, strategy):
    """Create the optimizer's slots (inside the model's strategy, so they
    take their parameters' layouts) if it has none yet."""
    optimizer = optimizer_of(model)
    if optimizer is not None and not getattr(optimizer, "built", True):
        with scope_of(strategy):
            optimizer.build(model.trainable_variables)


def check_model(model, action):
    if not isinstance(model, keras.layers.Layer):
        raise CheckpointError(
            f"{action}: expected a Keras model, got {type(model).__name__}."
        )
    if not model.weights:
        raise CheckpointError(
            f"{action}: model {model.name!r} has no variables yet. Build it "
            "first (give it a keras.Input, call model.build(shape), or call "
            "it on a batch), inside strategy.scope() for a sharded model."
        )


def settle(strategy):
    """Wait for the asynchronous ops a save or restore started; clear the
    error state a failed one leaves (so the next op, fit or save works).
    Returns the error a pending op failed with, or None."""
    if strategy is None:
        from tensorflow.python.eager import context

        context.context().clear_executor_errors()
        return None
    return _dtensor.settle(strategy.mesh._dtensor_mesh)
