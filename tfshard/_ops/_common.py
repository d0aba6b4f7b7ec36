"""What the op replacements share: whether an op runs on a mesh, and
laying a tensor out whole."""

from __future__ import annotations

import keras
import tensorflow as tf

from tfshard import _dtensor
from tfshard.layout import KEEP
from tfshard.strategy import mesh_computation


def on_mesh(*tensors):
    """The strategy an op on ``tensors`` runs under, or None for a plain op.

    Traced code decides by context; eager code only for DTensor inputs."""
    strategy = mesh_computation()
    if strategy is None:
        return None
    if tf.executing_eagerly() and not any(_dtensor.is_dtensor(t) for t in tensors):
        return None
    return strategy


def is_tensor(x):
    return isinstance(x, (tf.Tensor, tf.Variable, keras.Variable)) and not isinstance(
        x, keras.KerasTensor
    )


def replicated(strategy, x):
    """``x`` whole on every device (an all-gather of whatever is split)."""
    if not is_tensor(x) or isinstance(x, tf.SparseTensor):
        return x
    x = tf.convert_to_tensor(x)
    return strategy.place(x, (None,) * x.shape.rank)




def whole(strategy, x, keep_batch):
    """``x`` with every dimension whole; ``keep_batch``: dimension 0 keeps
    its split. A no-op (no data moves) for dimensions already whole; an
    all-gather of those that are split."""
    if not is_tensor(x) or isinstance(x, tf.SparseTensor):
        return x
    x = tf.convert_to_tensor(x)
    rank = x.shape.rank
    if not rank:
        return x
    first = KEEP if keep_batch else None
    return strategy.place(x, (first,) + (None,) * (rank - 1))


def channel_split_possible(strategy):
    """A mesh with devices beyond the data axis can split a channel dim."""
    return strategy.mesh.size > strategy.data_parallel_size
