"""Plans: which layers get which style, and which variables and
activations which spec, written as data (see :mod:`tfshard.styles` for the
styles).

A **plan** maps layer paths (regexes, matched in full) or layer classes to
styles, and variable or activation paths to specs (tuples of mesh axes), in
one dict::

    plan = tfshard.Plan({
        "embed": VocabParallel(),
        ".*attention": HeadParallel(),
        ".*ffn_in": ColumnParallel(),
        ".*ffn_out": RowParallel(),
        "head/kernel": (None, "model"),        # a variable path -> spec
        "head/output": ("batch", None, None),  # "<layer path>/output" -> activation spec
    })
    StrategyBuilder(mesh).data_parallel("batch").tensor_parallel("model").plan(plan).build()

A plan prints as a table, converts to and from JSON/YAML-ready data
(:meth:`Plan.to_config`) and to a ``keras.distribution.LayoutMap``
(:meth:`Plan.to_layout_map`). ``StrategyBuilder.shard`` / ``shard_output``
and keras ``LayoutMap`` keys are plan entries too: the strategy resolves
every variable and activation through its one plan (see
:meth:`tfshard.Strategy.variable_spec`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import keras

from tfshard import _keras
from tfshard.errors import ShardingError, StrategyError
from tfshard.layout import normalize_spec
from tfshard.styles import Style, style_from_config

__all__ = ["Plan", "resolve_style", "resolve_weight", "spec_of_layout", "weight_owners"]

VARIABLE, OUTPUT, LAYER, LAYOUT_MAP = "variable", "output", "layer", "layout_map"


def spec_of_layout(layout, key):
    """The spec of a ``keras.distribution.TensorLayout`` (or a tuple, as
    ``LayoutMap`` accepts)."""
    if isinstance(layout, keras.distribution.TensorLayout):
        return tuple(layout.axes)
    if isinstance(layout, (tuple, list)):
        return tuple(layout)
    raise ShardingError(
        f"LayoutMap[{key!r}] is {layout!r}; a layout must be a "
        "keras.distribution.TensorLayout or a tuple of mesh axis names/None."
    )


class _LayoutMapEntry:
    """A keras ``LayoutMap`` (or a ``ModelParallel``'s lookup) inside a
    plan, looked up live with Keras's own semantics (an exact key wins,
    otherwise ``re.fullmatch`` over the keys, two matches an error)."""

    def __init__(self, lookup, layout_map=None, source="LayoutMap"):
        self.lookup, self.layout_map, self.source = lookup, layout_map, source

    def key_for(self, path):
        if self.layout_map is None:
            return f"{self.source} layout map"  # its keys are not public
        keys = list(self.layout_map)  # (`in` on a LayoutMap is always True)
        if path in keys:
            return path
        return next((key for key in keys if re.fullmatch(key, path)), path)

    def match(self, path, what):
        try:
            layout = self.lookup(path)
        except ValueError as err:
            raise ShardingError(
                f"{what} {path!r}: {err} Make the LayoutMap keys exclusive "
                "(each path may match at most one key)."
            ) from None
        if layout is None:
            return None
        key = self.key_for(path)
        return key, spec_of_layout(layout, key)

    def specs(self):
        if self.layout_map is None:
            return []
        return [(key, spec_of_layout(self.layout_map[key], key)) for key in self.layout_map]

    def __str__(self):
        return f"<{self.source}>"


class Plan:
    """Ordered plan entries: ``key -> style or spec``.

    * a :class:`Style` under a layer-path regex (matched in full against
      ``layer.path``) or a layer class (any instance);
    * a spec (tuple of mesh axes or ``None``) under a variable-path regex,
      or under ``"<layer path regex>/output"`` for that layer's output.

    A path matched by two entries of one kind is an error naming both
    (except that, as in keras ``LayoutMap``, an entry whose key *is* the
    path wins over regex matches).
    """

    def __init__(self, entries=None):
        self._entries = []  # (key, kind, value, compiled or None)
        if entries is not None:
            self.update(entries)

    # ----------------------------------------------------------- building
    def update(self, entries):
        """Add entries: a Plan, a dict or pairs, or a keras ``LayoutMap``
        (looked up live, see :meth:`add_layout_map`)."""
        if isinstance(entries, keras.distribution.LayoutMap):
            return self.add_layout_map(entries.__getitem__, layout_map=entries)
        if isinstance(entries, Plan):
            for key, kind, value, _ in entries._entries:
                if kind == LAYOUT_MAP:
                    self._entries.append((key, kind, value, None))
                else:
                    self.add(key, value)
            return self
        elif isinstance(entries, Mapping):
            items = list(entries.items())
        else:
            items = [tuple(item) for item in entries]
        for key, value in items:
            self.add(key, value)
        return self

    def add(self, key, value):
        if isinstance(value, Mapping):
            value = style_from_config(value)
        if isinstance(key, type):
            if not isinstance(value, Style):
                raise StrategyError(
                    f"plan[{key.__name__}] = {value!r}: a layer class takes a style "
                    "(e.g. ColumnParallel()), not a spec."
                )
            kind, compiled = LAYER, None
        elif isinstance(key, str) and key:
            try:
                compiled = re.compile(key)
            except re.error as err:
                raise ShardingError(f"plan[{key!r}]: not a valid regular expression: {err}.") from None
            if isinstance(value, Style):
                kind = LAYER
            else:
                kind = OUTPUT if key.endswith("/output") else VARIABLE
                value = normalize_spec(value, name=f"plan[{key!r}]")
                _check_axes_once(value, key)
        else:
            raise StrategyError(
                f"plan key {key!r}: use a path regex (str) or a Keras layer class."
            )
        for existing, existing_kind, _, _ in self._entries:
            if existing == key and existing_kind == kind:
                raise ShardingError(f"plan[{key!r}] already exists; give each key once.")
        self._entries.append((key, kind, value, compiled))

    def add_layout_map(self, lookup, layout_map=None, source="LayoutMap"):
        """Look variables and ``"<layer>/output"`` tensors up in a keras
        layout map (``lookup(path) -> TensorLayout | None``), live: keys
        added to the map later apply to tensors created later."""
        entry = _LayoutMapEntry(lookup, layout_map, source)
        self._entries.append((entry, LAYOUT_MAP, entry, None))
        return self

    def check_axes(self, mesh):
        """Every mesh axis a spec entry (or layout map key) names exists."""
        for key, kind, value, _ in self._entries:
            specs = value.specs() if kind == LAYOUT_MAP else [(key, value)] if kind != LAYER else []
            for name, spec in specs:
                for axis in spec:
                    if axis is not None and axis not in mesh.axis_names:
                        raise ShardingError(
                            f"plan[{name!r}] = {tuple(spec)!r}: mesh axis {axis!r} is not "
                            f"on the mesh; its axes are {list(mesh.axis_names)}."
                        )

    def copy(self):
        out = Plan()
        out._entries = list(self._entries)
        return out

    # ---------------------------------------------------------- resolving
    def _match(self, kind, path, *, what):
        exact = [(k, v) for k, kd, v, _ in self._entries if kd == kind and k == path]
        hits = exact or [
            (k, v) for k, kd, v, c in self._entries if kd == kind and c is not None and c.fullmatch(path)
        ]
        if len(hits) > 1:
            raise ShardingError(
                f"{what} {path!r} matches two plan entries: {hits[0][0]!r} -> "
                f"{_show(hits[0][1])} and {hits[1][0]!r} -> {_show(hits[1][1])}. "
                "Make the keys exclusive."
            )
        for _, kd, entry, _ in self._entries:
            if kd != LAYOUT_MAP:
                continue
            found = entry.match(path, what)
            if found is None:
                continue
            if hits:
                raise ShardingError(
                    f"{what} {path!r} matches both {entry.source} key {found[0]!r} and "
                    f"the plan entry {hits[0][0]!r}; keep one."
                )
            hits = [found]
        return hits[0] if hits else None

    def variable_rule(self, path):
        """``(key, spec)`` of the entry for variable ``path``, or None."""
        return self._match(VARIABLE, path, what="Variable")

    def output_rule(self, path):
        """``(key, spec)`` of the entry for ``path`` (``"<layer path>/output"``),
        or None."""
        return self._match(OUTPUT, path, what="Layer output")

    def variable_spec(self, path):
        """The spec the plan gives variable ``path`` by path (None: none)."""
        rule = self.variable_rule(path)
        return None if rule is None else tuple(rule[1])

    def output_spec(self, path):
        """The spec the plan gives ``"<layer path>/output"`` (None: none)."""
        rule = self.output_rule(path)
        return None if rule is None else tuple(rule[1])

    def style_rule(self, layer, path):
        """``(key, style)`` of the entry for ``layer`` (at ``path``), or None.
        A class entry and a path entry for one layer are an error."""
        by_path = self._match(LAYER, path, what="Layer") if path else None
        by_class = [
            (k, v) for k, kd, v, _ in self._entries if kd == LAYER and isinstance(k, type) and isinstance(layer, k)
        ]
        found = ([by_path] if by_path else []) + by_class
        if len(found) > 1:
            raise ShardingError(
                f"Layer {path!r} has two styles in the plan: {_key(found[0][0])} -> "
                f"{found[0][1]} and {_key(found[1][0])} -> {found[1][1]}. Keep one."
            )
        return found[0] if found else None

    def has_outputs(self):
        return any(kind in (OUTPUT, LAYOUT_MAP) for _, kind, _, _ in self._entries)

    # --------------------------------------------------------------- data
    def __iter__(self):
        """``(key, style or spec)`` pairs (a layout map as its keys)."""
        for key, kind, value, _ in self._entries:
            if kind == LAYOUT_MAP:
                yield from value.specs()
            else:
                yield key, value

    def __len__(self):
        return sum(1 for _ in self)

    def to_config(self):
        """JSON/YAML-ready: a list of ``{"match": key, "style": ...}`` or
        ``{"match": key, "spec": [...]}`` (a class key as its Keras name)."""
        out = []
        for key, kind, value, _ in self._entries:
            if kind == LAYOUT_MAP:
                out += [{"match": k, "spec": list(spec)} for k, spec in value.specs()]
                continue
            match = key if isinstance(key, str) else f"class:{keras.saving.get_registered_name(key)}"
            if kind == LAYER:
                out.append({"match": match, **value.to_config()})
            else:
                out.append({"match": match, "spec": list(value)})
        return out

    @classmethod
    def from_config(cls, config):
        plan = cls()
        for entry in config:
            entry = dict(entry)
            match = entry.pop("match")
            if isinstance(match, str) and match.startswith("class:"):
                match = keras.saving.get_registered_object(match[len("class:"):]) or getattr(
                    keras.layers, match[len("class:"):].split(">")[-1], None
                )
            if "spec" in entry:
                plan.add(match, tuple(entry["spec"]))
            else:
                plan.add(match, style_from_config(entry))
        return plan

    def to_layout_map(self, model, mesh, rules):
        """A ``keras.distribution.LayoutMap`` for ``model``'s variables (one
        exact key per split variable, as :func:`resolve_weight` resolves
        them) and this plan's activation entries. ``mesh`` is a
        ``keras.distribution.DeviceMesh``, ``rules`` the logical rules (a
        :class:`tfshard.layout.LogicalRules`). Layouts a style gives
        activations *inside* a layer (e.g. attention heads) have no LayoutMap
        key and are not carried over."""
        layout_map = keras.distribution.LayoutMap(mesh)
        owners = weight_owners(model)
        for variable in model.weights:
            layer, parents = owners.get(id(variable), (None, []))
            resolved = resolve_weight(self, variable.path, variable.name, layer, parents)
            if resolved is None:
                continue
            source, axes = resolved
            spec = tuple(rules.spec_for(axes)) if source.startswith("style") else tuple(axes)
            if any(spec):
                layout_map[variable.path] = spec
        for key, kind, value, _ in self._entries:
            if kind == OUTPUT:
                layout_map[key] = value
            elif kind == LAYOUT_MAP:
                for k, spec in value.specs():
                    if k.endswith("/output"):
                        layout_map[k] = spec
        return layout_map

    def __repr__(self):
        return f"Plan({len(self)} entries)"

    def __str__(self):
        rows = [(_key(k), _show(v)) for k, v in self]
        if not rows:
            return "Plan: empty (everything replicated)"
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _check_axes_once(spec, key):
    named = [axis for axis in spec if axis is not None]
    for axis in set(named):
        if named.count(axis) > 1:
            raise ShardingError(
                f"plan[{key!r}] = {tuple(spec)!r} uses mesh axis {axis!r} for more than one "
                "dimension; an axis can split only one dimension. Set the others to None."
            )


def _key(key):
    return key.__name__ if isinstance(key, type) else repr(key)


def _show(value):
    return str(value) if isinstance(value, Style) else repr(tuple(value))


# ------------------------------------------------------------ resolving
def weight_owners(model):
    """``{id(weight): (owning layer, its enclosing layers)}`` for every
    weight of ``model`` (a built, possibly abstract, model)."""
    owners = {}

    def visit(layer, parents):
        for weight in _keras.own_weights(layer):
            owners.setdefault(id(weight), (layer, parents))
        for child in _keras.sublayers(layer):
            visit(child, parents + [layer])

    visit(model, [])
    return owners


def resolve_style(plan, layer, parents):
    """``(source, style)`` for ``layer`` whose enclosing layers are
    ``parents`` (outermost first), or None. In order: the plan's entry for
    the layer (path or class); the sublayer style its direct parent's style
    gives it (attention's projections); the layer's own ``tfshard_style``
    (tfshard's layer aliases)."""
    path = getattr(layer, "path", None) or layer.name
    rule = plan.style_rule(layer, path) if plan is not None else None
    if rule is not None:
        return f"plan {_key(rule[0])}", rule[1]
    if parents:
        parent = resolve_style(plan, parents[-1], parents[:-1])
        if parent is not None:
            sub = parent[1].declare(parents[-1]).sublayers.get(layer.name)
            if sub is not None:
                return f"{parent[0]} > {layer.name}", sub
    own = getattr(layer, "tfshard_style", None)
    if isinstance(own, Style):
        return f"{type(layer).__name__} default", own
    return None


def resolve_weight(plan, path, name, layer, parents):
    """How variable ``path`` (weight ``name`` of ``layer``) is laid out:
    ``("plan <key>", spec)`` from a variable entry, ``("style <source>",
    logical axes)`` from the owning layer's style, or None (replicated)."""
    rule = plan.variable_rule(path) if plan is not None else None
    if rule is not None:
        return f"plan {rule[0]!r}", rule[1]
    if layer is None:
        return None
    style = resolve_style(plan, layer, parents)
    if style is None:
        return None
    axes = style[1].declare(layer).weights.get(name)
    return None if axes is None else (f"style {style[0]}", tuple(axes))
