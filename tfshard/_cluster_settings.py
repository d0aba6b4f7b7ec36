"""The settings of a multi-client job, read and checked: each from its
argument to :func:`tfshard.initialize_multi_client` or else from its
environment variable (what ``tfshard launch`` and cluster schedulers set),
both set and different being an error; the result is a :class:`ClusterSpec`.
Nothing here starts TensorFlow (see :mod:`tfshard.multi_client`).
"""

from __future__ import annotations

import dataclasses
import os
import re

from tfshard import _dtensor
from tfshard.errors import MultiClientError

ENV_CLIENT_ID = "DTENSOR_CLIENT_ID"
ENV_NUM_CLIENTS = "DTENSOR_NUM_CLIENTS"
ENV_JOB_NAME = "DTENSOR_JOB_NAME"
ENV_JOBS = "DTENSOR_JOBS"
ENV_DEVICES_PER_PROCESS = "TFSHARD_DEVICES_PER_PROCESS"
ENV_DEVICE_TYPE = "TFSHARD_DEVICE_TYPE"
ENV_NCCL = "DTENSOR_GPU_USE_NCCL_COMMUNICATION"

_DEVICE_TYPES = ("CPU", "GPU", "TPU")
_JOB_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_ADDRESS = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-/]+):(?P<port>\d+)$")

# Default waits (seconds) for coordination between processes. A dead process
# is normally noticed much sooner: its peers' gRPC calls are refused.
DEFAULT_TIMEOUT = 600.0


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """The multi-client job this process belongs to."""

    client_id: int
    num_clients: int
    job_name: str
    jobs: tuple
    device_type: str
    devices_per_process: int
    seed: int | None
    timeout: float

    @property
    def is_chief(self) -> bool:
        """Process 0: it writes logs, metrics and checkpoint commits."""
        return self.client_id == 0

    @property
    def multi_client(self) -> bool:
        return self.num_clients > 1


def _env(name):
    value = os.environ.get(name)
    return None if value is None or value.strip() == "" else value.strip()


def _as_int(name, value, source):
    if isinstance(value, bool):
        raise MultiClientError(f"{name}={value!r} ({source}) must be an integer.")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise MultiClientError(
            f"{name}={value!r} ({source}) is not an integer."
        ) from None


def _pick(name, argument, env_name, convert=lambda v, source: v):
    """The argument, else the environment variable; both set and different
    is an error (a launcher and the code disagree about the cluster)."""
    env_value = _env(env_name)
    if argument is not None:
        value = convert(argument, f"argument {name}")
        if env_value is not None and convert(env_value, f"${env_name}") != value:
            raise MultiClientError(
                f"initialize_multi_client({name}={argument!r}) contradicts the "
                f"environment variable {env_name}={env_value!r}. Pass the "
                f"argument or set the variable, not both (or make them agree)."
            )
        return value
    if env_value is not None:
        return convert(env_value, f"${env_name}")
    return None


def _parse_jobs(value, source):
    if isinstance(value, str):
        items = [item.strip() for item in value.split(",")]
    else:
        try:
            items = [str(item).strip() for item in value]
        except TypeError:
            raise MultiClientError(
                f"jobs={value!r} ({source}) must be a list of 'host:port' "
                "strings or a comma-separated string."
            ) from None
    items = [item for item in items if item]
    for item in items:
        match = _ADDRESS.match(item)
        if not match or not 0 < int(match.group("port")) < 65536:
            raise MultiClientError(
                f"jobs entry {item!r} ({source}) is not 'host:port' with a port "
                "in 1..65535, e.g. '10.0.0.1:12345' or 'localhost:12345'."
            )
    duplicates = sorted({item for item in items if items.count(item) > 1})
    if duplicates:
        raise MultiClientError(
            f"jobs ({source}) lists {duplicates} more than once; every process "
            "needs its own host:port."
        )
    return tuple(items)


def _resolve_device_type(device_type):
    if device_type is None:
        return _dtensor.preferred_device_type()
    kind = str(device_type).upper()
    if kind not in _DEVICE_TYPES:
        raise MultiClientError(
            f"device_type={device_type!r} is not one of {_DEVICE_TYPES}."
        )
    return kind


