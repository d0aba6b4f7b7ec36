"""Random draws under a mesh: the numbers one device draws, under any layout.

DTensor's random expander draws a local op with the seed mixed with each
device's mesh coordinates, so a split layout draws other numbers than one
device. Here every draw is made at its global shape on a replicated layout
(DTensor then mixes nothing in: each device computes the same, whole draw)
and each device keeps its slice of it. Cost: each device computes the whole
draw (``random_streams="per_device"`` on the strategy opts out; measured by
``tfshard bench CONFIG --random-cost RATE``)."""

from __future__ import annotations

import functools

import tensorflow as tf
from keras import tree

from tfshard import _dtensor
from tfshard._ops._common import on_mesh, replicated, whole

def _draws_globally(strategy):
    return strategy.random_streams == "global"


def random_draw(original, *args, **kwargs):
    """``normal``, ``uniform``, ``truncated_normal``, ``randint``,
    ``categorical``, ``shuffle``, ``gamma``, ``binomial``, ``beta``: tensor
    arguments (logits, the array to shuffle, distribution parameters) are
    made whole, the draw is pinned to a replicated layout, and consumers
    take their slices of it (a local slice, no communication)."""
    strategy = on_mesh(*tree.flatten((args, kwargs)))
    if strategy is None or tf.executing_eagerly() or not _draws_globally(strategy):
        return original(*args, **kwargs)
    args, kwargs = tree.map_structure(functools.partial(replicated, strategy), (args, kwargs))
    return tree.map_structure(functools.partial(replicated, strategy), original(*args, **kwargs))


def dropout(original, inputs, rate, noise_shape=None, seed=None):
    """``keras.random.dropout``: the keep mask is one device's mask.

    The mask (``1 / (1 - rate)`` where kept, 0 elsewhere) is Keras's own
    dropout of a ones tensor of the noise shape, drawn replicated, then laid
    out like ``inputs`` (a local slice) before it scales them, so only the
    local slice lives on until the backward pass. ``inputs * mask`` equals
    Keras's ``where(keep, inputs / (1 - rate), 0)`` exactly."""
    strategy = on_mesh(inputs)
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
    mask = replicated(strategy, original(ones, rate, noise_shape=None, seed=seed))
    if noise_shape is None or all(
        size is None or size == dim for size, dim in zip(noise_shape, inputs.shape)
    ):
        mask = _dtensor.relayout_like(mask, inputs)
    return inputs * mask


def random_crop_images(original, layer, images, transformation, training=True):
    """``keras.layers.RandomCrop`` on a mesh: the crop at the random offsets
    (drawn as one device draws them) taken as gathers of ``height`` rows and
    ``width`` columns (a slice at run-time offsets has no DTensor expansion).
    The images are laid out whole but for the batch; the values equal the
    slice's."""
    strategy = on_mesh(images)
    offsets = transformation if isinstance(transformation, (tuple, list)) else ()
    if (
        strategy is None
        or tf.executing_eagerly()
        or not training
        or len(offsets) != 2
        or all(isinstance(o, int) for o in offsets)
    ):
        return original(layer, images, transformation, training=training)
    images = tf.cast(images, layer.compute_dtype)
    rank = images.shape.rank
    images = whole(strategy, images, rank == 4)
    rows_axis, cols_axis = layer.height_axis % rank, layer.width_axis % rank
    for axis, start, size in ((rows_axis, offsets[0], layer.height), (cols_axis, offsets[1], layer.width)):
        images = tf.gather(images, tf.cast(start, "int32") + tf.range(size), axis=axis)
    return images
