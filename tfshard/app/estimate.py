"""The communication a reference config's training step needs, by the
Megatron/Mesh-TF and GShard cost model (``tfshard inspect`` prints it; the
tests hold it against what ``tfshard bench`` counts in DTensor's program).

An application module: it reads the CLI's config schema
(:mod:`tfshard.app.config`) and the reference models' structure
(:mod:`tfshard.app.models`). Per-variable tables, which need no config, are
the library's (:mod:`tfshard.report`).
"""

from __future__ import annotations

from tfshard.comm import CollectiveCounts
from tfshard.layers.moe import expert_capacity
from tfshard.report import format_bytes
from tfshard.strategy import completed_rules

__all__ = ["communication_estimate", "estimate_collectives"]


def _config_rules(config):
    """The config's layout rules completed as ``jobs.build_strategy``
    completes them (``data_parallel("batch").tensor_parallel("model")``)."""
    return completed_rules((config.get("layout") or {}).get("rules") or {}, "batch", "model")


def _splitting(axis, sizes):
    """``axis`` when it is on the mesh with more than one device, else None."""
    return axis if axis is not None and sizes.get(axis, 1) > 1 else None


def _moe_axes(rules, sizes):
    """``(expert axis, d_ff axis)`` of the MoE expert kernels, each None when
    it splits nothing."""
    spec = rules.spec_for(("experts", None, "d_ff"))  # the expert_in kernel's
    return _splitting(spec[0], sizes), _splitting(spec[2], sizes)


def _axis_text(axis):
    return "+".join(axis) if isinstance(axis, tuple) else axis


def _moe_blocks(m):
    """Indices of the transformer blocks whose FFN is a mixture of experts
    (as :mod:`tfshard.app.models.transformer` builds them)."""
    if m["kind"] != "transformer" or not m.get("moe_experts"):
        return []
    every = m.get("moe_every", 2)
    return [i for i in range(m["layers"]) if (i + 1) % every == 0]


def _estimate_rows(config):
    """``[(kind, axis, count, bytes per device or None, what)]``: the
    collectives one training step launches, by the cost model."""
    m, mesh, train = config["model"], config["mesh"], config["train"]
    sizes = {"batch": mesh["batch"], "model": mesh["model"]}
    dp = sizes["batch"]

    rows = []
    if m["kind"] == "transformer":
        rules = _config_rules(config)
        local_batch = train["batch_size"] // dp
        tokens = local_batch * m["seq_len"]
        act = tokens * m["d_model"] * 4  # one float32 (batch/dp, seq, d_model)
        moe = _moe_blocks(m)
        layers = m["layers"]
        dense = layers - len(moe)
        heads, vocab = (_splitting(rules.axis_for(d), sizes) for d in ("heads", "vocab"))
        if heads:
            rows.append(("all_reduce", heads, 2 * layers, act,
                         f"attention output fwd, QKV input grad bwd (2 per block x {layers})"))
        d_ff = _splitting(rules.axis_for("d_ff"), sizes)
        if d_ff and dense:
            rows.append(("all_reduce", d_ff, 2 * dense, act,
                         f"FFN output fwd, FFN input grad bwd (2 per dense block x {dense})"))
        if moe:
            rows += _moe_rows(m, rules, sizes, local_batch, act, len(moe))
        if vocab:
            rows.append(("all_reduce", vocab, 2, act, "vocab-parallel embedding fwd, logits input grad bwd"))
            rows.append(("all_reduce", vocab, 2, tokens * 4, "loss max, sum-exp over the vocabulary"))
    if dp > 1:
        rows.append(("all_reduce", "batch", 1, None,
                     "gradients of the weights replicated over 'batch', combined by DTensor "
                     f"(ring volume 2*(dp-1)/dp = {2 * (dp - 1) / dp:.2f}x those bytes)"))
    return rows


