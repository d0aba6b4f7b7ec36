"""The DVariable tfshard creates: :class:`LaidOutVariable`.

A DVariable that conforms eager writes to its layout and, inside a traced
function, reads its resource once and passes later reads and writes through
plain data flow (DTensor does not honour the control edges that order them).
:func:`fresh_variable_reads` opts a recomputation out of that cache.
"""

from __future__ import annotations

import contextlib
import contextvars

import tensorflow as tf
from tensorflow.experimental import dtensor
from tensorflow.python.ops import gen_resource_variable_ops

from tfshard._dtensor.layouts import conform

_FRESH_READS = contextvars.ContextVar("tfshard_fresh_variable_reads", default=False)


@contextlib.contextmanager
def fresh_variable_reads():
    """Within this block, reads of :class:`LaidOutVariable` inside a traced
    function are new ``ReadVariableOp``s, outside its once-per-function cache:
    a recomputation in the backward pass (``tf.recompute_grad``) must read the
    variables under its own ``GradientTape`` to get their gradients. Safe
    there: nothing writes a parameter between the forward and the backward
    pass of a step."""
    token = _FRESH_READS.set(True)
    try:
        yield
    finally:
        _FRESH_READS.reset(token)


class LaidOutVariable(dtensor.DVariable):
    """A DVariable that is safe to write and read back inside one function.

    Two DTensor behaviours shape it:

    * Eager writes of host values or differently laid-out DTensors must be
      conformed to the variable's layout first (``pack`` or ``relayout``).
    * Inside a ``tf.function`` run by DTensor, a ``ReadVariableOp`` that
      follows a write of the same variable can return the value from
      *before* the write: the control edges that order them are not
      honoured (seen with TF 2.21 in Adam/RMSprop slot updates and metric
      ``result()`` after ``update_state``), and a read can also see a later
      write. So within a traced function the variable is read from its
      resource once; every later read, in that graph or a nested branch,
      returns that value or the last value written, through plain data
      flow. ``assign_add``/``assign_sub`` become ``assign(value + delta)``
      and chain through the same values. The one read happens where the
      function first touches the variable, so a ``GradientTape`` that is
      active then sees it (in Keras's ``train_step`` that is the forward
      pass).
    """

    def _cache(self):
        if not hasattr(self, "_tfshard_values"):
            self._tfshard_values = {}
        return self._tfshard_values

    def _cached(self, graph):
        """The value this function last read or wrote, looking outwards
        through enclosing graphs (a cond branch sees its caller's value)."""
        cache = self._cache()
        while graph is not None:
            entry = cache.get(id(graph))
            if entry is not None and entry[0] is graph:
                return entry[1]
            graph = getattr(graph, "outer_graph", None)
        return None

    def _remember(self, graph, value, dirty_outer=False):
        cache = self._cache()
        cache[id(graph)] = (graph, value)
        if dirty_outer:
            # A write inside a branch: callers must read the resource again.
            outer = getattr(graph, "outer_graph", None)
            while outer is not None:
                cache.pop(id(outer), None)
                outer = getattr(outer, "outer_graph", None)

    def _read_variable_op(self, no_copy=False):
        if tf.executing_eagerly() or _FRESH_READS.get():
            return super()._read_variable_op(no_copy=no_copy)
        graph = tf.compat.v1.get_default_graph()
        value = self._cached(graph)
        if value is None:
            value = super()._read_variable_op(no_copy=no_copy)
            self._remember(graph, value)
        return value

    def _write(self, value, name, read_value):
        value = tf.convert_to_tensor(value, dtype=self.dtype)
        op = gen_resource_variable_ops.assign_variable_op(self.handle, value, name=name)
        self._remember(tf.compat.v1.get_default_graph(), value, dirty_outer=True)
        return value if read_value else op

    def assign(self, value, use_locking=None, name=None, read_value=True):
        if tf.executing_eagerly():
            return super().assign(conform(value, self.layout, self.dtype), use_locking, name, read_value)
        return self._write(value, name, read_value)

    def assign_add(self, delta, use_locking=None, name=None, read_value=True):
        if tf.executing_eagerly():
            return super().assign_add(conform(delta, self.layout, self.dtype), use_locking, name, read_value)
        return self._write(self._read_variable_op() + delta, name, read_value)

    def assign_sub(self, delta, use_locking=None, name=None, read_value=True):
        if tf.executing_eagerly():
            return super().assign_sub(conform(delta, self.layout, self.dtype), use_locking, name, read_value)
        return self._write(self._read_variable_op() - delta, name, read_value)

    def _dense_update(self, sparse_delta):
        rows = tf.shape(self._read_variable_op())[0]
        return tf.math.unsorted_segment_sum(sparse_delta.values, sparse_delta.indices, rows)

    def scatter_add(self, sparse_delta, use_locking=False, name=None):
        if tf.executing_eagerly():
            return super().scatter_add(sparse_delta, use_locking, name)
        return self.assign_add(self._dense_update(sparse_delta), name=name)

    def scatter_sub(self, sparse_delta, use_locking=False, name=None):
        if tf.executing_eagerly():
            return super().scatter_sub(sparse_delta, use_locking, name)
        return self.assign_sub(self._dense_update(sparse_delta), name=name)


def make_variable(initial_value, *, trainable, name, dtype=None):
    return LaidOutVariable(initial_value, trainable=trainable, name=name, dtype=dtype)
