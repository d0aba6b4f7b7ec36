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


class CheckpointError(TfshardError):
    """A checkpoint cannot be written or read as asked: a bad argument, a
    missing, corrupt or incomplete checkpoint, or a failed write."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No committed checkpoint where one was expected."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint does not fit the model it is restored into.

    ``missing`` (in the model, not in the checkpoint), ``unexpected`` (in the
    checkpoint, not in the model), ``shape_mismatches`` and
    ``dtype_mismatches`` hold the Keras paths at fault.
    """

    def __init__(
        self, message, missing=(), unexpected=(), shape_mismatches=(), dtype_mismatches=()
    ):
        super().__init__(message)
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.shape_mismatches = list(shape_mismatches)
        self.dtype_mismatches = list(dtype_mismatches)


class CheckpointWriteError(CheckpointError, OSError):
    """A save could not write its files: no space left, a file-size limit,
    permissions, a read-only file system, an I/O error. Also an ``OSError``
    (``errno`` is set when the cause is known). Nothing was committed and
    the previous checkpoint is still the latest."""

    def __init__(self, message, errno=None):
        super().__init__(message)
        self.errno = errno


class ProcessLostError(RuntimeError):
    """Another process of a multi-client job died or cannot be reached, so
    this process cannot continue (its collectives would never complete)."""


# Bookkeeping TensorFlow wraps around an error's own words.
_TF_NOISE = (
    r"\{\{function_node [^}]*\}\}",
    r"\[\[[^\]]*\]\]",
    r"\d+ root error\(s\) found\.?",
    r"\(\d+\) [A-Z_]+:",
    r"\[Op:[^\]]*\]( name: \S*)?",
    r"Encountered when executing an operation using EagerExecutor\.[^\n]*",
    r"The error could be from a previous operation\.[^\n]*",
)


def plain_message(error, limit=300):
    """The first sentence of ``error``'s own words, without TensorFlow's
    bookkeeping (function names, node lists, root-error counts, op names),
    on one line: the cause to quote inside a tfshard error."""
    import re

    text = getattr(error, "message", None) or str(error)
    for pattern in _TF_NOISE:
        text = re.sub(pattern, " ", text)
    lines = [" ".join(line.split()) for line in text.splitlines()]
    line = next((line for line in lines if line.strip(" .;:")), "") or type(error).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."
