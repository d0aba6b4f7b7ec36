"""Megatron structure in a traced model, found from layers and connections.

:func:`recognize` reads a :class:`tfshard._auto_trace.Trace` and returns
:class:`Unit`\\ s, each a group of layers that one tensor-parallel split
covers, with what the split needs to know (head counts, widths, vocabulary):

* **attention**: projections whose outputs carry a heads dimension
  (an ``EinsumDense`` producing two or more dimensions: heads, head size)
  reach, through the attention math (not elementwise), a projection that
  contracts those heads back to the model width. Query-like projections
  have the most heads; fewer heads are grouped-query key/value.
* **feed-forward**: projections whose outputs reach, through elementwise
  ops only (activations, gating products, dropout), one projection that
  contracts their width back to their input width (plain and gated MLPs).
* **embedding**: a table (weight ``embeddings``, rank 2) looked up by
  integer ids; called again on floats it makes tied logits (keras-hub's
  ``ReversibleEmbedding``), and a second table of the transposed shape
  makes untied ones.
* **logits**: a last projection (nothing with weights reads its output)
  that widens its input (a vocabulary head, not a classifier head).
* **experts**: a layer whose own weights share a leading dimension of two
  or more (``(experts, d_model, d_ff)`` banks) and the router projection
  with that many outputs.
* tfshard layers that compute their own split keep it; everything else is
  replicated, each with the reason.

A projection's call is either a call of the layer or a contraction of its
kernel by another layer's code (see :mod:`tfshard._auto_trace`).

Names are used only to write the plan (a layer path) and to prefer
:class:`~tfshard.styles.HeadParallel` when the attention layer names its
projections as that style expects; recognition does not depend on them.
"""

from __future__ import annotations

import dataclasses
import math
import re

import keras

from tfshard import _keras
from tfshard.styles import DeclaredByLayer, _grouped_query


@dataclasses.dataclass(eq=False)
class Unit:
    """A group of layers split together (or kept whole), and why."""

    kind: str  # attention | ffn | embedding | logits | experts | own | replicated
    layers: list
    reason: str
    info: dict = dataclasses.field(default_factory=dict)
    calls: list = dataclasses.field(default_factory=list)

    @property
    def layer(self):
        return self.layers[0]


# --------------------------------------------------------------- projections
def einsum_letters(layer):
    """``(input, kernel, output)`` letters of a Dense or EinsumDense."""
    if isinstance(layer, keras.layers.EinsumDense):
        inputs, rest = layer.equation.split(",")
        kernel, output = rest.split("->")
        return inputs.replace("...", ""), kernel, output.replace("...", "")
    return "i", "io", "o"


def is_projection(layer):
    return isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense)) and getattr(
        layer, "kernel", None
    ) is not None


@dataclasses.dataclass
class Projection:
    """Kernel dimensions of a projection by role."""

    produced: list  # sizes of kernel dims that reach the output, in kernel order
    contracted: list  # sizes of kernel dims summed over

    @property
    def width_in(self):
        return math.prod(self.contracted)

    @property
    def width_out(self):
        return math.prod(self.produced)


def projection(layer):
    inputs, kernel, output = einsum_letters(layer)
    shape = tuple(int(d) for d in layer.kernel.shape)
    produced = [n for letter, n in zip(kernel, shape) if letter in output]
    contracted = [n for letter, n in zip(kernel, shape) if letter in inputs and letter not in output]
    return Projection(produced, contracted)


def _tfshard_own_split(layer):
    return isinstance(getattr(type(layer), "tfshard_style", None), DeclaredByLayer)


# ------------------------------------------------------------------ helpers
def _weighted(call):
    return bool(call.layer.weights)


def _common_parent(calls):
    """The innermost call enclosing every call in ``calls`` (or None)."""
    chains = [call.ancestors() for call in calls]
    for candidate in chains[0]:
        if all(candidate in chain for chain in chains[1:]):
            return candidate
    return None


