"""The only module that touches ``tf.experimental.dtensor``.

Everything above this module speaks in tfshard terms: a mesh is a
``tfshard.Mesh`` and a spec is a plain tuple of mesh-axis names or ``None``.
This module turns those into DTensor meshes and layouts and moves values
between host numpy arrays and sharded DTensors. It looks through Keras
variables to their DVariables with ``tfshard._keras.backend_variable``.
"""

from __future__ import annotations

import contextlib
import contextvars
import os

import numpy as np
import tensorflow as tf
from tensorflow.experimental import dtensor
from tensorflow.python.ops import gen_resource_variable_ops

from tfshard import _keras
from tfshard.errors import MultiClientError

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


_FRESH_READS = contextvars.ContextVar("tfshard_fresh_variable_reads", default=False)


@contextlib.contextmanager
def fresh_variable_reads():
    """Within this block, reads of :class:`LaidOutVariable` inside a traced
    function are new ``ReadVariableOp``s, outside its once-per-function cache:
    a recomputation in the backward pass (``tf.recompute_grad``) must read the
    variables under its own ``GradientTape`` to get their gradients. Safe
    there: nothing writes a parameter between the forward and the backward
    pass of a step."""
    token = _FRESH_READS.set(True)
    try:
        yield
    finally:
        _FRESH_READS.reset(token)


class LaidOutVariable(dtensor.DVariable):
    """A DVariable that is safe to write and read back inside one function.

    Two DTensor behaviours shape it:

    * Eager writes of host values or differently laid-out DTensors must be
      conformed to the variable's layout first (``pack`` or ``relayout``).
    * Inside a ``tf.function`` run by DTensor, a ``ReadVariableOp`` that
      follows a write of the same variable can return the value from
      *before* the write: the control edges that order them are not
      honoured (seen with TF 2.21 in Adam/RMSprop slot updates and metric
      ``result()`` after ``update_state``), and a read can also see a later
      write. So within a traced function the variable is read from its
      resource once; every later read, in that graph or a nested branch,
      returns that value or the last value written, through plain data
      flow. ``assign_add``/``assign_sub`` become ``assign(value + delta)``
      and chain through the same values. The one read happens where the
      function first touches the variable, so a ``GradientTape`` that is
      active then sees it (in Keras's ``train_step`` that is the forward
      pass).
    """

    def _cache(self):
        if not hasattr(self, "_tfshard_values"):
            self._tfshard_values = {}
        return self._tfshard_values

    def _cached(self, graph):
        """The value this function last read or wrote, looking outwards
        through enclosing graphs (a cond branch sees its caller's value)."""
        cache = self._cache()
        while graph is not None:
            entry = cache.get(id(graph))
            if entry is not None and entry[0] is graph:
                return entry[1]
            graph = getattr(graph, "outer_graph", None)
        return None

    def _remember(self, graph, value, dirty_outer=False):
        cache = self._cache()
        cache[id(graph)] = (graph, value)
        if dirty_outer:
            # A write inside a branch: callers must read the resource again.
            outer = getattr(graph, "outer_graph", None)
            while outer is not None:
                cache.pop(id(outer), None)
                outer = getattr(outer, "outer_graph", None)

    def _read_variable_op(self, no_copy=False):
        if tf.executing_eagerly() or _FRESH_READS.get():
            return super()._read_variable_op(no_copy=no_copy)
        graph = tf.compat.v1.get_default_graph()
        value = self._cached(graph)
        if value is None:
            value = super()._read_variable_op(no_copy=no_copy)
            self._remember(graph, value)
        return value

    def _write(self, value, name, read_value):
        value = tf.convert_to_tensor(value, dtype=self.dtype)
        op = gen_resource_variable_ops.assign_variable_op(self.handle, value, name=name)
        self._remember(tf.compat.v1.get_default_graph(), value, dirty_outer=True)
        return value if read_value else op

    def assign(self, value, use_locking=None, name=None, read_value=True):
        if tf.executing_eagerly():
            return super().assign(conform(value, self.layout, self.dtype), use_locking, name, read_value)
        return self._write(value, name, read_value)

    def assign_add(self, delta, use_locking=None, name=None, read_value=True):
        if tf.executing_eagerly():
            return super().assign_add(conform(delta, self.layout, self.dtype), use_locking, name, read_value)
        return self._write(self._read_variable_op() + delta, name, read_value)

    def assign_sub(self, delta, use_locking=None, name=None, read_value=True):
        if tf.executing_eagerly():
            return super().assign_sub(conform(delta, self.layout, self.dtype), use_locking, name, read_value)
        return self._write(self._read_variable_op() - delta, name, read_value)

    def _dense_update(self, sparse_delta):
        rows = tf.shape(self._read_variable_op())[0]
        return tf.math.unsorted_segment_sum(sparse_delta.values, sparse_delta.indices, rows)

    def scatter_add(self, sparse_delta, use_locking=False, name=None):
        if tf.executing_eagerly():
            return super().scatter_add(sparse_delta, use_locking, name)
        return self.assign_add(self._dense_update(sparse_delta), name=name)

    def scatter_sub(self, sparse_delta, use_locking=False, name=None):
        if tf.executing_eagerly():
            return super().scatter_sub(sparse_delta, use_locking, name)
        return self.assign_sub(self._dense_update(sparse_delta), name=name)


