"""Sequence parallelism (Megatron-SP, Korthikanti et al., 2022):
``StrategyBuilder.sequence_parallel()``.

The regions of a transformer block outside its tensor-parallel layers (norms,
dropout, residual adds) hold the sequence split over the *tensor* axis
instead of whole on every device of it. In layouts:

* a tensor-parallel layer whose output is whole in width (``RowParallel``,
  ``VocabParallel``, a gathered ``ColumnParallel``) lays its output out with
  dimension 1 (the sequence) split over the tensor axis: the partial sums
  are reduce-scattered over the sequence instead of all-reduced (Megatron's
  *g*: reduce-scatter forward, all-gather backward);
* a layer that reads its input whole (``ColumnParallel``, the projections of
  ``HeadParallel`` attention) gathers it (Megatron's *f*: all-gather
  forward, reduce-scatter backward);
* everything between keeps the split by DTensor's layout propagation.

Same values; activations between tensor-parallel regions take ``1/tp`` of
the memory. Dimension 1 must be the sequence (``[batch, seq, ...]``
activations); one the tensor axis cannot divide stays whole. It splits the
same dimension as context parallelism, so the two do not combine.
"""

from __future__ import annotations

import tensorflow as tf

from tfshard.errors import StrategyError


def check(enabled, tensor_axis, context_axis):
    if not enabled:
        return
    if tensor_axis is None:
        raise StrategyError(
            "sequence_parallel(): it splits the sequence over the tensor axis, and the "
            "strategy has none; call tensor_parallel(axis) too, or drop sequence_parallel()."
        )
    if context_axis is not None:
        raise StrategyError(
            f"sequence_parallel() with context_parallel({context_axis!r}): both split "
            "dimension 1 (the sequence), over different axes; use one of them."
        )


def output_sequence_axis(strategy, declaration, y):
    """The mesh axis dimension 1 of output ``y`` takes under sequence
    parallelism (the tensor axis), or None."""
    axis = strategy.tensor_axis
    if not getattr(strategy, "sequence_parallel", False) or declaration is None:
        return None
    if declaration.outputs != () or len(y.shape) < 3 or y.shape[1] is None:
        return None
    rules = strategy.logical_rules
    tensor_parallel = any(
        rules.axis_for(name) == axis for axes in declaration.weights.values() for name in axes
    )
    if not tensor_parallel or int(y.shape[1]) % strategy.mesh.axis_size(axis):
        return None
    return axis


def scatter_sequence(strategy, y, trailing, axis, *, after_bias):
    """``y`` (a tensor-parallel layer's output, partial sums over the tensor
    axis) laid out with dimension 1 split over ``axis``: forward, a
    reduce-scatter (DTensor: an all-reduce and a slice, which its
    optimizer fuses into one reduce-scatter); backward, an all-gather.

    ``after_bias``: the layer added a bias after the partial sums. DTensor's
    own gradient of that relayout (``RelayoutLike``) then fails layout
    propagation, so the backward all-gather is written out; the forward
    all-reduce then has two users and stays an all-reduce plus a slice."""
    split = strategy.constrain_spec(y, trailing, sequence=axis)
    if not after_bias:
        return strategy.place(y, split)
    whole = strategy.constrain_spec(y, trailing)

    @tf.custom_gradient
    def scatter(x):
        def grad(upstream):
            return strategy.place(upstream, whole)

        return strategy.place(x, split), grad

    return scatter(y)
