"""Layout specs and logical rules, and the glossary of tfshard's terms.

Glossary
--------
mesh
    A grid of devices with named axes: ``tfshard.Mesh({"batch": 2, "model": 4})``.
spec
    A plain tuple with one entry per tensor dimension: the name of the mesh
    axis that splits that dimension, or ``None`` to replicate it.
    ``(None, "model")`` splits a kernel's columns over the ``model`` axis.
    ``KEEP`` in an activation spec keeps the dimension's current split (the
    batch's, which the input pipeline decides).
layout
    DTensor's object for a spec on a mesh (``dtensor.Layout``); only
    ``tfshard._dtensor`` builds them, from specs.
logical axis
    A name for what a dimension *is* (``"heads"``, ``"d_ff"``, ``"vocab"``,
    ``"d_model"``, ``"batch"``), as Mesh-TensorFlow and flax name them.
    :class:`LogicalRules` map logical axes to mesh axes, so a change of mesh
    is a rule edit, not a model edit.
style
    How one layer is split: the logical axes of its weights and of its input
    and output activations (``ColumnParallel()``, ``HeadParallel()``, ... in
    :mod:`tfshard.styles`).
plan
    Data: layer paths or classes -> styles, variable and activation paths ->
    specs (:class:`tfshard.plans.Plan`). A strategy resolves every variable
    and activation through its plan and its logical rules.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from tfshard.errors import ShardingError

__all__ = ["KEEP", "normalize_spec", "validate_spec", "placement_spec", "fitting_spec", "LogicalRules"]

#: In an *activation* spec: keep whatever sharding this dimension already has
#: (typically the batch dimension, which the input pipeline decides).
KEEP = "*"


def normalize_spec(spec, *, name="spec"):
    """A spec as a tuple of str/None; raises ``ShardingError`` otherwise."""
    if isinstance(spec, str) or not isinstance(spec, (tuple, list)):
        raise ShardingError(
            f"{name}: a layout spec must be a tuple with one entry per tensor "
            f"dimension (a mesh axis name or None), e.g. (None, 'model'); got "
            f"{spec!r}."
        )
    for entry in spec:
        if entry is not None and (not isinstance(entry, str) or not entry):
            raise ShardingError(
                f"{name}: spec {tuple(spec)!r} has entry {entry!r}; each entry "
                "must be a mesh axis name or None."
            )
    return tuple(spec)


def validate_spec(spec, shape, mesh, *, name, allow_keep=False):
    """Check that ``spec`` can lay out a tensor of ``shape`` on ``mesh``.

    Raises ``ShardingError`` naming ``name`` (a variable path or tensor
    description), the offending value and the fix. ``allow_keep`` accepts
    :data:`KEEP` entries (activation specs), which are not checked.
    """
    spec = normalize_spec(spec, name=name)
    shape = tuple(int(d) if d is not None else None for d in shape)
    if len(spec) != len(shape):
        raise ShardingError(
            f"{name}: spec {spec!r} has {len(spec)} entries but the tensor has "
            f"rank {len(shape)} (shape {shape}); give one entry (a mesh axis "
            "name or None) per dimension."
        )
    used = {}
    for dim, (axis, size) in enumerate(zip(spec, shape)):
        if axis is None or (allow_keep and axis == KEEP):
            continue
        if axis not in mesh.axis_names:
            raise ShardingError(
                f"{name}: spec {spec!r} names mesh axis {axis!r}, which the "
                f"mesh does not have; its axes are {list(mesh.axis_names)}. "
                "Use one of those, or None to replicate."
            )
        if axis in used:
            raise ShardingError(
                f"{name}: spec {spec!r} uses mesh axis {axis!r} for both "
                f"dimension {used[axis]} and dimension {dim}; an axis can "
                "shard only one dimension. Set one of them to None."
            )
        used[axis] = dim
        parts = mesh.axis_size(axis)
        if size is not None and size % parts:
            raise ShardingError(
                f"{name}: dimension {dim} has size {size}, which mesh axis "
                f"{axis!r} (size {parts}) cannot divide evenly (shape {shape}, "
                f"spec {spec!r}). Use a size that is a multiple of {parts}, "
                f"or None for that dimension to replicate it; spec "
                f"{fitting_spec(spec, shape, mesh)!r} fits this tensor.",
                kind=ShardingError.INDIVISIBLE, axis=axis, axis_size=parts, dim=dim,
            )
    return spec


def placement_spec(spec, value, mesh, *, name="Strategy.place"):
    """``spec`` checked against ``value`` (an array, tensor or DTensor) as
    ``Strategy.place`` lays it out: its rank, mesh axes (each used once,
    :data:`KEEP` allowed) and, for every dimension whose size is known, an
    even split. Raises ``ShardingError`` naming the value's shape, the spec
    and the fix, instead of a DTensor error or a silently dropped row."""
    shape = getattr(value, "shape", None)
    if shape is None:
        shape = np.shape(value)
    if getattr(shape, "rank", 0) is None:  # a graph tensor of unknown rank
        return normalize_spec(spec, name=name)
    return validate_spec(spec, tuple(shape), mesh, name=name, allow_keep=True)


def fitting_spec(spec, shape, mesh):
    """The spec nearest ``spec`` that lays out ``shape`` on ``mesh``: its
    sharded axes swapped between dimensions if that divides evenly (a layout
    written for ``(in, out)`` used on ``(out, in)``), else ``spec`` with each
    dimension that does not divide replicated."""

    def divides(entry, size):
        return entry is None or size is None or entry not in mesh.axis_names or (
            size % mesh.axis_size(entry) == 0
        )

    def fits(candidate):
        return all(divides(a, n) for a, n in zip(candidate, shape))

    spec = tuple(spec)
    sharded = [d for d, a in enumerate(spec) if a is not None]
    for i, first in enumerate(sharded):
        for second in sharded[i + 1:]:
            candidate = list(spec)
            candidate[first], candidate[second] = spec[second], spec[first]
            if fits(candidate):
                return tuple(candidate)
    return tuple(a if divides(a, n) else None for a, n in zip(spec, shape))


class LogicalRules:
    """Logical dimension name -> mesh axis name (or ``None``: replicated).

    Accepts a mapping, a sequence of pairs, or Mesh-TensorFlow's string form
    ``"batch:batch,d_ff:model,heads:model"``. Within one tensor a mesh axis
    shards at most one dimension: the first logical dimension that claims it
    wins and later ones are replicated (the t5x/flax convention), so
    ``{"experts": "model", "d_ff": "model"}`` shards experts and keeps each
    expert's d_ff whole.

    An empty mesh axis replicates: ``"heads:"`` is ``{"heads": None}``, which
    overrides ``tensor_parallel``'s default for that dimension. Mesh-TF reads
    ``"heads:"`` the same way (a pair naming no mesh dimension maps to none),
    and it is the only way to say "replicated" in the string form (the
    ``layout.rules`` key of a config), so it is kept, not an error. Anything
    else that is not ``name:axis`` (``"heads"``, ``"heads:model:x"``) is an
    error, and so is an axis the mesh does not have.
    """

    def __init__(self, rules=None):
        self._rules: dict[str, str | None] = {}
        if rules is not None:
            self.update(rules)

    @staticmethod
    def parse(rules):
        if isinstance(rules, LogicalRules):
            return dict(rules._rules)
        if isinstance(rules, str):
            pairs = []
            for item in rules.split(","):
                item = item.strip()
                if not item:
                    continue
                if item.count(":") != 1:
                    raise ShardingError(
                        f"layout rules: {item!r} in {rules!r} is not of the form "
                        "'logical_dim:mesh_axis' (Mesh-TF syntax, e.g. "
                        "'batch:batch,d_ff:model')."
                    )
                logical, axis = (s.strip() for s in item.split(":"))
                pairs.append((logical, axis or None))
        elif isinstance(rules, Mapping):
            pairs = list(rules.items())
        else:
            try:
                pairs = [tuple(p) for p in rules]
            except TypeError:
                pairs = None
            if pairs is None or any(len(p) != 2 for p in pairs):
                raise ShardingError(
                    f"layout rules: {rules!r} is not a dict, a list of "
                    "(logical_dim, mesh_axis) pairs or a Mesh-TF string such as "
                    "'batch:batch,d_ff:model'."
                )
        out = {}
        for logical, axis in pairs:
            if not isinstance(logical, str) or not logical:
                raise ShardingError(
                    f"layout rules: logical dimension {logical!r} must be a "
                    "non-empty string."
                )
            if axis is not None and (not isinstance(axis, str) or not axis):
                raise ShardingError(
                    f"layout rules: {logical!r} maps to {axis!r}; map it to a "
                    "mesh axis name or None."
                )
            out[logical] = axis
        return out

    def update(self, rules):
        self._rules.update(self.parse(rules))

    def set_default(self, logical, axis):
        self._rules.setdefault(logical, axis)

    def check_axes(self, mesh):
        for logical, axis in self._rules.items():
            if axis is not None and axis not in mesh.axis_names:
                raise ShardingError(
                    f"layout rules: logical dimension {logical!r} maps to mesh "
                    f"axis {axis!r}, which the mesh does not have; its axes are "
                    f"{list(mesh.axis_names)}."
                )

    def axis_for(self, logical):
        return self._rules.get(logical) if logical is not None else None

    def spec_for(self, logical_axes):
        """The spec for a tensor whose dimensions carry ``logical_axes``."""
        spec, used = [], set()
        for logical in logical_axes:
            axis = self.axis_for(logical)
            if axis is not None and axis in used:
                axis = None
            if axis is not None:
                used.add(axis)
            spec.append(axis)
        return tuple(spec)

    def as_dict(self):
        return dict(self._rules)

    def __repr__(self):
        return "LogicalRules(" + ",".join(
            f"{k}:{v or ''}" for k, v in self._rules.items()
        ) + ")"