def make_variable(initial_value, *, trainable, name, dtype=None):
    return LaidOutVariable(initial_value, trainable=trainable, name=name, dtype=dtype)


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


# ------------------------------------------------------ multi-client runtime
# DTensor multi-client runs on TensorFlow's distributed runtime: one gRPC
# server per process, collectives between them, and the coordination service
# (hosted by client 0) for start-up, heartbeats, barriers and a small
# key-value store. DTensor reads its cluster description from the DTENSOR_*
# environment variables; tfshard.multi_client sets them before calling here.
from tensorflow.python.eager import context as _tf_context  # noqa: E402


def runtime_started():
    """True once TensorFlow's eager context exists (too late to configure)."""
    return bool(_tf_context.context()._initialized)


def preferred_device_type():
    """TPU, then GPU, then CPU, from the physical devices (does not start
    the runtime)."""
    return dtensor.preferred_device_type()


def physical_device_count(device_type):
    return len(tf.config.list_physical_devices(device_type.upper()))


def start_runtime(
    device_type,
    *,
    num_cpu_devices=None,
    multi_client=False,
    heartbeat_timeout_ms=0,
    shutdown_timeout_ms=0,
    register_timeout_ms=0,
):
    """``dtensor.initialize_accelerator_system`` with tfshard's coordination
    timeouts.

    In multi-client mode the coordination service is configured here (with
    the heartbeat, start-up and shutdown-barrier timeouts; 0 keeps
    TensorFlow's defaults) and DTensor is told not to configure it again.
    """
    if multi_client:
        _tf_context.context().configure_coordination_service(
            service_type="standalone",
            service_leader="/job:" + dtensor.full_job_name(task_id=0),
            heartbeat_timeout_in_ms=int(heartbeat_timeout_ms),
            shutdown_barrier_timeout_in_ms=int(shutdown_timeout_ms),
            cluster_register_timeout_in_ms=int(register_timeout_ms),
        )
        if register_timeout_ms:
            # Registration waits for every process, so a missing one fails
            # start-up after the timeout instead of blocking it for ever.
            _tf_context.context().coordination_service.cluster_register_with_barrier = True
    return dtensor.initialize_accelerator_system(
        device_type,
        enable_coordination_service=False,
        num_logical_cpu_devices=num_cpu_devices,
    )


def accelerator_system_initialized():
    from tensorflow.dtensor.python import accelerator_util

    return accelerator_util.is_initialized()


def client_id():
    return dtensor.client_id()


def num_clients():
    return dtensor.num_clients()


def job_name():
    return dtensor.job_name()


def task_name(task=None):
    """``/job:<name>/replica:0/task:<task>`` of this (or another) client."""
    return "/job:" + dtensor.full_job_name(task_id=task)


def device_names(device_type, count, task):
    """Full names of devices ``0..count-1`` of one type on client ``task``."""
    return [f"{task_name(task)}/device:{device_type.upper()}:{i}" for i in range(count)]


def wait_at_barrier(barrier_id, timeout_ms):
    """Block until every client reaches the barrier ``barrier_id``
    (coordination service). Raises if it times out or a client failed."""
    _tf_context.context().wait_at_barrier(barrier_id, int(timeout_ms))


def publish(key, value):
    """Store ``value`` (a string) under ``key`` for every client to read."""
    _tf_context.context().set_config_key_value(key, value)


def fetch(key, timeout_ms):
    """The string another client published under ``key`` (waits for it)."""
    return _tf_context.context().get_config_key_value(key, int(timeout_ms))


