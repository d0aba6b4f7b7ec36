"""Restoring a checkpoint (:func:`restore_checkpoint`, re-exported by
:mod:`tfshard.checkpoint`): validated against the model and checked on disk
before any variable is touched, then read onto whatever mesh and layout the
model has.
"""

from __future__ import annotations

import os
import warnings

import tensorflow as tf

from tfshard import _checkpoint_files as files
from tfshard import _checkpoint_store as store
from tfshard import _checkpoint_variables as variable_set
from tfshard import _dtensor, multi_client
from tfshard.errors import CheckpointError, CheckpointMismatchError
from tfshard.training import strategy_of_model


class _Dependencies(tf.__internal__.tracking.Trackable):
    """Stands in for an object in a restore, with a chosen set of its
    checkpoint dependencies. Restoring through it binds nothing to the real
    object, so checkpoint values the restore skips (the optimizer's, for a
    model restored without it) are not kept as deferred restorations that
    would fire when the model later gets an optimizer."""

    def __init__(self, children):
        self._tfshard_children = dict(children)

    def _trackable_children(self, save_type="checkpoint", **kwargs):
        return dict(self._tfshard_children)


def _limited(names, limit=20):
    names = list(names)
    if len(names) <= limit:
        return ", ".join(names)
    return ", ".join(names[:limit]) + f", ... ({len(names) - limit} more)"


def _compare(saved, live, what):
    """Problems between saved manifest entries and live entries, by key."""
    saved_by_key = {e["key"]: e for e in saved}
    live_by_key = {e.key: e for e in live}
    missing = [e.path for e in live if e.key not in saved_by_key]
    unexpected = [e["path"] for e in saved if e["key"] not in live_by_key]
    lines = []
    if missing:
        lines.append(f"  in the {what} but not in the checkpoint: {_limited(missing)}")
    if unexpected:
        lines.append(f"  in the checkpoint but not in the {what}: {_limited(unexpected)}")
    shapes, dtypes = [], []
    for e in live:
        s = saved_by_key.get(e.key)
        if s is None:
            continue
        if list(s["shape"]) != e.shape:
            shapes.append(e.path)
            lines.append(
                f"  shape mismatch: {e.path}: checkpoint {tuple(s['shape'])}, "
                f"{what} {tuple(e.shape)}"
            )
        if s["dtype"] != e.dtype:
            dtypes.append(e.path)
            lines.append(f"  dtype mismatch: {e.path}: checkpoint {s['dtype']}, {what} {e.dtype}")
    return missing, unexpected, shapes, dtypes, lines


def _raise_mismatch(path, model, problems, hint):
    missing, unexpected, shapes, dtypes, lines = problems
    raise CheckpointMismatchError(
        f"Checkpoint {path!r} does not match model {model.name!r}; the model "
        "was not changed:\n" + "\n".join(lines) + "\n" + hint,
        missing=missing,
        unexpected=unexpected,
        shape_mismatches=shapes,
        dtype_mismatches=dtypes,
    )


def restore_checkpoint(model, directory_or_path, *, weights_only=False, verify=True):
    """Restore ``model`` from a checkpoint, onto whatever mesh and layout
    the model has (or into a plain model).

    Args:
        model: a built Keras model, sharded or plain.
        directory_or_path: a ``ckpt-<step>`` directory, or a checkpoint
            directory (its latest committed checkpoint is used).
        weights_only: restore the model's weights and leave its optimizer
            alone. Otherwise the optimizer state is restored too when both
            the model and the checkpoint have one (the optimizer is built
            first if it has no slots yet).
        verify: check every variable file's CRC-32 against the manifest
            before reading (one more read of the files). Their presence and
            sizes are always checked.

    Returns:
        The path of the checkpoint restored.

    Raises:
        CheckpointNotFoundError: no committed checkpoint there.
        CheckpointMismatchError: the checkpoint is another model's (missing or
            extra variables, other shapes or dtypes). The model is unchanged.
        CheckpointError: the checkpoint is corrupt or incomplete (a missing,
            truncated or changed file, a malformed manifest); the message
            names the file and the next newest committed checkpoint. Found
            before the read, the model is unchanged; a read that fails
            anyway (an I/O error) may leave it partly restored.
    """
    variable_set.check_model(model, "restore_checkpoint")
    if not tf.executing_eagerly():
        raise CheckpointError("restore_checkpoint must run eagerly, not inside a tf.function.")
    strategy = strategy_of_model(model)
    path = store.resolve(directory_or_path)
    manifest = store.read_manifest(path)
    saved_model = [e for e in manifest["variables"] if e["group"] == "model"]
    saved_optimizer = [e for e in manifest["variables"] if e["group"] == "optimizer"]

    model_entries = variable_set.model_entries(model)
    problems = _compare(saved_model, model_entries, "model")
    if any(problems[:4]):
        _raise_mismatch(
            path,
            model,
            problems,
            "Restore into a model built by the same code (the same layers, in "
            "the same order, with the same shapes and dtypes); sharding and "
            "mesh may differ.",
        )

    optimizer = None if weights_only else variable_set.optimizer_of(model)
    if optimizer is not None and not saved_optimizer:
        warnings.warn(
            f"Checkpoint {path!r} holds no optimizer state; the optimizer of "
            f"model {model.name!r} keeps its current state.",
            stacklevel=2,
        )
        optimizer = None
    if optimizer is not None:
        variable_set.build_optimizer(model, strategy)
        live = variable_set.optimizer_entries(model, model_entries)
        problems = _compare(saved_optimizer, live, "optimizer")
        if any(problems[:4]):
            _raise_mismatch(
                path,
                model,
                problems,
                f"The checkpoint's optimizer ({(manifest.get('optimizer') or {}).get('class')}) "
                f"does not match the model's ({type(optimizer).__name__}). Compile "
                "the model with the same optimizer, or pass weights_only=True to "
                "restore the weights alone.",
            )

    opt = variable_set.optimizer_of(model)
    model_children = {
        name: child
        for name, child in tf.train.TrackableView.children(model).items()
        if opt is None or child is not opt
    }
    root_children = {"model": _Dependencies(model_children)}
    if optimizer is not None:
        root_children["optimizer"] = optimizer
    root = tf.train.Checkpoint(**root_children)
    prefix = manifest.get("variables_prefix", store.VARIABLES_PREFIX)
    if not isinstance(prefix, str) or not prefix or os.sep in prefix:
        raise store.corrupt(path, store.MANIFEST, f"has variables_prefix={prefix!r}, not a file name prefix")

    def check_files():  # on process 0 only: one read of a shared directory
        try:
            problem = files.file_problem(path, manifest, prefix, checksums=verify)
        except OSError as err:
            problem = (os.path.basename(err.filename or "") or None, f"cannot be read ({err.strerror})")
        if problem is not None:
            raise store.corrupt(path, *problem)

    multi_client.run_on_chief("restore_checkpoint (check files)", check_files, error=CheckpointError)
    try:
        if strategy is not None:
            _dtensor.complete_collective_groups(strategy.mesh._dtensor_mesh)  # as for a save
        with variable_set.scope_of(strategy):
            status = root.read(os.path.join(path, prefix))
        error = variable_set.settle(strategy)  # DTensor reads asynchronously: wait for the values
    except Exception as err:  # TensorFlow's read error: worded below
        variable_set.settle(strategy)
        error = err
    if error is not None:
        raise store.corrupt(path, *files.read_problem(error, path, prefix), unchanged=False) from error
    status.expect_partial()  # skipped parts (e.g. the optimizer) are intended
    return path
