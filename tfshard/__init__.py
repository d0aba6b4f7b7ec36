"""tfshard: tensor-parallel Keras 3 layers and training on TensorFlow DTensor.

The names a newcomer needs are here (``__all__``, at most 20); the rest live
in submodules:

* ``tfshard.errors``: every exception (``MeshError``, ``ShardingError``,
  ``StrategyError``, ``CheckpointError`` ...; all are ``TfshardError``);
* ``tfshard.layout``: specs and logical rules (``KEEP``, ``LogicalRules``,
  ``validate_spec``) and the glossary;
* ``tfshard.styles``: parallel styles; ``tfshard.plans``: plans;
* ``tfshard.auto_plan``: ``AutoPlan`` and ``check_plan`` (``tfshard.auto_plan``
  itself is the function that makes a plan for a model);
* ``tfshard.checkpoint``: ``latest_checkpoint``, ``list_checkpoints``,
  ``read_manifest``;
* ``tfshard.interop``: ``keras.distribution`` on TensorFlow
  (``enable_keras_distribution``, ``builder_from_keras`` ...);
* ``tfshard.multi_client``: several processes (``input_context``,
  ``barrier`` ...);
* ``tfshard.comm``: collectives counted from DTensor's program;
* ``tfshard.report``: per-device tables of layouts and bytes.

The application (the ``tfshard`` command, its configs, reference models and
benchmarks) is ``tfshard.app``, which this package never imports.

Compatibility: the names that used to be top-level (the error classes,
``KEEP``, ``LogicalRules``, ``validate_spec``, ``latest_checkpoint``,
``list_checkpoints``, ``read_manifest``, ``enable_keras_distribution``,
``interop``, ``comm``, ``multi_client``, and ``layout_of``, the former name
of ``spec_of``) stay importable from ``tfshard`` as before, without a
warning, but are not in ``__all__``: new code imports them from their
submodule.
"""

import os as _os
import sys as _sys

if "keras" not in _sys.modules:
    _os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from tfshard import _native_logs  # noqa: E402

_native_logs.import_tensorflow()  # so that TF_CPP_MIN_LOG_LEVEL holds from the start

from tfshard import _keras  # noqa: E402,F401  (checks versions first)
from tfshard._version import __version__  # noqa: E402
from tfshard.errors import TfshardError  # noqa: E402
from tfshard.mesh import Mesh, use_virtual_devices  # noqa: E402
from tfshard.multi_client import initialize_multi_client  # noqa: E402
from tfshard.strategy import Strategy, StrategyBuilder, current_strategy  # noqa: E402
from tfshard import styles  # noqa: E402
from tfshard import plans  # noqa: E402,F401
from tfshard.plans import Plan  # noqa: E402
from tfshard import hooks as _hooks  # noqa: E402
from tfshard import _ops  # noqa: E402
from tfshard.tensors import local_shape, spec_of, to_numpy  # noqa: E402
from tfshard import layers  # noqa: E402
from tfshard import losses  # noqa: E402
from tfshard import training as _training  # noqa: E402
from tfshard import callbacks  # noqa: E402
from tfshard.checkpoint import restore_checkpoint, save_checkpoint  # noqa: E402
from tfshard import interop  # noqa: E402
from tfshard.auto_plan import auto_plan  # noqa: E402

# Former top-level names, kept importable (see the module docstring).
from tfshard import comm, multi_client  # noqa: E402,F401
from tfshard.checkpoint import latest_checkpoint, list_checkpoints, read_manifest  # noqa: E402,F401
from tfshard.errors import (  # noqa: E402,F401
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    MeshError,
    MultiClientError,
    ProcessLostError,
    ShardingError,
    StrategyError,
    UnsupportedFeatureError,
    VirtualDeviceError,
)
from tfshard.interop import enable_keras_distribution  # noqa: E402
from tfshard.layout import KEEP, LogicalRules, validate_spec  # noqa: E402,F401
from tfshard.tensors import layout_of  # noqa: E402,F401

_hooks.install()
_ops.install()
_training.install()
enable_keras_distribution()  # keras.distribution acts on TensorFlow through tfshard

__all__ = [
    "__version__",
    # devices and strategies
    "Mesh",
    "use_virtual_devices",
    "StrategyBuilder",
    "Strategy",
    "current_strategy",
    # how layers are split
    "Plan",
    "auto_plan",
    "styles",
    "layers",
    "losses",
    # sharded values
    "spec_of",
    "local_shape",
    "to_numpy",
    # training and checkpoints
    "callbacks",
    "save_checkpoint",
    "restore_checkpoint",
    # several processes
    "initialize_multi_client",
    # errors (every kind is in tfshard.errors)
    "TfshardError",
]
