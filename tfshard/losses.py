"""Losses on tensor-parallel outputs.

:class:`VocabParallelSparseCategoricalCrossentropy` is Megatron-LM's
vocab-parallel cross-entropy in DTensor's global view. The logits
``(..., vocab)`` stay split over the tensor axis by vocabulary; per token

* ``m = max(logits)`` -- local max, then an all-reduce (max) over the axis;
* ``s = sum(exp(logits - m))`` -- local sum, then an all-reduce (sum);
* ``t = logits[label] - m`` -- picked without a gather: compare the label
  with the vocabulary ids each device holds (a local ``(..., vocab/tp)``
  boolean), keep that entry, sum: an all-reduce (sum) in which exactly one
  device contributes;
* ``loss = log(s) - t``.

Three all-reduces of ``(...,)``-shaped values (DTensor's optimizer may
combine the two sums), never one of the ``(..., vocab)`` logits. The
gradient ``softmax - one_hot`` is computed locally on each device's slice.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from tfshard import _dtensor, _keras
from tfshard.strategy import current_strategy
from tfshard.tensors import to_numpy

__all__ = ["VocabParallelSparseCategoricalCrossentropy", "vocab_parallel_sparse_categorical_crossentropy"]


def _vocab_ids(logits, logical_dim, mesh_axis=None):
    """``arange(vocab)`` laid out like the vocabulary dim of ``logits``:
    each device gets the ids of the logits it holds. Traced, the ids are
    split over ``mesh_axis``, else over the axis the rules give
    ``logical_dim``."""
    vocab = int(logits.shape[-1])
    if tf.executing_eagerly() and _dtensor.is_dtensor(logits):
        layout = _dtensor.layout_of(logits)
        axis = _dtensor.spec_of_layout(layout)[-1]
        return _dtensor.distribute(
            np.arange(vocab, dtype="int32"), _dtensor.to_layout((axis,), layout.mesh)
        )
    ids = tf.range(vocab, dtype="int32")
    strategy = current_strategy()
    if strategy is not None and not tf.executing_eagerly():
        axis = mesh_axis or strategy.logical_rules.axis_for(logical_dim)
        if axis is not None and vocab % strategy.mesh.axis_size(axis) == 0:
            ids = strategy.place(ids, (axis,))
    return ids


def vocab_parallel_sparse_categorical_crossentropy(
    y_true, y_pred, ignore_class=None, logical_dim="vocab"
):
    """Per-token cross-entropy of integer labels ``y_true`` ``(...)`` and
    logits ``y_pred`` ``(..., vocab)`` split (or not) on the vocabulary.

    Equals ``keras.losses.sparse_categorical_crossentropy(y_true, y_pred,
    from_logits=True)``; see the module docstring for the collectives.
    """
    logits = ops.convert_to_tensor(y_pred)
    labels = ops.convert_to_tensor(y_true)
    if len(labels.shape) == len(logits.shape) and labels.shape[-1] == 1:
        labels = ops.squeeze(labels, axis=-1)
    valid = None
    if ignore_class is not None:
        labels = ops.cast(labels, "int32")
        valid = ops.not_equal(labels, ignore_class)
        labels = ops.where(valid, labels, 0)
    losses = split_class_crossentropy(labels, logits, logical_dim=logical_dim)
    if valid is not None:
        losses = ops.where(valid, losses, ops.zeros_like(losses))
        _keras.set_keras_mask(losses, valid)  # Keras reads the loss mask from it
    return losses


def split_class_crossentropy(labels, logits, mesh_axis=None, logical_dim="vocab"):
    """Per-token cross-entropy of ``labels`` ``(...)`` (checked to lie in
    ``[0, classes)``) and ``logits`` ``(..., classes)``, the classes split
    (traced) over ``mesh_axis`` or the axis of ``logical_dim``: the module
    docstring's formula."""
    if keras.backend.standardize_dtype(logits.dtype) in ("float16", "bfloat16"):
        logits = ops.cast(logits, "float32")
    labels = checked_labels(ops.cast(labels, "int32"), logits.shape[-1])
    # max over the split vocabulary: all-reduce (max). No gradient flows
    # through it (the loss does not depend on the shift).
    shift = ops.stop_gradient(ops.max(logits, axis=-1, keepdims=True))
    shifted = logits - shift
    # sum of exp over the split vocabulary: all-reduce (sum).
    log_sum_exp = ops.log(ops.sum(ops.exp(shifted), axis=-1))
    # The label's logit: only its owner holds a True; all-reduce (sum).
    hit = ops.equal(ops.expand_dims(labels, -1), _vocab_ids(logits, logical_dim, mesh_axis))
    target = ops.sum(ops.where(hit, shifted, 0.0), axis=-1)
    return log_sum_exp - target


