"""Reading DTensor's pass dumps: the collectives and random draws in the
MLIR programs DTensor writes after each compiler pass.

:func:`parse_module_text` counts the collectives of one dumped module as a
:class:`CollectiveCounts` (``{(kind, axis): n}``, the axis read from group
assignments and layouts), :func:`parse_dump_dir` counts every program in a
dump directory at the ``"expanded"`` or ``"optimized"`` stage, and
:func:`random_elements` counts the random numbers a device draws.
``tfshard.comm`` re-exports all of it and adds the measuring (pointing the
dumps at a directory, running a function or a fresh interpreter).
"""

from __future__ import annotations

import ast
import collections
import os
import re

import numpy as np

#: DTensor op name -> the kind reported.
KINDS = {
    "DTensorAllReduce": "all_reduce",
    "DTensorAllGather": "all_gather",
    "DTensorAllScatter": "all_scatter",
    "DTensorAllToAll": "all_to_all",
    "DTensorReduceScatter": "reduce_scatter",
    "CollectivePermute": "collective_permute",
}
STAGES = ("expanded", "optimized")

_EXPANSION_PASS = "DTensorSPMDExpansion"
# The first pass of each of these turns DTensor collectives into device ops:
# the "optimized" stage is the text just before the first of them.
_LOWERING_PASSES = (
    "DTensorAllReduceLowering",
    "DTensorReduceScatterLowering",
    "DTensorAllScatterLowering",
    "DTensorAllToAllLowering",
    "DTensorLowerSendRecv",
    "DTensorMergeClusters",  # its first run after expansion follows lowering
)

# The passes whose output the stages read: the expansion, the passes that
# may rewrite collectives between it and lowering, and the lowering passes
# (they mark where "optimized" ends). Dumping only these (TensorFlow's MLIR
# bridge logger reads MLIR_BRIDGE_LOG_PASS_FILTER, exact pass names joined by
# ";") skips the ~20 other passes' full-module dumps: -19% CPU measured on a
# child counting three programs' collectives, with the same counts.
DUMPED_PASSES = (
    _EXPANSION_PASS,
    "CSE",
    "DTensorAllReduceSumOptimization",
    "DTensorAllReduceCombineOptimization",
    "DTensorAllReduceScatterOptimization",
    "DTensorMixedPrecisionReduce",
    "DTensorAllGatherLowering",
) + _LOWERING_PASSES
PASS_FILTER_VARIABLE = "MLIR_BRIDGE_LOG_PASS_FILTER"

_DUMP_NAME = re.compile(r"^dtensor\.(\d+)\.[^.]*\.after_([^.]+)\.(.*)\.mlir$")
_OP = re.compile(r'"tf\.(' + "|".join(KINDS) + r')"\(([^)]*)\)(.*)$')
_CONST = re.compile(
    r'(%[\w#.$-]+) = "tf\.Const"\(\) (?:<\{|\{)value = dense<(.*?)> : '
    r"tensor<([0-9x]*)xi(?:32|64)>"
)
_LAYOUT = re.compile(r"sharding_specs:([^ ]*?), mesh:\|([^|]*)\|([^|]*)\|")
_INPUT_LAYOUT = re.compile(r"input_layout = #dtensor\.layout<([^>]*)>")
_OUTPUT_LAYOUT = re.compile(r"output_layout = #dtensor\.layout<([^>]*)>")
_MESH = re.compile(r"mesh:\|([^|]*)\|([^|]*)\|")
# Random-number ops (TensorFlow's stateful and stateless families); the
# key/counter/algorithm helpers draw nothing.
_RANDOM_OP = re.compile(
    r'"tf\.((?:Stateless)?(?:Random|TruncatedNormal|Multinomial|ParameterizedTruncatedNormal)\w*)"\('
)
_RANDOM_HELPERS = ("GetKeyCounter", "GetAlg", "GetKeyCounterAlg")
_RESULT = re.compile(r"tensor<([^>]*)>")


