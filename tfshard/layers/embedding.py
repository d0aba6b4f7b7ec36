"""Vocabulary-parallel embedding (Megatron-LM's ``VocabParallelEmbedding``).

The table ``(vocab, dim)`` is split over the tensor axis by rows. Megatron
looks up each id on the one device that holds its row (the others return
zeros) and sums the results with an all-reduce. In DTensor's global view:

* the table ``(V, D)`` is viewed as ``(tp, V/tp, D)``, split on dim 0, so
  each device holds exactly one slab ``[s, :, :]`` (a reshape of the major
  dim: no communication);
* every id becomes ``(shard, row) = (id // (V/tp), id % (V/tp))``;
* ``gather(slabs, row, axis=1)`` is ``(tp, batch..., D)``: device ``s``
  looks every id up in its own slab (a local gather of ``row``; the rows of
  ids another device owns are wrong, and masked next);
* multiplying by the owner mask ``shard == s`` (``(batch..., tp)``, split
  like the slabs) keeps each id's row only on its owner, and summing over
  the split dim 0 is the all-reduce.

No device ever holds the full table, and the only collective is the one
all-reduce of the ``(batch..., D)`` output over the tensor axis. Backward:
each device scatter-adds the gradient of the ids it owns into its own slab
(a hand-written gradient; TensorFlow's own would build a whole-table
gradient on every device); with a split batch, the slab gradients are
all-reduced over the data axis as in any data-parallel step.
``tf.gather`` cannot read a DVariable split on dim 0 directly ("does not
support sharded 0th dimension for the resource tensor").
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops

from tfshard.errors import ShardingError, UnsupportedFeatureError
from tfshard.layers.base import ShardedLayerMixin
from tfshard import sequence_parallel
from tfshard.tensors import masked_local_lookup

_SHARD_DIMS = ("vocab", "embedding")


def _tied_equation(hidden):
    dims = "abcefghijklmnopqrstuwxyz"[: len(hidden.shape) - 1]
    return f"{dims}d,vd->{dims}v"


@keras.saving.register_keras_serializable(package="tfshard")
class VocabParallelEmbedding(ShardedLayerMixin, keras.layers.Embedding):
    """``keras.layers.Embedding`` with its table split over the tensor axis.

    Args:
        input_dim, output_dim, embeddings_initializer, mask_zero, ...: as
            ``keras.layers.Embedding``.
        shard_dim: ``"vocab"`` (default) splits the rows: table logical axes
            ``("vocab", None)``, masked local lookup plus one all-reduce.
            ``"embedding"`` splits the columns instead: table ``(None,
            "embed")``; each device gathers its columns of every id with no
            communication and the output stays split on its last dim (a
            consumer that needs it whole all-gathers it). ``tensor_parallel``
            does not map ``embed``: add the rule ``{"embed": "model"}``.
        logical_dim: the logical name of the split dimension (default
            ``"vocab"`` or ``"embed"`` per ``shard_dim``).

    ``input_dim`` (or ``output_dim``) must be divisible by the size of the
    mesh axis the logical dimension maps to; otherwise a
    :class:`tfshard.ShardingError` names the layer, the sizes and the fix.
    Outside a strategy the layer is ``keras.layers.Embedding``.

    :meth:`attend` gives tied output logits ``hidden @ table.T``, split over
    the vocabulary like the table (feed them to
    :class:`tfshard.losses.VocabParallelSparseCategoricalCrossentropy`).
    """

    def __init__(self, input_dim, output_dim, *, shard_dim="vocab", logical_dim=None, **kwargs):
        if shard_dim not in _SHARD_DIMS:
            raise ValueError(
                f"VocabParallelEmbedding: shard_dim={shard_dim!r}; use one of "
                f"{_SHARD_DIMS}."
            )
        self.shard_dim = shard_dim
        self.logical_dim = logical_dim or ("vocab" if shard_dim == "vocab" else "embed")
        super().__init__(input_dim, output_dim, **kwargs)

    def weight_logical_axes(self):
        if self.shard_dim == "vocab":
            return {"embeddings": (self.logical_dim, None)}
        return {"embeddings": (None, self.logical_dim)}

    # ------------------------------------------------------------- helpers
    def _split(self):
        """(mesh axis, its size) the table is split over, or (None, 1)."""
        axis = self._mesh_axis(self.logical_dim)
        if axis is None:
            return None, 1
        return axis, self.sharding_strategy.mesh.axis_size(axis)

    def _check(self):
        if self.sharding_strategy is None:
            return
        axis, size = self._split()
        what, count = (
            ("input_dim (vocabulary size)", self.input_dim)
            if self.shard_dim == "vocab"
            else ("output_dim (embedding size)", self.output_dim)
        )
        if axis is not None and count % size:
            padded = -(-count // size) * size
            raise ShardingError(
                f"{type(self).__name__} {self.name!r}: {what}={count} cannot be "
                f"split evenly over mesh axis {axis!r} of size {size} (logical "
                f"dimension {self.logical_dim!r}). Pad it to a multiple of "
                f"{size} (e.g. {padded}; Megatron pads the vocabulary), use a "
                f"mesh whose {axis!r} axis divides {count}, or the rule "
                f"{{{self.logical_dim!r}: None}} to replicate the table.",
                kind=ShardingError.INDIVISIBLE, axis=axis, axis_size=size,
            )

    def build(self, input_shape=None):
        if self.built:
            return
        self._check()
        super().build(input_shape)

    # ---------------------------------------------------------------- call
    def call(self, inputs):
        if self.quantization_mode or self.lora_enabled:
            raise UnsupportedFeatureError(
                f"{type(self).__name__} {self.name!r}: quantization_mode="
                f"{self.quantization_mode!r}, lora_enabled={self.lora_enabled}: "
                "quantized or LoRA embeddings are not supported on a mesh yet. "
                "Use the layer without quantize() / enable_lora(), or create it "
                "outside every strategy scope."
            )
        if inputs.dtype != "int32" and inputs.dtype != "int64":
            inputs = ops.cast(inputs, "int32")
        strategy = self.sharding_strategy
        ids = strategy.constrain(inputs, ())
        axis, size = self._split()
        table = self.embeddings
        if self.shard_dim == "embedding" or axis is None:
            # Rows whole on every device: an ordinary gather, split (or not)
            # on the embedding dim like the table.
            out = ops.take(table, ids, axis=0)
            out = strategy.constrain(out, (self.logical_dim,))
            return ops.cast(out, self.compute_dtype)
        rows = self.input_dim // size
        # (V, D) -> (tp, V/tp, D), split on dim 0: one slab per device.
        slabs = ops.reshape(table, (size, rows, self.output_dim))
        slabs = strategy.place(slabs, (axis, None, None))
        out = masked_local_lookup(strategy, slabs, ids, axis, size, rows)
        if strategy.sequence_parallel and len(out.shape) >= 3:
            # The rows' sum, scattered over the sequence: each device keeps
            # its tokens (tfshard.sequence_parallel).
            out = strategy.place(out, sequence_parallel.sequence_spec(strategy, len(out.shape)))
        else:
            out = strategy.constrain(out, ())
        return ops.cast(out, self.compute_dtype)

    def attend(self, hidden):
        """Tied output logits ``hidden @ embeddings.T``, ``(..., vocab)``.

        With the vocabulary split, the logits are split on their last dim
        over the same axis and no collective runs (the backward pass
        all-reduces the gradient of ``hidden``). With the embedding dim split,
        the contraction over it is all-reduced and the logits are whole.
        Outside a strategy: ``ops.matmul(hidden, ops.transpose(table))``.
        """
        table = ops.cast(self.embeddings, hidden.dtype)
        if self._computes_unsplit:
            return ops.matmul(hidden, ops.transpose(table))
        strategy, split = self.sharding_strategy, (self.logical_dim,)
        if self.shard_dim == "vocab":
            if strategy.sequence_parallel and len(hidden.shape) >= 3 and isinstance(hidden, tf.Tensor):
                return sequence_parallel.tied_logits(
                    strategy, hidden, table, self.embeddings, _tied_equation(hidden), split)
            hidden = strategy.constrain(hidden, ())
            logits = ops.einsum(_tied_equation(hidden), hidden, table)
            return strategy.constrain(logits, split)
        hidden = strategy.constrain(hidden, split)
        logits = ops.einsum(_tied_equation(hidden), hidden, table)
        return strategy.constrain(logits, ())

    tied_logits = attend

    def get_config(self):
        config = super().get_config()
        config.update(shard_dim=self.shard_dim, logical_dim=self.logical_dim)
        return config
