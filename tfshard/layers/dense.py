"""Megatron-style column- and row-parallel Dense layers.

Each is ``keras.layers.Dense`` carrying a style (:mod:`tfshard.styles`):
the same weights, arguments and math, split as the style declares. A
Column -> Row pair is the tensor-parallel MLP: the column layer splits the
hidden units over the tensor axis, the row layer contracts over them, and one
all-reduce joins the partial sums. ``keras.layers.Dense`` under a plan entry
``ColumnParallel()`` / ``RowParallel()`` is the same split.
"""

from __future__ import annotations

import keras

from tfshard.layers.base import StyledLayer
from tfshard.styles import ColumnParallel, RowParallel


@keras.saving.register_keras_serializable(package="tfshard")
class ColumnParallelDense(StyledLayer, keras.layers.Dense):
    """``keras.layers.Dense`` with its output units split over the tensor axis
    (style :class:`tfshard.styles.ColumnParallel`).

    kernel ``(None, tp)``, bias ``(tp,)``. The input is used whole (replicated
    over the tensor axis); the output stays sharded on its last dimension
    unless ``gather_output=True``.

    Collectives: none forward (all-gather if ``gather_output``); the input
    gradient is all-reduced over the tensor axis in the backward pass
    (Megatron's *f*: identity forward, all-reduce backward).

    Args:
        units, activation, use_bias, ...: as ``keras.layers.Dense``.
        gather_output: all-gather the output so it is replicated.
        logical_dim: the logical name of the split dimension; the strategy's
            rules map it to a mesh axis (``tensor_parallel`` maps ``d_ff``).
    """

    def __init__(self, units, *, gather_output=False, logical_dim="d_ff", **kwargs):
        super().__init__(units, **kwargs)
        self.gather_output = bool(gather_output)
        self.logical_dim = logical_dim

    @property
    def tfshard_style(self):
        return ColumnParallel(dim=self.logical_dim, gather_output=self.gather_output)

    def get_config(self):
        config = super().get_config()
        config.update(gather_output=self.gather_output, logical_dim=self.logical_dim)
        return config


@keras.saving.register_keras_serializable(package="tfshard")
class RowParallelDense(StyledLayer, keras.layers.Dense):
    """``keras.layers.Dense`` with its input features split over the tensor
    axis; the partial products are all-reduced (style
    :class:`tfshard.styles.RowParallel`).

    kernel ``(tp, None)``, bias replicated, output replicated over the tensor
    axis.

    Collectives: one all-reduce of the output over the tensor axis in the
    forward pass (Megatron's *g*: all-reduce forward, identity backward).

    Args:
        units, activation, use_bias, ...: as ``keras.layers.Dense``.
        input_is_parallel: the input already arrives split on its last
            dimension (e.g. from a ``ColumnParallelDense``). When False, a
            replicated input is split locally, which needs no communication.
            Either way the layer lays its input out as it needs, so the flag
            documents intent rather than changing results.
        logical_dim: the logical name of the split (input) dimension.
    """

    def __init__(self, units, *, input_is_parallel=True, logical_dim="d_ff", **kwargs):
        super().__init__(units, **kwargs)
        self.input_is_parallel = bool(input_is_parallel)
        self.logical_dim = logical_dim

    @property
    def tfshard_style(self):
        return RowParallel(dim=self.logical_dim)

    def get_config(self):
        config = super().get_config()
        config.update(input_is_parallel=self.input_is_parallel, logical_dim=self.logical_dim)
        return config