def _heads_of(layer):
    for name in ("num_query_heads", "num_heads", "num_attention_heads"):
        value = getattr(layer, name, None)
        if isinstance(value, int):
            return value
    return None


# ---------------------------------------------------------------- recognize
def recognize(trace, model):
    """Units of ``model`` (see the module docstring), in call order."""
    units, taken = [], {}

    def claim(unit):
        for layer in unit.layers:
            taken[id(layer)] = unit
        units.append(unit)

    calls = trace.calls if trace is not None else []
    producers = {}
    for call in calls:
        if _weighted(call) and call.inputs and not call.children:
            producers[call] = trace.producers(call.inputs[0], consumer=call)

    # tfshard layers with their own split computation keep it.
    for layer in _layers_with_weights(model):
        if _tfshard_own_split(layer) and id(layer) not in taken:
            own_calls = trace.calls_of(layer) if trace is not None else []
            claim(Unit("own", [layer], f"tfshard {type(layer).__name__}: keeps its own split", calls=own_calls))

    leaf_projections = [c for c in calls if is_projection(c.layer) and not c.children]
    _attention(leaf_projections, producers, claim, taken)
    if trace is None:
        _attention_by_layers(model, claim, taken)
    _feed_forward(leaf_projections, producers, claim, taken)
    embeddings = _embeddings(model, trace, claim, taken)
    _experts(model, trace, claim, taken)
    _logits_heads(leaf_projections, calls, producers, embeddings, claim, taken)

    for layer in _layers_with_weights(model):
        if id(layer) in taken:
            continue
        claim(Unit("replicated", [layer], _why_replicated(layer, trace)))
    order = {id(c.layer): c.index for c in reversed(calls)}
    units.sort(key=lambda u: min(order.get(id(layer), 10**9) for layer in u.layers))
    return units


def _layers_with_weights(model):
    """Layers owning weights themselves (the leaves of the weight tree)."""
    from tfshard._auto_trace import all_layers

    return [layer for layer in all_layers(model) if _keras.own_weights(layer)]


def _why_replicated(layer, trace):
    weights = _keras.own_weights(layer)
    if all(len(w.shape) <= 1 for w in weights):
        return "1-D weights (norm scales, biases): replicated"
    if isinstance(layer, keras.layers.BatchNormalization):
        return "batch statistics: replicated"
    conv_types = tuple(
        getattr(keras.layers, n) for n in ("Conv1D", "Conv2D", "Conv3D", "DepthwiseConv2D",
                                           "SeparableConv2D", "Conv2DTranspose")
    )
    if isinstance(layer, conv_types):
        return (
            f"stock {type(layer).__name__}: DTensor convolves only whole filters, so its channels "
            "cannot be split in place (tfshard.layers.ChannelParallelConv2D computes a split "
            "convolution): replicated"
        )
    if is_projection(layer):
        if trace is None:
            return "projection (model not traced: its neighbours are unknown): replicated"
        p = projection(layer)
        if not trace.calls_of(layer):
            return "projection never called in the traced call: replicated"
        if p.width_out < p.width_in:
            return (
                f"stand-alone projection {p.width_in}->{p.width_out} (a classifier head or "
                "pooler, not part of an attention or feed-forward block): replicated"
            )
        return (
            f"stand-alone projection {p.width_in}->{p.width_out} (not part of an attention or "
            "feed-forward block): replicated"
        )
    return f"{type(layer).__name__}: not recognised as a Megatron block: replicated"


def _heads_shape(call):
    """``(heads, head size)`` of a projection's output: its last two produced
    dimensions (an EinsumDense ``...,dhk->...hk``), or the last two of the
    reshape that follows it (a Dense whose units are ``heads * head size``);
    None for an output without heads."""
    p = projection(call.layer)
    if len(p.produced) >= 2:
        return p.produced[0], math.prod(p.produced[1:])
    for tensor in call.outputs[:1]:
        for op in tensor.consumers():
            if op.type != "Reshape" or not op.outputs:
                continue
            shape = op.outputs[0].shape
            if shape.rank == tensor.shape.rank + 1 and shape[-1] and shape[-2] and shape[-2] * shape[-1] == p.width_out:
                return int(shape[-2]), int(shape[-1])
    return None