# The name of the traced label check's lookup: a failed step names it
# (tfshard.step_guards reads it to say what went wrong).
LABEL_CHECK = "tfshard_label_range_check"


def checked_labels(labels, classes):
    """``labels`` (integers), checked to lie in ``[0, classes)``.

    TensorFlow's fused cross-entropy raises ``InvalidArgumentError`` on an
    id outside it (on CPU); the masked comparison above alone would give a
    finite, wrong loss. Eagerly the labels are read on the host (no
    collective) and an ``InvalidArgumentError`` names the value and where it
    is. Traced, they pass through a lookup in a replicated
    ``range(classes)``: the labels are split only like the batch, so the
    lookup is local on every device (no collective), and on CPU a gather
    fails on an id outside the table ("indices[i] = id is not in [0,
    classes)"). ``tf.debugging.assert_*`` cannot do this: eagerly it copies
    the split labels for its message (DTensor refuses), and DTensor drops
    the ``Assert`` of a traced step (measured: no error)."""
    if classes is None:
        return labels
    classes = int(classes)
    if tf.executing_eagerly():
        values = to_numpy(labels)
        bad = np.argwhere((values < 0) | (values >= classes))
        if len(bad):
            where = tuple(int(i) for i in bad[0])
            raise tf.errors.InvalidArgumentError(
                None, None,
                f"Received a label value of {values[where]} which is outside the valid range of "
                f"[0, {classes}) (sparse categorical cross-entropy over {classes} classes; "
                f"labels{list(where)}, {len(bad)} such label(s) in the batch). Labels must be "
                "class ids below the number of logits; pass ignore_class to skip a padding id.",
            )
        return labels
    return tf.gather(tf.range(classes, dtype=labels.dtype), labels, name=LABEL_CHECK)


@keras.saving.register_keras_serializable(package="tfshard")
class VocabParallelSparseCategoricalCrossentropy(keras.losses.Loss):
    """``keras.losses.SparseCategoricalCrossentropy(from_logits=True)`` for
    logits split over the tensor axis by vocabulary (e.g. from
    ``VocabParallelEmbedding.attend`` or a ``ColumnParallelDense`` with
    ``logical_dim="vocab"``). The logits are never gathered.

    Args:
        from_logits: must be True (probabilities cannot be split usefully).
        ignore_class: a label to ignore, as in Keras: its tokens get loss 0
            and are left out of the ``"sum_over_batch_size"`` average.
        reduction, name, dtype: as ``keras.losses.Loss``; ``sample_weight``
            works as for any Keras loss.
        logical_dim: the logical dimension of the vocabulary (for the layout
            of the vocabulary ids inside a traced step); None: the ids are
            not placed and follow the logits' layout (DTensor propagates it;
            logits left whole then need no collective).

    Outside a strategy, on plain tensors, it computes the same formula.
    """

    def __init__(
        self,
        from_logits=True,
        ignore_class=None,
        reduction="sum_over_batch_size",
        name="vocab_parallel_sparse_categorical_crossentropy",
        dtype=None,
        logical_dim="vocab",
    ):
        if not from_logits:
            raise ValueError(
                "VocabParallelSparseCategoricalCrossentropy works on logits "
                "only (from_logits=True): probabilities split over devices "
                "cannot be normalized safely. Output logits (no softmax)."
            )
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.from_logits = True
        self.ignore_class = ignore_class
        self.logical_dim = logical_dim

    def call(self, y_true, y_pred):
        return vocab_parallel_sparse_categorical_crossentropy(
            y_true, y_pred, ignore_class=self.ignore_class, logical_dim=self.logical_dim
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            from_logits=True,
            ignore_class=self.ignore_class,
            logical_dim=self.logical_dim,
        )
        return config