class CollectiveCountError(RuntimeError):
    """Collectives cannot be counted here (logging off, dump unreadable)."""


class CollectiveCounts(collections.Counter):
    """``{(kind, axis): n}``; missing keys count 0.

    ``counts.total("all_reduce")`` sums over axes,
    ``counts.total(axis="model")`` over kinds.
    """

    def total(self, kind=None, axis=None):
        return sum(
            n
            for (k, a), n in self.items()
            if (kind is None or k == kind) and (axis is None or a == axis)
        )

    def as_list(self):
        return [[k, a, n] for (k, a), n in sorted(self.items(), key=str)]

    @classmethod
    def from_list(cls, items):
        out = cls()
        for kind, axis, n in items:
            out[(kind, tuple(axis) if isinstance(axis, list) else axis)] += n
        return out

    def __repr__(self):
        inner = ", ".join(f"{k!r}: {n}" for k, n in sorted(self.items(), key=str))
        return f"CollectiveCounts({{{inner}}})"


# ------------------------------------------------------------------ parsing
class _Mesh:
    def __init__(self, dims_text, ids_text):
        dims = [d.split("=") for d in dims_text.split(",") if d]
        self.names = tuple(name for name, _ in dims)
        self.shape = tuple(int(size) for _, size in dims)
        ids = [int(i) for i in ids_text.split(",") if i]
        # Position p of the global id list sits at row-major coordinate p.
        self.coords = {
            dev: np.unravel_index(p, self.shape) if self.shape else ()
            for p, dev in enumerate(ids)
        }

    def axes_of_group(self, group):
        """Mesh axes along which the devices of ``group`` differ."""
        coords = [self.coords[int(d)] for d in group if int(d) in self.coords]
        if len(coords) < 2:
            return ()
        return tuple(
            name
            for i, name in enumerate(self.names)
            if len({c[i] for c in coords}) > 1
        )


def _parse_dense(value, shape_text):
    shape = tuple(int(s) for s in shape_text.split("x") if s) if shape_text else ()
    value = value.strip()
    if value.startswith('"0x'):
        raw = bytes.fromhex(value.strip('"')[2:])
        width = 4 if len(raw) == 4 * int(np.prod(shape or (1,))) else 8
        array = np.frombuffer(raw, dtype="<i4" if width == 4 else "<i8")
        return array.reshape(shape) if array.size == int(np.prod(shape or (1,))) else array
    parsed = np.array(ast.literal_eval(value))
    if parsed.ndim == 0 and shape:
        return np.full(shape, int(parsed))
    return parsed


def _axis_key(axes):
    if not axes:
        return None
    return axes[0] if len(axes) == 1 else tuple(axes)


def _layout_specs(text):
    match = _LAYOUT.search(text)
    if match is None:
        return None, None
    specs = tuple(
        None if s == "unsharded" else s for s in match.group(1).split(",") if s
    )
    return specs, _Mesh(match.group(2), match.group(3))


