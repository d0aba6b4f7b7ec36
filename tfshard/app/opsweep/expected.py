"""Cells of the sweep that are known to fail ("different" or a raw error),
each with its reason. tests/test_op_sweep.py is strict: a failing cell not
listed here fails it, and so does a listed cell that now passes (remove it:
the list stays true). Keys are ``(op, config, "fwd"|"grad")``.
"""

from __future__ import annotations

from tfshard.app.opsweep import compare

EXPECTED_FAILURES = {}


def _expect(op, cells, reason):
    """Add ``op``'s failing cells: ``cells`` is "fwd: <configs>; grad: <configs>"."""
    for chunk in cells.split(";"):
        part, configs = chunk.split(":", 1)
        for config in configs.split():
            key = (op, config, part.strip())
            assert key not in EXPECTED_FAILURES, key
            EXPECTED_FAILURES[key] = reason


# --- what remains after tfshard's op replacements (tfshard/_ops/) --- #
# Layouts of the sweep that no Keras layer or keras-hub model gives a tensor:
_ARTIFICIAL_CONTRACTION = (
    "the config splits a 2-D weight *tensor*'s contracted dim over the data axis while the "
    "activation's is split over the model axis; DTensor's matmul expander does not relayout "
    "mismatched contraction splits. No Keras layer or keras-hub model contracts such a tensor: "
    "weight variables split over the data axis (FSDP-style) are gathered over it for the op by "
    "tfshard (Strategy.compute_spec)"
)
for _op in ("einsum", "matmul", "tensordot"):
    _expect(_op, "fwd: 2x4:both", _ARTIFICIAL_CONTRACTION)
# A fix that breaks a real model:
_expect("split", "fwd: 2x4:batch 2x4:feat 2x4:both 1x8:feat",
        "DTensor's Split expander fails on these samples' layouts; laying the input out whole "
        "first fixes the cells but makes keras-hub QwenMoe/Qwen3Moe (ops.split of the fused "
        "gate/up projection) fail to train (a relayout pair DTensor rejects in the gradient), "
        "so split runs as Keras wrote it")


def check(result, complete=False):
    """(unexpected, stale): failing cells of ``result`` not listed, and
    listed cells of the configs it ran that do not fail. With ``complete``
    (an unfiltered run), a listed cell the run does not have is stale too."""
    ran = {c.name for c in result.configs}
    unexpected = {key: cell for key, cell in result.failing().items() if key not in EXPECTED_FAILURES}
    stale = []
    for key in EXPECTED_FAILURES:
        config = key[1]
        if config not in ran:
            continue
        cell = result.cells.get(key)
        if cell is None:
            if complete:
                stale.append(key)
        elif cell.kind not in compare.FAILING:
            stale.append(key)
    return unexpected, stale
