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
# Nothing: every cell of the sweep is exact or a clear tfshard error. A
# failure found later goes here as
# _expect("<op>", "fwd: <configs>; grad: <configs>", "<reason>").


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
