"""The files of a checkpoint: what tfshard records and checks about them,
and how it words their failures (used by :mod:`tfshard.checkpoint`).

* The manifest is validated when it is read: JSON, an object, the keys
  tfshard needs, each of the right type.
* A save records each variable file's size and CRC-32 in the manifest. A
  restore checks them before it touches the model, so a missing, truncated
  or corrupt file is found and named while the model is still unchanged.
  (TensorFlow checks each tensor's checksum too, but only as it assigns the
  variables, and by then it may have changed some of them.) The cost is one
  more read of the files at save and at restore.
* A failure TensorFlow or the OS reports while writing or reading becomes
  plain words: the cause (no space, a file-size limit, permissions...),
  the file when it is known, and the fix.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import uuid
import zlib

from tfshard.errors import plain_message

MANIFEST = "manifest.json"
_CHUNK = 1 << 22
_VARIABLE_FILE = re.compile(r"variables\.(index|data-\d{5}-of-\d{5})")

# key -> (type, what it holds), for the manifest and each of its variables.
_MANIFEST_KEYS = {
    "format": (str, "the format name"),
    "format_version": (int, "the format version"),
    "step": (int, "the step"),
    "variables": (list, "the variable list"),
}
_VARIABLE_KEYS = {"key": str, "group": str, "path": str, "shape": list, "dtype": str}


# ------------------------------------------------------------- the manifest
def manifest_problem(text):
    """``(manifest, None)`` for a valid manifest's text, else ``(None, what
    is wrong)`` in words (the JSON error and where, a wrong type, the keys
    it lacks)."""
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as err:
        return None, f"is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})"
    if not isinstance(manifest, dict):
        return None, f"holds a JSON {type(manifest).__name__} where an object is expected"
    missing = [key for key in _MANIFEST_KEYS if key not in manifest]
    if missing:
        return None, f"lacks the key(s) {missing}"
    for key, (kind, what) in _MANIFEST_KEYS.items():
        value = manifest[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            return None, f"has {key}={value!r}, not {what} ({kind.__name__})"
    for index, entry in enumerate(manifest["variables"]):
        wrong = (
            [key for key, kind in _VARIABLE_KEYS.items()
             if not isinstance(entry.get(key), kind) and not (key == "path" and entry.get(key) is None)]
            if isinstance(entry, dict) else ["(not an object)"]
        )
        if wrong:
            return None, f"has a malformed variables[{index}] (bad or missing {wrong})"
    files = manifest.get("files")
    if files is not None and not (
        isinstance(files, dict)
        and all(isinstance(r, dict) and isinstance(r.get("bytes"), int) for r in files.values())
    ):
        return None, "has a malformed 'files' record"
    return manifest, None


# ------------------------------------------------------------ file records
def _crc32(path):
    crc = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            crc = zlib.crc32(chunk, crc)
    return crc


def file_records(directory):
    """``{name: {"bytes": size, "crc32": checksum}}`` of the variable files
    (``variables.index``, ``variables.data-*``) in ``directory``."""
    return {
        name: {"bytes": os.path.getsize(os.path.join(directory, name)),
               "crc32": _crc32(os.path.join(directory, name))}
        for name in sorted(os.listdir(directory))
        if _VARIABLE_FILE.fullmatch(name)
    }


def _expected_files(directory, prefix):
    """The variable files a checkpoint written before records were kept
    needs: the index and every data shard its shard names count."""
    names = set(os.listdir(directory))
    counts = {int(m.group(1)) for n in names if (m := re.fullmatch(rf"{prefix}\.data-\d{{5}}-of-(\d{{5}})", n))}
    wanted = [f"{prefix}.index"]
    for count in sorted(counts):
        wanted += [f"{prefix}.data-{i:05d}-of-{count:05d}" for i in range(count)]
    if not counts:
        wanted.append(f"{prefix}.data-00000-of-00001")
    return wanted


def file_problem(directory, manifest, prefix, *, checksums=True):
    """``(file, what is wrong)`` for the first missing, truncated or
    corrupt variable file of a checkpoint, or None when all are intact."""
    records = manifest.get("files")
    if records is None:  # an older checkpoint: existence only
        for name in _expected_files(directory, prefix):
            if not os.path.isfile(os.path.join(directory, name)):
                return name, "is missing"
        return None
    for name, record in records.items():
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            return name, "is missing"
        size = os.path.getsize(path)
        if size != record["bytes"]:
            kind = "truncated" if size < record["bytes"] else "longer than written"
            return name, f"has {size} bytes where the save wrote {record['bytes']} ({kind})"
    if checksums:
        for name, record in records.items():
            if "crc32" in record and _crc32(os.path.join(directory, name)) != record["crc32"]:
                return name, "fails its CRC-32 check: its bytes changed after the save"
    return None


def read_problem(error, directory, prefix):
    """``(file, what is wrong)`` for a failed read of the variable files,
    from TensorFlow's error (the file is None when it does not say)."""
    text = str(error)
    match = _VARIABLE_FILE.search(text)
    name = match.group(0) if match else None
    shard = re.search(r"TensorBundle at \S+ shard (\d+)", text)
    if name is None and shard:  # "shard 2" of the data files
        wanted = f"{prefix}.data-{int(shard.group(1)):05d}-of-"
        name = next((n for n in sorted(os.listdir(directory)) if n.startswith(wanted)), None)
    if "Failed to find any matching files" in text or "Unsuccessful TensorSliceReader" in text:
        return name or f"{prefix}.index", "is missing"
    if "Read less bytes than requested" in text or "truncated" in text.lower():
        return name, "is truncated"
    if "Checksum does not match" in text or "checksum" in text.lower():
        return name, "fails its checksum (its bytes changed after the save)"
    if isinstance(error, FileNotFoundError) or type(error).__name__ == "NotFoundError":
        return name, "is missing"
    return name, f"cannot be read: {plain_message(error)}"


