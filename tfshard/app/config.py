"""Run configurations: YAML files validated against a small schema.

A config has five sections. Every key has a type and a default, so a YAML
file only states what it changes, and a typo is an error that names the key:

    model:  {kind: transformer, d_model: 64, heads: 4, d_ff: 256, layers: 2, seq_len: 64}
    mesh:   {batch: 2, model: 4}
    layout: {rules: "batch:batch,d_ff:model,heads:model,vocab:model"}   # or: layout: auto
    train:  {steps: 200, batch_size: 32, learning_rate: 3.0e-3}
    output: {dir: runs/transformer_2x4}

``--set section.key=value`` overrides one key (the value is parsed as YAML).
"""

from __future__ import annotations

import copy
import dataclasses
import os

from tfshard.errors import TfshardError


class ConfigError(TfshardError):
    """A config key is unknown or its value is invalid."""


@dataclasses.dataclass(frozen=True)
class Field:
    type: type | tuple
    default: object
    help: str
    choices: tuple = ()
    minimum: float | None = None


SCHEMA = {
    "model": {
        "kind": Field(str, "transformer", "transformer (byte-level LM) or cnn (image classifier)", ("transformer", "cnn")),
        "d_model": Field(int, 64, "transformer width", minimum=1),
        "heads": Field(int, 4, "attention heads", minimum=1),
        "d_ff": Field(int, 256, "feed-forward hidden size", minimum=1),
        "vocab": Field(int, 256, "vocabulary size (256 = bytes)", minimum=2),
        "layers": Field(int, 2, "transformer blocks", minimum=1),
        "seq_len": Field(int, 64, "tokens per example", minimum=2),
        "dropout": Field(float, 0.0, "dropout rate", minimum=0.0),
        "tie_embeddings": Field(bool, True, "reuse the embedding table for the output logits"),
        "split": Field(str, "channels", "cnn split: channels or spatial", ("channels", "spatial")),
        "width": Field(int, 32, "cnn channels", minimum=1),
        "blocks": Field(int, 2, "cnn residual blocks", minimum=1),
        "classes": Field(int, 10, "cnn classes", minimum=2),
        "moe_experts": Field(int, 0, "experts per mixture-of-experts FFN (0: dense FFNs only)", minimum=0),
        "moe_every": Field(int, 2, "every N-th transformer block's FFN is a mixture of experts", minimum=1),
        "moe_top_k": Field(int, 2, "experts per token (GShard: 2, Switch: 1)", minimum=1),
        "moe_capacity_factor": Field(float, 1.25, "expert capacity factor (> 0)", minimum=0.0),
        "moe_group_size": Field(int, 0, "tokens per routing group (0: the whole sequence)", minimum=0),
    },
    "mesh": {
        "batch": Field(int, 2, "data-parallel axis size", minimum=1),
        "model": Field(int, 4, "tensor-parallel axis size", minimum=1),
    },
    "layout": {
        "rules": Field(str, "batch:batch,d_ff:model,heads:model,vocab:model",
                       "Mesh-TF layout rules: logical_dim:mesh_axis,..."),
        "random_streams": Field(str, "global",
                                "global: dropout and other random layers draw one device's numbers "
                                "(each device draws the whole tensor, keeps its slice); per_device: "
                                "DTensor's own per-device streams (fewer draws, other numbers)",
                                ("global", "per_device")),
        "sequence_parallel": Field(bool, False,
                                   "split norms, dropout and residuals over the sequence on the tensor "
                                   "axis (Megatron-SP: all-gathers and reduce-scatters replace the "
                                   "all-reduces)"),
        "recompute": Field(str, "none", "recompute in the backward pass: none, selective (attention "
                                        "cores) or full (blocks)", ("none", "selective", "full")),
        "auto": Field(bool, False, "choose the plan with tfshard.auto_plan (also: 'layout: auto'), "
                                   "within layout.rules"),
    },
    "data": {
        "source": Field(str, "auto", "auto, stdlib (Python's own sources) or digits (scikit-learn)",
                        ("auto", "stdlib", "digits")),
        "max_bytes": Field(int, 4_000_000, "bytes of text to read", minimum=1024),
        "eval_batches": Field(int, 4, "held-out batches for the before/after loss", minimum=1),
    },
    "train": {
        "steps": Field(int, 200, "optimizer steps", minimum=1),
        "batch_size": Field(int, 32, "global batch size", minimum=1),
        "learning_rate": Field(float, 3e-3, "Adam learning rate", minimum=0.0),
        "optimizer": Field(str, "adam", "adam, adamw or sgd", ("adam", "adamw", "sgd")),
        "seed": Field(int, 0, "random seed", minimum=0),
        "checkpoint_every": Field(int, 0, "save a checkpoint every N steps (0: only at the end)", minimum=0),
        "keep_checkpoints": Field(int, 3, "checkpoints kept in output.dir/checkpoints (0: all)", minimum=0),
        "resume": Field(bool, True, "continue from the latest checkpoint in output.dir/checkpoints, "
                                    "on any mesh (false: delete them and start afresh)"),
    },
    "output": {
        "dir": Field(str, "runs/default", "where metrics.json, checkpoints and TensorBoard logs go"),
        "tensorboard": Field(bool, True, "write TensorBoard logs (loss, learning rate, ms/step, "
                                         "throughput, held-out loss, layouts) to output.dir/tensorboard"),
    },
}


