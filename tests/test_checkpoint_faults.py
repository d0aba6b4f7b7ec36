"""Checkpoints on broken storage.

* Writes that fail (a file-size limit through RLIMIT_FSIZE, a full disk on
  a tiny tmpfs) in fresh processes: a CheckpointWriteError naming the
  directory and the cause, nothing left behind, the previous checkpoint
  still the latest, and the process healthy: the next op, fit and save
  work, and the fits still equal one device. The same in a 2-process job,
  where every process raises the same error.
* Reads of missing, truncated or corrupt files and malformed manifests, in
  this process: a CheckpointError naming the checkpoint, the file and the
  next newest committed checkpoint, with the model unchanged and the
  process healthy.
"""

import json
import os
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
import tfshard
from tfshard.errors import CheckpointError, CheckpointWriteError

import _checkpoint_worker as worker

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "_fault_worker.py")
RAW = ("UnknownError", "InvalidArgumentError", "errors_impl", "MLIR", "root error(s)", "[Op:")
TIMEOUT = 420  # a guard against hangs, not a timing


def subprocess_env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DTENSOR_", "TFSHARD_"))}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, HERE, env.get("PYTHONPATH")) if p)
    return env


def run(command):
    proc = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True,
                          timeout=TIMEOUT, cwd=REPO)
    assert proc.returncode == 0, f"{command} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-5000:]}"
    return proc


def check_record(record, directory, cause, code, where=""):
    steps = record["steps"]
    names = [name for name, _ in steps]
    values = dict((f"{i}:{name}", value) for i, (name, value) in enumerate(steps))
    first, later = steps[0][1], steps[names.index("failed save (after a good one)")][1]
    good = steps[names.index("save")][1]
    for failure, still in ((first, "there is no committed checkpoint there yet"),
                           (later, f"the latest checkpoint is still '{os.path.join(directory, good)}'")):
        assert failure["type"] == "CheckpointWriteError", failure
        assert failure["is_oserror"] and failure["is_tfshard"]
        assert failure["errno"] == code
        message = failure["message"]
        for part in (f"in '{directory}' failed{where}: {cause}", "Nothing was committed", still):
            assert part in message, message
        for raw in RAW:
            assert raw not in message
    # Nothing left behind; the previous checkpoint stays the latest.
    assert steps[1] == ["listing", []], values
    assert steps[names.index("failed save (after a good one)") + 1] == ["listing", [good]]
    assert ["latest", good] in steps
    assert ["next op", 3.0] in steps
    assert names.count("save") == 2  # the saves after the failures worked
    assert record["restored_equal"]
    assert record["max_weight_diff"] < 1e-5  # fits after failed saves equal one device


def test_file_size_limit_during_save(tmp_path):
    run([sys.executable, WORKER, "save", str(tmp_path), "fsize", "2x4,1x8,plain"])
    for mesh in ("2x4", "1x8", "plain"):
        record = json.load(open(tmp_path / f"result-{mesh}.json"))
        check_record(record, str(tmp_path / f"ckpts-{mesh}"), "a file would exceed the process's "
                     "file-size limit (ulimit -f)", 27)


def _tmpfs_command(disk, command):
    """``command`` with a 2 MiB tmpfs mounted on ``disk``, in a private
    mount namespace (``unshare``), or None if this machine does not allow it."""
    wrapped = ["unshare", "-rm", "sh", "-c",
               f"mount -t tmpfs -o size=2m tmpfs '{disk}' && exec \"$0\" \"$@\"", *command]
    if shutil.which("unshare") is None:
        return None
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs '{disk}'"],
                           capture_output=True, text=True)
    return wrapped if probe.returncode == 0 else None