def _regrouped(call, heads, kv_heads, limit=64):
    """Whether the query heads are reshaped into ``(kv_heads, heads //
    kv_heads)`` groups downstream of ``call`` (grouped-query attention
    written as a reshape of the query, as keras-hub's Gemma does, rather
    than a repeat of the keys and values)."""
    frontier = [t for t in call.outputs[:1]]
    seen = set()
    while frontier and len(seen) < limit:
        tensor = frontier.pop()
        for op in tensor.consumers():
            if op.name in seen:
                continue
            seen.add(op.name)
            for out in op.outputs:
                shape = out.shape
                if op.type == "Reshape" and shape.rank == tensor.shape.rank + 1 and shape.rank >= 3 \
                        and shape[-3] == kv_heads and shape[-2] == heads // kv_heads:
                    return True
                if out.shape.rank == tensor.shape.rank:
                    frontier.append(out)
    return False


def _attention(projections, producers, claim, taken):
    for out in projections:
        if id(out.layer) in taken:
            continue
        found = producers.get(out, {})
        shaped = {
            c: _heads_shape(c) for c, elementwise in found.items()
            if is_projection(c.layer) and not elementwise and id(c.layer) not in taken
        }
        heads_like = [c for c, shape in shaped.items() if shape is not None]
        if not heads_like:
            continue
        o = projection(out.layer)
        heads = max(shaped[c][0] for c in heads_like)
        if len(o.contracted) >= 2 and o.contracted[0] != heads:
            continue
        if o.width_in % heads:
            continue
        parent = _common_parent(heads_like + [out])
        owner = parent.layer if parent is not None else None
        query = [c for c in heads_like if shaped[c][0] == heads]
        kv = [c for c in heads_like if shaped[c][0] != heads]
        kv_heads = max((shaped[c][0] for c in kv), default=heads)
        layers = [out.layer] + [c.layer for c in heads_like]
        named = owner is not None and _names_fit_head_parallel(owner, query, kv, out, kv_heads < heads)
        info = dict(
            heads=heads, kv_heads=kv_heads, owner=owner, named=named, head_dim=shaped[query[0]][1],
            query=[c.layer for c in query], kv=[c.layer for c in kv], output=out.layer,
            width=o.width_out,
            regrouped=kv_heads < heads and any(_regrouped(c, heads, kv_heads) for c in query),
        )
        what = "multi-head" if kv_heads == heads else f"grouped-query ({kv_heads} key/value heads)"
        reason = f"{what} attention, {heads} heads -> {o.width_out}"
        claim(Unit("attention", ([owner] if named else []) + layers, reason, info,
                   calls=[out] + heads_like))


def _attention_by_layers(model, claim, taken):
    """Without a trace: attention layers whose EinsumDense sublayers are
    named as :class:`~tfshard.styles.HeadParallel` applies them."""
    from tfshard._auto_trace import all_layers

    for owner in all_layers(model):
        children = {c.name: c for c in _keras.sublayers(owner)}
        parts = [children.get(n) for n in ("query", "key", "value", "attention_output")]
        if any(p is None or not isinstance(p, keras.layers.EinsumDense) or id(p) in taken for p in parts):
            continue
        query, key, value, out = parts
        shapes = [projection(p).produced for p in (query, key, value)]
        o = projection(out)
        if any(len(s) < 2 for s in shapes) or len(o.contracted) < 2 or o.contracted[0] != shapes[0][0]:
            continue
        heads, kv_heads = shapes[0][0], shapes[1][0]
        if _grouped_query(owner) != (kv_heads < heads):
            continue
        info = dict(heads=heads, kv_heads=kv_heads, owner=owner, named=True, head_dim=math.prod(shapes[0][1:]),
                    query=[query], kv=[key, value], output=out, width=o.width_out)
        what = "multi-head" if kv_heads == heads else f"grouped-query ({kv_heads} key/value heads)"
        claim(Unit("attention", [owner, out, query, key, value],
                   f"{what} attention, {heads} heads -> {o.width_out} (by its layers)", info))


