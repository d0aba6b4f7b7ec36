"""``reshape`` of flattened rows back into (batch, ...) dims: its output
laid out whole but for the batch, where DTensor cannot split it anyway.

DTensor's Reshape expander keeps a split only on a dim whose outermost
factor is the outermost factor of an input dim (``(B, S, H*D) -> (B, S, H,
D)`` keeps a head split, ``(B*S, F) -> (B, S, F)`` a feature split). An
output dim that starts inside the input's rows (``(B*S*H, D) -> (B, S,
H*D)``, as Qwen3.5's gated delta-net does after its gated norm) can never
keep one. Layout propagation still pushes a split onto such a dim when a
layer's input relayout follows (the row-parallel ``out_proj`` splits
``H*D`` over the tensor axis): the forward pass copes (computed whole, then
sliced), but in the gradient the ``RelayoutLike`` that returns ``dy`` to the
reshape output's layout gets another layout from the reshape gradient it
feeds, and SPMD expansion fails ("output layout of Relayout op after layout
propagation does not match layout specified by Relayout op"). Laying such
an output out ``(KEEP, None, ...)`` (the batch keeps its split) is what
DTensor computes anyway: the layer's relayout then slices locally and the
values are the reshape's.

Which reshapes: every output dim past the batch (of size > 1) is known and
starts inside an input dim other than at its outermost factor; or, with the
batch unknown (a step is traced for any batch size), rows ``(N, d)`` made
``(batch, S, -1)``, whose last dim cannot be told from the shapes alone:
it is ``d`` only when ``N = batch * S``, and then a split of ``d`` is
gathered (values unchanged; one all-gather that DTensor could have spared).
Every other reshape runs as is.
"""

from __future__ import annotations

import math

import tensorflow as tf

from tfshard._ops._common import is_tensor, on_mesh
from tfshard.layout import KEEP


def _dims(shape):
    """Static dims, None where unknown; None for an unknown rank."""
    shape = tf.TensorShape(shape)
    return None if shape.rank is None else list(shape.as_list())


def rows_unflattened(in_shape, out_shape):
    """True when no output dim past dim 0 can carry a split of the input
    (see the module docstring)."""
    src, dst = _dims(in_shape), _dims(out_shape)
    # Rows are flattened into dim 0 of an input of rank 2 or more (a weight
    # vector reshaped to broadcast, (D,) -> (1, 1, D), is no such reshape).
    if not src or not dst or len(src) < 2 or len(dst) < 2 or None in src[1:]:
        return False
    if None not in dst[1:]:
        starts = {math.prod(src[i:]) for i in range(1, len(src))}
        inner = [j for j in range(1, len(dst)) if dst[j] > 1]
        return bool(inner) and all(math.prod(dst[j:]) not in starts for j in inner)
    # The batch unknown: rows (N, d) -> (batch, S, -1).
    return (len(src) == 2 and len(dst) == 3 and src[0] is None and dst[0] is None
            and dst[1] is not None and dst[1] > 1 and dst[2] is None)


def reshape(original, x, newshape):
    """``keras.ops.reshape`` on a mesh: rows unflattened into dims DTensor
    cannot split are laid out whole but for the batch (see the module
    docstring); every other reshape runs as is."""
    strategy = on_mesh(x)
    if strategy is None or tf.executing_eagerly() or not is_tensor(x) or isinstance(x, tf.SparseTensor):
        return original(x, newshape)
    out = original(x, newshape)
    if not rows_unflattened(tf.convert_to_tensor(x).shape, out.shape):
        return out
    return strategy.place(out, (KEEP,) + (None,) * (out.shape.rank - 1))
