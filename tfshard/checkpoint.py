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

import collections
import contextlib
import json
import os
import re
import shutil
import time
import uuid
import warnings

import keras
import numpy as np
import tensorflow as tf

from tfshard import _checkpoint_files as files
from tfshard import _dtensor, multi_client
from tfshard._version import __version__
from tfshard.errors import (
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointWriteError,
)
from tfshard.strategy import current_strategy
from tfshard.tensors import spec_of
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

FORMAT = "tfshard.checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
COMMIT_MARKER = "COMMITTED"
VARIABLES_PREFIX = "variables"

_CKPT_DIR = re.compile(r"^ckpt-(\d+)$")
_TMP_PREFIX = ".tmp-ckpt-"
_TRASH_PREFIX = ".trash-ckpt-"

# Test hooks: name -> callable(path), run at the named point of a save.
# "written": the temporary directory is complete, before the rename.
# "renamed": renamed to ckpt-<step>, before the commit marker is written.
_HOOKS = {}


# ------------------------------------------------------- the variable set
class _Entry:
    """One variable of a model or optimizer, keyed by its object-graph path."""

    __slots__ = ("key", "group", "variable", "path", "shape", "dtype", "spec")

    def __init__(self, key, group, variable):
        self.key = key
        self.group = group
        self.variable = variable
        self.path = getattr(variable, "path", None) or variable.name
        self.shape = [int(d) for d in variable.shape]
        self.dtype = tf.as_dtype(variable.dtype).name
        spec = spec_of(variable)
        self.spec = None if spec is None else list(spec)

    def to_json(self):
        return {
            "key": self.key,
            "group": self.group,
            "path": self.path,
            "shape": self.shape,
            "dtype": self.dtype,
            "spec": self.spec,
        }


def _is_variable(obj):
    return isinstance(obj, (keras.Variable, tf.Variable))


def _name_order(name):
    # List positions in numeric order ("2" before "10"), then names.
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def _walk(root, prefix, group, skip_ids):
    """Every variable reachable from ``root`` through checkpoint
    dependencies, breadth first (shortest path wins, ties by name), keyed by
    the path of dependency names from ``root``. Objects in ``skip_ids`` are
    neither visited nor recorded."""
    entries = []
    recorded = set()
    visited = {id(root)}
    queue = collections.deque([(root, prefix)])
    while queue:
        obj, path = queue.popleft()
        children = tf.train.TrackableView.children(obj)
        for name in sorted(children, key=_name_order):
            child = children[name]
            if id(child) in skip_ids:
                continue
            child_path = f"{path}/{name}"
            if _is_variable(child):
                if id(child) not in recorded:
                    recorded.add(id(child))
                    entries.append(_Entry(child_path, group, child))
                continue
            if id(child) not in visited:
                visited.add(id(child))
                queue.append((child, child_path))
    return entries


def _optimizer_of(model):
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or not isinstance(optimizer, tf.__internal__.tracking.Trackable):
        return None
    return optimizer


def _model_entries(model):
    optimizer = _optimizer_of(model)
    skip = {id(optimizer)} if optimizer is not None else set()
    return _walk(model, "model", "model", skip)


def _optimizer_entries(model, model_entries):
    optimizer = _optimizer_of(model)
    if optimizer is None:
        return []
    skip = {id(e.variable) for e in model_entries}
    return _walk(optimizer, "optimizer", "optimizer", skip)


def _scope_of(strategy):
    if strategy is None or current_strategy() is strategy:
        return contextlib.nullcontext()
    return strategy.scope()


def _build_optimizer(model, strategy):
    """Create the optimizer's slots (inside the model's strategy, so they
    take their parameters' layouts) if it has none yet."""
    optimizer = _optimizer_of(model)
    if optimizer is not None and not getattr(optimizer, "built", True):
        with _scope_of(strategy):
            optimizer.build(model.trainable_variables)


def _check_model(model, action):
    if not isinstance(model, keras.layers.Layer):
        raise CheckpointError(
            f"{action}: expected a Keras model, got {type(model).__name__}."
        )
    if not model.weights:
        raise CheckpointError(
            f"{action}: model {model.name!r} has no variables yet. Build it "
            "first (give it a keras.Input, call model.build(shape), or call "
            "it on a batch), inside strategy.scope() for a sharded model."
        )