# --------------------------------------------------------- write failures
# errno -> (the cause in words, the fix); matched on OSError.errno or on
# the OS's own text inside TensorFlow's message.
_CAUSES = {
    errno.ENOSPC: ("no space left on the device", "free space there or save to another directory"),
    errno.EDQUOT: ("the disk quota is exceeded", "free space in your quota or save elsewhere"),
    errno.EFBIG: (
        "a file would exceed the process's file-size limit (ulimit -f) or the file "
        "system's largest file",
        "raise the limit (ulimit -f unlimited) or save to another file system",
    ),
    errno.EACCES: ("permission denied", "make the directory writable or save elsewhere"),
    errno.EPERM: ("operation not permitted", "make the directory writable or save elsewhere"),
    errno.EROFS: ("the file system is read-only", "save to a writable directory"),
    errno.EIO: ("an input/output error (EIO) on the storage", "check the device and save again"),
}


def write_cause(error):
    """``(cause in words, errno or None, fix)`` of a failed write."""
    code = getattr(error, "errno", None) if isinstance(error, OSError) else None
    if code not in _CAUSES:
        text = str(error)
        code = next((c for c in _CAUSES if os.strerror(c) in text), None)
    if code is None and type(error).__name__ == "PermissionDeniedError":
        code = errno.EACCES
    if code is None:
        return plain_message(error), None, "check the directory and save again"
    cause, fix = _CAUSES[code]
    return cause, code, fix


def write_preflight(directory, largest_file, total_bytes):
    """Why writing a checkpoint into ``directory`` is bound to fail here, as
    ``(cause, errno, fix)``, or None: a file-size limit below the largest
    file this process writes (``largest_file`` bytes), less free space than
    the checkpoint's ``total_bytes``, or a directory it cannot write."""
    probe = os.path.join(directory, f".probe-{uuid.uuid4().hex}")  # unique across hosts
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 512)
        os.remove(probe)
    except OSError as err:
        return write_cause(err)
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    except (ImportError, OSError, ValueError):  # not a POSIX system
        limit = None
    if limit is not None and limit != getattr(resource, "RLIM_INFINITY", -1) and limit < largest_file:
        cause, fix = _CAUSES[errno.EFBIG]
        return f"{cause} (a file of up to {largest_file} bytes; the limit is {limit})", errno.EFBIG, fix
    free = shutil.disk_usage(directory).free
    if free < total_bytes:
        cause, fix = _CAUSES[errno.ENOSPC]
        return f"{cause} ({free} bytes free, the checkpoint needs about {total_bytes})", errno.ENOSPC, fix
    return None