def defaults():
    return {
        section: {key: copy.deepcopy(field.default) for key, field in fields.items()}
        for section, fields in SCHEMA.items()
    }


def _check_value(section, key, value):
    field = SCHEMA[section][key]
    name = f"{section}.{key}"
    expected = field.type
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if expected is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    if expected is int and isinstance(value, bool) or not isinstance(value, expected):
        raise ConfigError(
            f"config key {name!r}: expected {expected.__name__}, got {value!r} "
            f"({type(value).__name__}). {field.help}."
        )
    if field.choices and value not in field.choices:
        raise ConfigError(
            f"config key {name!r}: {value!r} is not one of {list(field.choices)}."
        )
    if field.minimum is not None and value < field.minimum:
        raise ConfigError(
            f"config key {name!r}: {value!r} is below the minimum {field.minimum}."
        )
    return value


def validate(raw, *, origin="config"):
    """Merge ``raw`` over the defaults and validate it; returns a new dict."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: the top level must be a mapping of sections, got {type(raw).__name__}.")
    config = defaults()
    raw = _layout_shorthand(raw)
    for section, values in raw.items():
        if section not in SCHEMA:
            raise ConfigError(
                f"{origin}: unknown section {section!r}; sections are {sorted(SCHEMA)}."
            )
        if values is None:
            continue
        if not isinstance(values, dict):
            also = " or 'auto' (tfshard.auto_plan chooses the plan)" if section == "layout" else ""
            raise ConfigError(f"{origin}: section {section!r} must be a mapping{also}, got {values!r}.")
        for key, value in values.items():
            if key not in SCHEMA[section]:
                raise ConfigError(
                    f"{origin}: unknown key {section}.{key!r}; keys of {section!r} are "
                    f"{sorted(SCHEMA[section])}."
                )
            config[section][key] = _check_value(section, key, value)
    _check_consistency(config, origin)
    return config


def _layout_shorthand(raw):
    """``layout: auto`` is ``layout: {auto: true}``."""
    if raw.get("layout") == "auto":
        raw = {**raw, "layout": {"auto": True}}
    return raw


MESH_AXES = ("batch", "model")  # the config's mesh: {"batch": mesh.batch, "model": mesh.model}


def _check_rules(rules, origin):
    """``layout.rules``: Mesh-TF pairs over the config's two mesh axes (an
    empty axis, ``heads:``, replicates; see ``tfshard.LogicalRules``)."""
    from tfshard.layout import LogicalRules

    try:
        pairs = LogicalRules.parse(rules)
    except TfshardError as err:
        raise ConfigError(f"{origin}: config key 'layout.rules': {err}") from None
    for logical, axis in pairs.items():
        if axis is not None and axis not in MESH_AXES:
            raise ConfigError(
                f"{origin}: config key 'layout.rules': {logical!r} maps to mesh axis "
                f"{axis!r}, but the config's mesh axes are {list(MESH_AXES)} (sized by "
                f"mesh.batch and mesh.model); write e.g. '{logical}:model', or "
                f"'{logical}:' to replicate it."
            )


def _check_consistency(config, origin):
    _check_rules(config["layout"]["rules"], origin)
    m, mesh, train = config["model"], config["mesh"], config["train"]
    tp, dp = mesh["model"], mesh["batch"]
    if train["batch_size"] % dp:
        raise ConfigError(
            f"{origin}: train.batch_size={train['batch_size']} is not divisible by "
            f"mesh.batch={dp}; use a multiple of {dp}."
        )
    if m["kind"] == "transformer":
        for key in ("heads", "d_ff", "vocab"):
            if m[key] % tp:
                raise ConfigError(
                    f"{origin}: model.{key}={m[key]} is not divisible by mesh.model={tp}; "
                    f"use a multiple of {tp} or a smaller mesh.model."
                )
        if m["d_model"] % m["heads"]:
            raise ConfigError(
                f"{origin}: model.d_model={m['d_model']} is not divisible by "
                f"model.heads={m['heads']}."
            )
        if m["moe_experts"]:
            _check_moe(m, mesh, config["layout"]["rules"], origin)
    else:
        if m["width"] % tp:
            raise ConfigError(
                f"{origin}: model.width={m['width']} is not divisible by mesh.model={tp}."
            )


def _check_moe(m, mesh, rules, origin):
    """The mixture-of-experts keys against each other, the mesh and the axis
    the ``experts`` rule names (``tensor_parallel``'s axis, 'model', unless
    the rules say otherwise)."""
    pairs = dict(item.split(":", 1) for item in rules.replace(" ", "").split(",") if ":" in item)
    axis = pairs.get("experts", "model") or None
    experts, group = m["moe_experts"], m["moe_group_size"] or m["seq_len"]
    if m["moe_top_k"] > experts:
        raise ConfigError(f"{origin}: model.moe_top_k={m['moe_top_k']} exceeds model.moe_experts={experts}.")
    if m["moe_capacity_factor"] <= 0:
        raise ConfigError(f"{origin}: model.moe_capacity_factor must be > 0, got {m['moe_capacity_factor']}.")
    if m["seq_len"] % group:
        raise ConfigError(
            f"{origin}: model.moe_group_size={group} does not divide model.seq_len={m['seq_len']}."
        )
    size = mesh.get(axis, 1) if axis else 1
    if experts % size:
        raise ConfigError(
            f"{origin}: model.moe_experts={experts} is not divisible by mesh.{axis}={size} "
            f"(the experts' axis in layout.rules); use a multiple of {size}."
        )
    if axis != "batch" and (m["seq_len"] // group) % size:
        raise ConfigError(
            f"{origin}: model.seq_len / model.moe_group_size = {m['seq_len'] // group} routing "
            f"groups per sequence cannot be split over mesh.{axis}={size}, which holds the "
            f"experts; use a moe_group_size giving a multiple of {size} groups, or put the "
            f"experts on the data axis (layout.rules 'experts:batch')."
        )


def parse_override(text):
    """``"train.steps=50"`` -> (("train", "steps"), 50)."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"--set {text!r}: write it as section.key=value, e.g. train.steps=50.")
    key, _, value = text.partition("=")
    parts = key.strip().split(".")
    if len(parts) != 2:
        raise ConfigError(f"--set {text!r}: the key must be section.key, e.g. train.steps.")
    try:
        return tuple(parts), yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML: {_yaml_problem(err)}.") from None


def _yaml_problem(err):
    """A YAML error on one line: the problem and where."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or " ".join(str(err).split())
    context = getattr(err, "context", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}" + (f" ({context})" if context else "")


def load(path, overrides=()):
    """Read, override and validate a YAML config file."""
    import yaml

    if not os.path.exists(path):
        raise ConfigError(f"config file {path!r} does not exist.")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} is not a file; give a YAML file.")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(err)}.") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a UTF-8 text file ({err.reason} at byte {err.start}).") from None
    except OSError as err:
        raise ConfigError(f"config file {path!r} cannot be read: {err.strerror}.") from None
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}."
        )
    raw = _layout_shorthand(raw)
    for text in overrides:
        (section, key), value = parse_override(text)
        if not isinstance(raw.get(section, {}), dict):
            raise ConfigError(f"{path}: section {section!r} must be a mapping.")
        raw.setdefault(section, {})
        if raw[section] is None:
            raw[section] = {}
        raw[section][key] = value
    return validate(raw, origin=path)
