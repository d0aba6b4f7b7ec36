"""Context parallelism: the sequence split over a mesh axis, attention with
keys and values gathered (``StrategyBuilder.context_parallel(axis)``).

The design, all of it layouts (DTensor has no point-to-point send, so the
ring variant is out; this is the all-gather variant of Llama 3 / Megatron's
``cp_comm_type="allgather"``):

* **Dimension 1 is the sequence.** Every batch tensor of rank 2 or more
  enters the mesh split over the context axis on dimension 1 when the axis
  divides it (token ids, labels, padding masks; ``fit``'s batches and eager
  calls alike, :func:`sequence_axis`). Token-wise layers (embeddings,
  projections, norms, MLPs, residual adds, the loss) need nothing more:
  DTensor propagates the split, and tfshard's own activation layouts (the
  styles') keep it: dimension 1 of a ``[batch, seq, ...]`` activation (and
  of an integer or boolean ``[batch, seq]`` tensor) stays on the context
  axis (:func:`activation_sequence_axis`).
* **Attention** (Keras ``MultiHeadAttention`` / ``GroupQueryAttention``; the
  core ``_compute_attention`` is wrapped per layer, :func:`prepare`):
  queries ``[B, T/cp, N, H]`` stay split; keys and values are relaid out
  whole over the context axis, ``[B, S, N, H]``: forward, one all-gather
  each over the context axis; backward, the key and value gradients each
  device's queries contribute are partial sums, summed over the context axis
  and sliced back (DTensor: an all-reduce, or a reduce-scatter). The scores
  ``[B, N, T/cp, S]`` and their softmax over ``S`` are local; the output
  ``[B, T/cp, N, H]`` is split like the queries. A head split over the
  tensor axis (``HeadParallel``) is kept on every one of them.
* **Masks** are laid out like the scores' rows, ``[B, T/cp, S]``: a padding
  or explicit ``attention_mask`` is relaid out (a local slice); a
  causal-only call (``use_causal_mask=True`` and no other mask, which Keras
  routes to a fused kernel that builds its mask from local shapes) gets an
  explicit causal mask built from global positions, ``row >= column``.

Per device, activations outside attention hold ``1/cp`` of the sequence and
the scores ``1/cp`` of their rows; keys and values are whole inside the core
only. Limits: attention over one sequence axis (4-D projected queries), a
static query length the axis divides; multi-client input and the
vocabulary-parallel lookup take their ids whole (a tensor-parallel style
splits the output again, a local slice).
"""

from __future__ import annotations

import functools

import keras
import numpy as np
import tensorflow as tf

from tfshard import _dtensor, _keras
from tfshard._scope import mesh_computation
from tfshard.errors import StrategyError
from tfshard.layout import KEEP

ATTENTION_LAYERS = (keras.layers.MultiHeadAttention, keras.layers.GroupQueryAttention)


def check_axes(context_axis, data_axis, tensor_axis):
    """The context axis is its own mesh axis (StrategyBuilder.build)."""
    for role, axis in (("data_parallel", data_axis), ("tensor_parallel", tensor_axis)):
        if context_axis is not None and context_axis == axis:
            raise StrategyError(
                f"context_parallel({context_axis!r}) and {role}({axis!r}) use the same "
                "mesh axis; give context parallelism its own axis, e.g. "
                'tfshard.Mesh({"batch": 2, "context": 2, "model": 2}).'
            )


def sequence_axis(strategy, shape):
    """The mesh axis dimension 1 (the sequence) of a tensor of ``shape``
    takes: the context axis when the strategy has one and it divides that
    dimension, else None (whole)."""
    axis = getattr(strategy, "context_axis", None)
    if axis is None or len(shape) < 2 or shape[1] is None:
        return None
    return axis if int(shape[1]) % strategy.mesh.axis_size(axis) == 0 else None


def activation_sequence_axis(strategy, x):
    """:func:`sequence_axis` for an activation ``x`` inside a model: a
    ``[batch, seq, ...]`` tensor (rank 3 or more) or an integer/boolean
    ``[batch, seq]`` one (ids, masks); a float ``[batch, features]`` tensor
    keeps its features whole."""
    rank = len(x.shape)
    if rank < 2 or (rank == 2 and tf.as_dtype(x.dtype).is_floating):
        return None
    return sequence_axis(strategy, tuple(x.shape))


def prepare(layer, strategy):
    """Make attention ``layer`` (created under ``strategy``) attend over the
    split sequence, if the strategy has a context axis."""
    if getattr(strategy, "context_axis", None) is None or not isinstance(layer, ATTENTION_LAYERS):
        return
    _keras.wrap_attention_core(layer, lambda core: _context_parallel_core(core, layer, strategy))


def _on_mesh(x):
    if isinstance(x, keras.KerasTensor) or not isinstance(x, tf.Tensor):
        return False
    return not tf.executing_eagerly() or _dtensor.is_dtensor(x)


def _head_axes(strategy, layer, name, rank):
    """The mesh axes of dimensions 2.. of projection ``name``'s output (the
    heads' split its style declares, e.g. ``HeadParallel``), as many as
    ``rank - 2``."""
    sublayer = next((s for s in _keras.sublayers(layer) if s.name == name), None)
    declaration = None
    if sublayer is not None:
        declaration = strategy.declaration(sublayer, _keras.enclosing_layers())
    trailing = tuple(declaration.outputs or ()) if declaration is not None else ()
    axes = tuple(strategy.logical_rules.axis_for(a) for a in trailing)[-(rank - 2):]
    return (None,) * (rank - 2 - len(axes)) + axes