def _names_fit_head_parallel(owner, query, kv, out, grouped):
    children = {child.name: child for child in _keras.sublayers(owner)}
    roles = {"query", "key", "value", "gate", "attention_output"}
    if children.get("attention_output") is not out.layer:
        return False
    for call in query + kv:
        if call.layer.name not in roles or children.get(call.layer.name) is not call.layer:
            return False
    if any(c.layer.name not in ("key", "value") for c in kv):
        return False
    return _grouped_query(owner) == grouped


def _feed_forward(projections, producers, claim, taken):
    for down in projections:
        if id(down.layer) in taken:
            continue
        d = projection(down.layer)
        ups = [
            c for c, elementwise in producers.get(down, {}).items()
            if elementwise and is_projection(c.layer) and id(c.layer) not in taken
        ]
        if not ups or len(d.contracted) != 1:
            continue
        widths = {projection(c.layer).width_out for c in ups}
        inputs = {projection(c.layer).width_in for c in ups}
        if widths != {d.width_in} or inputs != {d.width_out}:
            continue
        if any(len(projection(c.layer).produced) != 1 for c in ups):
            continue
        gated = " gated" if len(ups) > 1 else ""
        reason = f"{gated.strip() or 'plain'} feed-forward {d.width_out} -> {d.width_in} -> {d.width_out}"
        info = dict(d_ff=d.width_in, width=d.width_out, columns=[c.layer for c in ups], row=down.layer)
        claim(Unit("ffn", [c.layer for c in ups] + [down.layer], reason, info, calls=ups + [down]))


def _embeddings(model, trace, claim, taken):
    found = []
    for layer in _layers_with_weights(model):
        if id(layer) in taken:
            continue
        table = next((w for w in _keras.own_weights(layer) if w.name == "embeddings" and len(w.shape) == 2), None)
        if table is None:
            continue
        vocab, dim = (int(d) for d in table.shape)
        calls = trace.calls_of(layer) if trace is not None else []
        lookups, logits, positional = embedding_calls(calls, vocab, dim)
        if trace is not None and not lookups:
            if positional:
                reason = f"table {vocab}x{dim} read by position (added to its float input), not looked up by ids: replicated"
            else:
                reason = f"table {vocab}x{dim} never looked up in the traced call: replicated"
            claim(Unit("replicated", [layer], reason))
            continue
        reverse = next(
            (w for w in _keras.own_weights(layer) if w is not table and tuple(w.shape) == (dim, vocab)), None
        )
        kind = "untied logits" if reverse is not None and logits else "tied logits" if logits else "lookups only"
        info = dict(vocab=vocab, dim=dim, logits=bool(logits), reverse=reverse, table=table,
                    lookup_calls=lookups, logits_calls=logits)
        unit = Unit("embedding", [layer], f"token embedding {vocab}x{dim} ({kind})", info, calls=calls)
        claim(unit)
        found.append(unit)
    return found


def embedding_calls(calls, vocab, dim):
    """``(lookups, logits, positional)`` calls of a ``(vocab, dim)`` table:
    ids looked up; vectors of width ``dim`` turned into ``vocab`` logits
    (tied output projection); vectors of width ``dim`` the table is added
    to by position."""
    logits = [c for c in calls if _reads_vectors(c, dim) and _last_dim(c.outputs) == vocab and vocab != dim]
    positional = [c for c in calls if _reads_vectors(c, dim) and c not in logits]
    lookups = [c for c in calls if c not in logits and c not in positional]
    return lookups, logits, positional


def _reads_vectors(call, dim):
    """The call's input is float vectors of the table's width (not ids)."""
    x = call.inputs[0] if call.inputs else None
    return x is not None and x.dtype.is_floating and x.shape.rank and x.shape[-1] == dim


