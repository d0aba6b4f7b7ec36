"""keras-hub's RWKV-7 recurrence (the generalized delta rule of its time
mixing) on a mesh.

keras-hub 0.32 computes it, on the TensorFlow backend, as a Python loop
over the (static) sequence length that writes each step's output into a
``tf.TensorArray`` (``rwkv7_layer.rnn_generalized_delta_rule``). In a
graph a TensorArray is a TensorList (``EmptyTensorList``,
``TensorListSetItem``, ``TensorListStack`` and, in the gradient,
``TensorListGetItem``...), for which DTensor has no layout propagation;
and its per-step slices ``x[:, t]`` drop a dim, which DTensor lays out
wrongly once the heads are split (the receptance comes split by heads:
"Attempted to shard two or more tensor dimensions over mesh dimension").

Decision: the same loop, unrolled as keras-hub unrolls it, the step outputs
kept in a Python list and concatenated once, every input laid out once,
before the loop, as ``[batch (kept), time whole, heads over the tensor
axis, head dim whole]``, and each step's slice taken with the time dim kept
(``_row``/``_column``). The recurrence is independent per batch row and per
head, so each device runs it on its own rows and heads with no
communication, and the numbers are one device's (the same ops in the same
order: checked equal to keras-hub's loop, forward and gradients, in
``tests/test_rwkv7_scan.py``). Memory is keras-hub's: the per-step states
the gradient needs, O(T * B * H * N^2), not O(T^2). A ``tf.while_loop``
with plain loop-carried tensors was not taken: its gradient accumulates the
per-step values in TensorLists (while_v2), which DTensor cannot lay out
either; a chunked (parallel) form would change the arithmetic.

Limits: the sequence length must be static (so must keras-hub's own loop,
``range(T)``); with a dynamic one keras-hub's original runs (and fails on a
mesh as before). Generation (``generate_call``, a cache state of shape
``(B, H, N, N)``) goes through the same replacement, the cache laid out
like the state; it is not tested on a mesh. Graph size grows with T, as
keras-hub's own unrolled loop does.
"""

from __future__ import annotations

import tensorflow as tf

from tfshard import _keras
from tfshard._ops._common import on_mesh
from tfshard.layout import KEEP


def _heads_axis(strategy, heads):
    """The mesh axis the heads are split over: the ``heads`` rule's axis
    when it divides the number of heads, else None (whole)."""
    axis = strategy.logical_rules.axis_for("heads")
    if axis is None or heads % strategy.mesh.axis_size(axis):
        return None
    return axis


# Step t of a (B, T, H, N) tensor as a row (B, H, 1, N) or a column (B, H, N, 1):
# a slice that keeps the time dim, transposed. Not x[:, t]: DTensor lays the
# output of a StridedSlice that drops a dim (shrink_axis_mask) out wrongly,
# the input's splits shifted onto the wrong dims (silently wrong numbers;
# pinned in tests/test_rwkv7_scan.py); nor tf.unstack/tf.stack: DTensor
# expands their gradients inconsistently ("SPMD expansion resulted in op
# output inconsistent with the provided layout").
def _row(x, t):
    return tf.transpose(x[:, t:t + 1], (0, 2, 1, 3))


def _column(x, t):
    return tf.transpose(x[:, t:t + 1], (0, 2, 3, 1))


def delta_rule_scan(original, r, w, k, v, a, b, initial_state=None, output_final_state=True,
                    head_first=False):
    """``rnn_generalized_delta_rule`` on a mesh: the same arithmetic as
    keras-hub's TensorFlow path, without a TensorArray (see the module
    docstring). Inputs ``(B, T, H, N)`` (``(B, H, T, N)`` if
    ``head_first``), state ``(B, H, N, N)``."""
    strategy = on_mesh(r, w, k, v, a, b, initial_state)
    if strategy is None:
        return original(r, w, k, v, a, b, initial_state=initial_state,
                        output_final_state=output_final_state, head_first=head_first)
    dtype = r.dtype
    inputs = []
    for x in (r, w, k, v, a, b):
        x = tf.cast(x, "float32")
        inputs.append(tf.transpose(x, (0, 2, 1, 3)) if head_first else x)
    batch, steps, heads, size = inputs[0].shape
    if steps is None or heads is None or size is None:
        return original(r, w, k, v, a, b, initial_state=initial_state,
                        output_final_state=output_final_state, head_first=head_first)
    axis = _heads_axis(strategy, heads)
    r, w, k, v, a, b = (strategy.place(x, (KEEP, None, axis, None)) for x in inputs)
    w = tf.exp(-tf.exp(w))
    # The zero state is made from the inputs, so it takes their layout
    # (batch and heads split) with no layout of its own to reconcile.
    zeros = tf.zeros_like(_column(k, 0) @ _row(k, 0))  # (B, H, N, N)
    state = zeros if initial_state is None else tf.cast(initial_state, "float32") + zeros
    state = strategy.place(state, (KEEP, axis, None, None))

    # keras-hub's step (rwkv7_layer.rnn_generalized_delta_rule), term for
    # term: state = state * w_t + state @ a_t @ b_t + v_t @ k_t; o_t = state @ r_t.
    outputs = []
    for t in range(steps):
        state = state * _row(w, t) + state @ _column(a, t) @ _row(b, t) + _column(v, t) @ _row(k, t)
        o = tf.transpose(state @ _column(r, t), (0, 3, 1, 2))  # (B, 1, H, N)
        outputs.append(tf.cast(o, dtype))
    out = tf.cast(tf.concat(outputs, axis=1), dtype)  # (B, T, H, N)
    if output_final_state:
        return out, state
    return out


def prepare(layer):
    """Make keras-hub's RWKV-7 time mixing ``layer`` (created under a
    strategy) run its recurrence with :func:`delta_rule_scan` on a mesh
    (off a mesh the replacement calls keras-hub's original)."""
    _keras.wrap_recurrence_scans(
        layer, lambda scan: lambda *args, **kwargs: delta_rule_scan(scan, *args, **kwargs))
