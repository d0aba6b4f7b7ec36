"""Contractions (``matmul``, ``tensordot``, ``einsum``) whose contracted dim
is split over one mesh axis in one operand and over another in the other.

DTensor's matmul expander reconciles a contracted dim split on one side
only (it slices the whole side, then all-reduces the partial products), but
rejects two different splits ("Contracting dimension for matmul has sharding
dimension model for the left input and batch for the right input"). Layouts
are not known when a step is traced (one traced function serves every
layout), so the fix is a layout that cannot mismatch: the contracted dims
of a matrix used as the right-hand weight (a rank-2 second operand that is
not read from a variable) are laid out whole first (a DTensor layout may
keep only one dim's split as it is, so a rank-2 operand is what one
relayout can do without gathering its other dim). That is one relayout:
no data moves where they are whole already; a split one is all-gathered,
then the expander slices it to the left operand's split (sum over the
contracted dim k of x[.., k] w[k, ..]: each device sums its own k-slice,
then one all-reduce, as before).

Variables are left alone: tfshard lays them out (``Strategy.compute_spec``
gathers a weight's data-axis split while an op reads it), so their
contracted dims already agree with the activations'. Activations of higher
rank (attention scores, MoE dispatch) are left alone too: their contracted
dims are split alike by the layer's plan, and gathering them would cost
every step.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from tfshard import _dtensor
from tfshard._ops._common import is_tensor, on_mesh
from tfshard.layout import KEEP

# Ops a weight read passes through before it reaches a contraction.
_VIEW_OPS = {"Identity", "Transpose", "Cast", "Relayout", "RelayoutLike", "Reshape",
             "ReadVariableOp", "ResourceGather", "DTensorLayout"}


def _read_from_variable(x, depth=6):
    """True if graph tensor ``x`` is a variable read, maybe transposed or cast."""
    op = getattr(x, "op", None)
    for _ in range(depth):
        if op is None or op.type not in _VIEW_OPS:
            return False
        if op.type == "ReadVariableOp" or op.type == "ResourceGather":
            return True
        if not op.inputs:
            return False
        x = op.inputs[0]
        if x.dtype == tf.resource:
            return True
        op = x.op
    return False


def _weight_matrix(x):
    """``x`` as a tensor when it is a rank-2 tensor that is not a variable
    read (a matrix used as a weight), else None."""
    if not is_tensor(x) or isinstance(x, (tf.Variable, keras.Variable, tf.SparseTensor)):
        return None
    x = tf.convert_to_tensor(x)
    if x.shape.rank != 2 or _read_from_variable(x):
        return None
    return x


def _with_whole_dims(strategy, x, dims):
    """``x`` with ``dims`` whole and every other dim keeping its split."""
    spec = [KEEP] * x.shape.rank
    for d in dims:
        spec[d] = None
    if tf.executing_eagerly():
        if not _dtensor.is_dtensor(x):
            return x
        current = _dtensor.spec_of_layout(_dtensor.layout_of(x))
        if all(current[d] is None for d in dims):
            return x
        spec = [None if d in dims else axis for d, axis in enumerate(current)]
    return strategy.place(x, tuple(spec))


def _prepare(x1, x2, contracted):
    """``x2`` with its ``contracted`` dims whole when it is a weight matrix
    on a mesh (see the module docstring), else ``x2`` unchanged."""
    strategy = on_mesh(x1, x2)
    if strategy is None:
        return x2
    w = _weight_matrix(x2)
    if w is None:
        return x2
    dims = sorted({d % 2 for d in contracted})
    return _with_whole_dims(strategy, w, dims) if dims else x2


def matmul(original, x1, x2):
    """``keras.ops.matmul``: a rank-2 ``x2`` contracts its dim 0."""
    return original(x1, _prepare(x1, x2, [0]))


def tensordot(original, x1, x2, axes=2):
    """``keras.ops.tensordot``: ``x2`` contracts its first ``axes`` dims, or
    ``axes[1]``."""
    if isinstance(axes, int):
        contracted = list(range(axes))
    else:
        try:
            second = axes[1]
            contracted = [int(a) for a in second] if isinstance(second, (list, tuple)) else [int(second)]
        except (TypeError, ValueError, IndexError):
            return original(x1, x2, axes=axes)
    return original(x1, _prepare(x1, x2, contracted), axes=axes)


def _einsum_contracted(subscripts, rank):
    """Dims of the second operand that ``subscripts`` (two operands, explicit
    output) sums over, or None when it cannot say (ellipsis, implicit
    output)."""
    if not isinstance(subscripts, str):
        return None
    text = subscripts.replace(" ", "")
    if "->" not in text or "." in text:
        return None
    inputs, out = text.split("->")
    parts = inputs.split(",")
    if len(parts) != 2 or len(parts[1]) != rank:
        return None
    first, second = parts
    return [d for d, label in enumerate(second) if label in first and label not in out]


def einsum(original, subscripts, *operands, **kwargs):
    """``keras.ops.einsum`` of two operands: the second's summed dims."""
    if len(operands) == 2 and is_tensor(operands[1]):
        rank = len(operands[1].shape)
        contracted = _einsum_contracted(subscripts, rank) if rank == 2 else None
        if contracted:
            operands = (operands[0], _prepare(operands[0], operands[1], contracted))
    return original(subscripts, *operands, **kwargs)
