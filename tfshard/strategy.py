"""Strategies: a mesh, its data and tensor axes, and the rules that lay out
every variable and activation.

    strategy = (tfshard.StrategyBuilder(mesh)
                .data_parallel("batch")
                .tensor_parallel("model")
                .build())
    with strategy.scope():
        model = build_my_keras_model()

Variables created inside ``scope()`` are DTensor variables laid out by the
strategy's *plan* (see :mod:`tfshard.styles`), resolved in one place,
:meth:`Strategy.variable_spec`, in order of precedence:

1. a plan entry for the variable's path (``.shard(pattern, spec)``, a keras
   ``LayoutMap`` key), matched in full;
2. the logical axes the owning layer's *style* declares (a plan entry for
   the layer's path or class, its parent's composite style, or the style a
   tfshard layer carries), mapped to mesh axes by the logical rules
   (``.rules({"heads": "model"})``; ``tensor_parallel`` maps the standard
   tensor-parallel dimensions ``heads``, ``kv_heads``, ``d_ff``, ``vocab``,
   ``channels`` and ``experts`` to its axis unless a rule says otherwise);
3. otherwise replicated.

Activations follow the same plan: a layer's style lays out its input and
output, and ``"<layer path>/output"`` entries lay out a layer's output.

This module holds the builder; the :class:`Strategy` it builds is defined in
``tfshard._strategy`` and re-exported here.
"""

from __future__ import annotations

from tfshard import _keras
from tfshard import context_parallel as _context_parallel
from tfshard import sequence_parallel as _sequence_parallel
from tfshard._scope import (  # noqa: F401  (re-exported: the active strategy)
    _computing_on,
    computing_on,
    current_strategy,
    mesh_computation,
    set_keras_distribution_resolver,
)
from tfshard._strategy import Strategy  # noqa: F401  (re-exported: defined there)
from tfshard.errors import StrategyError
from tfshard.layout import LogicalRules
from tfshard.mesh import Mesh
from tfshard.plans import Plan
from tfshard.recompute import check_mode as check_recompute_mode
from tfshard.tensors import VariableLayout
from tfshard.zero import check_combination, check_stage

# The documented names (the API reference renders these, Strategy included);
# the active-strategy functions above are re-exported from tfshard._scope.
__all__ = [
    "Strategy",
    "StrategyBuilder",
    "TENSOR_PARALLEL_DIMS",
    "completed_rules",
    "set_keras_converter",
    "strategy_of_layer",
]

# "experts" (ExpertParallelMoE) defaults to the tensor axis too; a rule
# {"experts": <data axis>} gives GShard's experts-over-data layout instead.
TENSOR_PARALLEL_DIMS = ("heads", "kv_heads", "d_ff", "vocab", "channels", "experts")


_keras_converter = None


def set_keras_converter(converter):
    """Register ``converter(obj) -> StrategyBuilder`` for
    :meth:`StrategyBuilder.from_keras` (``tfshard.interop`` registers
    :func:`~tfshard.interop.builder_from_keras`; ``None`` clears it)."""
    global _keras_converter
    _keras_converter = converter


def completed_rules(rules, data_axis=None, tensor_axis=None):
    """``rules`` (a mapping or Mesh-TF string) completed as
    ``data_parallel(data_axis).tensor_parallel(tensor_axis)`` completes them:
    ``batch`` to the data axis and :data:`TENSOR_PARALLEL_DIMS` to the
    tensor axis, unless a rule says otherwise."""
    rules = LogicalRules(rules)
    if data_axis is not None:
        rules.set_default("batch", data_axis)
    if tensor_axis is not None:
        for dim in TENSOR_PARALLEL_DIMS:
            rules.set_default(dim, tensor_axis)
    return rules


