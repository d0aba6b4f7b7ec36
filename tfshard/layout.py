"""Layout specs and the rule tables that choose them.

A *spec* is a plain tuple with one entry per tensor dimension: the name of the
mesh axis that shards that dimension, or ``None`` to replicate it. Example:
``(None, "model")`` shards a kernel's columns over the ``model`` axis.

Two kinds of rules pick specs:

* ``LogicalRules`` map Mesh-TensorFlow-style logical dimension names, which
  tfshard layers declare (``"heads"``, ``"d_ff"``, ``"vocab"``, ``"batch"``),
  to mesh axes. A mesh change is then a rule edit, not a model edit.
* ``PathRules`` map regular expressions over variable paths (matched in full,
  as keras ``LayoutMap`` does) to specs. A path matched by two rules is an
  error, never a silent first-match.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from tfshard.errors import ShardingError

__all__ = ["KEEP", "normalize_spec", "validate_spec", "fitting_spec", "LogicalRules", "PathRules"]

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


def validate_spec(spec, shape, mesh, *, name):
    """Check that ``spec`` can lay out a tensor of ``shape`` on ``mesh``.

    Raises ``ShardingError`` naming ``name`` (a variable path or tensor
    description), the offending value and the fix.
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
        if axis is None:
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
            pairs = [tuple(p) for p in rules]
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


class PathRules:
    """Ordered ``(regex, spec)`` rules over variable paths, matched in full.

    ``exact_first=True`` gives keras ``LayoutMap``'s lookup order: a rule
    whose pattern *is* the path wins outright; only otherwise are the
    patterns matched as regexes (and two matches are an error).
    """

    def __init__(self, *, exact_first=False):
        self._rules: list[tuple[str, re.Pattern, tuple]] = []
        self.exact_first = exact_first

    def add(self, pattern, spec):
        if not isinstance(pattern, str) or not pattern:
            raise ShardingError(
                f"shard(pattern, spec): pattern must be a non-empty regex "
                f"string; got {pattern!r}."
            )
        try:
            compiled = re.compile(pattern)
        except re.error as err:
            raise ShardingError(
                f"shard({pattern!r}, ...): not a valid regular expression: {err}."
            ) from None
        spec = normalize_spec(spec, name=f"shard({pattern!r}, ...)")
        for existing, _, _ in self._rules:
            if existing == pattern:
                raise ShardingError(
                    f"shard({pattern!r}, ...): a rule with this pattern already "
                    "exists; give each pattern once."
                )
        self._rules.append((pattern, compiled, spec))

    def check_axes(self, mesh):
        for pattern, _, spec in self._rules:
            for axis in spec:
                if axis is not None and axis not in mesh.axis_names:
                    raise ShardingError(
                        f"shard({pattern!r}, {spec!r}): mesh axis {axis!r} is "
                        f"not on the mesh; its axes are {list(mesh.axis_names)}."
                    )

    def match(self, path, *, what="Variable"):
        """The spec of the one rule matching ``path`` in full, else ``None``."""
        rule = self.match_rule(path, what=what)
        return rule[1] if rule else None

    def match_rule(self, path, *, what="Variable"):
        """``(pattern, spec)`` of the one rule matching ``path``, else None.
        ``what`` names the kind of path in the ambiguity error."""
        if self.exact_first:
            for p, _, s in self._rules:
                if p == path:
                    return p, s
        hits = [(p, s) for p, c, s in self._rules if c.fullmatch(path)]
        if len(hits) > 1:
            raise ShardingError(
                f"{what} {path!r} matches more than one layout rule: "
                f"{hits[0][0]!r} -> {hits[0][1]!r} and {hits[1][0]!r} -> "
                f"{hits[1][1]!r}. Make the patterns exclusive."
            )
        return hits[0] if hits else None

    def copy(self):
        out = PathRules(exact_first=self.exact_first)
        out._rules = list(self._rules)
        return out

    def __iter__(self):
        return iter((p, s) for p, _, s in self._rules)

    def __len__(self):
        return len(self._rules)
