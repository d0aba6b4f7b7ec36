"""Automatic Megatron plans for any Keras or keras-hub model.

    plan = tfshard.auto_plan(lambda: keras_hub.models.MistralCausalLM(backbone, preprocessor=None), mesh)
    print(plan)                      # each entry, its style and why
    strategy = (tfshard.StrategyBuilder(mesh).data_parallel("batch")
                .tensor_parallel("model").plan(plan).build())
    with strategy.scope():
        model = build()

:func:`auto_plan` builds the model without weights, traces one call to see
which layers feed which (:mod:`tfshard._auto_trace`), recognises attention,
feed-forward, embedding, logits and expert blocks from those connections
(:mod:`tfshard._auto_recognize`), and picks, among the candidate plans that
fit ``memory_budget``, the one with the least communication per training
step (:mod:`tfshard._auto_cost` states the cost model). What it does not
recognise stays replicated, and :meth:`AutoPlan.explain` says why.
:func:`check_plan` checks a (hand-edited) plan against a model: every entry
must match something.
"""

from __future__ import annotations

import dataclasses

import re
from collections.abc import Mapping

import keras

from tfshard import _auto_cost, _auto_loss, _auto_recognize, _auto_trace
from tfshard._plan_check import check_plan
from tfshard.errors import ShardingError, StrategyError
from tfshard.layout import LogicalRules
from tfshard.plans import Plan, weight_owners
from tfshard.styles import Style

__all__ = ["auto_plan", "AutoPlan", "check_plan"]

# Optimizer slots per trainable weight, by optimizer class (Adam's two moments).
_SLOTS = {"Adam": 2, "AdamW": 2, "Adamax": 2, "Nadam": 2, "Lamb": 2, "Lion": 1, "Adagrad": 1,
          "Adadelta": 2, "RMSprop": 1, "Ftrl": 2, "Adafactor": 2}
_DEFAULT_BATCH_PER_GROUP = 8
_DEFAULT_SEQ = 512