def parse_module_text(text):
    """Count the collectives in one dumped MLIR module."""
    counts = CollectiveCounts()
    constants = {}
    default_mesh = None
    for line in text.splitlines():
        for const in _CONST.finditer(line):
            constants[const.group(1)] = (const.group(2), const.group(3))
        if default_mesh is None:
            mesh_match = _MESH.search(line)
            if mesh_match is not None:
                default_mesh = _Mesh(mesh_match.group(1), mesh_match.group(2))
        op = _OP.search(line)
        if op is None:
            continue
        name, operands, rest = op.groups()
        kind = KINDS[name]
        operands = [o.strip() for o in operands.split(",") if o.strip()]
        axes = ()
        if kind in ("all_reduce", "reduce_scatter"):
            _, mesh = _layout_specs(rest)
            mesh = mesh or default_mesh
            group = constants.get(operands[1]) if len(operands) > 1 else None
            if group is None or mesh is None:
                axes = ("?",)
            else:
                groups = _parse_dense(*group)
                groups = groups.reshape(-1, groups.shape[-1]) if groups.ndim else groups
                found = {mesh.axes_of_group(g) for g in groups}
                axes = max(found, key=len) if found else ()
        elif kind in ("all_gather", "all_scatter", "all_to_all"):
            source = _INPUT_LAYOUT.search(rest)
            target = _OUTPUT_LAYOUT.search(rest)
            if source is None or target is None:
                axes = ("?",)
            else:
                before, mesh = _layout_specs(source.group(1))
                after, _ = _layout_specs(target.group(1))
                before, after = before or (), after or ()
                if kind == "all_gather":
                    moved = [b for b, a in zip(before, after) if b is not None and b != a]
                elif kind == "all_scatter":
                    moved = [a for b, a in zip(before, after) if a is not None and b != a]
                else:
                    moved = [x for b, a in zip(before, after) if b != a for x in (b, a) if x]
                names = mesh.names if mesh else ()
                axes = tuple(sorted(set(moved), key=lambda n: names.index(n) if n in names else 99))
        counts[(kind, _axis_key(axes))] += 1
    return counts


def _dump_files(directory):
    out = []
    for name in os.listdir(directory):
        match = _DUMP_NAME.match(name)
        if match:
            out.append((int(match.group(1)), match.group(2), match.group(3), name))
    out.sort()
    return out


def _program_texts(directory, stage, program):
    """The text of each DTensor program dumped in ``directory``, at ``stage``."""
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r}: use one of {STAGES}.")
    files = _dump_files(directory)
    wanted = None if program is None else re.compile(rf"__inference_{re.escape(program)}_\d+")
    starts = [
        i
        for i, f in enumerate(files)
        if f[1] == _EXPANSION_PASS and (wanted is None or wanted.fullmatch(f[2]))
    ]
    for n, start in enumerate(starts):
        chosen = files[start]
        if stage == "optimized":
            end = starts[n + 1] if n + 1 < len(starts) else len(files)
            for entry in files[start + 1 : end]:
                if entry[2] != chosen[2]:
                    continue  # another program compiled in between
                if entry[1].startswith(_LOWERING_PASSES):
                    break
                chosen = entry
        with open(os.path.join(directory, chosen[3]), encoding="utf-8") as handle:
            yield handle.read()


def parse_dump_dir(directory, stage="expanded", program=None):
    """Count collectives over every DTensor program dumped in ``directory``.

    Each compiled program is counted once, at ``stage`` (see the module
    docstring). ``program`` keeps only the programs traced from the Python
    function of that name (a ``tf.function`` named ``run`` compiles to
    ``__inference_run_<n>``). Returns ``(counts, n_programs)``.
    """
    counts = CollectiveCounts()
    n_programs = 0
    for text in _program_texts(directory, stage, program):
        counts.update(parse_module_text(text))
        n_programs += 1
    return counts, n_programs


def random_elements(text):
    """Random numbers one device draws per run of a dumped module: the
    elements of every random op's output, at the per-device shapes SPMD
    expansion gave them (read the ``expanded`` stage). A dimension unknown
    at compile time counts as 1."""
    total = 0
    for line in text.splitlines():
        op = _RANDOM_OP.search(line)
        if op is None or op.group(1).endswith(_RANDOM_HELPERS):
            continue
        result = _RESULT.search(line[op.end():].rsplit("->", 1)[-1])
        if result is None:
            continue
        dims = result.group(1).split("x")[:-1]
        total += int(np.prod([int(d) if d.isdigit() else 1 for d in dims]))
    return total


def random_elements_in_dump(directory, program=None):
    """:func:`random_elements` summed over the programs dumped in
    ``directory`` (``program`` as in :func:`parse_dump_dir`)."""
    return sum(random_elements(text) for text in _program_texts(directory, "expanded", program))