class StrategyBuilder:
    """Fluent builder of a :class:`Strategy`.

    ``StrategyBuilder(mesh).data_parallel("batch").tensor_parallel("model")``
    ``.rules({...}).shard(pattern, spec).build()``
    """

    def __init__(self, mesh):
        if not isinstance(mesh, Mesh):
            raise StrategyError(
                f"StrategyBuilder(mesh): mesh must be a tfshard.Mesh, got "
                f"{type(mesh).__name__}; build one with "
                'tfshard.Mesh({"batch": 2, "model": 4}).'
            )
        self._mesh = mesh
        self._data_axis = None
        self._tensor_axis = None
        self._optimizer_state_axis = None
        self._zero_stage = 0
        self._rules = LogicalRules()
        self._plan = Plan()
        self._random_streams = "global"
        self._recompute = None
        self._context_axis = None
        self._sequence_parallel = False

    def _check_axis(self, method, axis):
        if axis not in self._mesh.axis_names:
            raise StrategyError(
                f"{method}({axis!r}): the mesh has no axis {axis!r}; its axes "
                f"are {list(self._mesh.axis_names)}."
            )

    def data_parallel(self, axis):
        """Shard batches (the logical ``batch`` dimension) over ``axis``."""
        self._check_axis("data_parallel", axis)
        self._data_axis = axis
        return self

    def tensor_parallel(self, axis):
        """Shard tensor-parallel dimensions (heads, d_ff, vocab) over ``axis``."""
        self._check_axis("tensor_parallel", axis)
        self._tensor_axis = axis
        return self

    def shard_optimizer_state(self, axis, stage=1):
        """Split training state over the data axis ``axis`` (ZeRO): stage 1
        the optimizer slots, 2 also the gradients (reduce-scattered instead
        of all-reduced), 3 also the trainable parameters (all-gathered when
        a layer reads them). Parameters, gradients and Adam's state per
        device come to global / (dp x tp) at stage 3; numerics are
        unchanged. See :mod:`tfshard.zero`."""
        self._check_axis("shard_optimizer_state", axis)
        self._zero_stage = check_stage(axis, stage)
        self._optimizer_state_axis = axis
        return self

    def recompute(self, mode):
        """Keep less for backward and run parts of the forward pass again in
        it: ``"selective"``, each attention core (its ``a·s²·b`` scores are
        not kept); ``"full"``, each block (a layer of layers inside a model:
        only its inputs are kept). Gradients are unchanged; a recomputed
        layer with active dropout is an error. Applies to layers created in
        the strategy's scope. See :mod:`tfshard.recompute`."""
        self._recompute = check_recompute_mode(mode)
        return self

    def context_parallel(self, axis):
        """Split the sequence (dimension 1 of batches and activations) over
        mesh axis ``axis``; attention gathers keys and values over it (see
        :mod:`tfshard.context_parallel`). Composes with data and tensor
        parallelism on their own axes."""
        self._check_axis("context_parallel", axis)
        self._context_axis = axis
        return self

    def sequence_parallel(self, enabled=True):
        """Megatron's sequence parallelism on the tensor axis: between the
        tensor-parallel regions (norms, dropout, residual adds) activations
        are split over the sequence (dimension 1) too. Every column-parallel
        layer all-gathers its input, every row-parallel layer
        reduce-scatters its output, in place of the all-reduces. See
        :mod:`tfshard.sequence_parallel`."""
        self._sequence_parallel = bool(enabled)
        return self

    RANDOM_STREAMS = ("global", "per_device")

    def random_streams(self, mode):
        """How random ops (``keras.random.*``, ``Dropout``, noise and
        augmentation layers) draw under a split layout.

        ``"global"`` (the default): the same seed gives exactly the numbers
        one device gives. Each draw is computed at its global shape on every
        device, which keeps its own slice (no communication; the compute
        and a transient buffer are the whole draw's, see ``tfshard bench``).
        ``"per_device"``: DTensor's own streams, one per device (the seed
        mixed with the device's mesh coordinates): each device draws only its
        slice, and the numbers differ from one device's.
        """
        if mode not in self.RANDOM_STREAMS:
            raise StrategyError(
                f"random_streams({mode!r}): use one of {list(self.RANDOM_STREAMS)}; "
                '"global" draws what one device draws, "per_device" draws per device.'
            )
        self._random_streams = mode
        return self

    def rules(self, rules):
        """Map logical dimensions to mesh axes: a dict, or Mesh-TF's string
        form ``"batch:batch,d_ff:model,heads:model"``."""
        self._rules.update(rules)
        self._rules.check_axes(self._mesh)
        return self

    def plan(self, plan):
        """Add plan entries: a :class:`tfshard.Plan` or a dict from a layer
        path regex (or layer class) to a style, and from a variable path
        regex or ``"<layer path regex>/output"`` to a spec::

            .plan({".*ffn_in": ColumnParallel(), ".*ffn_out": RowParallel(),
                   "head/kernel": (None, "model")})
        """
        self._plan.update(plan)
        self._plan.check_axes(self._mesh)
        return self

    def shard(self, pattern, spec):
        """Lay out every variable whose path fully matches ``pattern`` as
        ``spec`` (a plan entry)."""
        if isinstance(pattern, str) and pattern.endswith("/output"):
            raise StrategyError(
                f"shard({pattern!r}, ...): a path ending in /output names a layer's "
                "output; use shard_output for activations."
            )
        self._plan.add(pattern, spec)
        self._plan.check_axes(self._mesh)
        return self

    def shard_output(self, pattern, spec):
        """Lay out the output of every layer whose ``"<layer path>/output"``
        fully matches ``pattern`` (keras ``LayoutMap``'s activation keys),
        e.g. ``.shard_output("decoder_.*/ffn_in/output", ("batch", None,
        "model"))``. The batch dimension keeps its own sharding."""
        if not (isinstance(pattern, str) and pattern.endswith("/output")):
            raise StrategyError(
                f"shard_output({pattern!r}, ...): the pattern matches "
                "'<layer path>/output'; end it with '/output', e.g. "
                f"{str(pattern) + '/output'!r}."
            )
        self._plan.add(pattern, spec)
        self._plan.check_axes(self._mesh)
        return self

    @classmethod
    def from_keras(cls, distribution_or_layout_map):
        """A builder from a ``keras.distribution`` object: ``ModelParallel``,
        ``DataParallel``, ``LayoutMap`` or ``DeviceMesh`` (see
        :func:`tfshard.interop.builder_from_keras`). Chain more calls or
        ``.build()`` it."""
        # interop sits above strategy (it converts Keras objects into
        # builders) and registers the converter when it is imported, which
        # `import tfshard` does.
        if _keras_converter is None:
            raise StrategyError(
                "StrategyBuilder.from_keras: no converter of keras.distribution objects "
                "is registered; import tfshard.interop (import tfshard does)."
            )
        return _keras_converter(distribution_or_layout_map)

    def build(self) -> Strategy:
        if (
            self._data_axis is not None
            and self._data_axis == self._tensor_axis
        ):
            raise StrategyError(
                f"data_parallel and tensor_parallel both use mesh axis "
                f"{self._data_axis!r}; give each its own axis."
            )
        _context_parallel.check_axes(self._context_axis, self._data_axis, self._tensor_axis)
        _sequence_parallel.check(self._sequence_parallel, self._tensor_axis, self._context_axis)
        check_combination(self._optimizer_state_axis, self._zero_stage, self._data_axis)
        rules = completed_rules(self._rules, self._data_axis, self._tensor_axis)
        rules.check_axes(self._mesh)
        return Strategy(
            self._mesh, self._data_axis, self._tensor_axis, rules, self._plan.copy(),
            optimizer_state_axis=self._optimizer_state_axis,
            zero_stage=self._zero_stage,
            random_streams=self._random_streams,
            recompute=self._recompute,
            context_axis=self._context_axis,
            sequence_parallel=self._sequence_parallel,
        )


def strategy_of_layer(layer):
    """The strategy a layer was created under (or whose weights it holds)."""
    strategy = getattr(layer, "_tfshard_strategy", None)
    if strategy is not None:
        return strategy
    if not getattr(layer, "built", False):
        return None
    for variable in getattr(layer, "weights", ()):
        layout = _keras.variable_layout(variable)
        if isinstance(layout, VariableLayout):
            return layout.strategy
    return None
