"""Which strategy is active: the stack of ``Strategy.scope()`` blocks, the
strategy code is computing on, and the ``keras.distribution`` fallback.

The lowest layer of tfshard's own modules (it imports only TensorFlow), so
anything that asks "which strategy?" (layers, reports, ops, checkpoints) can
depend on it without depending on :mod:`tfshard.strategy`, which pushes
onto the stack. :mod:`tfshard.strategy` re-exports these names.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading

import tensorflow as tf

_local = threading.local()
_computing_on = contextvars.ContextVar("tfshard_computing_on", default=None)


def _stack():
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


def push(strategy):
    """Enter ``strategy.scope()`` (this thread's innermost strategy)."""
    _stack().append(strategy)


def pop():
    """Leave the innermost ``strategy.scope()``."""
    _stack().pop()


_keras_distribution_resolver = None


def set_keras_distribution_resolver(resolver):
    """Register ``resolver() -> Strategy | None``: the strategy for the
    active ``keras.distribution`` distribution, which
    :func:`current_strategy` falls back on outside every scope.
    ``tfshard.interop`` registers it; ``None`` clears it."""
    global _keras_distribution_resolver
    _keras_distribution_resolver = resolver


def current_strategy():
    """The innermost active strategy, or ``None`` outside every scope.

    Outside every ``Strategy.scope()``, an active ``keras.distribution``
    distribution (``set_distribution`` / ``distribution.scope()``) acts as
    the strategy converted from it (see ``tfshard.interop``)."""
    stack = _stack()
    if stack:
        return stack[-1]
    if _keras_distribution_resolver is not None:
        return _keras_distribution_resolver()
    return None


@contextlib.contextmanager
def computing_on(strategy):
    """Code run or traced in this block computes on ``strategy``'s mesh
    (set around every call of a layer created under a strategy)."""
    token = _computing_on.set(strategy)
    try:
        yield strategy
    finally:
        _computing_on.reset(token)


def _in_dataset_function():
    # tf.data traces its functions (map, filter, ...) into graphs named
    # "Dataset_<transformation>_<fn>"; they never run on a mesh, even when
    # traced inside a strategy scope (augmentation layers in an input
    # pipeline).
    graph = tf.compat.v1.get_default_graph()
    while graph is not None:
        if str(getattr(graph, "name", "") or "").startswith("Dataset_"):
            return True
        graph = getattr(graph, "outer_graph", None)
    return False


def mesh_computation():
    """The strategy whose mesh the code now being run or traced computes on,
    or None for plain computation: inside a sharded layer's call, a tfshard
    step function or an explicit ``strategy.scope()``, and never inside a
    tf.data function. (Eager code must also check that its inputs are on
    the mesh.)"""
    strategy = _computing_on.get()
    if strategy is None:
        stack = _stack()
        strategy = stack[-1] if stack else None
    if strategy is None or (not tf.executing_eagerly() and _in_dataset_function()):
        return None
    return strategy
