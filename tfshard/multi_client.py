"""Scale out across processes and hosts with DTensor multi-client.

Every process runs the same program (SPMD). Each brings its own devices (GPUs,
TPU cores, or virtual CPUs) and one ``tfshard.Mesh`` spans the devices of all
of them. Communication is TensorFlow's own distributed runtime: a gRPC server
per process, DTensor's collectives between them, and TensorFlow's
coordination service (hosted by process 0) for start-up, heartbeats and
barriers. tfshard adds validation, clear errors, per-process input and
process-0-only side effects around it.

    import tfshard
    tfshard.initialize_multi_client()   # first thing: reads DTENSOR_* env vars
    mesh = tfshard.Mesh({"batch": 2, "model": 4})   # over all processes' devices

``tfshard launch --processes 2 --devices-per-process 4 -- python train.py``
starts the processes on one machine with the environment set; on a cluster,
start one process per host with the same ``DTENSOR_JOBS`` list and each its
own ``DTENSOR_CLIENT_ID`` (see docs/multi-process.md).

What every process must do the same way
    Run the same code, in the same order: build the same models, call
    ``fit``/``evaluate``/``predict``/``save_checkpoint``/``to_numpy`` with
    the same arguments and the same number of batches. A collective waits
    until every process reaches it. When a process dies or stops responding,
    the others raise :class:`tfshard.errors.ProcessLostError` instead of
    waiting for ever (see ``heartbeat_timeout``).

This module holds the job's state, its start-up, queries and coordination
(barriers, broadcasts, failures reported by every process); reading and
checking the settings is :mod:`tfshard._cluster_settings`, per-process
input :mod:`tfshard._process_input` (both re-exported here).
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import random
import sys
import weakref

from tfshard import _cluster_settings, _dtensor
from tfshard._cluster_settings import (  # noqa: F401  (part of this module's API)
    DEFAULT_TIMEOUT,
    ENV_CLIENT_ID,
    ENV_DEVICE_TYPE,
    ENV_DEVICES_PER_PROCESS,
    ENV_JOB_NAME,
    ENV_JOBS,
    ENV_NCCL,
    ENV_NUM_CLIENTS,
    ClusterSpec,
)
from tfshard._process_input import (  # noqa: F401  (part of this module's API)
    InputContext,
    data_positions,
    is_process_local,
    process_local,
)
from tfshard.errors import MultiClientError, ProcessLostError, TfshardError

__all__ = [
    "initialize_multi_client",
    "ClusterSpec",
    "cluster",
    "is_multi_client",
    "client_id",
    "num_clients",
    "is_chief",
    "barrier",
    "run_on_chief",
    "all_succeeded",
    "failures",
    "broadcast",
    "InputContext",
    "input_context",
    "process_local",
    "is_process_local",
]

_CLUSTER = None  # the ClusterSpec, once initialized
_COUNTERS = {}  # barrier / broadcast name -> calls so far (same on every process)


def initialize_multi_client(
    client_id=None,
    num_clients=None,
    jobs=None,
    job_name=None,
    devices_per_process=None,
    device_type=None,
    *,
    seed=None,
    timeout=DEFAULT_TIMEOUT,
    heartbeat_timeout=None,
    connect_timeout=DEFAULT_TIMEOUT,
    shutdown_timeout=None,
    gpu_use_nccl=None,
):
    """Join this process to a DTensor multi-client job (or set up a single
    process's accelerators). Call it first thing, before TensorFlow starts.

    Every argument left as ``None`` is read from the environment, which is
    what ``tfshard launch`` and cluster schedulers set:

    Args:
        client_id: this process's index, ``0 .. num_clients-1``
            (``DTENSOR_CLIENT_ID``). Process 0 hosts the coordination service
            and is the one that writes logs, metrics and checkpoint commits.
        num_clients: the number of processes (``DTENSOR_NUM_CLIENTS``);
            must equal ``len(jobs)``.
        jobs: ``"host:port"`` of every process, in client-id order, as a list
            or comma-separated string (``DTENSOR_JOBS``). Every process gets
            the same list. Empty or unset: a single process.
        job_name: the TensorFlow job name in device names
            (``DTENSOR_JOB_NAME``, default ``"worker"``).
        devices_per_process: devices this process brings: virtual CPUs it
            splits its host CPU into, or how many of its GPUs to use
            (``TFSHARD_DEVICES_PER_PROCESS``; default 1 CPU, or every
            GPU/TPU core present).
        device_type: "CPU", "GPU" or "TPU" (``TFSHARD_DEVICE_TYPE``; default
            detected: TPU, then GPU, then CPU).
        seed: the random seed every process sets with
            ``keras.utils.set_random_seed`` so that weights initialize
            identically everywhere. Default: process 0 draws one and sends it
            to the others.
        timeout: seconds to wait at tfshard's own barriers (checkpoint
            commits, start-up) before giving up.
        heartbeat_timeout, connect_timeout, shutdown_timeout: seconds for
            TensorFlow's coordination service: to declare a process that
            stopped sending heartbeats dead (TensorFlow's default: 10 s), to
            wait for every process to join at start-up (default 600 s; start-up
            then fails with a clear error), and to wait for every process at
            exit. ``None`` keeps TensorFlow's defaults (``connect_timeout=None``:
            wait for ever).
        gpu_use_nccl: use NCCL for GPU collectives
            (``DTENSOR_GPU_USE_NCCL_COMMUNICATION``).

    Returns:
        The :class:`ClusterSpec` of the job.

    Raises:
        MultiClientError: malformed or contradictory settings, or TensorFlow
            already started.
    """
    global _CLUSTER
    requested = (client_id, num_clients, jobs, job_name, devices_per_process, device_type, seed)
    if _CLUSTER is not None and all(value is None for value in requested):
        return _CLUSTER  # called again (e.g. by library code): the job it joined
    spec, (heartbeat_ms, connect_ms, shutdown_ms) = _cluster_settings.resolve(
        client_id, num_clients, jobs, job_name, devices_per_process, device_type, seed,
        timeout, heartbeat_timeout, connect_timeout, shutdown_timeout,
    )
    client_id, num_clients, jobs, job_name = spec.client_id, spec.num_clients, spec.jobs, spec.job_name
    device_type, devices, seed = spec.device_type, spec.devices_per_process, spec.seed
    if _CLUSTER is not None:
        same = dataclasses.replace(_CLUSTER, seed=spec.seed, timeout=spec.timeout)
        if same == spec and seed in (None, _CLUSTER.seed):
            return _CLUSTER
        raise MultiClientError(
            f"initialize_multi_client was already called with {_CLUSTER}; it "
            f"cannot be called again with {spec}. Restart the process."
        )
    if _dtensor.runtime_started():
        raise MultiClientError(
            "initialize_multi_client must run before TensorFlow starts (before "
            "any op, tensor, model or device listing). Call it first thing in "
            "the program, right after `import tfshard`."
        )

    # DTensor reads the cluster from these variables.
    os.environ[ENV_CLIENT_ID] = str(client_id)
    os.environ[ENV_NUM_CLIENTS] = str(num_clients)
    os.environ[ENV_JOB_NAME] = job_name
    if jobs:
        os.environ[ENV_JOBS] = ",".join(jobs)
    else:
        os.environ.pop(ENV_JOBS, None)
    if gpu_use_nccl is not None:
        os.environ[ENV_NCCL] = "1" if gpu_use_nccl else "0"
    if device_type == "GPU" and devices < _dtensor.physical_device_count("GPU"):
        _dtensor.use_first_gpus(devices)

    try:
        _dtensor.start_runtime(
            device_type,
            num_cpu_devices=devices if device_type == "CPU" else None,
            multi_client=num_clients > 1,
            heartbeat_timeout_ms=heartbeat_ms,
            shutdown_timeout_ms=shutdown_ms,
            register_timeout_ms=connect_ms,
        )
    except Exception as err:  # DTensor raises ValueError / RuntimeError / tf errors
        hint = ""
        if "Barrier timed out" in str(err) or "DeadlineExceeded" in type(err).__name__:
            hint = (
                f" Not every process joined within connect_timeout={connect_timeout}s: "
                f"start all {num_clients} processes, each with its own client id and "
                f"the same jobs list ({', '.join(jobs)}), and check that they can "
                "reach each other."
            )
        elif jobs:
            hint = (
                f" Check that {jobs[client_id]} is free on this host and that every "
                "process was started with the same jobs list."
            )
        raise MultiClientError(
            f"Starting TensorFlow's distributed runtime failed for client "
            f"{client_id} of {num_clients}: {type(err).__name__}: {err}.{hint}"
        ) from err

    _CLUSTER = spec
    if num_clients > 1:
        if seed is None:
            seed = int(broadcast("seed", lambda: str(random.SystemRandom().randrange(1, 2**31 - 1))))
        barrier("initialized")
        _register_exit_barrier(shutdown_ms / 1000 if shutdown_ms else timeout)
    if seed is not None:
        import keras

        keras.utils.set_random_seed(seed)
        _CLUSTER = dataclasses.replace(spec, seed=seed)
    return _CLUSTER


# ------------------------------------------------------------- exit
_UNCAUGHT = []  # exception types this process is dying of, if any


def _register_exit_barrier(timeout):
    """At a normal exit, wait until every process exits. Process 0 hosts the
    coordination service and resolves every collective group, even a
    process-local one (an all-gather within one host's devices): if it left
    first, the others' remaining collectives would fail ("Connection
    refused"). A process dying of an uncaught exception skips the wait, so
    it exits at once and ``tfshard launch`` stops the job."""
    previous = sys.excepthook

    def record(kind, value, traceback):
        _UNCAUGHT.append(kind)
        previous(kind, value, traceback)

    sys.excepthook = record
    atexit.register(_exit_barrier, timeout)


def exiting_on_error():
    """This process is about to exit because of an error it reported itself
    (the CLI's ``tfshard: error: ...``): skip the exit barrier, as for an
    uncaught exception, so it exits at once and ``tfshard launch`` stops the
    job instead of waiting for processes that may never arrive."""
    _UNCAUGHT.append(SystemExit)


def _exit_barrier(timeout):
    if _UNCAUGHT:
        return
    try:
        barrier("exit", timeout=timeout)
    except ProcessLostError as err:
        print(f"tfshard: at exit: {err}", file=sys.stderr)


# ------------------------------------------------------------- queries
def cluster():
    """The :class:`ClusterSpec` after ``initialize_multi_client``, else None."""
    return _CLUSTER


def is_multi_client() -> bool:
    return _CLUSTER is not None and _CLUSTER.num_clients > 1


def client_id() -> int:
    """This process's index (0 outside a multi-client job)."""
    return 0 if _CLUSTER is None else _CLUSTER.client_id


def num_clients() -> int:
    return 1 if _CLUSTER is None else _CLUSTER.num_clients


def is_chief() -> bool:
    """True in process 0 (and in a single-process program)."""
    return client_id() == 0


# ------------------------------------------------------- coordination
def _next_id(name):
    count = _COUNTERS.get(name, 0)
    _COUNTERS[name] = count + 1
    return f"tfshard/{name}/{count}"


def _timeout_ms(timeout):
    if timeout is None:
        timeout = _CLUSTER.timeout if _CLUSTER is not None else DEFAULT_TIMEOUT
    return int(timeout * 1000)


def process_lost_error(what, err):
    """The ProcessLostError for a runtime error ``err`` met while doing ``what``."""
    return ProcessLostError(
        f"{what} failed on client {client_id()} of {num_clients()}: another "
        f"process of the job died, is unreachable or did not arrive in time "
        f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
        "The job cannot continue; restart every process (from the last "
        "checkpoint)."
    )


def barrier(name, timeout=None):
    """Wait until every process reaches the barrier ``name`` (no-op in a
    single process). Every process must call barriers in the same order.

    Raises:
        ProcessLostError: a process failed or did not arrive within
            ``timeout`` seconds (default: the ``timeout`` given to
            ``initialize_multi_client``).
    """
    if not is_multi_client():
        return
    barrier_id = _next_id(f"barrier/{name}")
    try:
        _dtensor.wait_at_barrier(barrier_id, _timeout_ms(timeout))
    except Exception as err:
        raise process_lost_error(f"Barrier {name!r}", err) from err


def broadcast(name, make_value, timeout=None):
    """``make_value()`` (a string) computed on process 0 and returned on
    every process."""
    if not is_multi_client():
        return make_value()
    key = _next_id(f"broadcast/{name}")
    if is_chief():
        value = make_value()
        _dtensor.publish(key, value)
        return value
    try:
        return _dtensor.fetch(key, _timeout_ms(timeout))
    except Exception as err:
        raise process_lost_error(f"Waiting for process 0 ({name})", err) from err


def run_on_chief(name, function, *, error=RuntimeError, timeout=None):
    """Run ``function()`` on process 0 only; every process returns its
    (JSON-serializable) result, or raises if it failed there.

    Process 0 re-raises its own exception; the others raise ``error`` with
    process 0's message. When ``error`` is a TfshardError class and process
    0's exception one of its kind, the others raise the very same error
    (its class, message and errno), so a job reports one error, not one per
    process; otherwise the message is prefixed with ``name`` and the
    exception's type. In a single process this is just ``function()``.
    """
    if not is_multi_client():
        return function()
    key = _next_id(f"chief/{name}")
    if is_chief():
        try:
            result = function()
        except BaseException as err:
            if isinstance(err, error) and issubclass(error, TfshardError):
                kind = type(err)
                report = {"same": str(err), "kind": [kind.__module__, kind.__qualname__],
                          "errno": getattr(err, "errno", None)}
            else:
                report = {"error": f"{type(err).__name__}: {err}"}
            _dtensor.publish(key, json.dumps(report))
            raise
        _dtensor.publish(key, json.dumps({"result": result}))
        return result
    try:
        message = json.loads(_dtensor.fetch(key, _timeout_ms(timeout)))
    except Exception as err:
        raise process_lost_error(f"Waiting for process 0 ({name})", err) from err
    if "same" in message:
        raise _same_error(message, error)
    if "error" in message:
        raise error(f"{name} failed on process 0: {message['error']}")
    return message["result"]


def _same_error(report, error):
    """Process 0's tfshard error, rebuilt from its report: its own class when
    that is a tfshard class of kind ``error``, else ``error``."""
    import importlib

    module, name = report.get("kind") or (None, None)
    kind = error
    if module and module.split(".")[0] == "tfshard":
        found = getattr(importlib.import_module(module), name, None)
        if isinstance(found, type) and issubclass(found, error):
            kind = found
    rebuilt = kind(report["same"])
    if report.get("errno") is not None:
        rebuilt.errno = report["errno"]
    return rebuilt


def failures(name, message=None, *, timeout=None):
    """Every process reports its part of step ``name``: ``message`` (a
    string) if it failed, None if not. Returns ``{process: message}`` of the
    processes that failed, the same dict on every process, so each can
    raise the same error. It is also a barrier. In a single process:
    ``{0: message}`` or ``{}``."""
    if not is_multi_client():
        return {} if message is None else {0: message}
    base = _next_id(f"failures/{name}")
    try:
        _dtensor.publish(f"{base}/{client_id()}", json.dumps(message))
    except Exception as err:
        raise process_lost_error(f"Reporting {name!r}", err) from err
    barrier(name, timeout)
    reports = {}
    for other in range(num_clients()):
        try:
            reports[other] = json.loads(_dtensor.fetch(f"{base}/{other}", _timeout_ms(timeout)))
        except Exception as err:
            raise process_lost_error(f"Reading the status of {name!r}", err) from err
    return {other: text for other, text in reports.items() if text is not None}


def all_succeeded(name, failure=None, *, error=RuntimeError, timeout=None):
    """Every process reports whether its part of step ``name`` failed
    (``failure``: the exception, or None); if any did, every process raises.

    The process that failed re-raises its own exception; the others raise
    ``error`` naming the processes and their messages. It is also a barrier.
    In a single process it just re-raises ``failure``.
    """
    if not is_multi_client():
        if failure is not None:
            raise failure
        return
    base = _next_id(f"status/{name}")
    status = "ok" if failure is None else f"{type(failure).__name__}: {failure}"
    try:
        _dtensor.publish(f"{base}/{client_id()}", status)
    except Exception as err:
        raise process_lost_error(f"Reporting {name!r}", err) from err
    barrier(name, timeout)
    reports = {}
    for other in range(num_clients()):
        try:
            reports[other] = _dtensor.fetch(f"{base}/{other}", _timeout_ms(timeout))
        except Exception as err:
            raise process_lost_error(f"Reading the status of {name!r}", err) from err
    if failure is not None:
        raise failure
    failed = {other: message for other, message in reports.items() if message != "ok"}
    if failed:
        details = "; ".join(f"process {c}: {m}" for c, m in sorted(failed.items()))
        raise error(f"{name} failed on another process: {details}")


# ------------------------------------------------------ per-process input
_CONTEXTS = weakref.WeakKeyDictionary()  # strategy -> its InputContext (tfshard._process_input)


def input_context(strategy) -> InputContext:
    """The :class:`InputContext` of this process for ``strategy``'s mesh."""
    cached = _CONTEXTS.get(strategy)
    if cached is not None:
        return cached
    if not is_multi_client() or strategy.data_axis is None:
        context = InputContext(1, 0, strategy.data_parallel_size)
    else:
        positions = data_positions(strategy)
        dp = strategy.data_parallel_size
        mine = positions.get(client_id(), [])
        sizes = {len(p) for p in positions.values()}
        aligned = len(sizes) == 1 and all(
            p == list(range(p[0], p[0] + len(p))) and p[0] % len(p) == 0
            for p in positions.values()
        )
        if not mine or not aligned:
            raise MultiClientError(
                f"Per-process input needs every process to hold an equal, "
                f"contiguous block of data axis {strategy.data_axis!r} "
                f"(positions per process: {positions}). Order the mesh so the "
                "data axis comes first (the default device order does this), "
                "or feed every process the global batches."
            )
        local = len(mine)
        context = InputContext(dp // local, mine[0] // local, local)
    _CONTEXTS[strategy] = context
    return context


