"""SPMD-safe replacements for the Keras backend ops DTensor expands wrongly.

Each function here replaces one Keras TensorFlow-backend function (see
``tfshard._keras.BACKEND_OPS``) while the code being run or traced computes
on a mesh (:func:`tfshard.strategy.mesh_computation`); everywhere else it
calls the Keras original unchanged. They were found by the op-coverage
sweep (``python -m tfshard.app.opsweep``) and by running keras-io and
keras-hub models unchanged:

* **random draws** (``keras.random.*``, ``Dropout`` and every layer built on
  them): DTensor's random expander draws a local op with the seed mixed with
  each device's mesh coordinates, so a split layout draws other numbers than
  one device. Here every draw is made at its global shape on a replicated
  layout (DTensor then mixes nothing in: each device computes the same,
  whole draw) and each device keeps its slice of it, so the numbers are one
  device's. Cost: each device computes the whole draw (``random_streams=
  "per_device"`` on the strategy opts out).
* **top_k**: TopKV2's gradient builds flat indices from the global shape and
  scatters them into a local shard. Here the gradient compares the indices
  with the positions instead (elementwise, any layout).
* **one_hot**: OneHot cannot expand an output split on a dimension it
  inherits. Here it is an elementwise comparison with the class ids.
* **max_pool / average_pool**: DTensor expands pooling only for a replicated
  or batch-split input, yet pooling is independent per channel. Here it is a
  running max (sum) of the strided views of the window offsets, elementwise
  ops that keep any batch and channel split: no communication.
"""

from __future__ import annotations

import functools
import itertools
import math

import keras
import numpy as np
import tensorflow as tf
from keras import tree

from tfshard import _dtensor, _keras
from tfshard.strategy import mesh_computation


def _on_mesh(*tensors):
    """The strategy an op on ``tensors`` runs under, or None for a plain op.

    Traced code decides by context; eager code only for DTensor inputs."""
    strategy = mesh_computation()
    if strategy is None:
        return None
    if tf.executing_eagerly() and not any(_dtensor.is_dtensor(t) for t in tensors):
        return None
    return strategy


def _is_tensor(x):
    return isinstance(x, (tf.Tensor, tf.Variable, keras.Variable)) and not isinstance(
        x, keras.KerasTensor
    )


def _replicated(strategy, x):
    """``x`` whole on every device (an all-gather of whatever is split)."""
    if not _is_tensor(x) or isinstance(x, tf.SparseTensor):
        return x
    x = tf.convert_to_tensor(x)
    return strategy.place(x, (None,) * x.shape.rank)


# ---------------------------------------------------------------- random
def _draws_globally(strategy):
    return strategy.random_streams == "global"


def random_draw(original, *args, **kwargs):
    """``normal``, ``uniform``, ``truncated_normal``, ``randint``,
    ``categorical``, ``shuffle``, ``gamma``, ``binomial``, ``beta``: tensor
    arguments (logits, the array to shuffle, distribution parameters) are
    made whole, the draw is pinned to a replicated layout, and consumers
    take their slices of it (a local slice, no communication)."""
    strategy = _on_mesh(*tree.flatten((args, kwargs)))
    if strategy is None or tf.executing_eagerly() or not _draws_globally(strategy):
        return original(*args, **kwargs)
    args, kwargs = tree.map_structure(functools.partial(_replicated, strategy), (args, kwargs))
    return tree.map_structure(functools.partial(_replicated, strategy), original(*args, **kwargs))


def dropout(original, inputs, rate, noise_shape=None, seed=None):
    """``keras.random.dropout``: the keep mask is one device's mask.

    The mask (``1 / (1 - rate)`` where kept, 0 elsewhere) is Keras's own
    dropout of a ones tensor of the noise shape, drawn replicated, then laid
    out like ``inputs`` (a local slice) before it scales them, so only the
    local slice lives on until the backward pass. ``inputs * mask`` equals
    Keras's ``where(keep, inputs / (1 - rate), 0)`` exactly."""
    strategy = _on_mesh(inputs)
    if (
        strategy is None
        or tf.executing_eagerly()
        or not _draws_globally(strategy)
        or isinstance(rate, (tf.Tensor, tf.Variable))
        or rate in (0.0, 1.0)
    ):
        return original(inputs, rate, noise_shape=noise_shape, seed=seed)
    inputs = tf.convert_to_tensor(inputs)
    if noise_shape is None:
        shape = tf.shape(inputs)
    else:
        dynamic = tf.shape(inputs)
        shape = [dynamic[i] if size is None else size for i, size in enumerate(noise_shape)]
    ones = tf.ones(shape, dtype=inputs.dtype)
    mask = _replicated(strategy, original(ones, rate, noise_shape=None, seed=seed))
    if noise_shape is None or all(
        size is None or size == dim for size, dim in zip(noise_shape, inputs.shape)
    ):
        mask = _dtensor.relayout_like(mask, inputs)
    return inputs * mask