def _resolve_devices(device_type, devices_per_process):
    """How many devices of ``device_type`` this process brings."""
    if device_type == "CPU":
        if devices_per_process is None:
            return 1
        return devices_per_process
    present = _dtensor.physical_device_count(device_type)
    if present == 0:
        raise MultiClientError(
            f"device_type={device_type!r} but this process sees no "
            f"{device_type}. Check the drivers and CUDA_VISIBLE_DEVICES, or use "
            "device_type='CPU'."
        )
    if devices_per_process is None:
        return present
    if device_type == "TPU" and devices_per_process != present:
        raise MultiClientError(
            f"devices_per_process={devices_per_process} but this host has "
            f"{present} TPU cores; DTensor meshes on TPU use every core. Leave "
            "devices_per_process unset."
        )
    if devices_per_process > present:
        raise MultiClientError(
            f"devices_per_process={devices_per_process} but this process sees "
            f"only {present} {device_type}(s)."
        )
    return devices_per_process


def _check_timeout(name, value):
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise MultiClientError(f"{name}={value!r} must be a positive number of seconds or None.")
    return int(value * 1000)


def resolve(client_id, num_clients, jobs, job_name, devices_per_process, device_type, seed,
            timeout, heartbeat_timeout, connect_timeout, shutdown_timeout):
    """The :class:`ClusterSpec` and the coordination service's timeouts
    ``(heartbeat_ms, connect_ms, shutdown_ms)`` (0: TensorFlow's default)
    of :func:`tfshard.initialize_multi_client`'s arguments, each ``None``
    one read from its environment variable.

    Raises:
        MultiClientError: a malformed, contradictory or out-of-range setting.
    """
    jobs = _pick("jobs", jobs, ENV_JOBS, _parse_jobs) or ()
    num_clients = _pick(
        "num_clients", num_clients, ENV_NUM_CLIENTS, lambda v, s: _as_int("num_clients", v, s)
    )
    client_id = _pick(
        "client_id", client_id, ENV_CLIENT_ID, lambda v, s: _as_int("client_id", v, s)
    )
    job_name = _pick("job_name", job_name, ENV_JOB_NAME, lambda v, s: str(v))
    devices_per_process = _pick(
        "devices_per_process",
        devices_per_process,
        ENV_DEVICES_PER_PROCESS,
        lambda v, s: _as_int("devices_per_process", v, s),
    )
    device_type = _pick("device_type", device_type, ENV_DEVICE_TYPE, lambda v, s: str(v).upper())

    if num_clients is None:
        num_clients = max(len(jobs), 1)
    if num_clients < 1:
        raise MultiClientError(f"num_clients={num_clients} must be at least 1.")
    if num_clients > 1 and not jobs:
        raise MultiClientError(
            f"num_clients={num_clients} but no jobs are given: pass jobs=[...] "
            f"or set {ENV_JOBS}='host0:port,host1:port,...' with one host:port "
            "per process (the same list in every process)."
        )
    if jobs and len(jobs) != num_clients:
        raise MultiClientError(
            f"num_clients={num_clients} but jobs lists {len(jobs)} processes "
            f"({', '.join(jobs)}); give one host:port per process."
        )
    if client_id is None:
        if num_clients > 1:
            raise MultiClientError(
                f"This process is one of {num_clients} but does not know which: "
                f"pass client_id= or set {ENV_CLIENT_ID} (0 .. {num_clients - 1})."
            )
        client_id = 0
    if not 0 <= client_id < num_clients:
        raise MultiClientError(
            f"client_id={client_id} is out of range for num_clients={num_clients}; "
            f"use 0 .. {num_clients - 1}."
        )
    if job_name is None:
        job_name = "worker" if num_clients > 1 else "localhost"
    if not _JOB_NAME.match(job_name):
        raise MultiClientError(
            f"job_name={job_name!r} must start with a letter and contain only "
            "letters, digits, '_' and '-'."
        )
    if devices_per_process is not None and devices_per_process < 1:
        raise MultiClientError(
            f"devices_per_process={devices_per_process} must be at least 1."
        )
    heartbeat_ms = _check_timeout("heartbeat_timeout", heartbeat_timeout)
    connect_ms = _check_timeout("connect_timeout", connect_timeout)
    shutdown_ms = _check_timeout("shutdown_timeout", shutdown_timeout)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise MultiClientError(f"timeout={timeout!r} must be a positive number of seconds.")
    if seed is not None:
        seed = _as_int("seed", seed, "argument seed")
    device_type = _resolve_device_type(device_type)
    devices = _resolve_devices(device_type, devices_per_process)

    spec = ClusterSpec(
        client_id=client_id,
        num_clients=num_clients,
        job_name=job_name,
        jobs=tuple(jobs),
        device_type=device_type,
        devices_per_process=devices,
        seed=seed,
        timeout=float(timeout),
    )
    return spec, (heartbeat_ms, connect_ms, shutdown_ms)
