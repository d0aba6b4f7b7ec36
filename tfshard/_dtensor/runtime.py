"""DTensor's multi-client runtime: starting it, naming clients and devices,
barriers and the coordination service's key-value store, and building a
DTensor from one process's rows of a global batch.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from tensorflow.experimental import dtensor
from tensorflow.python.eager import context as _tf_context

from tfshard._dtensor.layouts import _shard_index, on_host
from tfshard.errors import MultiClientError

# DTensor multi-client runs on TensorFlow's distributed runtime: one gRPC
# server per process, collectives between them, and the coordination service
# (hosted by client 0) for start-up, heartbeats, barriers and a small
# key-value store. DTensor reads its cluster description from the DTENSOR_*
# environment variables; tfshard.multi_client sets them before calling here.


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

