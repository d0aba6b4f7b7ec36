"""Device meshes with named axes, and virtual CPU devices for testing."""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np
import tensorflow as tf

from tfshard import _dtensor
from tfshard.errors import MeshError, VirtualDeviceError

_DEVICE_PREFERENCE = ("TPU", "GPU", "CPU")
_AXIS_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def use_virtual_devices(n: int) -> None:
    """Split the host CPU into ``n`` logical devices.

    Must run before TensorFlow initializes its runtime (before the first op,
    tensor, or device listing). Calling it again with the same ``n`` is
    harmless; calling it too late with another ``n`` raises
    :class:`VirtualDeviceError`.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise MeshError(
            f"use_virtual_devices(n): n must be a positive int, got {n!r}."
        )
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if current is not None and len(current) == n:
        return
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(n)]
        )
    except RuntimeError as err:
        have = len(tf.config.list_logical_devices("CPU"))
        if have == n:
            return
        raise VirtualDeviceError(
            f"use_virtual_devices({n}): TensorFlow has already started with "
            f"{have} CPU device(s), and virtual devices cannot change after "
            "that. Call tfshard.use_virtual_devices(n) first thing in your "
            "program (or in tests/conftest.py, or the first notebook cell), "
            "before any TensorFlow op runs, or restart the process."
        ) from err


def detect_device_type() -> str:
    """The preferred accelerator type present: TPU, then GPU, then CPU."""
    for kind in _DEVICE_PREFERENCE:
        if tf.config.list_logical_devices(kind):
            return kind
    return "CPU"


def _num_clients() -> int:
    """Processes in the DTensor job (1 unless multi-client was initialized)."""
    if not _dtensor.accelerator_system_initialized():
        return 1
    return _dtensor.num_clients()


def _normalize_device(name: str, device_type: str) -> str:
    spec = tf.DeviceSpec.from_string(name)
    if spec.device_type is None:
        raise MeshError(
            f"Mesh: device {name!r} names no device type; write it as "
            f"'{device_type}:0' or as a full name '/job:.../device:{device_type}:0'."
        )
    if spec.device_type.upper() != device_type:
        raise MeshError(
            f"Mesh: device {name!r} is a {spec.device_type} device but the "
            f"mesh is of type {device_type}; a mesh uses one device type."
        )
    full = tf.DeviceSpec(
        job=spec.job or _dtensor.job_name(),
        replica=spec.replica if spec.replica is not None else 0,
        task=spec.task if spec.task is not None else 0,
        device_type=device_type,
        device_index=spec.device_index if spec.device_index is not None else 0,
    )
    return full.to_string()


class Mesh:
    """A grid of devices with named axes, e.g. ``Mesh({"batch": 2, "model": 4})``.

    Args:
        axes: ordered mapping of axis name to size (or a sequence of
            ``(name, size)`` pairs). The product of the sizes is the number of
            devices.
        devices: device names, row-major over ``axes``. Defaults to the first
            ``size`` logical devices of ``device_type``.
        device_type: "CPU", "GPU" or "TPU". Detected when omitted: TPU is
            preferred, then GPU, then CPU.
    """

    def __init__(self, axes, devices=None, device_type=None):
        pairs = self._validate_axes(axes)
        self._axis_names = tuple(name for name, _ in pairs)
        self._shape = tuple(size for _, size in pairs)
        self._size = int(np.prod(self._shape))

        if device_type is None:
            if devices:
                kind = tf.DeviceSpec.from_string(str(devices[0])).device_type
                device_type = kind or detect_device_type()
            else:
                device_type = detect_device_type()
        device_type = str(device_type).upper()
        if device_type not in _DEVICE_PREFERENCE:
            raise MeshError(
                f"Mesh: device_type={device_type!r} is not one of "
                f"{_DEVICE_PREFERENCE}."
            )
        self._device_type = device_type

        clients = _num_clients()
        if devices is None and clients > 1:
            devices = self._global_devices(device_type, clients)
        elif devices is None:
            available = _dtensor.logical_devices(device_type)
            if len(available) < self._size:
                hint = (
                    f"call tfshard.use_virtual_devices({self._size}) first "
                    "thing in your program, before TensorFlow starts"
                    if device_type == "CPU"
                    else "use a smaller mesh or a machine with more devices"
                )
                raise MeshError(
                    f"Mesh {self._describe_axes()} needs {self._size} "
                    f"{device_type} devices, but only {len(available)} are "
                    f"visible; {hint}."
                )
            devices = available[: self._size]
        else:
            if clients > 1:
                missing = [d for d in devices if tf.DeviceSpec.from_string(str(d)).task is None]
                if missing:
                    raise MeshError(
                        f"Mesh: in a multi-client job every device must name its "
                        f"process, e.g. '/job:worker/task:1/device:{device_type}:0'; "
                        f"got {missing[0]!r}."
                    )
            devices = [_normalize_device(str(d), device_type) for d in devices]
            if len(devices) != self._size:
                raise MeshError(
                    f"Mesh {self._describe_axes()} has {self._size} positions "
                    f"but devices= lists {len(devices)}; pass exactly "
                    f"{self._size} devices or change the axis sizes."
                )
            if len(set(devices)) != len(devices):
                raise MeshError(
                    f"Mesh: devices= lists a device twice: {devices}."
                )
        self._devices = tuple(devices)
        local = None if clients == 1 else self._local_indices(clients)
        self._local_devices = (
            self._devices if local is None else tuple(self._devices[i] for i in local)
        )
        self._dtensor_mesh = _dtensor.make_mesh(
            self._axis_names, self._shape, self._devices, device_type, local
        )

    def _global_devices(self, device_type, clients):
        """Default devices of a multi-client mesh: the first size/clients
        devices of every process, process 0's first (so the first mesh axis,
        usually the data axis, splits across processes)."""
        if self._size % clients:
            raise MeshError(
                f"Mesh {self._describe_axes()} has {self._size} devices, which "
                f"cannot be spread evenly over the {clients} processes of this "
                f"job; use a mesh whose size is a multiple of {clients}."
            )
        per_process = self._size // clients
        available = _dtensor.logical_devices(device_type)  # this process's only
        if len(available) < per_process:
            # TensorFlow lists every process's devices in a multi-client job.
            in_job = max(len(tf.config.list_logical_devices(device_type)), len(available))
            raise MeshError(
                f"Mesh {self._describe_axes()} has {self._size} devices: it needs "
                f"{per_process} {device_type} devices in each of the {clients} "
                f"processes of this job, but this process has {len(available)} "
                f"and the job {in_job} in all. Start every process with "
                f"{per_process} devices (tfshard launch --devices-per-process "
                f"{per_process}, or initialize_multi_client(devices_per_process="
                f"{per_process})), or use a mesh of at most {in_job} devices."
            )
        return [
            name
            for task in range(clients)
            for name in _dtensor.device_names(device_type, per_process, task)
        ]

    def _local_indices(self, clients):
        """Mesh positions whose device belongs to this process."""
        here = _dtensor.task_name() + "/"
        local = [i for i, d in enumerate(self._devices) if d.startswith(here)]
        if len(local) * clients != self._size:
            raise MeshError(
                f"Mesh {self._describe_axes()}: this process holds {len(local)} of "
                f"its {self._size} devices; in a job of {clients} processes each "
                f"must hold {self._size // clients}."
            )
        return local

    @staticmethod
    def _validate_axes(axes):
        if isinstance(axes, Mapping):
            pairs = list(axes.items())
        else:
            try:
                pairs = [tuple(p) for p in axes]
            except TypeError:
                raise MeshError(
                    f"Mesh: axes must be a dict of axis name -> size, e.g. "
                    f'{{"batch": 2, "model": 4}}; got {axes!r}.'
                ) from None
            if any(len(p) != 2 for p in pairs):
                raise MeshError(
                    f"Mesh: axes must be (name, size) pairs; got {axes!r}."
                )
        if not pairs:
            raise MeshError(
                'Mesh: axes is empty; give at least one axis, e.g. {"batch": 8}.'
            )
        seen = set()
        for name, size in pairs:
            if not isinstance(name, str) or not name:
                raise MeshError(
                    f"Mesh: axis name {name!r} must be a non-empty string."
                )
            if not _AXIS_NAME.match(name):
                raise MeshError(
                    f"Mesh: axis name {name!r} must be an identifier "
                    "(letters, digits, underscore)."
                )
            if name in seen:
                raise MeshError(
                    f"Mesh: axis name {name!r} is used twice; axis names "
                    "must be unique."
                )
            seen.add(name)
            if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
                raise MeshError(
                    f"Mesh: axis {name!r} has size {size!r}; sizes must be "
                    "positive integers."
                )
        return [(name, int(size)) for name, size in pairs]

    def _describe_axes(self):
        return "{" + ", ".join(
            f'"{n}": {s}' for n, s in zip(self._axis_names, self._shape)
        ) + "}"

    @property
    def shape(self) -> tuple:
        return self._shape

    @property
    def axis_names(self) -> tuple:
        return self._axis_names

    @property
    def size(self) -> int:
        return self._size

    @property
    def devices(self) -> tuple:
        return self._devices

    @property
    def local_devices(self) -> tuple:
        """The devices of this mesh that belong to this process (all of them
        outside a multi-client job)."""
        return self._local_devices

    @property
    def device_type(self) -> str:
        return self._device_type

    @property
    def axes(self) -> dict:
        return dict(zip(self._axis_names, self._shape))

    def axis_size(self, name: str) -> int:
        if name not in self._axis_names:
            raise MeshError(
                f"Mesh has no axis {name!r}; its axes are "
                f"{list(self._axis_names)}."
            )
        return self._shape[self._axis_names.index(name)]

    def __eq__(self, other):
        return (
            isinstance(other, Mesh)
            and self.axes == other.axes
            and self._axis_names == other._axis_names
            and self._devices == other._devices
        )

    def __hash__(self):
        return hash((self._axis_names, self._shape, self._devices))

    def __repr__(self):
        return f"Mesh({self._describe_axes()}, device_type={self._device_type!r})"
