"""Head-parallel attention: Megatron's attention block over DTensor.

Each layer is its Keras attention layer carrying the style
:class:`tfshard.styles.HeadParallel`, applied through the layer's own
projection sublayers: query, key and value are column-parallel (kernels
``(d_model, heads, head_dim)`` split by heads), so each device computes the
attention of its own heads with no communication; the output projection
``(heads, head_dim, d_model)`` is row-parallel, and one all-reduce over the
tensor axis sums the partial outputs. The attention call itself is Keras's,
unchanged.

Collectives per call: forward one all-reduce of the output (Megatron's *g*),
backward one all-reduce of the input gradient (Megatron's *f*: the input is
used whole by every head shard, so its gradient is a sum over shards).

``keras.layers.MultiHeadAttention`` (or keras-hub's attention layers) under
a plan entry ``HeadParallel()`` is the same split.
"""

from __future__ import annotations

import keras

from tfshard import _keras
from tfshard.errors import ShardingError
from tfshard.layers.base import StyledLayer
from tfshard.styles import HeadParallel

# The projection equations Keras builds for a rank-3 query (batch, seq,
# features), used to describe an attention layer before it is built.
_MHA_EQUATIONS = {
    "query": ("abc", "cde", "abde", "de"),
    "key": ("abc", "cde", "abde", "de"),
    "value": ("abc", "cde", "abde", "de"),
    "gate": ("abc", "cde", "abde", "de"),
    "attention_output": ("abcd", "cde", "abe", "e"),
}
_GQA_EQUATIONS = {
    "query": ("bqm", "muh", "bquh", "uh"),
    "key": ("bkm", "mvh", "bkvh", "vh"),
    "value": ("bkm", "mvh", "bkvh", "vh"),
    "gate": ("bqm", "muh", "bquh", "uh"),
    "attention_output": ("bquh", "uhm", "bqm", "m"),
}


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


class _HeadParallel(StyledLayer):
    tfshard_style = HeadParallel()
    _equations = _MHA_EQUATIONS

    @property
    def logical_axes(self) -> dict:
        """``"<sublayer>/<weight>"`` -> logical axes, e.g.
        ``{"query/kernel": ("d_model", "heads", None), ...}`` (for a rank-3
        query when the layer is not built yet)."""
        out = {}
        for name, style in self.tfshard_style.sublayer_styles(self).items():
            config = self.get_config()
            if name == "gate" and not config.get("use_gate", False):
                continue
            inputs, kernel, output, bias = self._equations[name]
            if not config.get("use_bias", True):
                bias = None
            sublayer = next((s for s in _keras.sublayers(self) if s.name == name), None)
            declared = (
                style.declare(sublayer) if sublayer is not None
                else style.declare_einsum(inputs, kernel, output, bias)
            )
            out.update({f"{name}/{weight}": axes for weight, axes in declared.weights.items()})
        return out


@keras.saving.register_keras_serializable(package="tfshard")
class HeadParallelAttention(_HeadParallel, keras.layers.MultiHeadAttention):
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
    each device's heads, and its dropout draws what one device draws.

    Same arguments, call arguments and weights as
    ``keras.layers.MultiHeadAttention``. ``num_heads`` must be divisible by
    the size of the mesh axis ``heads`` maps to; otherwise a
    :class:`tfshard.ShardingError` names the layer, the sizes and the fix.
    """

    def build(self, query_shape, value_shape, key_shape=None):
        _check_divisible(self, "num_heads", self.num_heads, "heads")
        super().build(query_shape, value_shape, key_shape)


@keras.saving.register_keras_serializable(package="tfshard")
class HeadParallelGroupedQueryAttention(_HeadParallel, keras.layers.GroupQueryAttention):
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

    _equations = _GQA_EQUATIONS

    def build(self, query_shape, value_shape, key_shape=None):
        _check_divisible(self, "num_query_heads", self.num_query_heads, "heads")
        _check_divisible(self, "num_key_value_heads", self.num_key_value_heads, "kv_heads")
        super().build(query_shape, value_shape, key_shape)