def _moe_rows(m, rules, sizes, local_batch, act, blocks):
    """Per training step, ``blocks`` ExpertParallelMoE layers (see
    :mod:`tfshard.layers.moe`): 2 all-to-alls forward and 2 backward over
    the expert axis, the d_ff sum forward and the expert input gradient
    backward over the d_ff axis, and, with the experts off the data axis,
    the all-gather of the output (fwd) and of the input gradient (bwd)."""
    experts = m["moe_experts"]
    group = m.get("moe_group_size") or m["seq_len"]
    capacity = expert_capacity(group, experts, m["moe_top_k"], m["moe_capacity_factor"])
    expert_axis, ff_axis = _moe_axes(rules, sizes)
    group_axis = expert_axis if expert_axis not in (None, "batch") else None
    # The dispatched tokens (E, batch, groups, C, d_model), per device: split
    # by the data axis, and by the expert axis when that is another one.
    dispatched = experts * local_batch * (m["seq_len"] // group) * capacity * m["d_model"] * 4
    if group_axis:
        dispatched //= sizes[group_axis]
    rows = []
    if expert_axis:
        rows.append(("all_to_all", expert_axis, 4 * blocks, dispatched,
                     f"MoE dispatch + combine, fwd and bwd (4 per MoE block x {blocks})"))
    if ff_axis:
        rows.append(("all_reduce", ff_axis, 2 * blocks, dispatched,
                     f"expert FFN d_ff sum fwd, expert input grad bwd (2 per MoE block x {blocks})"))
    if group_axis:
        rows.append(("all_gather", group_axis, 2 * blocks, act,
                     f"MoE output fwd, input grad bwd, whole on {group_axis!r} again "
                     f"(2 per MoE block x {blocks})"))
    loss_axes = tuple(a for a in ("batch", group_axis) if a and sizes.get(a, 1) > 1)
    if loss_axes:
        rows.append(("all_reduce", loss_axes[0] if len(loss_axes) == 1 else loss_axes, 1, 4,
                     "load-balancing loss mean over the routing groups (all MoE blocks combined)"))
    return rows


def estimate_collectives(config):
    """The collectives one training step of a reference config launches, by
    the cost model, as :class:`tfshard.comm.CollectiveCounts`
    ``{(kind, axis): n}`` (comparable with the ``"optimized"`` stage that
    :func:`tfshard.app.bench.count_step_collectives` measures, minus its
    ``all_scatter`` local slices; DTensor launches an all-gather as an
    all-reduce on CPU and GPU). For a CNN only the data axis is modelled.
    With the experts of a mixture of experts on a non-data axis, DTensor
    launches more than this (see :func:`communication_estimate`)."""
    return _counts(_estimate_rows(config))


def _counts(rows):
    counts = CollectiveCounts()
    for kind, axis, n, _, _ in rows:
        counts[(kind, axis)] += n
    return counts


def communication_estimate(config):
    """Collectives one training step of a reference config needs, by the
    Megatron/Mesh-TF and GShard cost model (an estimate, not a measurement;
    ``tfshard bench`` counts them in DTensor's program).

    Tensor axis, per transformer block: the attention output and the FFN
    output are all-reduced forward, and their input gradients backward
    (4 all-reduces of a (batch/dp, seq, d_model) activation). The vocab-
    parallel embedding adds one forward, the logits' input gradient one
    backward, and the loss two small ones (max, sum of exponentials). A
    mixture-of-experts block (``model.moe_experts``) instead routes tokens
    by 4 all-to-alls over the expert axis (dispatch and combine, forward and
    backward) of the dispatched ``(E, batch/dp, groups, capacity, d_model)``
    tokens, all-reduces them twice over the ``d_ff`` axis when that splits
    the experts' FFN, and, with the experts off the data axis, all-gathers
    its output and its input gradient over the expert axis. Data axis: one
    all-reduce of every gradient (DTensor combines them), and one of the
    load-balancing loss when there are experts.
    """
    mesh = config["mesh"]
    dp, tp = mesh["batch"], mesh["model"]
    lines = [f"estimated communication per training step on a {dp}x{tp} mesh:"]
    rows = _estimate_rows(config)
    if config["model"]["kind"] != "transformer" and tp > 1:
        lines.append("  tensor axis 'model': see the layer table (channel split)")
    for kind, axis, n, size, what in rows:
        noun = kind.replace("_", "-") + ("s" if n != 1 else "")
        size_text = f" of {format_bytes(size)}" if size is not None else ""
        lines.append(f"  {_axis_text(axis)!r}: {n} {noun}{size_text}: {what}")
    if rows:
        total = ", ".join(
            f"{n} {kind.replace('_', '-')}[{_axis_text(axis)}]"
            for (kind, axis), n in sorted(_counts(rows).items(), key=str)
        )
        lines.append(f"  total launched: {total}")
    moe_axis = None
    if _moe_blocks(config["model"]):
        moe_axis, _ = _moe_axes(_config_rules(config), mesh)
    if moe_axis not in (None, "batch"):
        lines.append(
            f"  note: with the experts on {moe_axis!r} rather than the data axis, DTensor also "
            f"splits neighbouring gradients by sequence over {moe_axis!r} and gathers them; "
            "`tfshard bench` counts those too (rule 'experts:batch' avoids them)"
        )
    if dp == 1 and tp == 1:
        lines.append("  none (one device)")
    return "\n".join(lines)
