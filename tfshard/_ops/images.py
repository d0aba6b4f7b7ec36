"""Keras image layers whose own TensorFlow-backend code DTensor cannot run
on a mesh, in forms it can (equal values)."""

from __future__ import annotations

import tensorflow as tf

from tfshard._ops._common import on_mesh


def equalization_apply(original, layer, channel, hist):
    """``keras.layers.Equalization``'s histogram lookup on a mesh.

    On TensorFlow Keras finds the first nonzero bin of the cumulative
    histogram with ``nonzero(cdf)[0][0]`` (a value-dependent shape, a clear
    error on a mesh); here it is ``argmax(cdf > 0)``, the form Keras uses on
    JAX: the same bin (the first maximum), the same lookup table. (The
    histogram is of the whole batch's channel: a batch split is all-gathered.)"""
    if on_mesh(channel, hist) is None or tf.executing_eagerly():
        return original(layer, channel, hist)
    np_ = layer.backend.numpy  # Keras's own ops, but for the first nonzero bin
    cdf = np_.cumsum(hist)
    cdf_min = np_.take(cdf, np_.argmax(cdf > 0))
    denominator = cdf[-1] - cdf_min
    denominator = np_.where(denominator == 0, np_.ones_like(1, dtype=denominator.dtype), denominator)
    lookup_table = np_.clip(np_.round(((cdf - cdf_min) * 255) / denominator), 0, 255)
    scaled_channel = (channel / 255.0) * (layer.bins - 1)
    indices = layer.backend.cast(np_.clip(scaled_channel, 0, layer.bins - 1), "int32")
    return np_.take(lookup_table, indices)


def equalization_histogram(original, layer, values, value_range, nbins):
    """``keras.layers.Equalization``'s histogram on a mesh: Keras's bin ids,
    counted with a segment sum of ``nbins`` segments (a static length;
    bincount's length is known only at run time, and DTensor cannot lay out
    or slice a dimension of unknown size)."""
    if on_mesh(values) is None or tf.executing_eagerly():
        return original(layer, values, value_range, nbins)
    values = tf.cast(values, "float32")
    low, high = (float(v) for v in value_range)
    ids = tf.cast((values - low) * (nbins - 1) / (high - low), "int32")
    ids = tf.reshape(tf.clip_by_value(ids, 0, nbins - 1), [-1])
    return tf.math.unsorted_segment_sum(tf.ones_like(ids), ids, nbins)
