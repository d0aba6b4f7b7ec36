"""Sharded, atomic checkpoints that restore onto any mesh.

    tfshard.save_checkpoint(model, "ckpts")            # -> "ckpts/ckpt-<step>"
    tfshard.restore_checkpoint(model, "ckpts")         # the latest committed one

What a checkpoint holds
    ``<directory>/ckpt-<step>/`` contains a TensorFlow object-based checkpoint
    (``variables.index`` and ``variables.data-*``) of the model and its
    optimizer (slots and iteration count), a JSON ``manifest.json`` (every
    variable's key, Keras path, global shape, dtype and spec; the mesh; the
    tfshard/Keras/TensorFlow versions; the step) and, last, a ``COMMITTED``
    marker.

Sharded writes, resharding reads
    The variables are written by ``tf.train.Checkpoint``. For a DTensor
    variable, DTensor expands the save so that each device writes its own
    shard (one copy of each distinct shard; replicas do not write twice), and
    expands the restore so that each device reads only the slice its target
    layout needs. So a checkpoint saved on one mesh and layout restores onto
    any other, and into a plain Keras model, and a plain model's checkpoint
    restores into a sharded one; no host assembles the whole model. tfshard
    does not reimplement any of this; it adds atomicity, validation and the
    manifest around it.

Atomic commits
    A save writes into ``<directory>/.tmp-ckpt-...``, fsyncs it, renames it to
    ``ckpt-<step>`` and then writes the ``COMMITTED`` marker (fsynced). Only
    directories with the marker count: an interrupted or failed save is never
    the latest checkpoint, leaves the previous ones intact, and its remains
    are deleted by the next save. ``max_to_keep`` deletes the oldest committed
    checkpoints only after the new one is committed. The latest checkpoint is
    the committed one with the highest step. One job writes to a
    directory at a time.

Several processes (multi-client)
    In a multi-client job every process calls ``save_checkpoint`` and
    ``restore_checkpoint`` (they are collective). Each process writes its own
    devices' shards into the same temporary directory (a shared file system
    across hosts); process 0 alone cleans up, creates the temporary
    directory, and, once every process reports its shards written, writes
    the manifest, renames and commits. The other processes wait for each of
    these steps and raise if it failed anywhere. A plain (unsharded) model is
    written by process 0. The checkpoint does not record the process count:
    one saved by 2 processes restores in 1, and the other way round.

Broken storage
    A save records each variable file's size and CRC-32 in the manifest. A
    restore validates the manifest and checks the files against it before
    any variable is touched: a missing, truncated or changed file, or a
    malformed manifest, raises CheckpointError naming the checkpoint, the
    file and the next newest committed checkpoint, with the model
    unchanged. A write that fails (no space, a file-size limit, permissions,
    an I/O error) raises CheckpointWriteError (also an OSError) naming the
    directory and the cause; nothing is committed, the temporary directory
    is removed and the previous checkpoint stays the latest. Either way the
    process keeps working: TensorFlow's and DTensor's error state from the
    failed op is cleared (see ``_dtensor.settle``). In a
    multi-client job every process raises the same error, and a write bound
    to fail on any process is refused on all before it starts: DTensor's
    save ends in a collective without a timeout, which a process whose
    write failed midway could not complete (its peers would wait for ever;
    such a failure, after the checks passed, remains possible).

Validation before restore
    The manifest is compared with the model before any variable is touched.
    Missing or extra variables and shape or dtype differences raise
    :class:`CheckpointMismatchError` (a ``ValueError``) that lists the
    offending Keras paths, and the model keeps its values. Variables are
    matched by their place in the object graph (attribute names and list
    positions, as ``tf.train.Checkpoint`` matches them), not by their Keras
    names, so auto-generated layer names (``dense_3``) do not matter.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid

import keras
import numpy as np
import tensorflow as tf

from tfshard import _checkpoint_files as files
from tfshard import _checkpoint_store as store
from tfshard import _checkpoint_variables as variable_set
from tfshard import _dtensor, multi_client
from tfshard._checkpoint_restore import restore_checkpoint
from tfshard._checkpoint_store import latest_checkpoint, list_checkpoints, read_manifest
from tfshard._version import __version__
from tfshard.errors import (
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointWriteError,
)
from tfshard.training import strategy_of_model

__all__ = [
    "save_checkpoint",
    "restore_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "read_manifest",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CheckpointMismatchError",
    "CheckpointWriteError",
]

# Test hooks: name -> callable(path), run at the named point of a save.
# "written": the temporary directory is complete, before the rename.
# "renamed": renamed to ckpt-<step>, before the commit marker is written.
_HOOKS = {}


def _versions():
    return {
        "tfshard": __version__,
        "keras": keras.version(),
        "tensorflow": tf.__version__,
    }


def _mesh_json(strategy):
    if strategy is None:
        return None
    mesh = strategy.mesh
    return {
        "axes": {name: int(size) for name, size in zip(mesh.axis_names, mesh.shape)},
        "device_type": mesh.device_type,
        "data_axis": strategy.data_axis,
        "tensor_axis": strategy.tensor_axis,
    }


def _default_step(model, directory):
    optimizer = variable_set.optimizer_of(model)
    iterations = getattr(optimizer, "iterations", None)
    if iterations is not None:
        return int(np.asarray(iterations.numpy()))
    latest = store.latest_checkpoint(directory)
    return 0 if latest is None else store.step_of(os.path.basename(latest)) + 1


def _check_count(name, value, minimum):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise CheckpointError(f"{name} must be an int >= {minimum} or None, got {value!r}.")
    return int(value)


def _run_hook(name, path):
    hook = _HOOKS.get(name)
    if hook is not None:
        hook(path)


def save_checkpoint(model, directory, step=None, max_to_keep=None, *, metadata=None):
    """Save ``model`` (weights and optimizer state) as ``directory/ckpt-<step>``.

    Args:
        model: a built Keras model, sharded or plain. Its optimizer, if it has
            one, is built first so that its slots are saved.
        directory: the checkpoint directory (created if needed).
        step: the checkpoint's number. Defaults to the optimizer's iteration
            count, or, without an optimizer, one more than the latest step.
        max_to_keep: keep at most this many committed checkpoints; the oldest
            are deleted once the new one is committed. ``None`` keeps all.
        metadata: a JSON-serializable dict stored in the manifest
            (``read_manifest(path)["metadata"]``).

    Returns:
        The path of the committed checkpoint directory.
    """
    variable_set.check_model(model, "save_checkpoint")
    if not tf.executing_eagerly():
        raise CheckpointError(
            "save_checkpoint must run eagerly, not inside a tf.function; call "
            "it between training steps (e.g. from a Keras callback)."
        )
    max_to_keep = _check_count("save_checkpoint(max_to_keep=...)", max_to_keep, 1)
    strategy = strategy_of_model(model)
    directory = os.fspath(directory)
    step = _check_count("save_checkpoint(step=...)", step, 0)
    # In a multi-client job every process runs this function; process 0
    # alone changes the directory (clean-up, temp dir, rename, marker,
    # pruning) and every process writes its own devices' shards in between.
    # run_on_chief and failures are the barriers that order them. A failure
    # anywhere raises the same CheckpointWriteError on every process.
    chief = multi_client.is_chief()
    if step is None:
        step = _default_step(model, directory)  # the same on every process
    final = os.path.join(directory, f"ckpt-{step}")

    def prepare():
        with _write_errors(directory, final, store.latest_checkpoint(directory)):
            os.makedirs(directory, exist_ok=True)
            store.clean_up(directory)
        if os.path.exists(final):
            raise CheckpointError(
                f"Checkpoint {final!r} already exists. Pass another step= to "
                "save_checkpoint, or delete the old checkpoint first."
            )
        return store.latest_checkpoint(directory)

    previous = multi_client.run_on_chief("save_checkpoint (prepare)", prepare, error=CheckpointError)

    variable_set.build_optimizer(model, strategy)
    model_entries = variable_set.model_entries(model)
    entries = model_entries + variable_set.optimizer_entries(model, model_entries)
    optimizer = variable_set.optimizer_of(model)
    manifest = {
        "format": store.FORMAT,
        "format_version": store.FORMAT_VERSION,
        "step": step,
        "created": time.time(),
        "versions": _versions(),
        "mesh": _mesh_json(strategy),
        "model": {"name": model.name, "class": type(model).__name__},
        "optimizer": None
        if optimizer is None
        else {"name": optimizer.name, "class": type(optimizer).__name__},
        "variables_prefix": store.VARIABLES_PREFIX,
        "variables": [e.to_json() for e in entries],
        "metadata": metadata if metadata is not None else {},
    }
    json.dumps(manifest)  # fail before writing anything

    def make_tmp():
        path = os.path.join(directory, f"{store.TMP_PREFIX}{step}-{uuid.uuid4().hex[:8]}")
        with _write_errors(directory, final, previous):
            os.mkdir(path)
        return path

    tmp = multi_client.run_on_chief("save_checkpoint (temp dir)", make_tmp, error=CheckpointError)
    renamed = False

    def commit():
        try:
            _commit()
        except BaseException:
            store.remove(final if renamed else tmp)  # before the others hear of it
            raise

    def _commit():
        nonlocal renamed
        with _write_errors(directory, final, previous):
            # Each variable file's size and checksum, for restore to check.
            manifest["files"] = files.file_records(tmp)
            store.write_file(os.path.join(tmp, store.MANIFEST), json.dumps(manifest, indent=1))
            store.fsync_tree(tmp)
            _run_hook("written", tmp)
            os.rename(tmp, final)
            renamed = True
            store.fsync(directory, directory=True)
            _run_hook("renamed", final)
            # The marker appears whole or not at all (written aside, renamed).
            marker = os.path.join(final, store.COMMIT_MARKER)
            store.write_file(marker + ".tmp", json.dumps({"step": step}) + "\n")
            os.rename(marker + ".tmp", marker)
            store.fsync(final, directory=True)

    try:
        tracked = {"model": model}
        if optimizer is not None:
            tracked["optimizer"] = optimizer
        root = tf.train.Checkpoint(**tracked)
        cause = None
        if strategy is not None and multi_client.is_multi_client():
            # DTensor's save ends in a collective over every process, with
            # no timeout: a process whose write failed could not complete
            # it and the others would wait for ever. So a write bound to
            # fail (a file-size limit, too little space, no permission) is
            # refused on every process before it starts.
            try:
                manifest_bytes = len(json.dumps(manifest, indent=1)) if chief else 0
                largest = max(_device_bytes(entries, strategy), manifest_bytes)
                cause = files.write_preflight(tmp, largest, sum(_global_bytes(e) for e in entries))
            except Exception as err:  # reported like a failed check, on every process
                cause = files.write_cause(err)
            failed = multi_client.failures("save_checkpoint (preflight)", cause)
            if failed:
                raise _write_error(directory, final, previous, failed, tmp=tmp)
        # Sharded variables: each process writes its devices' shards. A
        # plain model is whole in every process: process 0 writes it.
        if strategy is not None or chief:
            cause = _write_variables(root, os.path.join(tmp, store.VARIABLES_PREFIX), strategy)
        # Every process's shards are on disk before process 0 commits.
        failed = multi_client.failures("save_checkpoint (write)", cause)
        if failed:
            raise _write_error(directory, final, previous, failed, tmp=tmp)
        multi_client.run_on_chief("save_checkpoint (commit)", commit, error=CheckpointError)
    except BaseException:
        if chief:
            store.remove(final if renamed else tmp)
        raise
    if chief:
        store.prune(directory, max_to_keep, keep=final)
    return final


def _global_bytes(entry):
    return int(np.prod(entry.shape, dtype=np.int64)) * tf.as_dtype(entry.dtype).size


def _device_bytes(entries, strategy):
    """Bytes of one device's shards of every variable: at most what one
    device writes into its data file."""
    total = 0
    for e in entries:
        parts = 1
        for axis in e.spec or ():
            parts *= strategy.mesh.axis_size(axis) if axis else 1
        total += _global_bytes(e) // parts
    return total


def _write_variables(root, prefix, strategy):
    """Write the variable files; returns None, or the failure's
    ``[cause in words, errno, fix]`` (it is sent to the other processes)."""
    try:
        if strategy is not None:
            # A failed write must not cancel the save's collective group for
            # good: form it first (see _dtensor.complete_collective_groups).
            _dtensor.complete_collective_groups(strategy.mesh._dtensor_mesh)
        with variable_set.scope_of(strategy):
            root.write(prefix)
        error = variable_set.settle(strategy)
    except Exception as err:  # TensorFlow's or the OS's: worded below
        variable_set.settle(strategy)
        error = err
    return None if error is None else list(files.write_cause(error))


def _write_error(directory, final, previous, failed, tmp=None):
    """The CheckpointWriteError of a save that failed on the processes in
    ``failed`` ({process: [cause, errno, fix]}): the same on every process.
    With ``tmp``, process 0 first removes that temporary directory, and
    every process waits for it, so that what the error says holds when any
    process raises it."""
    if tmp is not None:
        if multi_client.is_chief():
            store.remove(tmp)
        multi_client.barrier("save_checkpoint (cleaned up)")
    causes = sorted(failed.items())
    (_, (cause, code, fix)) = causes[0]
    if not multi_client.is_multi_client():
        where = ""
    elif len({c for _, (c, _, _) in causes}) == 1:
        every = len(causes) == multi_client.num_clients()
        where = " on every process" if every else " on process " + ", ".join(str(r) for r, _ in causes)
    else:
        where = ""
        cause = "; ".join(f"process {r}: {c}" for r, (c, _, _) in causes)
    still = (
        f"the latest checkpoint is still {previous!r}" if previous
        else "there is no committed checkpoint there yet"
    )
    return CheckpointWriteError(
        f"save_checkpoint: writing {os.path.basename(final)} in {directory!r} failed{where}: "
        f"{cause}. Nothing was committed and its temporary files are removed; {still}. "
        f"To save, {fix}.",
        errno=code,
    )


@contextlib.contextmanager
def _write_errors(directory, final, previous):
    """An OSError in this block becomes a CheckpointWriteError."""
    try:
        yield
    except OSError as err:
        if isinstance(err, CheckpointError):
            raise
        raise _write_error(directory, final, previous, {0: list(files.write_cause(err))}) from err
