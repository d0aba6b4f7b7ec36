"""The checkpoint directory: committed ``ckpt-<step>`` checkpoints, how they
are listed and resolved, their manifest read and validated, and the file
operations that keep a save atomic (fsync, rename out of the namespace
before deleting, clean-up of what interrupted saves leave). Used by
:mod:`tfshard.checkpoint` (see its docstring for the format); the files
inside one checkpoint are :mod:`tfshard._checkpoint_files`'.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid

from tfshard import _checkpoint_files as files
from tfshard._version import __version__
from tfshard.errors import CheckpointError, CheckpointNotFoundError

FORMAT = "tfshard.checkpoint"
FORMAT_VERSION = 1
MANIFEST = files.MANIFEST
COMMIT_MARKER = "COMMITTED"
VARIABLES_PREFIX = "variables"

_CKPT_DIR = re.compile(r"^ckpt-(\d+)$")
TMP_PREFIX = ".tmp-ckpt-"
TRASH_PREFIX = ".trash-ckpt-"


def fsync(path, directory=False):
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


def fsync_tree(root):
    for dirpath, _, filenames in os.walk(root):
        for filename in filenames:
            fsync(os.path.join(dirpath, filename))
        fsync(dirpath, directory=True)


def write_file(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def step_of(name):
    match = _CKPT_DIR.match(name)
    return int(match.group(1)) if match else None


def is_committed(path):
    return os.path.isfile(os.path.join(path, COMMIT_MARKER))


def list_checkpoints(directory):
    """Paths of the committed checkpoints in ``directory``, oldest (lowest
    step) first. Uncommitted or partial saves are not listed."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        step = step_of(name)
        path = os.path.join(directory, name)
        if step is not None and os.path.isdir(path) and is_committed(path):
            found.append((step, path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(directory):
    """The committed checkpoint with the highest step in ``directory``, or
    ``None`` if there is none."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


def remove(path):
    """Delete a directory: first renamed out of the ``ckpt-*`` namespace (so
    a crash midway never leaves a half-deleted checkpoint that looks
    committed), then removed."""
    parent, name = os.path.split(path)
    trash = os.path.join(parent, f"{TRASH_PREFIX}{name}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, trash)
    except OSError:
        trash = path
    shutil.rmtree(trash, ignore_errors=True)


def clean_up(directory):
    """Remove what interrupted saves and deletions left behind."""
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if not os.path.isdir(path):
            continue
        if name.startswith((TMP_PREFIX, TRASH_PREFIX)):
            shutil.rmtree(path, ignore_errors=True)
        elif step_of(name) is not None and not is_committed(path):
            remove(path)


def prune(directory, max_to_keep, keep):
    if max_to_keep is None:
        return
    committed = list_checkpoints(directory)
    old = [p for p in committed[: max(len(committed) - max_to_keep, 0)] if p != keep]
    for path in old:
        remove(path)


def older_than(path):
    """The committed checkpoint saved just before ``path`` (the next newest
    beside it), or None."""
    parent, name = os.path.split(os.path.normpath(path))
    step = step_of(name)
    older = [p for p in list_checkpoints(parent) if step is None or step_of(os.path.basename(p)) < step]
    return older[-1] if older else None


def corrupt(path, file, problem, *, unchanged=True):
    """The CheckpointError for a corrupt or incomplete checkpoint at
    ``path``: the file at fault, the problem, the model's state and the
    next newest committed checkpoint to use instead."""
    older = older_than(path)
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
        raise corrupt(path, MANIFEST, "is not UTF-8 text") from None
    except OSError as err:
        raise corrupt(path, MANIFEST, f"cannot be read ({err.strerror})") from None
    manifest, problem = files.manifest_problem(text)
    if problem is not None:
        raise corrupt(path, MANIFEST, problem)
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


def resolve(directory_or_path):
    """A committed checkpoint directory from a checkpoint or parent path."""
    path = os.fspath(directory_or_path)
    if not os.path.isdir(path):
        raise CheckpointNotFoundError(
            f"No checkpoint at {path!r}: it does not exist or is not a directory."
        )
    if is_committed(path):
        return path
    name = os.path.basename(os.path.normpath(path))
    if os.path.isfile(os.path.join(path, MANIFEST)) or step_of(name) is not None:
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
