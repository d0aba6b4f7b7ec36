"""The :class:`Strategy` object: a mesh, its data and tensor axes, and the
rules that lay out every variable and activation.

It decides each variable's spec in one place (:meth:`Strategy.variable_spec`;
the order of precedence is in ``tfshard.strategy``'s docstring), lays out
activations (:meth:`~Strategy.place`, :meth:`~Strategy.constrain`), creates
the DVariables behind Keras variables, and tracks them for
:meth:`~Strategy.describe`. :class:`tfshard.strategy.StrategyBuilder` builds
it; ``tfshard.strategy`` re-exports it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref

import keras
import numpy as np
import tensorflow as tf

from tfshard import _dtensor, _keras
from tfshard import context_parallel as _context_parallel
from tfshard._scope import current_strategy
from tfshard._scope import pop as _pop_scope
from tfshard._scope import push as _push_scope
from tfshard.errors import StrategyError
from tfshard.layout import KEEP, LogicalRules, placement_spec, validate_spec
from tfshard.mesh import Mesh
from tfshard.plans import Plan, resolve_style, resolve_weight
from tfshard.report import variable_table
from tfshard.tensors import VariableLayout
from tfshard.zero import ZeroSharding, hold_gradients


class Strategy:
    """A mesh plus layout rules. Build it with :class:`StrategyBuilder`."""

    def __init__(self, mesh, data_axis, tensor_axis, logical_rules, plan, *,
                 optimizer_state_axis=None, zero_stage=None, random_streams="global",
                 recompute=None, context_axis=None, sequence_parallel=False):
        self._mesh = mesh
        self._context_axis = context_axis
        self._sequence_parallel = sequence_parallel
        self._random_streams = random_streams
        self._recompute = recompute
        if zero_stage is None:
            zero_stage = 0 if optimizer_state_axis is None else 1
        self._zero = ZeroSharding(
            optimizer_state_axis,
            int(zero_stage) if optimizer_state_axis is not None else 0,
            mesh.axis_size(optimizer_state_axis) if optimizer_state_axis is not None else 1,
        )
        self._data_axis = data_axis
        self._tensor_axis = tensor_axis
        self._logical_rules = logical_rules
        self._plan = plan
        self._layouts = {}
        self._variables = weakref.WeakValueDictionary()
        self._next_id = 0

    # ------------------------------------------------------------ properties
    @property
    def mesh(self) -> Mesh:
        return self._mesh

    @property
    def data_axis(self):
        return self._data_axis

    @property
    def tensor_axis(self):
        return self._tensor_axis

    @property
    def data_parallel_size(self) -> int:
        return self._mesh.axis_size(self._data_axis) if self._data_axis else 1

    @property
    def tensor_parallel_size(self) -> int:
        return self._mesh.axis_size(self._tensor_axis) if self._tensor_axis else 1

    @property
    def context_axis(self):
        """The mesh axis the sequence is split over (context parallelism,
        :mod:`tfshard.context_parallel`), or None."""
        return self._context_axis

    @property
    def random_streams(self) -> str:
        """``"global"``: random ops draw what one device draws (see
        :meth:`StrategyBuilder.random_streams`); ``"per_device"``: DTensor's
        own per-device streams."""
        return self._random_streams

    @property
    def recompute(self):
        """None, ``"selective"`` or ``"full"``: see :mod:`tfshard.recompute`."""
        return self._recompute

    @property
    def sequence_parallel(self) -> bool:
        """Whether column/row/vocab-parallel styles split the sequence
        between them: see :mod:`tfshard.sequence_parallel`."""
        return self._sequence_parallel

    @property
    def logical_rules(self) -> LogicalRules:
        return self._logical_rules

    @property
    def plan(self) -> Plan:
        """Styles by layer, specs by variable and activation path."""
        return self._plan

    def __repr__(self):
        return (
            f"Strategy(mesh={self._mesh!r}, data_axis={self._data_axis!r}, "
            f"tensor_axis={self._tensor_axis!r}, rules={self._logical_rules!r})"
        )

    # ----------------------------------------------------------------- scope
    @contextlib.contextmanager
    def scope(self):
        """Variables and layers created in this block are laid out by this
        strategy."""
        _push_scope(self)
        try:
            yield self
        finally:
            _pop_scope()

    def _ensure_scope(self):
        if current_strategy() is self:
            return contextlib.nullcontext()
        return self.scope()

    # --------------------------------------------------------------- layouts
    def dtensor_layout(self, spec):
        spec = tuple(spec)
        layout = self._layouts.get(spec)
        if layout is None:
            layout = _dtensor.to_layout(spec, self._mesh._dtensor_mesh)
            self._layouts[spec] = layout
        return layout

    def variable_spec(self, path, shape, *, name=None, layer=None, parents=()):
        """The validated spec of the variable at ``path`` with ``shape``:
        weight ``name`` of ``layer`` (inside ``parents``, outermost first).

        The one place every variable layout is decided: the plan's entry
        for the path (``.shard``, a keras LayoutMap key), else the logical
        axes the owning layer's style declares mapped by the logical rules,
        else replicated (see :func:`tfshard.plans.resolve_weight`).
        """
        shape = tuple(int(d) for d in shape)
        resolved = resolve_weight(self._plan, path, name, layer, list(parents))
        if resolved is None:
            return validate_spec((None,) * len(shape), shape, self._mesh, name=f"Variable {path!r}")
        source, axes = resolved
        if source.startswith("plan"):
            return validate_spec(axes, shape, self._mesh, name=f"Variable {path!r} ({source})")
        if len(axes) != len(shape):
            raise StrategyError(
                f"Variable {path!r}: {source} declares logical axes {axes!r} for a "
                f"tensor of shape {shape}; a style must declare one logical name "
                "per dimension."
            )
        spec = self._logical_rules.spec_for(axes)
        return validate_spec(spec, shape, self._mesh, name=f"Variable {path!r} ({source})")

    def declaration(self, layer, parents=()):
        """What ``layer``'s style declares (weights and activation layouts),
        or None for a layer with no style. Cached on the layer."""
        cached = layer.__dict__.get("_tfshard_declaration")
        if cached is not None and cached[0] is self:
            return cached[1]
        resolved = resolve_style(self._plan, layer, list(parents))
        style = None if resolved is None else resolved[1]
        if self._sequence_parallel and getattr(style, "sequence_parallel", True) is False:
            style = dataclasses.replace(style, sequence_parallel=True)
        declaration = None if style is None else style.declare(layer)
        if getattr(layer, "built", False):
            object.__setattr__(layer, "_tfshard_declaration", (self, declaration))
        return declaration

    def constrain(self, x, trailing):
        """Lay out activation ``x`` as :meth:`constrain_spec` says. Eager host
        values get the batch split; symbolic (Keras construction) values
        pass through."""
        if isinstance(x, keras.KerasTensor) or not isinstance(x, (tf.Tensor, tf.Variable, np.ndarray)):
            return x
        if len(x.shape) == 0:
            return x
        return self.place(x, self.constrain_spec(x, trailing))

    def constrain_spec(self, x, trailing):
        """The spec :meth:`constrain` gives ``x``: dimension 0 (the batch)
        keeps its split, the trailing ``len(trailing)`` dimensions take the
        *logical* axes ``trailing`` (mapped by the rules), dimension 1 (the
        sequence) takes the context axis, and the other
        dimensions between are whole. DTensor allows "keep this dimension's
        split" on one dimension only, hence the batch alone."""
        rank = len(x.shape)
        axes = tuple(self._logical_rules.axis_for(a) for a in trailing)
        if len(axes) >= rank:  # no batch dim left to keep
            return axes[len(axes) - rank:]
        first = KEEP
        if tf.executing_eagerly() and not _dtensor.is_dtensor(x):
            first = self.batch_spec(tuple(x.shape))[0]
        middle = [None] * (rank - 1 - len(axes))
        if middle and self._context_axis is not None:  # dim 1: the sequence
            middle[0] = _context_parallel.activation_sequence_axis(self, x)
        return (first, *middle) + axes

    def compute_spec(self, spec):
        """The layout a layer computes with, for a weight stored as ``spec``.

        A weight split over the data axis (FSDP-style, as keras-hub's layout
        maps split weights over ``("model", "batch")``) is whole over that
        axis while an op reads it: the batch is split over the data axis, so
        the weight cannot be too. Its tensor-parallel split is kept.
        """
        spec = tuple(spec)
        if self._data_axis is None or self._data_axis not in spec:
            return spec
        return tuple(None if axis == self._data_axis else axis for axis in spec)

    def output_spec(self, path, shape):
        """The validated activation spec the plan gives ``path`` (``"<layer
        path>/output"``) for a tensor with ``shape``, or None (see
        :meth:`activation_spec`)."""
        rule = self._plan.output_rule(path)
        if rule is None:
            return None
        key, spec = rule
        return self.activation_spec(spec, shape, name=f"Layer output {path!r} (plan entry {key!r})")

    def activation_spec(self, spec, shape, *, name):
        """``spec`` validated for an activation of ``shape`` (any batch
        size). Dimension 0 laid out over the data axis keeps the batch's own
        sharding (``KEEP``), so a partial batch that runs replicated works."""
        spec = tuple(spec)
        shape = tuple(None if d is None else int(d) for d in shape)
        if len(shape) != len(spec):
            validate_spec(spec, shape, self._mesh, name=name)  # raises: rank
        validate_spec(spec, (None,) + shape[1:], self._mesh, name=name)
        if spec and spec[0] is not None and spec[0] == self._data_axis:
            spec = (KEEP,) + spec[1:]
        return spec

    @property
    def optimizer_state_axis(self):
        return self._zero.axis

    @property
    def zero_stage(self):
        """0 (ZeRO off), 1 (optimizer slots split over the data axis), 2 (and
        gradients) or 3 (and parameters): see :mod:`tfshard.zero`."""
        return self._zero.stage

    def optimizer_state_spec(self, spec, shape):
        """The spec of an optimizer slot for a parameter laid out as
        ``spec``: the parameter's, plus (ZeRO) the data axis on the first
        whole dimension it divides (see :mod:`tfshard.zero`)."""
        return self._zero.state_spec(spec, shape)

    def gradient_spec(self, spec, shape):
        """The spec a gradient is held in for the optimizer update: the
        parameter's, or (ZeRO-2/3) its slots'."""
        return self._zero.gradient_spec(spec, shape)

    def parameter_spec(self, spec, shape, *, trainable=True):
        """The spec a variable the plan lays out as ``spec`` is stored in:
        with ZeRO-3 a trainable one is also split over the data axis (and
        read whole inside a layer call, :meth:`compute_spec`)."""
        return self._zero.parameter_spec(spec, shape, trainable)

    def hold_gradients(self, grads, variables):
        """``grads`` laid out as :meth:`gradient_spec` says (with ZeRO; see
        :func:`tfshard.zero.hold_gradients`)."""
        return hold_gradients(self, grads, variables)

    def batch_spec(self, shape):
        """Batch dim over the data axis when it divides, the rest replicated."""
        rank = len(shape)
        if rank == 0:
            return ()
        first = self._data_axis
        if first is not None and (
            shape[0] is None or int(shape[0]) % self.data_parallel_size
        ):
            first = None
        if rank > 1 and self._context_axis is not None:  # dim 1: the sequence
            return (first, _context_parallel.sequence_axis(self, shape)) + (None,) * (rank - 2)
        return (first,) + (None,) * (rank - 1)

    def place(self, x, spec):
        """``x`` laid out as ``spec`` on this mesh (relayout if needed).

        Eager plain values are split on the host and each device gets only
        its own slice. Inside a graph, values are assumed to be DTensors
        already (tfshard's train step feeds DTensors) and are relaid out.
        """
        if isinstance(x, keras.KerasTensor):
            return x  # symbolic (functional-model construction): shapes only
        layout = self.dtensor_layout(placement_spec(spec, x, self._mesh))
        if not tf.executing_eagerly():
            if not tf.is_tensor(x):
                x = tf.constant(x)  # a constant, laid out once on the mesh
            return _dtensor.relayout(x, layout)
        if _dtensor.is_dtensor(x):
            if _dtensor.layout_of(x) == layout:
                return x
            return _dtensor.relayout(x, layout)
        return _dtensor.distribute(np.asarray(x), layout)

    def adopt_variable(self, kvar):
        """Move a plain Keras variable onto the mesh, replicated.

        Used for variables Keras creates outside the scope that a sharded step
        reads and writes: the optimizer's iteration count and learning rate,
        metric totals.
        """
        variable = self._variable_on_mesh(kvar, kvar.numpy(), (None,) * len(kvar.shape))
        _keras.replace_variable_value(kvar, variable)

    def _variable_on_mesh(self, kvar, value, spec):
        """The DVariable behind Keras variable ``kvar``: ``value`` (a global
        value, a DTensor, or a callable giving one) laid out as ``spec``.
        Records the layout on ``kvar`` and tracks it."""
        dlayout = self.dtensor_layout(spec)
        dtype = _keras.variable_dtype(kvar)
        with tf.init_scope():
            if callable(value):
                # On the host: an enclosing colocation scope (Keras colocates
                # optimizer slots with their parameter) must not run the
                # initializer on the DTensor device.
                with _dtensor.on_host():
                    value = value()
            if _dtensor.is_dtensor(value):
                initial = _dtensor.relayout(value, dlayout)
            else:
                initial = _dtensor.distribute(np.asarray(value), dlayout, dtype=dtype)
            variable = _dtensor.make_variable(
                initial, trainable=kvar.trainable, name=kvar.name, dtype=dtype
            )
        _keras.set_variable_layout(kvar, VariableLayout(self, spec))
        self._track(kvar)
        return variable

    # -------------------------------------------------------------- tracking
    def _track(self, variable):
        self._variables[self._next_id] = variable
        self._next_id += 1

    def variables(self):
        """Live variables created under this strategy, in creation order."""
        return [v for _, v in sorted(self._variables.items())]

    def describe(self, model=None):
        """A table of every variable: path, global shape, spec, per-device
        shape and per-device bytes, with per-device totals."""
        if model is None:
            variables = self.variables()
        else:
            variables = list(model.variables)
            optimizer = getattr(model, "optimizer", None)
            if optimizer is not None and getattr(optimizer, "built", False):
                seen = {id(v) for v in variables}
                variables += [v for v in optimizer.variables if id(v) not in seen]
        return variable_table(variables)