# ----------------------------------------------------------------- top_k
def top_k(original, x, k, sorted=True):
    """``keras.ops.top_k`` with a gradient that works under any layout:
    d x[..., j] = sum_k d values[..., k] * [indices[..., k] == j]."""
    if _on_mesh(x) is None:
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


# --------------------------------------------------------------- one_hot
def one_hot(original, x, num_classes, axis=-1, dtype=None, sparse=False):
    """``keras.ops.one_hot`` as an elementwise comparison with the class ids
    (equal to ``tf.one_hot``: negative or too large ids give zeros)."""
    if sparse or _on_mesh(x) is None:
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


# ------------------------------------------------------------ cross-entropy
def sparse_categorical_crossentropy(original, target, output, from_logits=False, axis=-1):
    """``keras.ops.sparse_categorical_crossentropy`` on logits, on a mesh
    that can split the classes: Megatron's vocab-parallel formula
    (:func:`tfshard.losses.vocab_parallel_sparse_categorical_crossentropy`),
    equal to TensorFlow's. DTensor's expander of the fused
    ``SparseSoftmaxCrossEntropyWithLogits`` needs whole classes, so logits
    split by vocabulary were all-gathered and every device computed the loss
    of its whole batch shard (profiled on keras-hub Llama, 2x4: 40% of a
    device's op time). Here the logits stay split: three all-reduces of
    per-token values."""
    strategy = _on_mesh(output)
    if (
        strategy is None
        or tf.executing_eagerly()
        or not from_logits
        or not _channel_split_possible(strategy)
        or not _is_tensor(output)
    ):
        return original(target, output, from_logits=from_logits, axis=axis)
    logits = tf.convert_to_tensor(output)
    labels = tf.convert_to_tensor(target)
    rank = logits.shape.rank
    if len(labels.shape) == rank and labels.shape[-1] == 1:
        labels = tf.squeeze(labels, axis=-1)
    if (
        rank is None
        or axis not in (-1, rank - 1)
        or not logits.dtype.is_floating
        or not (labels.dtype.is_integer or labels.dtype.is_floating)  # Keras casts labels to floats
        or len(labels.shape) != rank - 1
    ):
        return original(target, output, from_logits=from_logits, axis=axis)
    from tfshard.losses import vocab_parallel_sparse_categorical_crossentropy

    return vocab_parallel_sparse_categorical_crossentropy(labels, logits)


# --------------------------------------------------------------- pooling
def _as_tuple(value, rank):
    if isinstance(value, int):
        return (value,) * rank
    value = tuple(int(v) for v in value)
    return value * rank if len(value) == 1 else value


