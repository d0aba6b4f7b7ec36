"""DTensor meshes and layouts, and values moved between the host and a mesh.

Turns a tfshard mesh (axis names, shape, devices) and spec (a tuple of mesh
axis names, ``None`` or ``KEEP``) into DTensor's ``Mesh`` and ``Layout``;
places host values on a mesh one shard per device (``distribute``), reads
them back stitched together on the host (``to_numpy``), and relays out,
packs and unpacks DTensors. It looks through Keras variables to their
DVariables with ``tfshard._keras.backend_variable``.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf
from tensorflow.experimental import dtensor

from tfshard import _keras

UNSHARDED = dtensor.UNSHARDED

# DTensor lowers an all-gather on CPU and GPU to an all-reduce: each device
# writes its shard into a zero-filled buffer of the gathered size
# (TensorStridedSliceUpdate), then the buffers are summed. With this
# environment switch set to "1" (read each time DTensor compiles) it
# launches a CollectiveGatherV2 instead, moving only the shards: keras-hub
# Llama on 2x4 (weights split over the data axis, gathered at every read)
# spends 27% less CPU time per training step, with the same losses. tfshard
# leaves it off by default: in TF 2.21 the lowering fails to compile a
# gather over two mesh axes at once ("'tf.Reshape' op requires 'output'
# number of elements to match", tests/test_comm.py pins both behaviours).
GATHER_AS_COLLECTIVE_GATHER = "LOWER_DTENSOR_GATHER_TO_COLLECTIVE_GATHER_V2"


# --------------------------------------------------------------------- meshes
def make_mesh(axis_names, shape, devices, device_type, local_indices=None):
    """A DTensor mesh over ``devices`` (full device names, row-major).

    ``local_indices`` are the mesh positions whose devices belong to this
    process (multi-client); ``None`` means every device is local.
    """
    size = int(np.prod(shape)) if shape else 1
    ids = np.arange(size).reshape(shape)
    if local_indices is None:
        local_indices = list(range(size))
    return dtensor.Mesh(
        dim_names=list(axis_names),
        global_device_ids=ids,
        local_device_ids=list(local_indices),
        local_devices=[devices[i] for i in local_indices],
    )


def logical_devices(device_type):
    """Full names (``/job:.../device:CPU:i``) of this process's logical
    devices of one type (in a multi-client job TensorFlow also lists the
    other processes' devices: they are left out)."""
    kind = device_type.upper()
    job = "/job:" + dtensor.full_job_name()
    here = tf.DeviceSpec.from_string(job)
    specs = [tf.DeviceSpec.from_string(d.name) for d in tf.config.list_logical_devices(kind)]
    return [
        f"{job}/device:{kind}:{spec.device_index}"
        for spec in specs
        if spec.job in (None, here.job) and spec.task in (None, here.task)
    ]


# -------------------------------------------------------------------- layouts
_KEEP = "*"  # tfshard.layout.KEEP


def to_layout(spec, dmesh):
    return dtensor.Layout(
        [
            UNSHARDED if axis is None else dtensor.MATCH if axis == _KEEP else axis
            for axis in spec
        ],
        dmesh,
    )


def spec_of_layout(layout):
    return tuple(None if s == UNSHARDED else s for s in layout.sharding_specs)


def _as_tensor_or_variable(x):
    # Keras variables wrap a tf.Variable; look through them.
    inner = _keras.backend_variable(x)
    return x if inner is None else inner


def is_dtensor(x):
    """True for DTensor tensors and DVariables (and Keras variables on them)."""
    x = _as_tensor_or_variable(x)
    if isinstance(x, dtensor.DVariable):
        return True
    if isinstance(x, tf.Variable):
        return False
    if not isinstance(x, tf.Tensor) or not tf.executing_eagerly():
        return False
    try:
        return dtensor.is_dtensor(x)
    except Exception:  # symbolic or foreign tensors
        return False


def layout_of(x):
    """The DTensor layout of a DTensor tensor or variable."""
    x = _as_tensor_or_variable(x)
    if isinstance(x, dtensor.DVariable):
        return x.layout
    return dtensor.fetch_layout(x)


def local_shape(layout, global_shape):
    return tuple(int(d) for d in layout.local_shape_from_global_shape(global_shape))


# ------------------------------------------------------------ host <-> mesh
def on_host():
    """A device scope on this process's host CPU.

    Values computed inside it are plain tensors even where an enclosing scope
    (e.g. Keras colocating optimizer slots with a DVariable) would otherwise
    run them on the DTensor device with a guessed layout.
    """
    return tf.device("/job:" + dtensor.full_job_name() + "/device:CPU:0")


def _shard_index(layout, global_shape, location):
    """numpy index of the shard that lives at one mesh location."""
    index = []
    for dim, axis in zip(global_shape, spec_of_layout(layout)):
        if axis is None:
            index.append(slice(None))
        else:
            n = layout.mesh.dim_size(axis)
            step = dim // n
            start = location[axis] * step
            index.append(slice(start, start + step))
    return tuple(index)


def distribute(value, layout, dtype=None):
    """A DTensor holding the global ``value`` laid out as ``layout``.

    Each local device receives only its own slice (``dtensor.pack``); no
    device ever holds the full value unless the layout replicates it.
    """
    array = np.asarray(value)
    if dtype is not None:
        array = array.astype(tf.as_dtype(dtype).as_numpy_dtype, copy=False)
    locations = layout.mesh.local_device_locations()
    shards = [array[_shard_index(layout, array.shape, loc)] for loc in locations]
    with on_host():
        tensors = [tf.constant(s) for s in shards]
    return dtensor.pack(tensors, layout)


def copy_to_mesh(tensor, layout):
    """Place a plain tensor onto the mesh, then lay it out (works in graphs)."""
    replicated = dtensor.Layout.replicated(layout.mesh, layout.rank)
    out = dtensor.copy_to_mesh(tensor, replicated)
    if layout.is_fully_replicated():
        return out
    return dtensor.relayout(out, layout)


def expand_replicated(op_types):
    """Let DTensor expand TensorFlow ops that have no SPMD expander (e.g.
    ``StatelessMultinomial``, ``ReverseV2``) as replicated ops: their inputs
    are laid out whole on every device (an all-gather of what is split) and
    each device runs the whole op, so results are exact. DTensor reads one
    environment variable per op type when it compiles a function
    (``dtensor_utils.cc``: EnableReplicatedSpmdAsDefault)."""
    for op_type in op_types:
        os.environ[f"DTENSOR_ENABLE_REPLICATED_SPMD_AS_DEFAULT_TF.{op_type.upper()}"] = "1"


def default_mesh(dmesh):
    """Within this block, eager ops with no DTensor input (``tf.ones``, a
    causal mask built from it) make replicated DTensors on ``dmesh``, so they
    can meet sharded values."""
    return dtensor.default_mesh(dmesh)


def relayout(tensor, layout):
    """``tensor`` laid out as ``layout``; in a graph, a tensor that a
    relayout to the same layout just produced is returned as is."""
    if not tf.executing_eagerly() and getattr(tensor, "op", None) is not None:
        op = tensor.op
        if op.type == "Relayout" and op.get_attr("layout") == layout.to_string().encode():
            return tensor
    return dtensor.relayout(tensor, layout)


def relayout_like(tensor, like):
    """``tensor`` laid out like ``like``, whatever layout DTensor gives
    ``like`` when it compiles (e.g. a batch dim split or not), so a traced
    function can undo a relayout without knowing the layout it started from."""
    return dtensor.relayout_like(tensor, like)


def unpack(x):
    """The per-local-device components of a DTensor tensor or variable."""
    x = _as_tensor_or_variable(x)
    if isinstance(x, tf.Variable):
        x = x.read_value()
    return dtensor.unpack(x)


def to_numpy(x):
    """The global value of a DTensor as numpy, assembled on the host.

    Shards are copied off their devices and stitched together in numpy, so no
    device has to hold the whole tensor. Replicated copies are read once.
    """
    x = _as_tensor_or_variable(x)
    if isinstance(x, tf.Variable):
        x = x.read_value()
    layout = dtensor.fetch_layout(x)
    mesh = layout.mesh
    if mesh.num_local_devices() != mesh.size:
        # Multi-client: this process does not hold every shard.
        x = dtensor.relayout(x, dtensor.Layout.replicated(mesh, layout.rank))
        return dtensor.unpack(x)[0].numpy()
    global_shape = tuple(int(d) for d in x.shape)
    parts = dtensor.unpack(x)
    out = None
    for part, loc in zip(parts, mesh.local_device_locations()):
        part = part.numpy()
        if out is None:
            out = np.empty(global_shape, dtype=part.dtype)
        out[_shard_index(layout, global_shape, loc)] = part
    return out


def pack(tensors, layout):
    """A DTensor from one tensor per local device (in mesh order)."""
    return dtensor.pack(tensors, layout)


def conform(value, layout, dtype):
    """An eager ``value`` as a DTensor with ``layout`` (host values are split)."""
    if is_dtensor(value):
        return value if dtensor.fetch_layout(value) == layout else dtensor.relayout(value, layout)
    if isinstance(value, tf.Tensor):
        value = value.numpy()
    return distribute(np.asarray(value), layout, dtype=dtype)



def to_plain(tensor):
    """The global value of a DTensor as a plain (single-device) tensor.

    Differentiable: all-gather forward (relayout to replicated), and the
    upstream gradient is copied back onto the mesh in the backward pass.
    """
    layout = dtensor.fetch_layout(tensor)
    rep = dtensor.Layout.replicated(layout.mesh, layout.rank)

    @tf.custom_gradient
    def _to_plain(t):
        out = dtensor.unpack(dtensor.relayout(t, rep))[0]

        def grad(upstream):
            return copy_to_mesh(upstream, layout)

        return out, grad

    return _to_plain(tensor)
