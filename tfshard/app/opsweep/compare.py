"""Cell kinds and the comparison of a sharded run with the plain one."""

from __future__ import annotations

import dataclasses
import re

import numpy as np

EXACT = "exact"
DIFFERENT = "different"
RAW = "raw error"
TFSHARD = "tfshard error"
NOT_APPLICABLE = "n/a"  # no gradient (integer/bool op, or not differentiable)
BLOCKED = "blocked"  # gradient not run: the forward fails
KINDS = (EXACT, DIFFERENT, RAW, TFSHARD, NOT_APPLICABLE, BLOCKED)
FAILING = (DIFFERENT, RAW)
SEVERITY = {RAW: 5, TFSHARD: 4, DIFFERENT: 3, BLOCKED: 2, EXACT: 1, NOT_APPLICABLE: 0}
RTOL = 1e-6


@dataclasses.dataclass
class Outcome:
    """One sample's forward or gradient under one config."""

    kind: str
    detail: str = ""  # max diff, or the error's first line
    message: str = ""  # the whole error text ("Class: message")

    def to_json(self):
        return [self.kind, self.detail, self.message]

    @classmethod
    def from_json(cls, value):
        return cls(*value)


def error_outcome(err):
    import tfshard

    text = str(err).strip()
    first = text.splitlines()[0] if text else ""
    first = re.sub(r"^.*?:\d+:\d+: error: ", "", first)  # MLIR location prefix
    first = re.sub(r"^\{\{function_node [^}]*\}\}\s*", "", first)  # runtime error prefix
    message = f"{type(err).__name__}: {text}"
    if isinstance(err, tfshard.TfshardError):
        return Outcome(TFSHARD, first[:300], message)
    return Outcome(RAW, f"{type(err).__name__}: {first[:300]}", message)


def compare(got, ref):
    """Outcome of a list of arrays against the reference list."""
    if isinstance(got, Exception):
        return error_outcome(got)
    if len(got) != len(ref):
        return Outcome(DIFFERENT, f"{len(got)} outputs, reference {len(ref)}")
    worst = 0.0
    for g, r in zip(got, ref):
        if g is None or r is None:
            if (g is None) != (r is None):
                return Outcome(DIFFERENT, "gradient missing on one side")
            continue
        if g.shape != r.shape:
            return Outcome(DIFFERENT, f"shape {g.shape}, reference {r.shape}")
        if r.dtype.kind not in "fc":
            if not np.array_equal(g, r):
                return Outcome(DIFFERENT, f"{int(np.sum(g != r))} of {r.size} values differ")
            continue
        g64, r64 = g.astype("float64"), r.astype("float64")
        if not np.array_equal(np.isnan(g64), np.isnan(r64)):
            return Outcome(DIFFERENT, "NaN at other positions")
        finite = ~np.isnan(r64)
        if not finite.any():
            continue
        diff = float(np.max(np.abs(g64[finite] - r64[finite])))
        scale = max(1.0, float(np.max(np.abs(r64[finite]))))
        if diff > RTOL * scale:
            worst = max(worst, diff / scale)
    if worst:
        return Outcome(DIFFERENT, f"max rel diff {worst:.2e}")
    return Outcome(EXACT)


def outcomes(sample, run, ref):
    """(forward, gradient) outcomes of one sample against its reference run."""
    fwd = compare(run.fwd, ref.fwd)
    if isinstance(run.fwd, Exception):
        grad = Outcome(BLOCKED, "forward fails") if ref.grad is not None else Outcome(NOT_APPLICABLE)
    elif ref.grad is None or isinstance(ref.grad, Exception) or all(g is None for g in ref.grad):
        grad = Outcome(NOT_APPLICABLE)
    elif run.grad is None:
        grad = Outcome(DIFFERENT, "no gradient")
    else:
        grad = compare(run.grad, ref.grad)
    return fwd, grad
