"""Sparse categorical cross-entropy on logits split by class: Megatron's
vocab-parallel formula instead of TensorFlow's fused op, whose DTensor
expander gathers the logits."""

from __future__ import annotations

import tensorflow as tf

from tfshard._ops._common import channel_split_possible, is_tensor, on_mesh


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
    strategy = on_mesh(output)
    if (
        strategy is None
        or tf.executing_eagerly()
        or not from_logits
        or not channel_split_possible(strategy)
        or not is_tensor(output)
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
