"""ZeRO over the data axis: which training state is split over it.

ZeRO (Rajbhandari et al., 2020) removes the data-parallel copies of
training state; tfshard does it with layouts alone:

=====  ==========================  ============================================
stage  split over the data axis    communication per step (data axis)
=====  ==========================  ============================================
1      optimizer slots             gradients all-reduced; each update slice
                                   all-gathered into the replicated parameter
2      slots and gradients         gradients reduce-scattered (sum, each device
                                   keeps its slice); update all-gathered
3      slots, gradients and        parameters all-gathered when a layer reads
       trainable parameters        them; their gradients reduce-scattered
=====  ==========================  ============================================

Every piece of state is split on the first dimension that the tensor-parallel
layout leaves whole and that the data axis divides, so a tensor-parallel
weight's parameter, gradient and Adam slots each hold global / (dp x tp) per
device at stage 3. Tensors no dimension of which divides keep their
tensor-parallel layout. Numerics are those of one device at every stage.

The gathered copy of a stage-3 parameter lives from the layer's forward
until its backward (TensorFlow keeps what the gradient reads), as FSDP with
``reshard_after_forward=False`` does; ``tfshard.memory.memory_by_kind``
lists these copies as ``parameter_copies``.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from tfshard import _keras
from tfshard.errors import StrategyError
from tfshard.tensors import VariableLayout

STAGES = (1, 2, 3)


def check_stage(axis, stage):
    """``shard_optimizer_state(axis, stage)``'s own check (before build)."""
    if isinstance(stage, bool) or stage not in STAGES:
        raise StrategyError(
            f"shard_optimizer_state({axis!r}, stage={stage!r}): stage must be 1 "
            "(optimizer slots), 2 (slots and gradients) or 3 (slots, gradients "
            "and parameters)."
        )
    return int(stage)


def check_combination(axis, stage, data_axis):
    """Raise ``StrategyError`` for a stage that cannot run with the
    strategy's axes (checked by ``StrategyBuilder.build``)."""
    if stage < 2:
        return
    call = f"shard_optimizer_state({axis!r}, stage={stage})"
    if data_axis is None:
        raise StrategyError(
            f"{call}: stage {stage} reduce-scatters gradients over the data-parallel "
            f"axis, and this strategy has none; add .data_parallel({axis!r}), or use "
            "stage=1."
        )
    if axis != data_axis:
        raise StrategyError(
            f"{call}: stage {stage} splits gradients over the axis their data-parallel "
            f"sum runs over, the data axis {data_axis!r}, not {axis!r}; use "
            f"shard_optimizer_state({data_axis!r}, stage={stage}), or stage=1 to split "
            f"only the optimizer slots over {axis!r}."
        )


@dataclasses.dataclass(frozen=True)
class ZeroSharding:
    """Which state a strategy splits over ``axis`` (``None``: ZeRO off)."""

    axis: object = None
    stage: int = 0
    parts: int = 1  # the size of ``axis``

    def split(self, spec, shape):
        """``spec`` plus ``axis`` on the first dimension that is still whole
        and that ``axis`` divides (``spec`` itself when ``axis`` is already
        used or nothing divides)."""
        spec = tuple(spec)
        if self.axis is None or self.axis in spec:
            return spec
        for dim, (entry, size) in enumerate(zip(spec, shape)):
            if entry is None and int(size) % self.parts == 0 and int(size) >= self.parts:
                return spec[:dim] + (self.axis,) + spec[dim + 1:]
        return spec

    def state_spec(self, spec, shape):
        return self.split(spec, shape)

    def gradient_spec(self, spec, shape):
        return self.split(spec, shape) if self.stage >= 2 else tuple(spec)

    def parameter_spec(self, spec, shape, trainable):
        return self.split(spec, shape) if self.stage >= 3 and trainable else tuple(spec)


def hold_gradients(strategy, grads, variables):
    """``grads`` of ``variables`` laid out as ``strategy`` holds them for the
    optimizer update (with ZeRO; otherwise unchanged).

    First like the parameter, so the slots' data-axis split cannot propagate
    back into the backward pass (DTensor then fails with "output layout of
    Relayout op ... does not match"); then, at stage 2, split like the
    slots: the data-parallel sum (all-reduce) followed by a slice, which
    DTensor fuses into one reduce-scatter. Sparse gradients and variables of
    other strategies are left as they are.
    """
    if strategy.optimizer_state_axis is None:
        return list(grads)
    out = []
    for grad, variable in zip(grads, variables):
        layout = _keras.variable_layout(variable)
        if (
            grad is not None
            and isinstance(layout, VariableLayout)
            and layout.strategy is strategy
            and not isinstance(grad, tf.IndexedSlices)
        ):
            grad = strategy.place(grad, layout.spec)
            held = strategy.gradient_spec(layout.spec, tuple(variable.shape))
            if held != layout.spec:
                grad = strategy.place(grad, held)
        out.append(grad)
    return out
