"""tfshard: tensor-parallel Keras 3 layers and training on TensorFlow DTensor."""

import os as _os
import sys as _sys

if "keras" not in _sys.modules:
    _os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from tfshard import _keras  # noqa: E402,F401  (checks versions first)
from tfshard._version import __version__  # noqa: E402
from tfshard.errors import (  # noqa: E402
    MeshError,
    ShardingError,
    StrategyError,
    TfshardError,
    VirtualDeviceError,
    MultiClientError,
    ProcessLostError,
    UnsupportedFeatureError,
)
from tfshard.layout import KEEP, LogicalRules, validate_spec  # noqa: E402
from tfshard.mesh import Mesh, use_virtual_devices  # noqa: E402
from tfshard import multi_client  # noqa: E402
from tfshard.multi_client import initialize_multi_client  # noqa: E402
from tfshard.strategy import Strategy, StrategyBuilder, current_strategy  # noqa: E402
from tfshard import hooks as _hooks  # noqa: E402
from tfshard import _ops  # noqa: E402
from tfshard.tensors import layout_of, local_shape, to_numpy  # noqa: E402
from tfshard import layers  # noqa: E402
from tfshard import losses  # noqa: E402
from tfshard import comm  # noqa: E402
from tfshard import training as _training  # noqa: E402
from tfshard import callbacks  # noqa: E402
from tfshard.checkpoint import (  # noqa: E402
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    latest_checkpoint,
    list_checkpoints,
    read_manifest,
    restore_checkpoint,
    save_checkpoint,
)

from tfshard import interop  # noqa: E402
from tfshard.interop import enable_keras_distribution  # noqa: E402

_hooks.install()
_ops.install()
_training.install()
enable_keras_distribution()  # keras.distribution acts on TensorFlow through tfshard

__all__ = [
    "__version__",
    "Mesh",
    "use_virtual_devices",
    "Strategy",
    "StrategyBuilder",
    "current_strategy",
    "layout_of",
    "local_shape",
    "to_numpy",
    "layers",
    "interop",
    "enable_keras_distribution",
    "losses",
    "comm",
    "callbacks",
    "save_checkpoint",
    "restore_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "read_manifest",
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "KEEP",
    "LogicalRules",
    "validate_spec",
    "TfshardError",
    "MeshError",
    "ShardingError",
    "StrategyError",
    "VirtualDeviceError",
    "MultiClientError",
    "ProcessLostError",
    "UnsupportedFeatureError",
    "multi_client",
    "initialize_multi_client",
]
