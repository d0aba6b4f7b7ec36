"""Candidate plans for :func:`tfshard.auto_plan`, their memory and their
communication per training step.

What the search decides
-----------------------
Compute splits are not a choice: every attention, feed-forward, logits
projection and expert bank that the tensor axis divides is split over it
(that is what the axis is for: each device computes ``1/tp`` of each matmul,
as in Megatron-LM). The search chooses what trades memory for
communication: whether embedding tables used only for lookups are split,
whether weights are also split over the data axis at rest (FSDP-style,
gathered where a layer reads them), whether optimizer slots are (ZeRO-1),
and where experts go that the tensor axis cannot divide (the data axis or
nowhere). Among the candidates that fit the memory budget it takes the
lowest communication volume per device, then the fewest launches, then the
fewest bytes.

The cost model
--------------
Per training step, in the ring model (an all-reduce of ``b`` bytes over
``n`` devices moves ``2(n-1)/n * b`` per device, an all-gather or a
reduce-scatter ``(n-1)/n * b``), with ``t`` tokens per data-parallel group
(``batch/dp * seq``):

* split attention: one all-reduce of the ``(t, d_model)`` output forward
  (row-parallel sum), one of the input gradient backward; key/value heads
  computed whole (the tensor axis does not divide them) add the all-gather
  of their gradients, which DTensor launches with the input gradient's;
* split feed-forward: the same two; a gated one's two input gradients are
  launched together;
* split embedding: one all-reduce of the looked-up rows; its logits (tied or
  untied, or a split output projection) are gathered whole for a fused loss,
  or, for a stock sparse cross-entropy on logits (run vocab-parallel, see
  :mod:`tfshard._auto_loss`), reduced per token in two launches (the max,
  then the sums; with compiled metrics the gather stays and only the sums
  are added); their input gradient is all-reduced backward. tfshard's own
  vocabulary-parallel embedding keeps its logits split and its loss adds
  two launches;
* experts over the tensor axis: the experts' sum all-reduced forward, the
  routing weights' and input gradients together backward, and a router
  auxiliary loss's data-axis reduction (:mod:`tfshard._auto_experts`);
* norms on split heads: their scale gradients over both axes, backward;
* the data axis: one all-reduce of every gradient that is whole over it
  (DTensor combines them into one launch); FSDP weights add a gather where
  they are read, ZeRO-1 a gather of the updated weights.

Launches are what DTensor runs after combining independent all-reduces
(``tfshard.comm``'s ``"optimized"`` stage): collectives of one stage of the
forward or backward chain over one axis launch together; on CPU and GPU an
all-gather launches as an all-reduce. This is exact for tensor-parallel and
data-parallel plans (tested against DTensor's SPMD dump on tfshard's
reference transformer and keras-hub Llama); with FSDP or ZeRO-1, DTensor
fuses data-axis collectives further (all-reduce + slice into
reduce-scatter), so their launch counts are estimates. Units that read
the same tensor (parallel branches) launch together
(:mod:`tfshard._auto_launches`); pinned on keras-hub QwenMoe and Qwen3Moe
(2x4: 8 model-axis launches, 2 data-axis, and for Qwen3Moe's query/key
norms 1 over both axes). Bytes per device matched exactly in every tested model.
"""

from __future__ import annotations

import dataclasses
import itertools
import re

import numpy as np

from tfshard._auto_experts import expert_entries
from tfshard._auto_launches import head_norm_rows, parallel_branches
from tfshard._auto_loss import logits_rows
from tfshard.comm import CollectiveCounts
from tfshard.plans import Plan, resolve_weight, weight_owners
from tfshard.styles import ColumnParallel, HeadParallel, RowParallel, VocabParallel

# A Keras optimizer's iteration count (int64) and learning rate (float32),
# replicated on every device next to its slots.
OPTIMIZER_COUNTERS = 8 + 4


