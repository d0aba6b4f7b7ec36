"""Sharded values: what a variable's layout records, inspecting sharded
values (their spec, per-device shape and global value), and the masked local
lookup on a table split by rows.

Below :mod:`tfshard.strategy`: it imports only the DTensor and Keras
boundaries, so strategies and layers can both use it.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from keras import ops

from tfshard import _dtensor, _keras


class VariableLayout:
    """What tfshard stores in a Keras variable's ``_layout``.

    Keras optimizers copy a reference variable's ``_layout`` into the slots
    they create for it, which is how slots get their parameter's layout.
    """

    __slots__ = ("strategy", "spec")

    def __init__(self, strategy, spec):
        self.strategy = strategy
        self.spec = tuple(spec)

    @property
    def axes(self):  # the attribute keras.distribution.TensorLayout exposes
        return self.spec

    def __repr__(self):
        return f"VariableLayout({self.spec!r})"


def spec_of(x):
    """The spec (tuple of mesh-axis names or None) of a sharded variable or
    tensor; ``None`` for a value that is not on a mesh."""
    layout = _keras.variable_layout(x)
    if isinstance(layout, VariableLayout):
        return layout.spec
    if _dtensor.is_dtensor(x):
        return _dtensor.spec_of_layout(_dtensor.layout_of(x))
    return None


layout_of = spec_of  # its former name (it returns a spec, not a DTensor layout)


def local_shape(x):
    """The shape of the shard each device holds (the global shape for a
    value that is not on a mesh)."""
    if _dtensor.is_dtensor(x):
        return _dtensor.local_shape(_dtensor.layout_of(x), tuple(x.shape))
    return tuple(int(d) for d in x.shape)


def to_numpy(x):
    """The global value of a sharded tensor or variable, as numpy.

    Plain tensors, variables and arrays are accepted too."""
    if _dtensor.is_dtensor(x):
        return _dtensor.to_numpy(x)
    if hasattr(x, "numpy"):
        return np.asarray(x.numpy())
    return np.asarray(x)


def _numpy_dtype(v):
    return tf.as_dtype(_keras.variable_dtype(v)).as_numpy_dtype


def masked_local_lookup(strategy, slabs, ids, axis, size, rows):
    """Megatron's vocabulary-parallel lookup in DTensor's global view (see
    :mod:`tfshard.layers.embedding`): ``slabs`` is a ``(V, D)`` table viewed
    as ``(size, rows, D)`` and split on dim 0 over mesh ``axis`` (``size``
    devices), ``ids`` any shape. Returns ``(ids..., D)`` after one
    all-reduce over ``axis``; ``strategy`` places the helper tensors.

    The gradient is written by hand: TensorFlow's gradient of a gather along
    axis 1 scatters into a whole ``(tp, V/tp, D)`` tensor on every device (a
    full-table gradient, all-reduced over the data axis at full size). Here
    each device scatter-adds only into its own slab.
    """
    dims = "abcefghijklmnopqrtuvwxyz"[: len(ids.shape)]
    shard = ops.floor_divide(ids, rows)
    local = ops.mod(ids, rows)
    # (ids..., tp): 1 on the owner of each id, 0 elsewhere, split on tp like
    # the slabs: compare with the slab ids each device holds (no gather).
    # (Not ops.one_hot: DTensor cannot expand OneHot split on its depth.)
    eager = tf.executing_eagerly()
    slab_ids = np.arange(size, dtype="int32") if eager else tf.range(size, dtype="int32")
    slab_ids = strategy.place(slab_ids, (axis,))
    owner = ops.cast(
        ops.equal(ops.expand_dims(ops.cast(shard, "int32"), -1), slab_ids), slabs.dtype
    )

    @tf.custom_gradient
    def lookup(slabs):
        # (tp, ids..., D): every device looks every id up in its own slab.
        looked_up = ops.take(slabs, local, axis=1)
        # Keep each id's row on its owner only; contracting the split dim
        # gives partial sums that DTensor all-reduces (the one collective).
        out = ops.einsum(f"s{dims}d,{dims}s->{dims}d", looked_up, owner)

        def grad(upstream):
            # Each device's share of the upstream gradient: (tp, ids..., D),
            # zero for the ids it does not own. No communication.
            mine = ops.einsum(f"{dims}d,{dims}s->s{dims}d", upstream, owner)
            mine = ops.reshape(mine, (size, -1, slabs.shape[-1]))
            mine = ops.transpose(mine, (1, 0, 2))  # (n_ids, tp, D)
            # Scatter-add into rows; the slab dim stays split (and partial
            # sums over a split batch are all-reduced over the data axis).
            table_grad = tf.math.unsorted_segment_sum(mine, ops.reshape(local, (-1,)), rows)
            table_grad = ops.transpose(table_grad, (1, 0, 2))
            return strategy.place(table_grad, (axis, None, None))

        return out, grad

    return lookup(slabs)
