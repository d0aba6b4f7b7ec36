"""Layer and RMS normalization over a hidden dimension that may be split.

Each is its Keras layer carrying the style
:class:`tfshard.styles.HiddenParallel` (logical ``d_model``). By default
``d_model`` is replicated (``tensor_parallel`` does not map it), and the
layers are Keras's own math on whole rows. With the rule
``{"d_model": "model"}`` the hidden dimension of the activations and of
``gamma``/``beta``/``scale`` is split over that axis: each device normalizes
its slice, and the per-row statistics are the only communication:

* ``ShardedLayerNormalization``: mean and variance are each a local sum plus
  an all-reduce over the split axis (two all-reduces of ``(..., 1)``).
* ``ShardedRMSNormalization``: the mean square is one all-reduce.

The activation keeps the split, so a chain of element-wise ops and norms on
the hidden dimension (residual adds, dropout, norms) moves no activations
between devices.
"""

from __future__ import annotations

import keras

from tfshard.errors import ShardingError
from tfshard.layers.base import StyledLayer
from tfshard.styles import HiddenParallel


class _HiddenShardedNorm(StyledLayer):
    logical_dim = "d_model"

    @property
    def tfshard_style(self):
        return HiddenParallel(dim=self.logical_dim)

    def build(self, input_shape):
        self._rank = len(input_shape)
        self._check_hidden(input_shape)
        super().build(input_shape)

    def _check_hidden(self, input_shape):
        strategy = self.sharding_strategy
        axis = self._mesh_axis(self.logical_dim)
        if strategy is None or axis is None or not self.logical_axes:
            return  # multi-axis normalization keeps its weights whole
        hidden = input_shape[-1]
        size = strategy.mesh.axis_size(axis)
        if hidden is not None and hidden % size:
            raise ShardingError(
                f"{type(self).__name__} {self.name!r}: the hidden size "
                f"{hidden} (last input dimension, logical {self.logical_dim!r}) "
                f"cannot be split evenly over mesh axis {axis!r} of size "
                f"{size}. Use a hidden size that is a multiple of {size}, or "
                f"the rule {{{self.logical_dim!r}: None}} to keep it whole."
            )


@keras.saving.register_keras_serializable(package="tfshard")
class ShardedLayerNormalization(_HiddenShardedNorm, keras.layers.LayerNormalization):
    """``keras.layers.LayerNormalization`` whose hidden dimension may be split
    over a mesh axis (logical ``d_model``; ``gamma``/``beta``: ``("d_model",)``).

    Same arguments, weights and math as Keras. Normalizing over several axes
    is supported with whole (replicated) weights. Collectives with ``d_model``
    split: two all-reduces of the per-row statistics forward; none otherwise.
    """

    _weight_names = ("gamma", "beta")


@keras.saving.register_keras_serializable(package="tfshard")
class ShardedRMSNormalization(_HiddenShardedNorm, keras.layers.RMSNormalization):
    """``keras.layers.RMSNormalization`` whose hidden dimension may be split
    over a mesh axis (logical ``d_model``; ``scale``: ``("d_model",)``).

    Collectives with ``d_model`` split: one all-reduce of the per-row mean
    square forward.
    """

    _weight_names = ("scale",)
