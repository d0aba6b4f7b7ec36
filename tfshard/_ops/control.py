"""Control flow and value-dependent shapes on a mesh: ``switch`` as a
where-chain, ``map`` unrolled, and ``nonzero``/``where(condition)`` a clear
error (DTensor cannot lay out a shape that depends on the values)."""

from __future__ import annotations

import tensorflow as tf
from keras import tree

from tfshard._ops._common import on_mesh

def switch(original, index, branches, *operands):
    """``keras.ops.switch`` on a mesh: every branch runs and ``where``
    keeps the chosen one's output (DTensor cannot expand a ``Case`` region;
    the selection is exact and the other branches get no gradient)."""
    if on_mesh(index, *operands) is None or tf.executing_eagerly():
        return original(index, branches, *operands)
    index = tf.clip_by_value(tf.cast(index, "int32"), 0, len(branches) - 1)
    outputs = [branch(*operands) for branch in branches]
    chosen = outputs[0]
    for i, out in enumerate(outputs[1:], start=1):
        chosen = tree.map_structure(
            lambda a, b, i=i: tf.where(tf.fill(tf.shape(b), tf.equal(index, i)), b, a), chosen, out
        )
    return chosen


def map_fn(original, f, xs):
    """``keras.ops.map`` on a mesh, for a static leading dimension: ``f``
    applied to each slice and the results stacked (DTensor cannot expand
    the TensorList ops of ``tf.map_fn``). A dynamic leading dimension keeps
    the original."""
    flat = tree.flatten(xs)
    if on_mesh(*flat) is None or tf.executing_eagerly():
        return original(f, xs)
    sizes = {tf.convert_to_tensor(x).shape[0] for x in flat}
    if len(sizes) != 1 or None in sizes:
        return original(f, xs)
    n = sizes.pop()
    parts = [tf.unstack(tf.convert_to_tensor(x), num=n) for x in flat]
    results = [f(tree.pack_sequence_as(xs, [p[i] for p in parts])) for i in range(n)]
    return tree.map_structure(lambda *ys: tf.stack(ys), *results)


def _value_dependent_shape_error(name):
    from tfshard.errors import UnsupportedFeatureError

    return UnsupportedFeatureError(
        f"keras.ops.{name} on a mesh: its output shape depends on the values (the "
        "positions of the nonzero entries), which DTensor cannot lay out across devices. "
        "Use keras.ops.where(condition, x, y) (the shape of its inputs), or compute it "
        "outside the sharded model (in the input pipeline, or on predict outputs)."
    )


def nonzero(original, x):
    if on_mesh(x) is None or tf.executing_eagerly():
        return original(x)
    raise _value_dependent_shape_error("nonzero(x)")


def where(original, condition, x1=None, x2=None):
    """``keras.ops.where`` on a mesh: ``where(condition)`` alone is a clear
    error (a value-dependent shape); a scalar condition is broadcast first
    (DTensor crashes on a scalar ``SelectV2`` condition)."""
    if on_mesh(condition, x1, x2) is None or tf.executing_eagerly():
        return original(condition, x1, x2)
    if x1 is None and x2 is None:
        raise _value_dependent_shape_error("where(condition)")
    condition = tf.convert_to_tensor(condition)
    if condition.shape.rank == 0:
        shape = tf.broadcast_dynamic_shape(tf.shape(tf.convert_to_tensor(x1)), tf.shape(tf.convert_to_tensor(x2)))
        condition = tf.fill(shape, tf.cast(condition, "bool"))
    return original(condition, x1, x2)