class AutoPlan(Plan):
    """A :class:`~tfshard.plans.Plan` made by :func:`auto_plan`, which
    knows why each entry is there and what it costs.

    ``print(plan)`` shows the entries with their reasons and the estimate;
    :meth:`explain` also lists every layer kept whole and the candidates
    compared. ``optimizer_state_axis`` is the data axis when the plan needs
    ZeRO-1 (see :meth:`builder`).
    """

    def __init__(self, chosen, alternatives, units, notes, model_name, entries=None, *,
                 keys=None, user_rules=None):
        entries = chosen.entries if entries is None else entries
        super().__init__([(key, value) for key, value, _ in entries])
        self.reasons = {key: reason for key, value, reason in entries}
        self.assessment = chosen
        self.alternatives = alternatives
        self.units = units
        self.notes = notes
        self.model_name = model_name
        self.optimizer_state_axis = chosen.optimizer_state_axis
        self.rules = chosen.setting.rules
        self._keys = keys or {}  # id(layer) -> its plan key
        self._user_rules = dict(user_rules or {})  # the rules= given, for builder()

    # ------------------------------------------------------------ numbers
    @property
    def per_device_bytes(self):
        """Parameters + optimizer slots one device holds (estimated from
        the weights' shapes and the resolved specs)."""
        return self.assessment.bytes_per_device

    def estimate_collectives(self):
        """Collectives one training step launches, by the cost model, as
        :class:`tfshard.comm.CollectiveCounts` ``{(kind, axis): n}``
        (comparable with the ``"optimized"`` stage ``tfshard.comm`` counts,
        minus its all-scatters, which are local slices)."""
        return self.assessment.launches()

    def builder(self, mesh):
        """A :class:`tfshard.StrategyBuilder` with this plan, the axes and
        rules it was made for, and ZeRO-1 when the plan chose it."""
        from tfshard.strategy import StrategyBuilder

        setting = self.assessment.setting
        builder = StrategyBuilder(mesh)
        if setting.data_axis:
            builder.data_parallel(setting.data_axis)
        if setting.tensor_axis:
            builder.tensor_parallel(setting.tensor_axis)
        builder.rules(self._user_rules)
        builder.plan(self)
        if self.optimizer_state_axis:
            builder.shard_optimizer_state(self.optimizer_state_axis)
        return builder


    # ------------------------------------------------------------ reports
    def _summary(self):
        a, s = self.assessment, self.assessment.setting
        counts = ", ".join(f"{n} {k.replace('_', '-')}[{_show_axis(axis)}]" for (k, axis), n in sorted(a.launches().items(), key=str))
        mesh = " x ".join(f"{axis}={n}" for axis, n in s.sizes.items())
        zero = f"; ZeRO-1 over {a.optimizer_state_axis!r}" if a.optimizer_state_axis else ""
        return [
            f"auto plan for {self.model_name!r} on {mesh} (data axis {s.data_axis!r}, tensor axis {s.tensor_axis!r}){zero}",
            f"  per device: {_fmt_bytes(a.bytes_per_device)} (parameters {_fmt_bytes(a.param_bytes)} + "
            f"{s.slots} optimizer slot(s) {_fmt_bytes(a.slot_bytes)})",
            f"  per training step (global batch {s.batch} x {s.seq}): {counts or 'no collectives'}; "
            f"{_fmt_bytes(a.volume)} moved per device",
        ]

    def __str__(self):
        lines = self._summary()
        rows = [(_show_key(k), _show_value(v), self.reasons.get(k, "")) for k, v in self]
        if not rows:
            lines.append("  nothing to split: every weight replicated (data parallel only); see explain()")
        else:
            width = [max(len(r[i]) for r in rows) for i in range(2)]
            for key, value, reason in rows:
                lines.append(f"  {key:<{width[0]}}  {value:<{width[1]}}  # {reason}")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)

    def explain(self):
        """The plan (as ``print(plan)``), then every layer with weights and
        what was decided for it, the collectives of a step and the candidate
        plans compared."""
        lines = str(self).splitlines() + ["", "layers:"]
        decided = {id(u): reason for u, reason in self._unit_reasons()}
        for unit in self.units:
            names = ", ".join(layer.path if hasattr(layer, "path") else layer.name for layer in unit.layers)
            lines.append(f"  {names}: {decided.get(id(unit), unit.reason)}")
        lines += ["", "collectives per step (cost model):"]
        for row in self.assessment.rows:
            lines.append(f"  {row.stage[0]:>6} {row.kind}[{_show_axis(row.axis)}] {_fmt_bytes(row.nbytes)}: {row.what}")
        lines += ["", "candidates (volume moved per device, launches, bytes per device):"]
        for other in self.alternatives[:8]:
            mark = "*" if other is self.assessment else " "
            c = other.choice
            what = []
            if c.split_tables:
                what.append(f"{len(c.split_tables)} lookup table(s) split")
            if c.experts_on_data:
                what.append("experts over the data axis")
            if c.fsdp:
                what.append("FSDP")
            if c.zero1:
                what.append("ZeRO-1")
            lines.append(
                f" {mark} {', '.join(what) or 'tensor-parallel splits only'}: {_fmt_bytes(other.volume)}, "
                f"{sum(other.launches().values())} launches, {_fmt_bytes(other.bytes_per_device)}"
                + ("" if other.fits else " (over the budget)")
            )
        return "\n".join(lines)

    def _unit_reasons(self):
        s, c = self.assessment.setting, self.assessment.choice
        keys = self._keys
        for unit in self.units:
            yield unit, _auto_cost.unit_entries(unit, s, c, keys)[2]


def _fmt_bytes(n):
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _show_axis(axis):
    return "+".join(axis) if isinstance(axis, tuple) else str(axis)


def _show_key(key):
    return key.__name__ if isinstance(key, type) else repr(key)


def _show_value(value):
    return str(value) if isinstance(value, Style) else repr(tuple(value))