def test_full_disk_during_save(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    command = _tmpfs_command(disk, [sys.executable, WORKER, "save", str(tmp_path), "enospc", "2x4"])
    if command is None:
        pytest.skip("cannot mount a tmpfs here (no user namespaces); the file-size test covers the write path")
    run(command)
    record = json.load(open(tmp_path / "result-2x4.json"))
    check_record(record, str(disk / "ckpts-2x4"), "no space left on the device", 28)


def test_failed_save_in_a_multi_client_job(tmp_path):
    """Process 0 alone has the file-size limit: both processes raise the
    same error, and both go on to train and save."""
    run([
        sys.executable, "-m", "tfshard.app.cli", "launch", "--processes", "2", "--devices-per-process", "4",
        "--timeout", str(TIMEOUT - 60), "--grace", "5", "--",
        sys.executable, WORKER, "multi", str(tmp_path), "0",
    ])
    records = [json.load(open(tmp_path / f"result-{rank}.json")) for rank in (0, 1)]
    for record in records:
        check_record(record, str(tmp_path / "ckpts"), "a file would exceed", 27, where=" on process 0")
    assert records[0]["steps"] == records[1]["steps"]  # the very same errors


# ------------------------------------------------------------ reads
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A sharded model with two checkpoints: ckpt-4 (older) and ckpt-8."""
    keras.backend.clear_session()
    base = tmp_path_factory.mktemp("faults")
    model = worker.sharded_mlp(tfshard, keras, 2, 4, seed=1)
    x, y = worker.training_data()
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    older = tfshard.save_checkpoint(model, base / "ckpts")
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    newer = tfshard.save_checkpoint(model, base / "ckpts")
    return {"model": model, "older": older, "newer": newer, "data": (x, y)}


def state(model):
    return [np.array(v.numpy()) for v in model.weights + model.optimizer.variables]


def data_file(path):
    return os.path.join(path, sorted(n for n in os.listdir(path) if ".data-" in n)[0])


def truncate(path):
    name = data_file(path)
    with open(name, "r+b") as f:
        f.truncate(os.path.getsize(name) - 7)
    return name


def flip(path, name=None):
    name = name or data_file(path)
    raw = bytearray(open(name, "rb").read())
    raw[len(raw) // 2] ^= 0x01
    open(name, "wb").write(bytes(raw))
    return name


def remove(name):
    def fault(path):
        target = os.path.join(path, name) if name else data_file(path)
        os.remove(target)
        return target
    return fault


def manifest_text(text):
    def fault(path):
        target = os.path.join(path, "manifest.json")
        open(target, "w").write(text)
        return target
    return fault


def drop_key(key):
    def fault(path):
        target = os.path.join(path, "manifest.json")
        manifest = json.load(open(target))
        del manifest[key]
        json.dump(manifest, open(target, "w"))
        return target
    return fault


FAULTS = {
    "truncated data": (truncate, "truncated"),
    "flipped bit in data": (flip, "CRC-32"),
    "flipped bit in index": (lambda p: flip(p, os.path.join(p, "variables.index")), "CRC-32"),
    "deleted index": (remove("variables.index"), "is missing"),
    "deleted data": (remove(None), "is missing"),
    "manifest syntax error": (manifest_text('{"format": "tfshard.checkpoint",'), "not valid JSON"),
    "manifest is a list": (manifest_text("[]"), "JSON list"),
    "manifest without step": (drop_key("step"), "lacks the key(s) ['step']"),
}


@pytest.fixture
def broken(saved, tmp_path):
    """A copy of both checkpoints, to break the newer one."""
    directory = tmp_path / "ckpts"
    shutil.copytree(os.path.dirname(saved["newer"]), directory)
    return str(directory / os.path.basename(saved["older"])), str(directory / os.path.basename(saved["newer"]))


@pytest.mark.parametrize("fault", list(FAULTS))
def test_corrupt_or_incomplete_checkpoint(saved, broken, fault):
    model = saved["model"]
    older, newer = broken
    damage, problem = FAULTS[fault]
    culprit = damage(newer)
    before = state(model)
    for target in (newer, os.path.dirname(newer)):  # the checkpoint, or its directory's latest
        with pytest.raises(CheckpointError) as info:
            tfshard.restore_checkpoint(model, target)
        message = str(info.value)
        for part in (f"Checkpoint '{newer}' is corrupt or incomplete", culprit, problem,
                     "The model was not changed", f"The next newest committed checkpoint is '{older}'"):
            assert part in message, message
        for raw in RAW:
            assert raw not in message
        for got, want in zip(state(model), before):
            np.testing.assert_array_equal(got, want)
    # The process is healthy: the suggested checkpoint restores, fit runs.
    assert tfshard.restore_checkpoint(model, older) == older
    x, y = saved["data"]
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)


def test_read_manifest_names_the_file(broken):
    _, newer = broken
    manifest_text("{oops")(newer)
    with pytest.raises(CheckpointError, match=r"manifest.json is not valid JSON \(.* line 1, column 2\)"):
        tfshard.read_manifest(newer)
    assert tfshard.latest_checkpoint(os.path.dirname(newer)) == newer  # still listed; restore refuses it


@pytest.mark.parametrize("fault", ["truncated data", "flipped bit in data"])
def test_read_failure_without_file_records(saved, broken, fault):
    """A checkpoint whose manifest has no file records (as written before
    they were kept): TensorFlow finds the damage while reading; the error
    still names the checkpoint and says the model may be partly restored,
    and the process recovers."""
    model = saved["model"]
    older, newer = broken
    manifest_path = os.path.join(newer, "manifest.json")
    manifest = json.load(open(manifest_path))
    del manifest["files"]
    json.dump(manifest, open(manifest_path, "w"))
    culprit = FAULTS[fault][0](newer)
    with pytest.raises(CheckpointError) as info:
        tfshard.restore_checkpoint(model, newer)
    message = str(info.value)
    # TensorFlow names the shard of a checksum failure, not of a short read.
    where = culprit if fault == "flipped bit in data" else "one of its variable files"
    for part in (f"Checkpoint '{newer}' is corrupt or incomplete", where, "may be partly restored", older):
        assert part in message, message
    for raw in RAW:
        assert raw not in message
    assert tfshard.restore_checkpoint(model, older) == older
    x, y = saved["data"]
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    assert np.isfinite(model.evaluate(x, y, batch_size=8, verbose=0))


def test_verify_false_skips_checksums_not_sizes(saved, broken):
    model = saved["model"]
    _, newer = broken
    truncate(newer)
    with pytest.raises(CheckpointError, match="truncated"):
        tfshard.restore_checkpoint(model, newer, verify=False)


def test_save_records_sizes_and_checksums(saved):
    manifest = tfshard.read_manifest(saved["newer"])
    names = sorted(os.listdir(saved["newer"]))
    assert sorted(manifest["files"]) == [n for n in names if n.startswith("variables.")]
    for name, record in manifest["files"].items():
        assert record["bytes"] == os.path.getsize(os.path.join(saved["newer"], name))


def test_write_error_is_an_oserror_with_errno(saved, tmp_path):
    """A commit that fails (an OSError from the file system) becomes a
    CheckpointWriteError; the hook stands in for the failing write."""
    from tfshard import checkpoint

    def fail(path):
        raise OSError(28, "No space left on device")

    checkpoint._HOOKS["written"] = fail
    try:
        with pytest.raises(CheckpointWriteError) as info:
            tfshard.save_checkpoint(saved["model"], tmp_path, step=100)
    finally:
        checkpoint._HOOKS.clear()
    assert isinstance(info.value, OSError) and info.value.errno == 28
    assert "no space left on the device" in str(info.value)
    assert os.listdir(tmp_path) == []
