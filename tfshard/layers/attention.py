"""Head-parallel attention: Megatron's attention block over DTensor.

Query, key and value projections are column-parallel: their kernels
``(d_model, heads, head_dim)`` are split over the tensor axis by heads, so
each device computes the attention of its own heads with no communication.
The output projection ``(heads, head_dim, d_model)`` is row-parallel: each
device contracts its heads and one all-reduce over the tensor axis sums the
partial outputs.

Collectives per call: forward one all-reduce of the output (Megatron's *g*),
backward one all-reduce of the input gradient (Megatron's *f*: the input is
used whole by every head shard, so its gradient is a sum over shards).

Both layers are drop-ins for their Keras counterparts (same arguments, same
weights in the same order and shapes). Outside a strategy they run exactly
the Keras code. Inside one they run the same Keras sublayers and attention
kernel with explicit activation layouts, and they build every mask as a
DTensor, because eager DTensor ops refuse plain non-scalar tensors (Keras
builds the causal mask with plain ``ops.ones``).
"""

from __future__ import annotations

import keras
from keras import ops
import tensorflow as tf

from tfshard import _dtensor, _keras
from tfshard.errors import ShardingError
from tfshard.layers.base import ShardedLayerMixin
from tfshard.strategy import declare_logical_axes_by_name


def _on_mesh(layer, x):
    """A mask (or other small helper tensor) that Keras built as a plain
    tensor, replicated on the layer's mesh. Only eager code needs this:
    inside a traced function DTensor lays out plain ops itself."""
    if x is None or not tf.executing_eagerly() or _dtensor.is_dtensor(x):
        return x
    return layer.sharding_strategy.place(x, (None,) * len(x.shape))


def _check_divisible(layer, what, count, logical):
    """Fail before DTensor runs when ``count`` heads cannot split evenly."""
    strategy = layer.sharding_strategy
    axis = layer._mesh_axis(logical)
    if strategy is None or axis is None:
        return
    size = strategy.mesh.axis_size(axis)
    if count % size:
        fits = [n for n in range(1, count + 1) if count % n == 0]
        raise ShardingError(
            f"{type(layer).__name__} {layer.name!r}: {what}={count} cannot be "
            f"split evenly over mesh axis {axis!r} of size {size} (logical "
            f"dimension {logical!r}). Use a multiple of {size} for {what}, a "
            f"mesh whose {axis!r} axis size divides {count} (one of {fits}), "
            f"or the rule {{{logical!r}: None}} to replicate these heads.",
            kind=ShardingError.INDIVISIBLE, axis=axis, axis_size=size,
        )


class _HeadParallelMixin(ShardedLayerMixin):
    """What both attention layers share: layouts of the activations, masks
    built on the mesh."""

    def _inputs_and_mask(self, query, value, key, query_mask, value_mask, key_mask,
                         attention_mask, use_causal_mask, clear_input_masks=False):
        """Query/key/value with whole features, and the attention mask built
        on the mesh. Causal masking is materialised (as a DTensor) rather
        than passed to the backend's is_causal kernel, which builds a plain
        tf.ones mask."""
        same_kv = key is None or key is value
        query_in = self._features_whole(query)
        value_in = self._features_whole(value)
        key_in = value_in if same_kv else self._features_whole(key)
        if clear_input_masks:
            for tensor in (query_in, value_in, key_in):
                _keras.set_keras_mask(tensor, None)
        attention_mask = self._compute_attention_mask(
            query_in,
            value_in,
            query_mask=self._mask_on_mesh(query_mask),
            value_mask=self._mask_on_mesh(value_mask),
            key_mask=self._mask_on_mesh(key_mask),
            attention_mask=self._mask_on_mesh(attention_mask),
            use_causal_mask=use_causal_mask,
        )
        return query_in, value_in, key_in, attention_mask

    # ---------------------------------------------------------- layouts
    def _features_whole(self, x):
        """Every dim but the batch replicated (the input of the q/k/v
        projections, the output of the row-parallel projection)."""
        if x is None:
            return None
        return self._constrain(x, ())

    def _split_heads(self, x, logical="heads"):
        """``(batch, ..., heads, head_dim)`` split by heads."""
        return self._constrain(x, (self._mesh_axis(logical), None))

    # ------------------------------------------- masks as DTensors (eager)
    def _compute_causal_mask(self, query, value=None):
        mask = super()._compute_causal_mask(query, value)
        if self.sharding_strategy is None:
            return mask
        return _on_mesh(self, mask)

    def _compute_sliding_window_mask(self, query, value=None):
        mask = super()._compute_sliding_window_mask(query, value)
        if self.sharding_strategy is None:
            return mask
        return _on_mesh(self, mask)

    def _mask_on_mesh(self, mask):
        if mask is None or self.sharding_strategy is None:
            return mask
        return _on_mesh(self, ops.convert_to_tensor(mask))


