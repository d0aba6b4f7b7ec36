"""Ops whose TensorFlow gradient or output layout is not SPMD-safe, made so
with elementwise formulations (exact, any layout):

* **top_k**: TopKV2's gradient builds flat indices from the global shape and
  scatters them into a local shard; here it compares the indices with the
  positions.
* **one_hot**: OneHot cannot expand an output split on a dimension it
  inherits; here it is a comparison with the class ids.
* **segment_sum**: the segment reductions' gradients fail to expand under
  any layout; here the inputs are whole and the gradient is a gather of the
  upstream gradient by segment id.
* **clip**: TensorFlow's gradient of ``clip_by_value`` (Minimum/Maximum:
  ``where(mask, dy, 0)``) reaches the gradient of a strided slice with a
  step (GPT-OSS's ``gate_up[..., ::2]`` of an expert-split einsum output)
  with the split dimension whole while DTensor expects it split (``shape of
  dy was [4,...] instead of [1,...]``); here the mask multiplies ``dy``."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tfshard._ops._common import on_mesh, whole

def top_k(original, x, k, sorted=True):
    """``keras.ops.top_k`` with a gradient that works under any layout:
    d x[..., j] = sum_k d values[..., k] * [indices[..., k] == j]."""
    if on_mesh(x) is None:
        return original(x, k, sorted=sorted)
    x = tf.convert_to_tensor(x)
    if not x.dtype.is_floating:
        return original(x, k, sorted=sorted)
    positions = tf.range(tf.shape(x)[-1])

    @tf.custom_gradient
    def top(x):
        values, indices = original(x, k, sorted=sorted)

        def grad(d_values, d_indices=None):
            # (..., k, n): 1 where the k-th pick is position n.
            hits = tf.cast(tf.equal(indices[..., None], positions), d_values.dtype)
            return tf.reduce_sum(hits * d_values[..., None], axis=-2)

        return (values, indices), grad

    values, indices = top(x)
    return values, indices


# ------------------------------------------------------------------ clip
def clip(original, x, x_min, x_max):
    """``keras.ops.clip`` with the gradient ``dy * [x_min <= x <= x_max]``
    (TensorFlow's, as a product: equal for finite ``dy``). Bounds that are
    tensors (possibly differentiated) keep the Keras original."""
    if on_mesh(x) is None or not all(_is_number(b) for b in (x_min, x_max)):
        return original(x, x_min, x_max)
    x = tf.convert_to_tensor(x)
    if not x.dtype.is_floating:
        return original(x, x_min, x_max)

    @tf.custom_gradient
    def clipped(x):
        def grad(dy):
            inside = tf.logical_and(x >= x_min, x <= x_max)
            return dy * tf.cast(inside, dy.dtype)

        return original(x, x_min, x_max), grad

    return clipped(x)


def _is_number(value):
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


# --------------------------------------------------------------- one_hot
def one_hot(original, x, num_classes, axis=-1, dtype=None, sparse=False):
    """``keras.ops.one_hot`` as an elementwise comparison with the class ids
    (equal to ``tf.one_hot``: negative or too large ids give zeros)."""
    if sparse or on_mesh(x) is None:
        return original(x, num_classes, axis=axis, dtype=dtype, sparse=sparse)
    x = tf.convert_to_tensor(x)
    if not x.dtype.is_integer:
        x = tf.cast(x, "int64")
    rank = x.shape.rank
    axis = axis + rank + 1 if axis < 0 else axis
    ids_shape = [1] * (rank + 1)
    ids_shape[axis] = num_classes
    ids = tf.reshape(tf.range(num_classes, dtype=x.dtype), ids_shape)
    hit = tf.equal(tf.expand_dims(x, axis), ids)
    return tf.cast(hit, dtype or "float32")


# ----------------------------------------------------------- segment_sum
def segment_sum(original, data, segment_ids, num_segments=None, sorted=False):
    """``keras.ops.segment_sum`` on a mesh: ``data`` and the ids whole, and
    d data[i] = d out[segment_ids[i]] (0 for ids outside the segments), a
    gather DTensor expands where TensorFlow's segment gradients do not.

    Sorted ids without ``num_segments`` give an output whose length depends
    on the values; DTensor cannot expand the gradients of its consumers
    (their broadcast shapes are not constants), so differentiating it is a
    clear error naming the fix."""
    strategy = on_mesh(data, segment_ids)
    if strategy is None or tf.executing_eagerly():
        return original(data, segment_ids, num_segments=num_segments, sorted=sorted)
    data, segment_ids = whole(strategy, data, False), whole(strategy, segment_ids, False)
    if segment_ids.shape.rank != 1 or not data.dtype.is_floating:
        return whole(strategy, original(data, segment_ids, num_segments=num_segments,
                                        sorted=sorted), False)

    @tf.custom_gradient
    def summed(data):
        out = original(data, segment_ids, num_segments=num_segments, sorted=sorted)

        def grad(upstream):
            if out.shape.rank and out.shape[0] is None:
                raise _segments_from_values_error()
            ids = tf.cast(segment_ids, "int32")
            inside = tf.logical_and(ids >= 0, ids < tf.shape(upstream)[0])
            picked = tf.gather(upstream, tf.where(inside, ids, tf.zeros_like(ids)))
            keep = tf.reshape(tf.cast(inside, upstream.dtype), [-1] + [1] * (data.shape.rank - 1))
            return picked * keep

        return out, grad

    return whole(strategy, summed(data), False)


def _segments_from_values_error():
    from tfshard.errors import UnsupportedFeatureError

    return UnsupportedFeatureError(
        "keras.ops.segment_sum(data, segment_ids, sorted=True) on a mesh: the number of "
        "segments comes from the values of segment_ids, so the output's length is unknown "
        "when the step is compiled and DTensor cannot expand the gradients of the ops that "
        "consume it. Pass the count: segment_sum(data, segment_ids, num_segments=N) "
        "(sorted=False; the TensorFlow backend takes num_segments only unsorted)."
    )
