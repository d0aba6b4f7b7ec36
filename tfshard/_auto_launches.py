"""Which collectives of a step DTensor launches together, beyond stages by
call index (:mod:`tfshard._auto_cost`), as measured in its SPMD dumps:

* **parallel branches**: units that read the same tensor (QwenMoe's
  experts and its shared expert, both fed the block's input; attention and
  feed-forward of a parallel block) launch their output all-reduces
  together forward and their input gradients together backward: neither
  depends on the other, and DTensor combines independent all-reduces;
* **norms on split heads** (Qwen3's and Gemma3's query/key norms): a
  norm's scale gradient sums over the tokens and the heads, which are split
  over the data and the tensor axes: one all-reduce over both, backward.
"""

from __future__ import annotations

import dataclasses

_BRANCHING = ("attention", "ffn", "experts")


def parallel_branches(units, rows_by_unit):
    """``rows_by_unit`` (``{id(unit): rows}``) with the forward and backward
    rows of units reading the same tensor moved to one stage each."""
    readers = {}
    for unit in units:
        if unit.kind in _BRANCHING and unit.calls and rows_by_unit.get(id(unit)):
            entry = min(unit.calls, key=lambda c: c.index)
            if entry.inputs:
                tensor = entry.inputs[0]
                readers.setdefault((id(tensor.graph), tensor.name), []).append(unit)
    out = dict(rows_by_unit)
    for group in readers.values():
        if len(group) < 2:
            continue
        stages = {}
        for unit in group:
            for row in rows_by_unit[id(unit)]:
                if row.stage[0] in ("fwd", "bwd"):
                    stages.setdefault(row.stage[0], set()).add(row.stage)
        first = {phase: min(found) for phase, found in stages.items()}
        for unit in group:
            out[id(unit)] = [dataclasses.replace(r, stage=first.get(r.stage[0], r.stage)) for r in out[id(unit)]]
    return out


def head_norm_rows(unit, setting, row):
    """The backward all-reduce of the scales of norms applied to a split
    attention's heads: layers with only 1-D weights called inside the
    attention between its projections and its output projection."""
    info = unit.info
    output = next((c for c in unit.calls if c.layer is info.get("output")), None)
    projections = [c for c in unit.calls if c is not output]
    if output is None or not projections or output.parent is None:
        return []
    first = min(c.index for c in projections)
    norms = [c for c in _descendants(output.parent) if first < c.index < output.index and _only_vectors(c.layer)]
    if not norms:
        return []
    axis = (setting.data_axis, setting.tensor_axis) if setting.dp > 1 else setting.tensor_axis
    nbytes = sum(int(w.shape[0]) * 4 for c in norms for w in c.layer.weights)
    names = ", ".join(sorted({c.layer.name for c in norms}))
    return [row(("bwd", first), "all_reduce", axis, nbytes, f"gradient of norms on split heads ({names})")]


def _descendants(call):
    for child in call.children:
        yield child
        yield from _descendants(child)


def _only_vectors(layer):
    weights = list(layer.weights)
    return bool(weights) and all(len(w.shape) == 1 for w in weights)