@keras.saving.register_keras_serializable(package="tfshard")
class HeadParallelAttention(_HeadParallelMixin, keras.layers.MultiHeadAttention):
    """``keras.layers.MultiHeadAttention`` split over the tensor axis by
    attention heads (Megatron-LM).

    Weights (logical dimensions; ``tensor_parallel`` maps ``heads``):

    * ``query``/``key``/``value`` kernels ``(d_model, heads, head_dim)``,
      biases ``(heads, head_dim)``: column-parallel, split by heads;
    * ``attention_output`` kernel ``(heads, head_dim, d_model)``: row-parallel,
      split by heads; its bias ``(d_model,)`` is replicated.

    Collectives: forward one all-reduce of the output over the tensor axis;
    backward one all-reduce of the input gradient (two when key/value come
    from a different tensor than the query, one per distinct input). The
    attention itself (scores, softmax, dropout, weighted sum) is local to
    each device's heads.

    Takes exactly ``keras.layers.MultiHeadAttention``'s arguments and call
    arguments (``attention_mask``, ``use_causal_mask``,
    ``return_attention_scores``, ``training``, separate ``key``). Returned
    attention scores are split by heads. ``num_heads`` must be divisible by
    the size of the mesh axis ``heads`` maps to; otherwise a
    :class:`tfshard.ShardingError` names the layer, the sizes and the fix.

    Dropout runs on each device's heads with DTensor's sharded random
    numbers: the same rate, but not the same mask as unsharded Keras for the
    same seed.
    """

    def weight_logical_axes(self):
        out_dims = len(self._output_shape) if self._output_shape else 1
        out = ("d_model",) + (None,) * (out_dims - 1)
        axes = {
            "query/kernel": ("d_model", "heads", None),
            "key/kernel": ("d_model", "heads", None),
            "value/kernel": ("d_model", "heads", None),
            "query/bias": ("heads", None),
            "key/bias": ("heads", None),
            "value/bias": ("heads", None),
            "attention_output/kernel": ("heads", None) + out,
            "attention_output/bias": out,
        }
        if self._use_gate:
            axes["gate/kernel"] = ("d_model", "heads", None)
            axes["gate/bias"] = ("heads", None)
        return axes

    def build(self, query_shape, value_shape, key_shape=None):
        _check_divisible(self, "num_heads", self.num_heads, "heads")
        with declare_logical_axes_by_name(self.weight_logical_axes()):
            super().build(query_shape, value_shape, key_shape)

    def call(
        self,
        query,
        value,
        key=None,
        query_mask=None,
        value_mask=None,
        key_mask=None,
        attention_mask=None,
        return_attention_scores=False,
        training=None,
        use_causal_mask=False,
    ):
        if self._computes_unsplit:
            return super().call(
                query,
                value,
                key=key,
                query_mask=query_mask,
                value_mask=value_mask,
                key_mask=key_mask,
                attention_mask=attention_mask,
                return_attention_scores=return_attention_scores,
                training=training,
                use_causal_mask=use_causal_mask,
            )
        # Keras's MultiHeadAttention.call, with layouts: inputs whole,
        # projections split by heads, output whole after one all-reduce.
        # Keras reads the query mask off the tensor, not the argument.
        query_mask = _keras.keras_mask(query)
        query_in, value_in, key_in, attention_mask = self._inputs_and_mask(
            query, value, key, query_mask, value_mask, key_mask, attention_mask,
            use_causal_mask, clear_input_masks=True,
        )
        if self._use_gate:
            gate = self._split_heads(self._gate_dense(query_in))
        q = self._split_heads(self._query_dense(query_in))
        k = self._split_heads(self._key_dense(key_in))
        v = self._split_heads(self._value_dense(value_in))
        output, scores = self._compute_attention(
            q, k, v, attention_mask, training, return_attention_scores
        )
        output = self._split_heads(output)
        if self._use_gate:
            output = ops.multiply(output, gate)
        # Row-parallel: contracts the head dims, partial sums all-reduced.
        output = self._features_whole(self._output_dense(output))
        if query_mask is not None:
            _keras.set_keras_mask(output, query_mask)
        if return_attention_scores:
            return output, scores
        return output