@dataclasses.dataclass
class Setting:
    """The mesh and the step the plan is for."""

    sizes: dict  # mesh axis -> size
    data_axis: str | None
    tensor_axis: str | None
    rules: object  # LogicalRules, completed for the two axes
    batch: int  # global batch
    seq: int  # positions per example
    slots: int  # optimizer slots per trainable weight
    loss_splits_logits: bool = False  # the compiled loss is vocab-parallel (_auto_loss)
    metrics_read_logits: bool = False  # compiled metrics gather the logits anyway

    @property
    def dp(self):
        return self.sizes.get(self.data_axis, 1) if self.data_axis else 1

    @property
    def tp(self):
        return self.sizes.get(self.tensor_axis, 1) if self.tensor_axis else 1

    @property
    def tokens(self):
        """Positions per data-parallel group per step."""
        return max(self.batch // max(self.dp, 1), 1) * self.seq

    def splits(self, logical):
        """The tensor axis, when the rules send ``logical`` to it."""
        return self.tp > 1 and self.rules.axis_for(logical) == self.tensor_axis


@dataclasses.dataclass(frozen=True)
class Choice:
    split_tables: frozenset = frozenset()  # lookup-only embedding units split
    experts_on_data: frozenset = frozenset()  # expert units the tensor axis cannot divide
    fsdp: bool = False
    zero1: bool = False


@dataclasses.dataclass
class Row:
    """One collective of the step."""

    stage: tuple  # ("fwd" | "loss" | "bwd" | "update", position)
    kind: str  # all_reduce | all_gather | reduce_scatter
    axis: str | tuple  # a mesh axis, or axes reduced over together
    nbytes: int  # the tensor's bytes per device (gathered size for an all-gather)
    what: str

    def volume(self, sizes):
        size = int(np.prod([sizes[a] for a in (self.axis if isinstance(self.axis, tuple) else (self.axis,))]))
        factor = 2 * (size - 1) / size if self.kind == "all_reduce" else (size - 1) / size
        return factor * self.nbytes


@dataclasses.dataclass
class Assessment:
    choice: Choice
    entries: list  # (key, style or spec, reason)
    param_bytes: int
    slot_bytes: int
    rows: list
    setting: Setting
    optimizer_state_axis: str | None = None
    fits: bool = True

    @property
    def bytes_per_device(self):
        return self.param_bytes + self.slot_bytes

    @property
    def volume(self):
        return sum(row.volume(self.setting.sizes) for row in self.rows)

    def launches(self):
        """:class:`tfshard.comm.CollectiveCounts` of launched collectives
        (``{("all_reduce", axis): n}``; gathers launch as all-reduces)."""
        stages = {}
        for row in self.rows:
            kind = "reduce_scatter" if row.kind == "reduce_scatter" else "all_reduce"
            stages.setdefault((kind, row.axis), set()).add(row.stage)
        return CollectiveCounts({key: len(found) for key, found in stages.items()})

    def rank(self):
        return (round(self.volume), sum(self.launches().values()), self.bytes_per_device)


# ------------------------------------------------------------- entries
def _spec_axes(setting, shape_axes):
    return tuple(setting.rules.spec_for(shape_axes))


def unit_entries(unit, setting, choice, keys):
    """``(entries, rows, reason)`` of one unit under ``choice``: plan
    entries ``(key, value, reason)``, its tensor-axis collectives and a
    sentence on what was decided."""
    tp, t, axis = setting.tp, setting.tokens, setting.tensor_axis
    info, entries, rows = unit.info, [], []
    calls = sorted(unit.calls, key=lambda c: c.index)
    first = calls[0].index if calls else 0
    if unit.kind == "attention":
        heads, kv = info["heads"], info["kv_heads"]
        if not setting.splits("heads"):
            return [], [], f"{unit.reason}: replicated (rule heads -> {setting.rules.axis_for('heads')})"
        if heads % tp:
            return [], [], f"{unit.reason}: {heads} heads do not divide {axis}={tp}: replicated"
        kv_split = kv % tp == 0 and (kv == heads or setting.splits("kv_heads"))
        if not kv_split and info.get("regrouped"):
            # DTensor mis-expands the gradient of that reshape of heads split
            # over the axis into (kv, groups) when kv does not divide it
            # (measured on keras-hub Gemma3: "SPMD expansion resulted in op
            # output inconsistent with the provided layout").
            return [], [], (f"{unit.reason}: replicated (the query's {heads} heads are regrouped as "
                            f"{kv} key/value heads x {heads // kv}, and {kv} does not divide {axis}={tp})")
        note = "" if kv_split else f"; kv heads {kv} do not divide {axis}={tp}: key/value replicated"
        if info["named"]:
            style = HeadParallel() if kv_split else HeadParallel(kv_heads=None)
            entries.append((keys[id(info["owner"])], style, unit.reason + note))
        else:
            for layer in info["query"]:
                entries.append((keys[id(layer)], ColumnParallel(dim="heads", hidden="d_model"),
                                f"{unit.reason}: query-like, split by heads"))
            if kv_split:
                kv_dim = "heads" if kv == heads else "kv_heads"
                for layer in info["kv"]:
                    entries.append((keys[id(layer)], ColumnParallel(dim=kv_dim, hidden="d_model"),
                                    f"{unit.reason}: key/value, split by heads"))
            entries.append((keys[id(info["output"])], RowParallel(dim="heads", hidden="d_model"),
                            f"{unit.reason}: output projection, row-parallel{note}"))
        act = t * info["width"] * 4
        out_call = next((c.index for c in calls if c.layer is info["output"]), first)
        rows.append(Row(("fwd", out_call), "all_reduce", axis, act, "attention output (row-parallel sum)"))
        rows.append(Row(("bwd", first), "all_reduce", axis, act, "attention input gradient"))
        if not kv_split:
            head_size = info["head_dim"]
            for layer in info["kv"]:
                rows.append(Row(("bwd", first), "all_gather", axis, t * heads * head_size * 4,
                                f"gradient of whole key/value heads ({layer.name})"))
        rows += head_norm_rows(unit, setting, Row)
        return entries, rows, f"{unit.reason}: split by heads over {axis}{note}"
    if unit.kind == "ffn":
        if not setting.splits("d_ff"):
            return [], [], f"{unit.reason}: replicated (rule d_ff -> {setting.rules.axis_for('d_ff')})"
        if info["d_ff"] % tp:
            return [], [], f"{unit.reason}: d_ff {info['d_ff']} does not divide {axis}={tp}: replicated"
        for layer in info["columns"]:
            entries.append((keys[id(layer)], ColumnParallel(), f"{unit.reason}: column-parallel"))
        entries.append((keys[id(info["row"])], RowParallel(), f"{unit.reason}: row-parallel"))
        act = t * info["width"] * 4
        rows.append(Row(("fwd", calls[-1].index), "all_reduce", axis, act, "feed-forward output (row-parallel sum)"))
        for _ in info["columns"]:
            rows.append(Row(("bwd", first), "all_reduce", axis, act, "feed-forward input gradient"))
        return entries, rows, f"{unit.reason}: split by d_ff over {axis}"
    if unit.kind == "embedding":
        return _embedding_entries(unit, setting, choice, keys)
    if unit.kind == "logits":
        if not setting.splits("vocab") or info["vocab"] % tp:
            return [], [], f"{unit.reason}: {info['vocab']} outputs do not divide {axis}={tp}: replicated"
        entries.append((keys[id(unit.layer)], ColumnParallel(dim="vocab", gather_output=True),
                        f"{unit.reason}: column-parallel, {_logits_fate(setting)}"))
        rows += logits_rows(Row, setting, first, info["vocab"], info["width"], "logits")
        return entries, rows, f"{unit.reason}: split by vocabulary over {axis}"
    if unit.kind == "experts":
        return expert_entries(unit, setting, choice, keys, Row)
    if unit.kind == "own":
        return [], _own_rows(unit, setting), unit.reason
    return [], [], unit.reason


def _embedding_entries(unit, setting, choice, keys):
    info, tp, t, axis = unit.info, setting.tp, setting.tokens, setting.tensor_axis
    vocab, dim = info["vocab"], info["dim"]
    if not setting.splits("vocab") or vocab % tp:
        return [], [], f"{unit.reason}: vocabulary {vocab} does not divide {axis}={tp}: replicated"
    if not info["logits"] and id(unit) not in choice.split_tables:
        return [], [], (
            f"{unit.reason}: replicated (a lookup-only table: splitting it saves memory but adds an "
            "all-reduce of the looked-up rows per step; the search kept it whole)"
        )
    key = keys[id(unit.layer)]
    entries = [(key, VocabParallel(), f"{unit.reason}: vocabulary-parallel")]
    if info["reverse"] is not None:
        entries.append((key + "/" + re.escape(info["reverse"].name), (None, axis),
                        f"{unit.reason}: untied output table split by vocabulary"))
    rows = []
    for call in info["lookup_calls"]:
        rows.append(Row(("fwd", call.index), "all_reduce", axis, t * dim * 4, "vocabulary-parallel lookup"))
    for call in info["logits_calls"]:
        rows += logits_rows(Row, setting, call.index, vocab, dim, "logits")
    what = "tied logits" if info["logits"] and info["reverse"] is None else "logits" if info["logits"] else "lookups"
    return entries, rows, f"{unit.reason}: split by vocabulary over {axis} ({what}: {_logits_fate(setting)})" \
        if info["logits"] else f"{unit.reason}: split by vocabulary over {axis} (chosen by the search)"


def _logits_fate(setting):
    if not setting.loss_splits_logits:
        return "logits gathered for the loss"
    if setting.metrics_read_logits:
        return "vocab-parallel loss, logits gathered for the metrics"
    return "vocab-parallel loss, logits never gathered"


def _own_rows(unit, setting):
    """Collectives of tfshard's own vocabulary-parallel embedding (its
    logits stay split; the vocabulary-parallel loss reduces them)."""
    layer, t, axis = unit.layer, setting.tokens, setting.tensor_axis
    table = getattr(layer, "embeddings", None)
    if table is None or not setting.splits(getattr(layer, "logical_dim", "vocab")):
        return []
    vocab, dim = (int(d) for d in table.shape)
    if vocab % setting.tp:
        return []
    from tfshard._auto_recognize import embedding_calls

    lookups, logits, _ = embedding_calls(unit.calls, vocab, dim)
    rows = []
    for call in lookups:
        rows.append(Row(("fwd", call.index), "all_reduce", axis, t * dim * 4, "vocabulary-parallel lookup"))
    for call in logits:
        rows.append(Row(("bwd", call.index), "all_reduce", axis, t * dim * 4, "logits input gradient"))
        rows.append(Row(("loss", 0), "all_reduce", axis, t * 4, "loss: max over the vocabulary"))
        rows.append(Row(("loss", 1), "all_reduce", axis, t * 4, "loss: sum of exponentials"))
        rows.append(Row(("loss", 1), "all_reduce", axis, t * 4, "loss: the target's logit"))
    return rows


# ----------------------------------------------------------- assessment
def layer_keys(model, units, all_paths):
    """A plan key for every layer a unit names."""
    from tfshard._auto_recognize import path_key
    from tfshard._auto_trace import all_layers

    parents = {}

    def visit(layer, chain):
        parents.setdefault(id(layer), chain)
        for child in _sublayers(layer):
            visit(child, chain + [layer])

    visit(model, [])
    keys = {}
    for layer in all_layers(model):
        keys[id(layer)] = path_key(layer, parents.get(id(layer), []), all_paths)
    return keys


def _sublayers(layer):
    from tfshard import _keras

    return _keras.sublayers(layer)


def assess(model, units, setting, choice, keys, owners):
    """The :class:`Assessment` of ``choice``."""
    entries, rows_by_unit = [], {}
    for unit in units:
        unit_plan, rows_by_unit[id(unit)], _ = unit_entries(unit, setting, choice, keys)
        entries += unit_plan
    staged = parallel_branches(units, rows_by_unit)
    rows = [r for unit in units for r in staged[id(unit)]]
    plan = Plan([(k, v) for k, v, _ in entries])
    specs = resolve_specs(model, plan, setting, owners)
    if choice.fsdp and setting.dp > 1:
        extra = {key: (key, value, reason) for key, value, reason in fsdp_entries(model, specs, setting, keys, owners)}
        entries = [extra.pop(key, (key, value, reason)) for key, value, reason in entries] + list(extra.values())
        plan = Plan([(k, v) for k, v, _ in entries])
        specs = resolve_specs(model, plan, setting, owners)
    rows += data_rows(model, units, specs, setting, choice)
    param_bytes = slot_bytes = 0
    if setting.slots:
        slot_bytes += OPTIMIZER_COUNTERS
    for weight in model.weights:
        spec = specs[id(weight)]
        param_bytes += shard_bytes(weight, spec, setting)
        if weight.trainable and setting.slots:
            slot_spec = optimizer_state_spec(spec, weight.shape, setting) if choice.zero1 else spec
            slot_bytes += setting.slots * shard_bytes(weight, slot_spec, setting)
    return Assessment(choice, entries, param_bytes, slot_bytes, rows, setting,
                      optimizer_state_axis=setting.data_axis if choice.zero1 else None)


def resolve_specs(model, plan, setting, owners):
    """``{id(weight): spec}`` as ``Strategy.variable_spec`` resolves them."""
    out = {}
    for weight in model.weights:
        layer, parents = owners.get(id(weight), (None, []))
        resolved = resolve_weight(plan, weight.path, weight.name, layer, parents)
        if resolved is None:
            spec = (None,) * len(weight.shape)
        elif resolved[0].startswith("plan"):
            spec = tuple(resolved[1])
        else:
            spec = _spec_axes(setting, resolved[1])
        out[id(weight)] = spec
    return out


def indivisible(weight, spec, setting):
    for dim, axis in zip(weight.shape, spec):
        if axis is not None and int(dim) % setting.sizes.get(axis, 1):
            return f"dimension of size {int(dim)} does not divide {axis}={setting.sizes.get(axis, 1)}"
    return None


def shard_bytes(weight, spec, setting):
    itemsize = np.dtype(str(getattr(weight, "dtype", "float32")).replace("bfloat16", "float16")).itemsize
    n = 1
    for dim, axis in zip(weight.shape, spec):
        n *= int(dim) // (setting.sizes.get(axis, 1) if axis else 1)
    return n * itemsize


def optimizer_state_spec(spec, shape, setting):
    """``Strategy.optimizer_state_spec`` with ZeRO-1 over the data axis."""
    axis = setting.data_axis
    if axis is None or axis in spec:
        return tuple(spec)
    parts = setting.dp
    for dim, (entry, size) in enumerate(zip(spec, shape)):
        if entry is None and int(size) % parts == 0 and int(size) >= parts:
            return tuple(spec[:dim]) + (axis,) + tuple(spec[dim + 1:])
    return tuple(spec)


def fsdp_entries(model, specs, setting, keys, owners):
    """Variable entries adding the data axis to the largest whole dimension
    it divides of every trainable weight of rank 2 or more."""
    out = []
    for weight in model.weights:
        spec = specs[id(weight)]
        if not weight.trainable or len(weight.shape) < 2 or setting.data_axis in spec:
            continue
        free = [d for d, (a, n) in enumerate(zip(spec, weight.shape)) if a is None and int(n) % setting.dp == 0]
        if not free:
            continue
        dim = max(free, key=lambda d: int(weight.shape[d]))
        new = tuple(setting.data_axis if d == dim else a for d, a in enumerate(spec))
        layer = owners.get(id(weight), (None, []))[0]
        key = keys[id(layer)] + "/" + re.escape(weight.name) if layer is not None else re.escape(weight.path)
        out.append((key, new, f"stored split over {setting.data_axis} (FSDP), gathered where read"))
    return out


def data_rows(model, units, specs, setting, choice):
    """The data-axis collectives of a step."""
    if setting.dp <= 1 or setting.data_axis is None:
        return []
    axis = setting.data_axis
    first_call = {}
    for unit in units:
        for call in unit.calls:
            first_call.setdefault(id(call.layer), call.index)
    rows, grads = [], 0
    owners = weight_owners(model)
    for weight in model.trainable_weights:
        spec = specs[id(weight)]
        tp_spec = tuple(None if a == axis else a for a in spec)
        nbytes = shard_bytes(weight, tp_spec, setting)
        if axis in spec:
            layer = owners.get(id(weight), (None, []))[0]
            stage = first_call.get(id(layer), 0)
            rows.append(Row(("fwd", stage), "all_gather", axis, nbytes, f"{weight.path} gathered where read (FSDP)"))
            rows.append(Row(("update", 0), "reduce_scatter", axis, nbytes, f"{weight.path} gradient, reduced to its shard"))
            continue
        grads += nbytes
        if choice.zero1 and optimizer_state_spec(spec, weight.shape, setting) != tuple(spec):
            rows.append(Row(("update", 1), "all_gather", axis, nbytes, f"{weight.path} updated shard gathered (ZeRO-1)"))
    if grads:
        rows.append(Row(("update", 0), "all_reduce", axis, grads,
                        "gradients whole over the data axis, summed (DTensor combines them into one launch)"))
    return rows


def candidates(units, setting):
    """Every :class:`Choice` worth assessing."""
    tables = [u for u in units if u.kind == "embedding" and not u.info["logits"]]
    stranded = [u for u in units if u.kind == "experts" and (setting.tp <= 1 or u.info["experts"] % setting.tp)]
    table_sets = [frozenset(id(u) for u, on in zip(tables, flags) if on)
                  for flags in itertools.product((False, True), repeat=len(tables))]
    expert_sets = [frozenset(id(u) for u, on in zip(stranded, flags) if on)
                   for flags in itertools.product((False, True), repeat=len(stranded))]
    out = []
    for split_tables, on_data, fsdp, zero1 in itertools.product(
        table_sets, expert_sets, (False, True), (False, True)
    ):
        if (fsdp or zero1 or on_data) and setting.dp <= 1:
            continue
        out.append(Choice(split_tables, on_data, fsdp, zero1))
    return out