def _context_parallel_core(core, layer, strategy):
    axis = strategy.context_axis
    size = strategy.mesh.axis_size(axis)

    @functools.wraps(core)
    def attend(query, key, value, attention_mask=None, *args, **kwargs):
        if not _on_mesh(query):
            return core(query, key, value, attention_mask, *args, **kwargs)
        rank = len(query.shape)
        length = query.shape[1]
        if rank != 4:
            raise StrategyError(
                f"context_parallel({axis!r}): attention layer {layer.name!r} attends over "
                f"several axes (projected query of rank {rank}); context parallelism splits "
                "one sequence axis. Use attention_axes=None, or build the strategy without "
                "context_parallel."
            )
        if length is None or int(length) % size:
            raise StrategyError(
                f"context_parallel({axis!r}): attention layer {layer.name!r} got a sequence "
                f"of {length} positions, which the {size} devices of mesh axis {axis!r} "
                "cannot split evenly. Pad (or cut) sequences to a multiple of "
                f"{size}, or use a smaller context axis."
            )
        if attention_mask is not None and len(attention_mask.shape) != 3:
            raise StrategyError(
                f"context_parallel({axis!r}): attention layer {layer.name!r} got an "
                f"attention mask of shape {tuple(attention_mask.shape)}; context "
                "parallelism lays out a [batch, query, key] mask (Keras's form). Pass "
                "attention_mask as [batch, T, S], or a padding mask through the inputs' "
                "Keras mask."
            )
        queries = (KEEP, axis) + _head_axes(strategy, layer, "query", rank)
        # Keys and values whole over the context axis: an all-gather each
        # forward; backward, their gradients (partial sums over each
        # device's query rows) are summed over the axis and sliced back.
        key = strategy.place(key, (KEEP, None) + _head_axes(strategy, layer, "key", rank))
        value = strategy.place(value, (KEEP, None) + _head_axes(strategy, layer, "value", rank))
        query = strategy.place(query, queries)
        if kwargs.pop("use_causal_mask", False) and attention_mask is None:
            attention_mask = _causal_mask(int(length), int(key.shape[1]))
        if attention_mask is not None:
            # The scores' rows: [B, T/cp, S] (a local slice of a whole mask).
            attention_mask = _place_mask(strategy, attention_mask, (KEEP, axis, None))
        output, scores = core(query, key, value, attention_mask, *args, **kwargs)
        return strategy.place(output, queries), scores

    return attend


def _sequence_split_operand(x1):
    strategy = mesh_computation()
    return (
        strategy is not None
        and (getattr(strategy, "context_axis", None) is not None
             or getattr(strategy, "sequence_parallel", False))  # Megatron-SP splits it too
        and _on_mesh(x1)
        and len(x1.shape) >= 3
    )


def matmul(original, x1, x2):
    """Keras's ``matmul`` (every ``Dense``) of a ``[batch, seq, ..., in]``
    tensor by an ``[in, out]`` kernel as one broadcasting ``tf.matmul``
    under context parallelism: Keras's ``tf.tensordot`` folds batch and
    sequence into one dimension, and DTensor cannot split a folded
    dimension over two axes, so it gathers the sequence (an all-gather over
    the context axis per projection). Same values."""
    if not _sequence_split_operand(x1) or len(getattr(x2, "shape", ())) != 2:
        return original(x1, x2)
    x2 = tf.convert_to_tensor(x2)
    if not (x1.dtype.is_floating and x2.dtype.is_floating):
        return original(x1, x2)
    dtype = keras.backend.result_type(x1.dtype.name, x2.dtype.name)
    return tf.matmul(tf.cast(x1, dtype), tf.cast(x2, dtype))


def add(original, x1, x2):
    """Keras's ``add`` (``keras.ops.add``, every ``Dense``/``EinsumDense``
    bias) with a plain broadcasting ``tf.add`` where Keras would pick
    ``tf.nn.bias_add``, for a ``[batch, seq, ...]`` tensor under context
    parallelism: DTensor's ``BiasAdd`` expansion makes every dimension but
    the batch and the channels whole (an all-gather of the sequence over the
    context axis after every biased projection); ``AddV2`` keeps the split.
    Same values: a bias add is a broadcasting add."""
    if not _sequence_split_operand(x1) or not isinstance(
        x2, (tf.Tensor, tf.Variable, keras.Variable)
    ):
        return original(x1, x2)
    x2 = tf.convert_to_tensor(x2)
    dtype = keras.backend.result_type(x1.dtype.name, x2.dtype.name)
    return tf.add(tf.cast(x1, dtype), tf.cast(x2, dtype))


def _place_mask(strategy, mask, spec):
    """``mask`` laid out as ``spec``, moved as int32: DTensor's all-to-all
    (a padding mask built from a split ``[batch, seq]`` one arrives split
    over the keys) has no boolean kernel on CPU."""
    if not isinstance(mask, tf.Tensor) or mask.dtype != tf.bool:
        return strategy.place(mask, spec)
    return tf.cast(strategy.place(tf.cast(mask, tf.int32), spec), tf.bool)


def _causal_mask(queries, keys):
    """Keras's causal mask ``[1, T, S]``: position t sees keys s <= t."""
    return (np.arange(queries)[:, None] >= np.arange(keys)[None, :])[None]