def _repeat_heads(x, repeats):
    """``ops.repeat(x, repeats, axis=2)`` for ``(batch, seq, kv_heads, dim)``
    split by kv heads, kept local: each device's kv heads expand into exactly
    the query heads it holds, so the result is split by query heads with no
    communication (broadcast into a new minor axis, then merge it)."""
    if repeats == 1:
        return x
    shape = ops.shape(x)
    x = ops.expand_dims(x, 3)
    x = ops.broadcast_to(x, (shape[0], shape[1], shape[2], repeats, shape[3]))
    return ops.reshape(x, (shape[0], shape[1], shape[2] * repeats, shape[3]))


@keras.saving.register_keras_serializable(package="tfshard")
class HeadParallelGroupedQueryAttention(
    _HeadParallelMixin, keras.layers.GroupQueryAttention
):
    """``keras.layers.GroupQueryAttention`` split over the tensor axis by
    heads: query heads (logical ``heads``) and key/value heads (logical
    ``kv_heads``) are both split, so each device holds whole groups.

    Weights: ``query`` kernel ``(d_model, heads, head_dim)``, ``key``/``value``
    kernels ``(d_model, kv_heads, head_dim)``, biases split the same way;
    ``attention_output`` kernel ``(heads, head_dim, d_model)`` row-parallel,
    bias replicated. Collectives as :class:`HeadParallelAttention`: one
    forward all-reduce.

    Both ``num_query_heads`` and ``num_key_value_heads`` must be divisible by
    the tensor axis size. For fewer key/value heads than devices (e.g.
    multi-query attention) map ``kv_heads`` to ``None``
    (``.rules({"kv_heads": None})``): key/value are then computed whole on
    every device and each keeps the groups of its query heads.
    """

    def weight_logical_axes(self):
        axes = {
            "query/kernel": ("d_model", "heads", None),
            "key/kernel": ("d_model", "kv_heads", None),
            "value/kernel": ("d_model", "kv_heads", None),
            "query/bias": ("heads", None),
            "key/bias": ("kv_heads", None),
            "value/bias": ("kv_heads", None),
            "attention_output/kernel": ("heads", None, "d_model"),
            "attention_output/bias": ("d_model",),
        }
        if self.use_gate:
            axes["gate/kernel"] = ("d_model", "heads", None)
            axes["gate/bias"] = ("heads", None)
        return axes

    def build(self, query_shape, value_shape, key_shape=None):
        _check_divisible(self, "num_query_heads", self.num_query_heads, "heads")
        _check_divisible(self, "num_key_value_heads", self.num_key_value_heads, "kv_heads")
        with declare_logical_axes_by_name(self.weight_logical_axes()):
            super().build(query_shape, value_shape, key_shape)

    def call(
        self,
        query,
        value,
        key=None,
        query_mask=None,
        value_mask=None,
        key_mask=None,
        attention_mask=None,
        return_attention_scores=False,
        training=None,
        use_causal_mask=False,
    ):
        if self._computes_unsplit:
            return super().call(
                query,
                value,
                key=key,
                query_mask=query_mask,
                value_mask=value_mask,
                key_mask=key_mask,
                attention_mask=attention_mask,
                return_attention_scores=return_attention_scores,
                training=training,
                use_causal_mask=use_causal_mask,
            )
        self._return_attention_scores = return_attention_scores
        query_in, value_in, key_in, attention_mask = self._inputs_and_mask(
            query, value, key, query_mask, value_mask, key_mask, attention_mask,
            use_causal_mask,
        )
        if self.use_gate:
            gate = self._split_heads(self._gate_dense(query_in))
        q = self._split_heads(self._query_dense(query_in))
        k = self._split_heads(self._key_dense(key_in), "kv_heads")
        v = self._split_heads(self._value_dense(value_in), "kv_heads")
        k = self._split_heads(_repeat_heads(k, self.num_repeats))
        v = self._split_heads(_repeat_heads(v, self.num_repeats))
        output, scores = self._compute_attention(
            q, k, v, attention_mask=attention_mask, training=training
        )
        output = self._split_heads(output)
        if self.use_gate:
            output = ops.multiply(output, gate)
        output = self._features_whole(self._output_dense(output))
        if return_attention_scores:
            return output, scores
        return output
