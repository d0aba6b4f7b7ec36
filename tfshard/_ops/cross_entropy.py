"""Sparse categorical cross-entropy on logits split by class: Megatron's
vocab-parallel formula instead of TensorFlow's fused op, whose DTensor
expander gathers the logits."""

from __future__ import annotations

import tensorflow as tf

from tfshard._ops._common import is_tensor, on_mesh


def split_class_axis(strategy, classes):
    """The mesh axis the strategy splits ``classes``-sized weight dims over
    (a vocabulary-split output projection or tied table), or None.

    A traced step cannot read the layout DTensor will give the logits, so
    this asks the weights: the logits ``(..., classes)`` are split by class
    when some weight of the strategy has a dimension of ``classes`` split
    over the tensor axis (keras-hub's reverse embeddings, a column-parallel
    vocabulary projection, a vocabulary-split table). Whole logits (a
    classifier) keep TensorFlow's fused op: the formula below would add an
    all-reduce to them."""
    from tfshard.tensors import spec_of

    axis = strategy.tensor_axis
    if axis is None or strategy.mesh.axis_size(axis) <= 1 or classes % strategy.mesh.axis_size(axis):
        return None
    for variable in strategy.variables():
        spec = spec_of(variable) or ()
        if any(int(dim) == classes and entry == axis for dim, entry in zip(variable.shape, spec)):
            return axis
    return None


def sparse_categorical_crossentropy(original, target, output, from_logits=False, axis=-1):
    """``keras.ops.sparse_categorical_crossentropy`` on logits, in a traced
    step on a mesh whose weights split the classes: Megatron's
    vocab-parallel formula
    (:func:`tfshard.losses.vocab_parallel_sparse_categorical_crossentropy`),
    equal to TensorFlow's, out-of-range labels included (an
    ``InvalidArgumentError``). DTensor's expander of the fused
    ``SparseSoftmaxCrossEntropyWithLogits`` needs whole classes, so logits
    split by vocabulary were all-gathered and every device computed the loss
    of its whole batch shard (profiled on keras-hub Llama, 2x4: 40% of a
    device's op time). Here the logits stay split: all-reduces of per-token
    values (the max, then the sum of exponentials and the label's logit,
    which DTensor launches together)."""
    strategy = on_mesh(output)
    if strategy is None or tf.executing_eagerly() or not from_logits or not is_tensor(output):
        return original(target, output, from_logits=from_logits, axis=axis)
    logits = tf.convert_to_tensor(output)
    labels = tf.convert_to_tensor(target)
    rank = logits.shape.rank
    if rank is not None and len(labels.shape) == rank and labels.shape[-1] == 1:
        labels = tf.squeeze(labels, axis=-1)
    if (
        rank is None
        or axis not in (-1, rank - 1)
        or logits.shape[-1] is None
        or not logits.dtype.is_floating
        or not (labels.dtype.is_integer or labels.dtype.is_floating)  # Keras casts labels to floats
        or len(labels.shape) != rank - 1
    ):
        return original(target, output, from_logits=from_logits, axis=axis)
    mesh_axis = split_class_axis(strategy, int(logits.shape[-1]))
    if mesh_axis is None:
        return original(target, output, from_logits=from_logits, axis=axis)
    from tfshard.losses import split_class_crossentropy

    return split_class_crossentropy(labels, logits, mesh_axis)
