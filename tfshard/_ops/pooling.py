"""Pooling on split channels.

DTensor expands pooling only for a replicated or batch-split input, yet
pooling is independent per channel. Here it is a running max (sum) of the
strided views of the window offsets: elementwise ops that keep any batch
and channel split, with no communication."""

from __future__ import annotations

import functools
import itertools
import math

import keras
import numpy as np
import tensorflow as tf

from tfshard._ops._common import channel_split_possible, on_mesh

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


def _pool(original, inputs, pool_size, strides, padding, data_format, *, reduce):
    strategy = on_mesh(inputs)
    if strategy is None or not channel_split_possible(strategy):
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
