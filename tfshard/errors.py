"""Exceptions raised by tfshard.

Every error that comes from bad user input is a ``ValueError`` subclass, so
``except ValueError`` keeps working for callers that do not care about the
finer kinds. Each message names the thing at fault, the value, and the fix.
"""


class TfshardError(ValueError):
    """Base class of tfshard's input errors."""


class MeshError(TfshardError):
    """A mesh cannot be built: bad axes, or not the devices it needs."""


class ShardingError(TfshardError):
    """A layout spec does not fit a tensor or a mesh.

    ``kind`` classifies it for callers that act on it (None when not
    classified): ``INDIVISIBLE`` when mesh axis ``axis`` (of ``axis_size``
    devices) cannot split a size evenly; ``dim`` is the tensor dimension,
    when the size is one.
    """

    INDIVISIBLE = "indivisible"

    def __init__(self, message, *, kind=None, axis=None, axis_size=None, dim=None):
        super().__init__(message)
        self.kind = kind
        self.axis = axis
        self.axis_size = axis_size
        self.dim = dim


class VirtualDeviceError(TfshardError, RuntimeError):
    """Virtual devices were requested after TensorFlow had started.

    Also a ``RuntimeError``, because the cause is the order of calls.
    """


class StrategyError(TfshardError):
    """A strategy is built or used in a way that cannot work."""


class MultiClientError(TfshardError):
    """Multi-client (multi-process) settings are missing, malformed or
    contradict each other, or are applied too late."""


class UnsupportedFeatureError(TfshardError, NotImplementedError):
    """A request tfshard does not support (yet). Also a
    ``NotImplementedError``, so ``except NotImplementedError`` still works."""


class ProcessLostError(RuntimeError):
    """Another process of a multi-client job died or cannot be reached, so
    this process cannot continue (its collectives would never complete)."""