# ------------------------------------------------------------ the files
def _fsync(path, directory=False):
    flags = os.O_RDONLY
    if directory:
        flags |= getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:  # e.g. Windows cannot open directories
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:  # some file systems cannot fsync directories
            raise
    finally:
        os.close(fd)


def _fsync_tree(root):
    for dirpath, _, filenames in os.walk(root):
        for filename in filenames:
            _fsync(os.path.join(dirpath, filename))
        _fsync(dirpath, directory=True)


def _write_file(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _step_of(name):
    match = _CKPT_DIR.match(name)
    return int(match.group(1)) if match else None


def _is_committed(path):
    return os.path.isfile(os.path.join(path, COMMIT_MARKER))


def list_checkpoints(directory):
    """Paths of the committed checkpoints in ``directory``, oldest (lowest
    step) first. Uncommitted or partial saves are not listed."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        step = _step_of(name)
        path = os.path.join(directory, name)
        if step is not None and os.path.isdir(path) and _is_committed(path):
            found.append((step, path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(directory):
    """The committed checkpoint with the highest step in ``directory``, or
    ``None`` if there is none."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


def _remove(path):
    """Delete a directory: first renamed out of the ``ckpt-*`` namespace (so
    a crash midway never leaves a half-deleted checkpoint that looks
    committed), then removed."""
    parent, name = os.path.split(path)
    trash = os.path.join(parent, f"{_TRASH_PREFIX}{name}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, trash)
    except OSError:
        trash = path
    shutil.rmtree(trash, ignore_errors=True)


def _clean_up(directory):
    """Remove what interrupted saves and deletions left behind."""
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if not os.path.isdir(path):
            continue
        if name.startswith((_TMP_PREFIX, _TRASH_PREFIX)):
            shutil.rmtree(path, ignore_errors=True)
        elif _step_of(name) is not None and not _is_committed(path):
            _remove(path)


def _prune(directory, max_to_keep, keep):
    if max_to_keep is None:
        return
    committed = list_checkpoints(directory)
    old = [p for p in committed[: max(len(committed) - max_to_keep, 0)] if p != keep]
    for path in old:
        _remove(path)


def _older_than(path):
    """The committed checkpoint saved just before ``path`` (the next newest
    beside it), or None."""
    parent, name = os.path.split(os.path.normpath(path))
    step = _step_of(name)
    older = [p for p in list_checkpoints(parent) if step is None or _step_of(os.path.basename(p)) < step]
    return older[-1] if older else None


def _corrupt(path, file, problem, *, unchanged=True):
    """The CheckpointError for a corrupt or incomplete checkpoint at
    ``path``: the file at fault, the problem, the model's state and the
    next newest committed checkpoint to use instead."""
    older = _older_than(path)
    use = (
        f"The next newest committed checkpoint is {older!r}: restore that one "
        f"(restore_checkpoint(model, {older!r})), or delete {path!r} so that it is the latest."
        if older else
        f"There is no older committed checkpoint beside it; delete {path!r} and start afresh."
    )
    state = (
        "The model was not changed. " if unchanged else
        "The model may be partly restored: restore an intact checkpoint before using it. "
    )
    where = os.path.join(path, file) if file else f"one of its variable files in {path!r}"
    return CheckpointError(
        f"Checkpoint {path!r} is corrupt or incomplete: {where} {problem}. {state}{use}"
    )


def read_manifest(path):
    """The manifest (a dict) of a committed checkpoint directory, validated:
    valid JSON, an object with the keys tfshard needs. Raises
    CheckpointError naming the file and the next newest checkpoint."""
    path = os.fspath(path)
    manifest_path = os.path.join(path, MANIFEST)
    try:
        with open(manifest_path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise CheckpointNotFoundError(
            f"{path!r} is not a tfshard checkpoint: it has no {MANIFEST}."
        ) from None
    except UnicodeDecodeError:
        raise _corrupt(path, MANIFEST, "is not UTF-8 text") from None
    except OSError as err:
        raise _corrupt(path, MANIFEST, f"cannot be read ({err.strerror})") from None
    manifest, problem = files.manifest_problem(text)
    if problem is not None:
        raise _corrupt(path, MANIFEST, problem)
    if manifest["format"] != FORMAT:
        raise CheckpointError(
            f"{manifest_path!r} is not a tfshard checkpoint manifest (format "
            f"{manifest['format']!r}, expected {FORMAT!r})."
        )
    if manifest["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"Checkpoint {path!r} has format version {manifest['format_version']}; "
            f"this tfshard ({__version__}) reads versions up to {FORMAT_VERSION}. "
            "Upgrade tfshard to read it."
        )
    return manifest


def _resolve(directory_or_path):
    """A committed checkpoint directory from a checkpoint or parent path."""
    path = os.fspath(directory_or_path)
    if not os.path.isdir(path):
        raise CheckpointNotFoundError(
            f"No checkpoint at {path!r}: it does not exist or is not a directory."
        )
    if _is_committed(path):
        return path
    name = os.path.basename(os.path.normpath(path))
    if os.path.isfile(os.path.join(path, MANIFEST)) or _step_of(name) is not None:
        latest = latest_checkpoint(os.path.dirname(os.path.normpath(path)))
        fix = (
            f"The latest committed checkpoint there is {latest!r}."
            if latest
            else "There is no committed checkpoint beside it."
        )
        raise CheckpointError(
            f"Checkpoint {path!r} was never committed (it has no {COMMIT_MARKER} "
            f"marker): its save was interrupted and it may be incomplete. {fix}"
        )
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointNotFoundError(
            f"No committed checkpoint in {path!r} (looked for ckpt-<step> "
            f"directories with a {COMMIT_MARKER} marker)."
        )
    return latest


# ------------------------------------------------------------------ save
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
    optimizer = _optimizer_of(model)
    iterations = getattr(optimizer, "iterations", None)
    if iterations is not None:
        return int(np.asarray(iterations.numpy()))
    latest = latest_checkpoint(directory)
    return 0 if latest is None else _step_of(os.path.basename(latest)) + 1


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
    _check_model(model, "save_checkpoint")
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
        with _write_errors(directory, final, latest_checkpoint(directory)):
            os.makedirs(directory, exist_ok=True)
            _clean_up(directory)
        if os.path.exists(final):
            raise CheckpointError(
                f"Checkpoint {final!r} already exists. Pass another step= to "
                "save_checkpoint, or delete the old checkpoint first."
            )
        return latest_checkpoint(directory)

    previous = multi_client.run_on_chief("save_checkpoint (prepare)", prepare, error=CheckpointError)

    _build_optimizer(model, strategy)
    model_entries = _model_entries(model)
    entries = model_entries + _optimizer_entries(model, model_entries)
    optimizer = _optimizer_of(model)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "step": step,
        "created": time.time(),
        "versions": _versions(),
        "mesh": _mesh_json(strategy),
        "model": {"name": model.name, "class": type(model).__name__},
        "optimizer": None
        if optimizer is None
        else {"name": optimizer.name, "class": type(optimizer).__name__},
        "variables_prefix": VARIABLES_PREFIX,
        "variables": [e.to_json() for e in entries],
        "metadata": metadata if metadata is not None else {},
    }
    json.dumps(manifest)  # fail before writing anything

    def make_tmp():
        path = os.path.join(directory, f"{_TMP_PREFIX}{step}-{uuid.uuid4().hex[:8]}")
        with _write_errors(directory, final, previous):
            os.mkdir(path)
        return path

    tmp = multi_client.run_on_chief("save_checkpoint (temp dir)", make_tmp, error=CheckpointError)
    renamed = False

    def commit():
        try:
            _commit()
        except BaseException:
            _remove(final if renamed else tmp)  # before the others hear of it
            raise

    def _commit():
        nonlocal renamed
        with _write_errors(directory, final, previous):
            # Each variable file's size and checksum, for restore to check.
            manifest["files"] = files.file_records(tmp)
            _write_file(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=1))
            _fsync_tree(tmp)
            _run_hook("written", tmp)
            os.rename(tmp, final)
            renamed = True
            _fsync(directory, directory=True)
            _run_hook("renamed", final)
            # The marker appears whole or not at all (written aside, renamed).
            marker = os.path.join(final, COMMIT_MARKER)
            _write_file(marker + ".tmp", json.dumps({"step": step}) + "\n")
            os.rename(marker + ".tmp", marker)
            _fsync(final, directory=True)

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
            cause = _write_variables(root, os.path.join(tmp, VARIABLES_PREFIX), strategy)
        # Every process's shards are on disk before process 0 commits.
        failed = multi_client.failures("save_checkpoint (write)", cause)
        if failed:
            raise _write_error(directory, final, previous, failed, tmp=tmp)
        multi_client.run_on_chief("save_checkpoint (commit)", commit, error=CheckpointError)
    except BaseException:
        if chief:
            _remove(final if renamed else tmp)
        raise
    if chief:
        _prune(directory, max_to_keep, keep=final)
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


def _settle(strategy):
    """Wait for the asynchronous ops a save or restore started; clear the
    error state a failed one leaves (so the next op, fit or save works).
    Returns the error a pending op failed with, or None."""
    if strategy is None:
        from tensorflow.python.eager import context

        context.context().clear_executor_errors()
        return None
    return _dtensor.settle(strategy.mesh._dtensor_mesh)


def _write_variables(root, prefix, strategy):
    """Write the variable files; returns None, or the failure's
    ``[cause in words, errno, fix]`` (it is sent to the other processes)."""
    try:
        if strategy is not None:
            # A failed write must not cancel the save's collective group for
            # good: form it first (see _dtensor.complete_collective_groups).
            _dtensor.complete_collective_groups(strategy.mesh._dtensor_mesh)
        with _scope_of(strategy):
            root.write(prefix)
        error = _settle(strategy)
    except Exception as err:  # TensorFlow's or the OS's: worded below
        _settle(strategy)
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
            _remove(tmp)
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


# --------------------------------------------------------------- restore
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
    _check_model(model, "restore_checkpoint")
    if not tf.executing_eagerly():
        raise CheckpointError("restore_checkpoint must run eagerly, not inside a tf.function.")
    strategy = strategy_of_model(model)
    path = _resolve(directory_or_path)
    manifest = read_manifest(path)
    saved_model = [e for e in manifest["variables"] if e["group"] == "model"]
    saved_optimizer = [e for e in manifest["variables"] if e["group"] == "optimizer"]

    model_entries = _model_entries(model)
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

    optimizer = None if weights_only else _optimizer_of(model)
    if optimizer is not None and not saved_optimizer:
        warnings.warn(
            f"Checkpoint {path!r} holds no optimizer state; the optimizer of "
            f"model {model.name!r} keeps its current state.",
            stacklevel=2,
        )
        optimizer = None
    if optimizer is not None:
        _build_optimizer(model, strategy)
        live = _optimizer_entries(model, model_entries)
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

    opt = _optimizer_of(model)
    model_children = {
        name: child
        for name, child in tf.train.TrackableView.children(model).items()
        if opt is None or child is not opt
    }
    root_children = {"model": _Dependencies(model_children)}
    if optimizer is not None:
        root_children["optimizer"] = optimizer
    root = tf.train.Checkpoint(**root_children)
    prefix = manifest.get("variables_prefix", VARIABLES_PREFIX)
    if not isinstance(prefix, str) or not prefix or os.sep in prefix:
        raise _corrupt(path, MANIFEST, f"has variables_prefix={prefix!r}, not a file name prefix")

    def check_files():  # on process 0 only: one read of a shared directory
        try:
            problem = files.file_problem(path, manifest, prefix, checksums=verify)
        except OSError as err:
            problem = (os.path.basename(err.filename or "") or None, f"cannot be read ({err.strerror})")
        if problem is not None:
            raise _corrupt(path, *problem)

    multi_client.run_on_chief("restore_checkpoint (check files)", check_files, error=CheckpointError)
    try:
        if strategy is not None:
            _dtensor.complete_collective_groups(strategy.mesh._dtensor_mesh)  # as for a save
        with _scope_of(strategy):
            status = root.read(os.path.join(path, prefix))
        error = _settle(strategy)  # DTensor reads asynchronously: wait for the values
    except Exception as err:  # TensorFlow's read error: worded below
        _settle(strategy)
        error = err
    if error is not None:
        raise _corrupt(path, *files.read_problem(error, path, prefix), unchanged=False) from error
    status.expect_partial()  # skipped parts (e.g. the optimizer) are intended
    return path
