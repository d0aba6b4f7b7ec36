"""Human-readable tables of layouts and per-device memory."""

from __future__ import annotations

import numpy as np

from tfshard.tensors import _numpy_dtype, layout_of, local_shape


def _fmt_spec(spec):
    if spec is None:
        return "(not on mesh)"
    return "(" + ", ".join("-" if a is None else a for a in spec) + ")"


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
                "spec": layout_of(v),
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


def describe_tiling(x_or_spec, shape=None, mesh=None):
    """How an image tensor is tiled across devices (see
    :func:`tfshard.layers.spatial.describe_tiling`)."""
    from tfshard.layers.spatial import describe_tiling as _describe

    return _describe(x_or_spec, shape, mesh)


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
    import re

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
    from tfshard.layout import validate_spec

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
    from tfshard import _dtensor
    from tfshard.errors import ShardingError

    if not _dtensor.is_dtensor(x):
        raise ShardingError(
            f"device_shards: {getattr(x, 'path', type(x).__name__)} is not on a mesh; "
            "create it in strategy.scope() or place it with strategy.place(x, spec)."
        )
    return [np.asarray(piece.numpy()) for piece in _dtensor.unpack(x)]
