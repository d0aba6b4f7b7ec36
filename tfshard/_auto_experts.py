"""Plan entries and collectives of an expert bank (keras-hub's MoE blocks)
for :mod:`tfshard._auto_cost`.

Over the tensor axis (experts split, router whole), measured in DTensor's
SPMD dump on keras-hub QwenMoe and Qwen3Moe (2x4):

* forward, one all-reduce of the experts' weighted outputs summed over the
  experts, ``sum_e w[t, e] * expert_e(x[t])``;
* backward, the routing weights' gradient ``dL/dw[t, e] = <dy[t],
  expert_e(x[t])>`` is computed where expert ``e`` lives and gathered
  whole, and the experts' input gradients are summed: both launch in one
  combined all-reduce;
* the router's logits are never gathered, nor its input gradient reduced:
  its kernel and its input are whole on every device, so is its output
  (each device routes every token);
* a router auxiliary loss (load balancing, keras-hub's
  ``router_aux_loss_coef[ficient]``, added in training only) averages
  routing statistics over the tokens, split over the data axis: one
  data-axis all-reduce forward.

Over the data axis (experts the tensor axis cannot divide): stored split,
gathered where used; the data-parallel rows of :func:`_auto_cost.data_rows`
count them.
"""

from __future__ import annotations

import re


def expert_entries(unit, setting, choice, keys, row):
    """``(entries, rows, reason)`` of an expert unit; ``row`` makes a
    :class:`tfshard._auto_cost.Row`."""
    info, tp, t, axis = unit.info, setting.tp, setting.tokens, setting.tensor_axis
    experts, layer = info["experts"], unit.layer
    key = keys[id(layer)]
    rows, entries = [], []
    if setting.splits("experts") and experts % tp == 0:
        for weight in info["weights"]:
            spec = (axis,) + (None,) * (len(weight.shape) - 1)
            entries.append((key + "/" + re.escape(weight.name), spec, f"{unit.reason}: experts over {axis}"))
        router = info["router"]
        call = next((c.index for c in unit.calls if c.layer is layer), 0)
        router_call = info["router_call"].index if info["router_call"] is not None else call
        if router is not None:
            rank = info.get("router_rank", 2)
            entries.append((keys[id(router)] + "/output", (setting.data_axis,) + (None,) * (rank - 1),
                            f"{unit.reason}: router logits whole (each device routes every token)"))
            if setting.dp > 1 and adds_auxiliary_loss(info["router_call"]):
                rows.append(row(("fwd", router_call), "all_reduce", setting.data_axis, experts * 4 * 2,
                                "router auxiliary loss: routing statistics averaged over the tokens"))
        rows.append(row(("fwd", call), "all_reduce", axis, t * info["width"] * 4, "experts' outputs summed"))
        rows.append(row(("bwd", router_call), "all_gather", axis, t * experts * 4, "routing weights' gradient"))
        rows.append(row(("bwd", router_call), "all_reduce", axis, t * info["width"] * 4, "experts' input gradient"))
        return entries, rows, f"{unit.reason}: experts split over {axis}"
    if id(unit) in choice.experts_on_data and setting.dp > 1 and experts % setting.dp == 0:
        for weight in info["weights"]:
            spec = (setting.data_axis,) + (None,) * (len(weight.shape) - 1)
            entries.append((key + "/" + re.escape(weight.name), spec,
                            f"{unit.reason}: experts over {setting.data_axis} (stored split, gathered where used)"))
        return entries, rows, f"{unit.reason}: {experts} experts do not divide {axis}={tp}: stored over {setting.data_axis}"
    return [], [], f"{unit.reason}: {experts} experts do not divide {axis}={tp}: replicated"


_AUX_LOSS = re.compile(r".*aux_loss.*")


def adds_auxiliary_loss(router_call):
    """Whether the block calling the router adds an auxiliary loss in
    training (the trace runs in inference, where it is skipped): a positive
    ``*aux_loss*`` coefficient on the block, as keras-hub's MoE blocks
    name it."""
    block = router_call.parent.layer if router_call is not None and router_call.parent is not None else None
    if block is None:
        return False
    for name, value in vars(block).items():
        if _AUX_LOSS.fullmatch(name) and isinstance(value, (int, float)) and not isinstance(value, bool):
            return value > 0
    return False