# ------------------------------------------------------------------- API
def auto_plan(build_model, mesh, *, memory_budget=None, rules=None, inputs=None,
              data_axis=None, tensor_axis=None, optimizer_slots=None):
    """A :class:`AutoPlan` for the model ``build_model()`` makes.

    Args:
        build_model: a zero-argument callable that builds the model (built
            abstractly: no weight is materialised when Keras allows it), or
            a model.
        mesh: a :class:`tfshard.Mesh`, or a mapping ``{axis: size}`` (to plan
            for a mesh this machine does not have).
        memory_budget: bytes per device for parameters and optimizer slots;
            the plan with the least communication that fits is chosen
            (None: no limit).
        rules: the logical rules the strategy will use (as
            ``StrategyBuilder.rules``), e.g. ``{"heads": None}``.
        inputs: one global batch (arrays), or its shapes (``(8, 128)`` or a
            dict of shapes): sizes the per-step estimate, and gives a
            subclassed model its input. Default: the model's own inputs,
            8 examples per data-parallel group, 512 for unknown lengths.
        data_axis, tensor_axis: mesh axis names (default ``"batch"`` and
            ``"model"``, or the mesh's first and second axes).
        optimizer_slots: slots per trainable weight (default: from the
            model's optimizer, else 2 as Adam).

    Raises:
        tfshard.ShardingError: no candidate plan fits ``memory_budget``
            (naming the smallest per-device bytes reachable and a mesh that
            would fit).
    """
    sizes = _mesh_sizes(mesh)
    data_axis, tensor_axis = _axes(sizes, data_axis, tensor_axis)
    from tfshard.strategy import completed_rules

    user_rules = LogicalRules(rules or {}).as_dict()
    completed = completed_rules(user_rules, data_axis, tensor_axis)
    model, note = _auto_trace.build_abstract(build_model)
    notes = [note] if note else []
    try:
        trace = _auto_trace.trace_calls(model, inputs)
    except Exception as err:  # never a crash: recognise from the layers alone
        trace = None
        notes.append(
            f"could not trace a call of the model ({type(err).__name__}: {str(err).splitlines()[0][:240]}); "
            "recognised from its layers alone (attention layers by their query/key/value/attention_output "
            "projections); blocks found only by their connections are left whole"
        )
    units = _auto_recognize.recognize(trace, model)
    batch, seq = _step_size(model, inputs, sizes.get(data_axis, 1) if data_axis else 1)
    slots = optimizer_slots if optimizer_slots is not None else _optimizer_slots(model, notes)
    setting = _auto_cost.Setting(sizes, data_axis, tensor_axis, completed, batch, seq, slots,
                                 _auto_loss.loss_splits_logits(model), _auto_loss.metrics_read_logits(model))
    all_paths = [getattr(layer, "path", None) or layer.name for layer in _auto_trace.all_layers(model)]
    keys = _auto_cost.layer_keys(model, units, all_paths)
    owners = weight_owners(model)
    assessed = _assess_all(model, units, setting, keys, owners, memory_budget)
    fitting = [a for a in assessed if a.fits]
    if not fitting:
        raise _budget_error(model, units, setting, keys, owners, memory_budget, assessed)
    chosen = min(fitting, key=lambda a: a.rank())
    _check_divisible(model, chosen, owners)
    notes += _naming_notes(model)
    if not chosen.entries:
        notes.append("nothing to split: every weight stays replicated (data parallel only)")
    entries = chosen.entries + _pinned_weights(model, chosen, owners, keys)
    entries = _compressed(entries, all_paths, [w.path for w in model.weights])
    return AutoPlan(chosen, sorted(assessed, key=lambda a: a.rank()), units, notes, model.name, entries,
                    keys=keys, user_rules=user_rules)


def _pinned_weights(model, assessment, owners, keys):
    """A variable entry for every weight a style splits, with the spec the
    style resolves to: the plan then reads as a layout table, and lays the
    weights out by path even where Keras builds a layer lazily, inside its
    parent's first call (where the layer that owns a variable is not known
    while the variable is made)."""
    plan = Plan([(k, v) for k, v, _ in assessment.entries])
    specs = _auto_cost.resolve_specs(model, plan, assessment.setting, owners)
    out = []
    for weight in model.weights:
        spec = specs[id(weight)]
        if not any(spec) or plan.variable_rule(weight.path) is not None:
            continue
        layer = owners.get(id(weight), (None, []))[0]
        key = keys[id(layer)] + "/" + re.escape(weight.name) if layer is not None else re.escape(weight.path)
        out.append((key, spec, "the spec its layer's style gives it"))
    return out