def distribute_local(local, layout, origin, global_rows):
    """A DTensor from this process's rows of a global value.

    ``local`` holds rows ``origin .. origin + len(local)`` (dimension 0) of a
    global value with ``global_rows`` rows; every local device's shard must
    lie in that range. Each local device receives its slice
    (``dtensor.pack``); no process needs the rows of another.
    """
    array = np.asarray(local)
    global_shape = (int(global_rows),) + tuple(array.shape[1:])
    shards = []
    for loc in layout.mesh.local_device_locations():
        index = list(_shard_index(layout, global_shape, loc))
        rows = index[0]
        start = (rows.start or 0) - origin
        stop = (global_rows if rows.stop is None else rows.stop) - origin
        if start < 0 or stop > len(array):
            raise MultiClientError(
                f"Per-process input: this process's devices need rows "
                f"{start + origin}..{stop + origin} of the global batch of "
                f"{global_rows} rows, which are not among this process's rows "
                f"{origin}..{origin + len(array)} (a local batch of {len(array)} "
                "rows). Feed each process its own share of every global batch: "
                "tfshard.multi_client.input_context(strategy).shard_dataset("
                "dataset, global_batch_size) gives it."
            )
        index[0] = slice(start, stop)
        shards.append(array[tuple(index)])
    with on_host():
        tensors = [tf.constant(s) for s in shards]
    return dtensor.pack(tensors, layout)


def use_first_gpus(count):
    """Make only the first ``count`` physical GPUs visible (before start)."""
    gpus = tf.config.list_physical_devices("GPU")
    tf.config.set_visible_devices(gpus[:count], "GPU")


# ------------------------------------------------- recovering from failed ops
# A failed op (a checkpoint write on a full disk, a read of a corrupt file)
# leaves state behind that fails the next ops: DTensor's device keeps a
# cancelled cancellation manager and rendezvous until it is waited on (which
# copying a replicated value off the mesh does); and a collective group
# cancelled while still forming stays cancelled for good ("group is
# cancelled"). A save ends with a reduction over every device of the mesh,
# so that group is formed before the first save.
_COMPLETE_GROUPS = set()


def complete_collective_groups(dmesh):
    """Once per mesh, run one all-reduce over every set of its axes, so that
    every collective group DTensor forms on the mesh is complete.

    DTensor gives all collectives over the same mesh axes one group key
    (``DTENSOR_ENABLE_REUSE_GROUP_KEY``, on by default), and TensorFlow marks
    a group that is cancelled before all its devices joined it as cancelled
    for good ("group is cancelled"). A step or a save failing on some devices
    while the others wait in a group's first collective would make every
    later collective over those axes fail, in every program. A complete
    group is never cancelled.
    """
    key = dmesh.to_string()
    axes = [name for name in dmesh.dim_names if dmesh.dim_size(name) > 1]
    if key in _COMPLETE_GROUPS or not axes:
        return
    ones = distribute(
        np.ones([dmesh.dim_size(name) for name in axes], np.float32), dtensor.Layout(axes, dmesh)
    )
    subsets = [
        [dim for dim in range(len(axes)) if mask >> dim & 1] for mask in range(1, 2 ** len(axes))
    ]

    @tf.function(autograph=False)
    def reduce_over_each_set_of_axes(x):
        return [tf.reduce_sum(x, axis=dims) for dims in subsets]

    for total in reduce_over_each_set_of_axes(ones):
        to_numpy(total)
    _COMPLETE_GROUPS.add(key)


def settle(dmesh):
    """Wait for every pending DTensor op on ``dmesh`` and clear the error
    state a failed one left behind; returns the root error (the first that
    is not a cancellation, if any) or None.

    DTensor runs asynchronously: a function that fails on one device cancels
    the others, the caller often sees only a ``CancelledError``, and the root
    error stays queued, to surface at some later op. Copying a replicated
    value off the mesh is the one public path into DTensor's ``AsyncWait``,
    which waits on every mesh, reports the root error, clears the per-device
    executors and renews the cancellation manager
    (``context.async_clear_error`` alone does not: every later DTensor op is
    then cancelled).
    """
    root = None
    for _ in range(3):
        try:
            _tf_context.async_wait()
            distribute(np.zeros((), np.float32), dtensor.Layout.replicated(dmesh, 0)).numpy()
            break
        except tf.errors.OpError as err:
            if root is None or (
                isinstance(root, tf.errors.CancelledError)
                and not isinstance(err, tf.errors.CancelledError)
            ):
                root = err
    _tf_context.context().clear_executor_errors()
    return root