def _window_plan(size, pool, stride, padding):
    """Output length, padding before and after, and per-output counts of
    real (not padded) elements, as TensorFlow's pooling defines them."""
    if padding == "valid":
        out = (size - pool) // stride + 1
        before = after = 0
    else:
        out = -(-size // stride)
        total = max((out - 1) * stride + pool - size, 0)
        before, after = total // 2, total - total // 2
    starts = np.arange(out) * stride - before
    counts = np.minimum(starts + pool, size) - np.maximum(starts, 0)
    return out, before, after, counts


def _window_views(x, pool, stride, plans, *, fill):
    """The strided view of padded ``x`` (channels last) for each window
    offset, in row-major order of the offsets (a running maximum then
    gives ties to the first offset, as MaxPoolGrad does).

    Built from Slice and Reshape only, whose gradients (Pad, Reshape) DTensor
    expands under any batch or channel split (StridedSliceGrad's expander
    does not reconcile the gradient's layout): the view at offset ``o`` of a
    dim is ``x[o : o + out * s]`` seen as ``(out, s)``, of which column 0 is
    kept."""
    # Pad for the window padding, then to the length every offset's
    # (out * s)-long slice needs; the tail is never kept.
    pads = []
    for n, k, s, (out, before, after, _) in zip(x.shape[1:-1], pool, stride, plans):
        need = (k - 1) + out * s
        pads.append((before, max(after, need - n - before)))
    if any(before or after for before, after in pads):
        x = tf.pad(x, [(0, 0), *pads, (0, 0)], constant_values=fill)
    outs = [plan[0] for plan in plans]
    channels = x.shape[-1]
    views = []
    for offsets in itertools.product(*(range(k) for k in pool)):
        size = [-1] + [out * s for out, s in zip(outs, stride)] + [-1]
        view = tf.slice(x, [0, *offsets, 0], size)
        # One dim at a time (TensorFlow pads tensors of rank <= 6 only).
        for dim, (out, s) in enumerate(zip(outs, stride)):
            if s == 1:
                continue
            shape = [-1, *outs[:dim], out, s, *size[dim + 2:-1], channels]
            view = tf.reshape(view, shape)
            begin, keep = [0] * len(shape), [-1] * len(shape)
            keep[dim + 2] = 1
            view = tf.reshape(tf.slice(view, begin, keep), [-1, *outs[: dim + 1], *size[dim + 2:-1], channels])
        views.append(view)
    return views


def _channel_split_possible(strategy):
    """A mesh with devices beyond the data axis can split a channel dim."""
    return strategy.mesh.size > strategy.data_parallel_size


def _pool(original, inputs, pool_size, strides, padding, data_format, *, reduce):
    strategy = _on_mesh(inputs)
    if strategy is None or not _channel_split_possible(strategy):
        return original(inputs, pool_size, strides, padding, data_format)
    x = tf.convert_to_tensor(inputs)
    rank = x.shape.rank - 2
    channels_first = (data_format or keras.config.image_data_format()) == "channels_first"
    if channels_first:
        x = tf.transpose(x, (0, *range(2, rank + 2), 1))
    spatial = tuple(x.shape[1:-1])
    if any(d is None for d in spatial):
        return original(inputs, pool_size, strides, padding, data_format)
    pool = _as_tuple(pool_size, rank)
    stride = pool if strides is None else _as_tuple(strides, rank)
    plans = [
        _window_plan(n, k, s, padding.lower()) for n, k, s in zip(spatial, pool, stride)
    ]
    views = _window_views(x, pool, stride, plans, fill=x.dtype.min if reduce == "max" else 0)
    if reduce == "max":
        y = functools.reduce(tf.maximum, views)
    else:
        y = tf.add_n(views) if len(views) > 1 else views[0]
        counts = functools.reduce(np.multiply.outer, [plan[3] for plan in plans])
        if np.all(counts == math.prod(pool)):
            y = y / tf.cast(math.prod(pool), y.dtype)
        else:
            y = y / tf.constant(counts.reshape((1, *counts.shape, 1)), dtype=y.dtype)
    if channels_first:
        y = tf.transpose(y, (0, rank + 1, *range(1, rank + 1)))
    return y


def max_pool(original, inputs, pool_size, strides=None, padding="valid", data_format=None):
    return _pool(original, inputs, pool_size, strides, padding, data_format, reduce="max")


def average_pool(original, inputs, pool_size, strides=None, padding="valid", data_format=None):
    return _pool(original, inputs, pool_size, strides, padding, data_format, reduce="mean")


# ---------------------------------------------------------------- install
RANDOM_DRAWS = (
    "normal", "uniform", "truncated_normal", "randint", "categorical", "shuffle",
    "gamma", "binomial", "beta",
)
# TensorFlow ops without a DTensor SPMD expander, run replicated (see
# _dtensor.expand_replicated): the categorical, gamma/beta and binomial
# draws (their inputs are made whole above anyway), and ReverseV2 (keras
# AUC's threshold bookkeeping on small replicated metric state, flips).
REPLICATED_OP_TYPES = (
    "StatelessMultinomial", "StatelessRandomGammaV3", "StatelessRandomBinomial", "ReverseV2",
)


def install():
    _dtensor.expand_replicated(REPLICATED_OP_TYPES)
    ops = _keras.hooks.backend_ops
    for name in RANDOM_DRAWS:
        ops[("random", name)] = random_draw
    ops[("random", "dropout")] = dropout
    ops[("math", "top_k")] = top_k
    ops[("nn", "sparse_categorical_crossentropy")] = sparse_categorical_crossentropy
    ops[("nn", "one_hot")] = one_hot
    ops[("nn", "max_pool")] = max_pool
    ops[("nn", "average_pool")] = average_pool