def _last_dim(tensors):
    return tensors[0].shape[-1] if tensors and tensors[0].shape.rank else None


def _experts(model, trace, claim, taken):
    for layer in _layers_with_weights(model):
        if id(layer) in taken:
            continue
        weights = _keras.own_weights(layer)
        banks = [w for w in weights if len(w.shape) == 3]
        if len(banks) < 2 or len({int(w.shape[0]) for w in banks}) != 1:
            continue
        experts = int(banks[0].shape[0])
        if experts < 2:
            continue
        expert_weights = [w for w in weights if len(w.shape) >= 2 and int(w.shape[0]) == experts]
        calls = trace.calls_of(layer) if trace is not None else []
        router_call = None
        for call in calls:
            parent = call.parent
            siblings = [c for c in (parent.children if parent else []) if c is not call]
            nested = [g for c in siblings for g in [c] + c.children]
            router_call = next(
                (c for c in nested if is_projection(c.layer) and id(c.layer) not in taken
                 and projection(c.layer).width_out == experts), router_call,
            )
        router = router_call.layer if router_call is not None else None
        width = projection(router).width_in if router is not None else int(banks[0].shape[1])
        info = dict(
            experts=experts, weights=expert_weights, router=router, width=width,
            router_call=router_call,
            router_rank=len(router_call.outputs[0].shape) if router_call is not None and router_call.outputs else 2,
        )
        layers = [layer] + ([router] if router is not None else [])
        unit_calls = list(calls) + ([router_call] if router_call is not None else [])
        claim(Unit("experts", layers, f"mixture of {experts} experts ({len(expert_weights)} expert weights)",
                   info, calls=unit_calls))


def _logits_heads(projections, calls, producers, embeddings, claim, taken):
    read_by = {}
    for consumer, found in producers.items():
        for producer in found:
            read_by.setdefault(id(producer.layer), []).append(consumer)
    vocabularies = {u.info["vocab"] for u in embeddings}
    for call in projections:
        if id(call.layer) in taken or read_by.get(id(call.layer)):
            continue
        p = projection(call.layer)
        if len(p.produced) != 1 or len(p.contracted) != 1:
            continue
        if p.width_out <= p.width_in and p.width_out not in vocabularies:
            continue  # not widening: a classifier head or a projection back to the model width
        info = dict(vocab=p.width_out, width=p.width_in)
        claim(Unit("logits", [call.layer], f"output projection {p.width_in} -> {p.width_out} (logits)",
                   info, calls=[call]))


# --------------------------------------------------------------- plan keys
def snake_case(name):
    """Keras's default layer name of a class (``keras.src.utils.naming``)."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def auto_named(layer):
    """Whether Keras generated ``layer``'s name (``dense_3``): another build
    in the same session names the same layer differently."""
    base = snake_case(type(layer).__name__)
    return re.fullmatch(re.escape(base) + r"(_\d+)?", layer.name) is not None


def path_key(layer, parents, all_paths):
    """A plan key (a regex matched in full) for ``layer`` inside ``parents``
    (its enclosing layers): its path, with the numbers Keras appends to
    generated names made optional (``qwen_sparse_moe_block(?:_\\d+)?``), so
    that the plan also fits the model built again later in the session,
    unless that key would then match another layer of ``all_paths``."""
    path = getattr(layer, "path", None) or layer.name
    exact = re.escape(path)
    by_name = {p.name: p for p in parents + [layer]}
    pieces, generalized = [], False
    for segment in path.split("/"):
        owner = by_name.get(segment)
        if owner is not None and auto_named(owner):
            pieces.append(re.escape(snake_case(type(owner).__name__)) + r"(?:_\d+)?")
            generalized = True
        else:
            pieces.append(re.escape(segment))
    if not generalized:
        return exact
    key = "/".join(pieces)
    matches = [p for p in all_paths if re.fullmatch(key, p)]
    return key if matches == [path] else exact
