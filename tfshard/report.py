"""Human-readable tables of layouts and per-device memory, and which piece
of a tensor each device holds.

Below :mod:`tfshard.strategy` (``Strategy.describe`` prints
:func:`variable_table`): it reads sharded values through
:mod:`tfshard.tensors` and the active strategy through
:mod:`tfshard._scope`. The communication estimate of a reference config is
the application's (:mod:`tfshard.app.estimate`).
"""

from __future__ import annotations

import math
import re

import numpy as np

from tfshard import _dtensor
from tfshard._scope import current_strategy
from tfshard.errors import ShardingError
from tfshard.layout import validate_spec
from tfshard.tensors import _numpy_dtype, local_shape, spec_of


def _fmt_spec(spec):
    if spec is None:
        return "(not on mesh)"
    return "(" + ", ".join("-" if a is None else str(a) for a in spec) + ")"


def format_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def variable_rows(variables):
    rows = []
    for v in variables:
        shape = tuple(int(d) for d in v.shape)
        per_device = local_shape(v)
        itemsize = np.dtype(_numpy_dtype(v)).itemsize
        rows.append(
            {
                "path": v.path,
                "shape": shape,
                "spec": spec_of(v),
                "per_device_shape": per_device,
                "per_device_bytes": int(np.prod(per_device, dtype=np.int64)) * itemsize,
                "global_bytes": int(np.prod(shape, dtype=np.int64)) * itemsize,
            }
        )
    return rows