def _compressed(entries, layer_paths, variable_paths):
    """Entries that differ only in a block number (``transformer_layer_3``)
    and carry the same value, merged into one key with ``\\d+``, where the
    merged key matches exactly the paths the entries matched."""
    def generalize(key):
        return re.sub(r"(?<=_)\d+(?=/|$)", r"\\d+", key) if isinstance(key, str) else key

    def matched(key, value):
        if isinstance(value, Style):
            paths = layer_paths
        elif key.endswith("/output"):
            paths, key = layer_paths, key[: -len("/output")]
        else:
            paths = variable_paths
        return {p for p in paths if re.fullmatch(key, p)}

    groups = {}
    for key, value, reason in entries:
        groups.setdefault((generalize(key), repr(value)), []).append((key, value, reason))
    out, done = [], set()
    for key, value, reason in entries:
        group_key = (generalize(key), repr(value))
        if group_key in done:
            continue
        group = groups[group_key]
        if len(group) > 1 and isinstance(key, str):
            wanted = set().union(*(matched(k, v) for k, v, _ in group))
            if matched(group_key[0], value) == wanted:
                out.append((group_key[0], value, f"{reason} (x{len(group)})"))
                done.add(group_key)
                continue
        out.append((key, value, reason))
        if len(group) > 1:
            groups[group_key] = [g for g in group if g[0] != key]
    return out


def _assess_all(model, units, setting, keys, owners, budget):
    out = []
    for choice in _auto_cost.candidates(units, setting):
        assessment = _auto_cost.assess(model, units, setting, choice, keys, owners)
        assessment.fits = budget is None or assessment.bytes_per_device <= budget
        out.append(assessment)
    return out


def _budget_error(model, units, setting, keys, owners, budget, assessed):
    best = min(assessed, key=lambda a: a.bytes_per_device)
    suggestion = _mesh_that_fits(model, units, setting, keys, owners, budget)
    fix = (f"a mesh that fits: {suggestion[0]} ({_fmt_bytes(suggestion[1])} per device)"
           if suggestion else "no mesh up to 4096 devices fits; use a smaller model or a larger budget")
    return ShardingError(
        f"auto_plan: memory_budget={budget} bytes ({_fmt_bytes(budget)}) per device: no plan for model "
        f"{model.name!r} fits on {setting.sizes}; the smallest reachable is "
        f"{best.bytes_per_device} bytes ({_fmt_bytes(best.bytes_per_device)}) per device "
        f"(parameters + {setting.slots} optimizer slot(s)). Raise the budget, or use {fix}."
    )


def _mesh_that_fits(model, units, setting, keys, owners, budget):
    data, tensor = setting.data_axis, setting.tensor_axis
    options = []
    for dp_factor in (1, 2, 4, 8, 16, 32, 64):
        for tp_factor in (1, 2, 4, 8, 16, 32, 64):
            sizes = dict(setting.sizes)
            if data:
                sizes[data] = sizes[data] * dp_factor
            if tensor:
                sizes[tensor] = sizes[tensor] * tp_factor
            devices = 1
            for n in sizes.values():
                devices *= n
            if (dp_factor, tp_factor) != (1, 1) and devices <= 4096:
                options.append((devices, tp_factor, sizes))
    for devices, _, sizes in sorted(options, key=lambda o: (o[0], o[1])):
        trial = dataclasses.replace(setting, sizes=sizes, data_axis=data, tensor_axis=tensor)
        best = min(
            (_auto_cost.assess(model, units, trial, c, keys, owners) for c in _auto_cost.candidates(units, trial)),
            key=lambda a: a.bytes_per_device,
        )
        if best.bytes_per_device <= budget and not _any_indivisible(model, best, owners):
            axes = ", ".join(f"{a!r}: {n}" for a, n in sizes.items())
            return f"tfshard.Mesh({{{axes}}})", best.bytes_per_device
    return None


