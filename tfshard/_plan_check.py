"""Checking a plan against a model before it is applied: every entry must
match something, and no layer may have two styles (:func:`check_plan`,
re-exported by :mod:`tfshard.auto_plan`)."""

from __future__ import annotations

import difflib
import re

import keras

from tfshard import _auto_trace
from tfshard.errors import ShardingError
from tfshard.plans import LAYER, OUTPUT, VARIABLE, Plan

__all__ = ["check_plan"]


def check_plan(plan, model):
    """Check that every entry of ``plan`` matches something in ``model``
    (a model, or a zero-argument function building it, built abstractly):
    a layer-path or layer-class entry some layer, a variable entry some
    variable, an output entry some layer; and that no layer has two styles.
    Raises :class:`tfshard.ShardingError` naming each entry that matches
    nothing (with the nearest paths) and both entries of each clash."""
    if not isinstance(plan, Plan):
        plan = Plan(plan)
    if not isinstance(model, keras.layers.Layer):
        model, _ = _auto_trace.build_abstract(model)
    layers = _auto_trace.all_layers(model)
    layer_paths = [getattr(layer, "path", None) or layer.name for layer in layers]
    variable_paths = [w.path for w in model.weights]
    problems = []
    for key, kind, value, compiled in plan._entries:
        if kind == LAYER and isinstance(key, type):
            if not any(isinstance(layer, key) for layer in layers):
                present = sorted({type(layer).__name__ for layer in layers})
                near = difflib.get_close_matches(key.__name__, present, n=3, cutoff=0.3)
                problems.append(f"plan[{key.__name__}] matches no layer of the model "
                                f"(layer classes nearest: {near or present[:5]})")
            continue
        if kind == LAYER:
            candidates, path_key = layer_paths, key
        elif kind == OUTPUT:
            candidates, path_key = layer_paths, key[: -len("/output")]
            compiled = re.compile(path_key)
        elif kind == VARIABLE:
            candidates, path_key = variable_paths, key
        else:
            continue  # a keras LayoutMap: Keras's own semantics (unmatched keys are allowed there)
        if any(compiled.fullmatch(path) for path in candidates):
            continue
        near = _nearest(path_key, candidates)
        what = {LAYER: "layer", OUTPUT: "layer", VARIABLE: "variable"}[kind]
        problems.append(f"plan[{key!r}] matches no {what} path of the model; nearest: {near}")
    for layer, path in zip(layers, layer_paths):
        try:
            plan.style_rule(layer, path)  # raises, naming both entries, on two styles
        except ShardingError as err:
            problems.append(str(err))
    if problems:
        raise ShardingError(
            f"Plan entries that do not fit model {model.name!r}:\n  "
            + "\n  ".join(problems)
            + "\nFix the keys (regular expressions matched against the whole path; Keras numbers "
            "generated layer names per session, so a path from another build may differ) or drop them."
        )


def _nearest(pattern, paths, n=3):
    literal = re.sub(r"\\(.)", r"\1", pattern)
    literal = re.sub(r"[\^\$\(\)\[\]\{\}\*\+\?\|]|\.\*", "", literal)
    near = difflib.get_close_matches(literal, paths, n=n, cutoff=0.0)
    return near