def variable_table(variables):
    """Path, global shape, spec, per-device shape and bytes, plus totals."""
    rows = variable_rows(variables)
    header = ("path", "global shape", "spec", "per-device shape", "bytes/device")
    body = [
        (
            r["path"],
            str(r["shape"]),
            _fmt_spec(r["spec"]),
            str(r["per_device_shape"]),
            format_bytes(r["per_device_bytes"]),
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    per_device = sum(r["per_device_bytes"] for r in rows)
    total = sum(r["global_bytes"] for r in rows)
    lines.append(
        f"total: {len(rows)} variables, {format_bytes(per_device)} per device "
        f"({format_bytes(total)} unsharded)"
    )
    return "\n".join(lines)


def per_device_bytes(variables):
    """Bytes of ``variables`` that one device holds."""
    return sum(r["per_device_bytes"] for r in variable_rows(variables))


def per_device_bytes_by_group(variables, groups):
    """Per-device bytes of ``variables`` summed by group, for memory plots.

    ``groups`` maps a label to a regex searched in each variable's path, in
    order; the first label that matches takes the variable, the rest go to
    ``"other"``. Returns ``{label: bytes}`` in the order of ``groups``
    (``"other"`` last, only if it has bytes).
    """
    totals = {label: 0 for label in groups}
    totals["other"] = 0
    for row in variable_rows(variables):
        label = next((k for k, pattern in groups.items() if re.search(pattern, row["path"])), "other")
        totals[label] += row["per_device_bytes"]
    if not totals["other"]:
        del totals["other"]
    return totals


def device_tiles(spec, shape, mesh):
    """Which piece of a tensor of global ``shape`` laid out as ``spec`` each
    device of ``mesh`` holds: a list, in device order, of
    ``{"device", "coords" (axis -> index), "slices" (one per dimension)}``.
    Device ``i`` is the ``i``-th mesh coordinate in row-major order, the
    order of :func:`device_shards` (and of ``describe_tiling``)."""
    spec = validate_spec(tuple(spec), tuple(shape), mesh, name="device_tiles")
    axes = mesh.axis_names
    tiles = []
    for device, coord in enumerate(np.ndindex(*mesh.shape)):
        where = dict(zip(axes, coord))
        slices = []
        for axis, size in zip(spec, shape):
            step = size // mesh.axis_size(axis) if axis else size
            start = where[axis] * step if axis else 0
            slices.append(slice(start, start + step))
        tiles.append({"device": device, "coords": where, "slices": tuple(slices)})
    return tiles


def device_shards(x):
    """The pieces of a sharded tensor or variable that the devices hold, as
    numpy arrays in device order (see :func:`device_tiles`)."""
    if not _dtensor.is_dtensor(x):
        raise ShardingError(
            f"device_shards: {getattr(x, 'path', type(x).__name__)} is not on a mesh; "
            "create it in strategy.scope() or place it with strategy.place(x, spec)."
        )
    return [np.asarray(piece.numpy()) for piece in _dtensor.unpack(x)]


def describe_tiling(x_or_spec, shape=None, mesh=None, *, names=("batch", "rows", "cols", "channels")):
    """Text showing how an NHWC image tensor is tiled across devices.

    ``x_or_spec``: a DTensor (its spec and shape are read) or a spec tuple
    (then give ``shape``). ``mesh``: a ``tfshard.Mesh`` (default: the
    current strategy's). One line per device: its mesh coordinates and the
    global index ranges of the tile it holds, followed by a map of which
    device holds which (row band, column band) of the image.
    """
    if isinstance(x_or_spec, (tuple, list)):
        spec = tuple(x_or_spec)
        if shape is None:
            raise ShardingError("describe_tiling(spec, shape, mesh): give the tensor's global shape.")
    else:
        spec = spec_of(x_or_spec)
        if spec is None:
            raise ShardingError("describe_tiling: the tensor is not on a mesh; pass a spec and a shape instead.")
        shape = tuple(int(d) for d in x_or_spec.shape) if shape is None else shape
    if mesh is None:
        strategy = current_strategy()
        if strategy is None:
            raise ShardingError("describe_tiling: give mesh=..., or call it inside strategy.scope().")
        mesh = strategy.mesh
    shape = tuple(int(d) for d in shape)
    if len(spec) != len(shape):
        raise ShardingError(f"describe_tiling: spec {spec!r} does not match shape {shape}.")
    names = tuple(names) + tuple(f"dim{i}" for i in range(len(names), len(shape)))
    for axis, size in zip(spec, shape):
        if axis is not None and size % mesh.axis_size(axis):
            raise ShardingError(
                f"describe_tiling: dimension of size {size} cannot split over "
                f"mesh axis {axis!r} (size {mesh.axis_size(axis)})."
            )
    tile = tuple(s // (mesh.axis_size(a) if a else 1) for a, s in zip(spec, shape))
    axes = mesh.axis_names
    lines = [
        f"tensor {shape} spec {_fmt_spec(spec)} on mesh "
        + " x ".join(f"{a}={mesh.axis_size(a)}" for a in axes),
        f"per-device tile {tile} ({100.0 * math.prod(tile) / max(1, math.prod(shape)):.1f}% of the tensor)",
        "device  " + "  ".join(f"{a:>5}" for a in axes) + "  " + "  ".join(f"{n:>9}" for n in names[: len(shape)]),
    ]
    coords = list(np.ndindex(*[mesh.axis_size(a) for a in axes]))
    for device, coord in enumerate(coords):
        where = dict(zip(axes, coord))
        ranges = []
        for a, s, t in zip(spec, shape, tile):
            start = where[a] * t if a else 0
            ranges.append(f"{start}:{start + t}")
        lines.append(
            f"{device:>6}  " + "  ".join(f"{c:>5}" for c in coord) + "  " + "  ".join(f"{r:>9}" for r in ranges)
        )
    if len(shape) == 4:
        ha, wa = spec[1], spec[2]
        nh = mesh.axis_size(ha) if ha else 1
        nw = mesh.axis_size(wa) if wa else 1
        lines.append(f"image map ({nh} row band(s) x {nw} column band(s); devices per tile):")
        for i in range(nh):
            cells = []
            for j in range(nw):
                owners = [
                    str(d)
                    for d, coord in enumerate(coords)
                    if (ha is None or dict(zip(axes, coord))[ha] == i)
                    and (wa is None or dict(zip(axes, coord))[wa] == j)
                ]
                cells.append(",".join(owners))
            lines.append(f"  rows {i * tile[1]:>4}:{(i + 1) * tile[1]:<4} | " + " | ".join(cells))
    return "\n".join(lines)
