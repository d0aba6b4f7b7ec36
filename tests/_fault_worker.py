"""Subprocess worker for the storage fault tests (run with sys.executable,
or by ``tfshard launch`` for the multi-client case).

    python _fault_worker.py save OUT FAULT MESHES
        FAULT: "fsize" (RLIMIT_FSIZE of 1000 bytes, SIGXFSZ ignored) or
        "enospc" (the checkpoints go to OUT/disk, which the test has made a
        tiny tmpfs; a filler file takes its free space).
        MESHES: e.g. "2x4,1x8" (sharded) and/or "plain".
    python _fault_worker.py multi OUT FAULT_ON
        In a 2-process job (2 x 4 CPUs, a 2x4 mesh): the file-size limit on
        the processes FAULT_ON ("all" or a client id).
    python _fault_worker.py mesh OUT
        In a 2-process job of 2 CPUs each: a mesh of 8 devices (an error),
        then one of 4 (works).

For each mesh: fit, a save that fails (before any save succeeded there, the
case that used to cancel the save's collective group for good), the next op,
a fit, a save that succeeds, a fit, another failed save, a fit and a save.
Every fit is repeated on a plain Keras model from the same weights; the
final weights of both are compared. The record of what happened goes to
OUT/result-<mesh or client>.json.
"""

import json
import os
import resource
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _checkpoint_worker as worker  # noqa: E402

LIMIT = 1000  # bytes: far below one checkpoint's data files


class Fault:
    """A storage fault that can be switched on and off in this process."""

    def __init__(self, kind, disk):
        self.kind, self.disk = kind, disk
        self.filler = None
        self.limits = resource.getrlimit(resource.RLIMIT_FSIZE)
        if kind == "fsize":
            # Past the limit, write() fails with EFBIG instead of killing us.
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def __enter__(self):
        if self.kind == "fsize":
            resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, self.limits[1]))
        elif self.kind == "enospc":
            self.filler = open(os.path.join(self.disk, "filler"), "wb", buffering=0)
            try:
                while True:
                    self.filler.write(b"\0" * 65536)
            except OSError:
                pass
            try:
                while True:
                    self.filler.write(b"\0" * 512)
            except OSError:
                pass
        return self

    def __exit__(self, *exc):
        if self.kind == "fsize":
            resource.setrlimit(resource.RLIMIT_FSIZE, self.limits)
        elif self.filler is not None:
            self.filler.close()
            os.remove(os.path.join(self.disk, "filler"))
            self.filler = None


def try_save(tfshard, model, directory, fault):
    with fault:
        try:
            tfshard.save_checkpoint(model, directory)
        except Exception as err:  # recorded and checked by the test
            return {"type": type(err).__name__, "message": str(err),
                    "errno": getattr(err, "errno", None),
                    "is_oserror": isinstance(err, OSError),
                    "is_tfshard": isinstance(err, tfshard.TfshardError)}
    return {"type": None}


def listing(directory):
    return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


def run_mesh(tfshard, keras, mesh, directory, fault):
    """The sequence of the module docstring on one mesh; returns its record."""
    import numpy as np
    import tensorflow as tf

    x, y = worker.training_data()
    if mesh == "plain":
        model = worker.build_mlp(keras, seed=3)
    else:
        data, tp = (int(n) for n in mesh.split("x"))
        model = worker.sharded_mlp(tfshard, keras, data, tp, seed=3)
    reference = worker.build_mlp(keras, seed=4)  # one device, same weights
    reference.set_weights([v.numpy() for v in model.weights])

    def fit():
        for m in (model, reference):
            m.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)

    record = {"steps": []}

    def step(name, value):
        record["steps"].append([name, value])

    fit()
    step("failed save (first on this mesh)", try_save(tfshard, model, directory, fault))
    step("listing", listing(directory))
    step("next op", float((tf.constant(2.0) + 1.0).numpy()))
    fit()
    good = tfshard.save_checkpoint(model, directory)
    step("save", os.path.basename(good))
    fit()
    step("failed save (after a good one)", try_save(tfshard, model, directory, fault))
    step("listing", listing(directory))
    step("latest", os.path.basename(tfshard.latest_checkpoint(directory) or ""))
    fit()
    step("save", os.path.basename(tfshard.save_checkpoint(model, directory)))
    fresh = (worker.build_mlp(keras, seed=5) if mesh == "plain"
             else worker.sharded_mlp(tfshard, keras, data, tp, seed=5))
    tfshard.restore_checkpoint(fresh, directory)
    record["restored_equal"] = all(
        np.array_equal(a.numpy(), b.numpy()) for a, b in zip(fresh.weights, model.weights)
    )
    record["max_weight_diff"] = max(
        float(np.max(np.abs(a.numpy() - b.numpy())))
        for a, b in zip(model.weights, reference.weights)
    )
    return record


def save_mode(out, kind, meshes):
    import tfshard

    tfshard.use_virtual_devices(8)
    import keras

    base = os.path.join(out, "disk") if kind == "enospc" else out
    for mesh in meshes.split(","):
        directory = os.path.join(base, f"ckpts-{mesh}")
        record = run_mesh(tfshard, keras, mesh, directory, Fault(kind, base))
        with open(os.path.join(out, f"result-{mesh}.json"), "w") as f:
            json.dump(record, f)


def multi_mode(out, fault_on):
    import tfshard

    tfshard.initialize_multi_client(seed=7)
    import keras

    me = tfshard.multi_client.client_id()
    kind = "fsize" if fault_on in ("all", str(me)) else None
    record = run_mesh(tfshard, keras, "2x4", os.path.join(out, "ckpts"), Fault(kind, out))
    with open(os.path.join(out, f"result-{me}.json"), "w") as f:
        json.dump(record, f)


def mesh_mode(out):
    """In a job of 2 processes x 2 CPUs: a 2x4 mesh (too large) and then a
    2x2 mesh, on which a collective runs."""
    import numpy as np
    import tfshard

    tfshard.initialize_multi_client(seed=7)
    me = tfshard.multi_client.client_id()
    record = {}
    try:
        tfshard.Mesh({"batch": 2, "model": 4})
    except Exception as err:  # recorded and checked by the test
        record["error"] = [type(err).__name__, str(err)]
    mesh = tfshard.Mesh({"batch": 2, "model": 2})
    strategy = tfshard.StrategyBuilder(mesh).data_parallel("batch").tensor_parallel("model").build()
    x = strategy.place(np.arange(8, dtype="float32").reshape(2, 4), ("batch", "model"))
    record["sum"] = float(tfshard.to_numpy(x).sum())
    with open(os.path.join(out, f"mesh-{me}.json"), "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "save":
        save_mode(*args)
    elif mode == "multi":
        multi_mode(*args)
    elif mode == "mesh":
        mesh_mode(*args)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    sys.stdout.flush()
    sys.stderr.flush()
    if mode == "save":
        os._exit(0)  # skip TensorFlow's slow interpreter teardown