def _any_indivisible(model, assessment, owners):
    plan = Plan([(k, v) for k, v, _ in assessment.entries])
    specs = _auto_cost.resolve_specs(model, plan, assessment.setting, owners)
    return any(_auto_cost.indivisible(w, specs[id(w)], assessment.setting) for w in model.weights)


def _check_divisible(model, assessment, owners):
    """Every spec the plan gives divides its weight (a recognised block's
    own checks make sure; this is the last guard before DTensor would
    fail)."""
    plan = Plan([(k, v) for k, v, _ in assessment.entries])
    specs = _auto_cost.resolve_specs(model, plan, assessment.setting, owners)
    for weight in model.weights:
        problem = _auto_cost.indivisible(weight, specs[id(weight)], assessment.setting)
        if problem:
            raise ShardingError(
                f"auto_plan: the plan would lay out {weight.path!r} {tuple(weight.shape)} as "
                f"{specs[id(weight)]!r}, but its {problem}; please report this model (a recognised "
                "block's divisibility check missed it) and pass rules= to replicate that dimension."
            )


def _naming_notes(model):
    segments = {segment for weight in model.weights for segment in weight.path.split("/")}
    generated = [layer.path for layer in _auto_trace.all_layers(model)[1:]
                 if _auto_recognize.auto_named(layer) and re.search(r"_\d+$", layer.name)
                 and layer.name in segments]
    if not generated:
        return []
    return [
        f"{len(generated)} layer name(s) were generated by Keras (e.g. {generated[0]!r}); the plan "
        "matches them up to their number where that is unambiguous, otherwise build the model in a "
        "fresh session (keras.backend.clear_session()) or name those layers"
    ]


def _mesh_sizes(mesh):
    if isinstance(mesh, Mapping):
        return {str(k): int(v) for k, v in mesh.items()}
    names = getattr(mesh, "axis_names", None)
    if names is None:
        raise StrategyError(
            f"auto_plan(build_model, mesh): mesh is {type(mesh).__name__}; pass a tfshard.Mesh or "
            "a dict of axis sizes such as {'batch': 2, 'model': 4}."
        )
    return {name: int(mesh.axis_size(name)) for name in names}


def _axes(sizes, data_axis, tensor_axis):
    names = list(sizes)
    for given in (data_axis, tensor_axis):
        if given is not None and given not in names:
            raise StrategyError(f"auto_plan: the mesh has no axis {given!r}; its axes are {names}.")
    if data_axis is None:
        if "batch" in names:
            data_axis = "batch"
        elif len(names) > 1:
            data_axis = next(n for n in names if n not in (tensor_axis, "model"))
        elif names[0] not in (tensor_axis, "model"):
            data_axis = names[0]
    if tensor_axis is None:
        rest = [n for n in names if n != data_axis]
        tensor_axis = "model" if "model" in rest else rest[0] if rest else None
    return data_axis, tensor_axis


def _step_size(model, inputs, dp):
    """``(global batch, positions per example)`` for the estimate."""
    shapes = []
    source = inputs
    if source is None:
        try:
            source = model.input
        except (AttributeError, ValueError):
            source = None
    def shape_of(x):
        if isinstance(x, tuple) and all(d is None or isinstance(d, int) for d in x):
            return x
        return tuple(getattr(x, "shape", ()))
    if source is not None:
        if isinstance(source, tuple) and all(d is None or isinstance(d, int) for d in source):
            shapes = [source]
        else:
            shapes = [shape_of(x) for x in keras.tree.flatten(source)]
    batch = next((s[0] for s in shapes if s and s[0]), None) or _DEFAULT_BATCH_PER_GROUP * dp
    seq = next((s[1] for s in shapes if len(s) >= 2 and s[1]), None)
    if seq is None:
        seq = _DEFAULT_SEQ if any(len(s) >= 2 for s in shapes) else 1
    return int(batch), int(seq)


def _optimizer_slots(model, notes):
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        notes.append("no optimizer on the model: optimizer memory counted as Adam's 2 slots per weight")
        return 2
    name = type(optimizer).__name__
    if name == "SGD":
        return 1 if getattr(optimizer, "momentum", 0) else 0
    return _SLOTS.get(name, 2)
