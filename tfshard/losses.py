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

__all__ = ["VocabParallelSparseCategoricalCrossentropy", "vocab_parallel_sparse_categorical_crossentropy"]


def _vocab_ids(logits, logical_dim):
    """``arange(vocab)`` laid out like the vocabulary dim of ``logits``:
    each device gets the ids of the logits it holds."""
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
        axis = strategy.logical_rules.axis_for(logical_dim)
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
    if keras.backend.standardize_dtype(logits.dtype) in ("float16", "bfloat16"):
        logits = ops.cast(logits, "float32")
    labels = ops.convert_to_tensor(y_true)
    if len(labels.shape) == len(logits.shape) and labels.shape[-1] == 1:
        labels = ops.squeeze(labels, axis=-1)
    labels = ops.cast(labels, "int32")
    valid = None
    if ignore_class is not None:
        valid = ops.not_equal(labels, ignore_class)
        labels = ops.where(valid, labels, 0)

    # max over the split vocabulary: all-reduce (max). No gradient flows
    # through it (the loss does not depend on the shift).
    shift = ops.stop_gradient(ops.max(logits, axis=-1, keepdims=True))
    shifted = logits - shift
    # sum of exp over the split vocabulary: all-reduce (sum).
    log_sum_exp = ops.log(ops.sum(ops.exp(shifted), axis=-1))
    # The label's logit: only its owner holds a True; all-reduce (sum).
    hit = ops.equal(ops.expand_dims(labels, -1), _vocab_ids(logits, logical_dim))
    target = ops.sum(ops.where(hit, shifted, 0.0), axis=-1)
    losses = log_sum_exp - target
    if valid is not None:
        losses = ops.where(valid, losses, ops.zeros_like(losses))
        _keras.set_keras_mask(losses, valid)  # Keras reads the loss mask from it
    return losses


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
            of the vocabulary ids inside a traced step).

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
