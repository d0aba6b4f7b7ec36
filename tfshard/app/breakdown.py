"""``tfshard bench --llama --breakdown``: where the time of a sharded step goes.

One process, the same model and batches on one device (plain Keras) and on
the mesh (tfshard). For each:

* **host side** (timed in Python, no profiler): per step, packing the batch
  onto the mesh (``training.shard_batch``), the compiled step call
  (``training._Step``), copying the logs to the host (``training._to_host``)
  and the rest of Keras's ``fit`` loop;
* **device side** (TensorFlow's profiler, a second fit of the same length):
  the TensorFlow ops every device ran, per device per step (count and time),
  split by kind: matmuls, collectives, variable reads/writes, the ops DTensor
  inserted when it expanded the step (slices and concatenations of
  relayouts, the all-gathers of FSDP-split weights, ...), sends/receives and
  the rest; the compute threads' executor time outside ops and their idle
  time; the collective threads' busy time.

An op event of the profiler is named ``<node name>:<op type>``; the node
names keep DTensor's suffixes (``.../DTensorAllGatherOp``,
``.../DTensorAllScatterOp``, ``.../Relayout``), which is how DTensor's own
ops are told apart. The mesh's devices run the same SPMD program, so per
device is the sum over devices divided by their number.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import os
import tempfile
import time

import numpy as np

MATMULS = ("MatMul", "BatchMatMul", "Einsum", "Conv")
VARIABLE_OPS = ("ReadVariableOp", "AssignVariableOp", "VarHandleOp", "ResourceGather")
TRANSFERS = ("_Send", "_Recv", "_HostSend", "_HostRecv")
DTENSOR_MARKS = ("DTensor", "Relayout", "CopyToMesh", "CombinedReduce", "PostCombinedReduce")


def op_kind(name, op_type):
    """The breakdown row of one op event (see the module docstring)."""
    if op_type.startswith("Collective") or op_type in ("DTensorAllReduce", "DTensorAllGather"):
        return "collectives (launch)"
    if op_type in TRANSFERS:
        return "sends/receives"
    if op_type.startswith(VARIABLE_OPS):
        return "variable reads/writes"
    if any(mark in name for mark in DTENSOR_MARKS):
        return "inserted by DTensor (relayouts, gathers, slices)"
    if any(m in op_type for m in MATMULS):
        return "matmuls/einsums"
    return "other ops (elementwise, reductions, reshapes...)"


def parse_profile(logdir, devices, steps):
    """Per-device, per-step figures from a profiler run's ``*.xplane.pb``."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    files = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
    space = xplane_pb2.XSpace()
    with open(max(files, key=os.path.getmtime), "rb") as handle:
        space.ParseFromString(handle.read())
    plane = next(p for p in space.planes if p.name == "/host:CPU")
    names = plane.event_metadata
    stat_names = plane.stat_metadata
    kinds_ms, kinds_n, types = collections.Counter(), collections.Counter(), collections.Counter()
    types_ms = collections.Counter()
    busy_ps = executor_ps = collective_ps = 0
    threads = 0
    for line in plane.lines:
        if line.name.startswith("collective_ops"):
            collective_ps += sum(e.duration_ps for e in line.events
                                 if names[e.metadata_id].name == "CollectiveExecutor::RunClosure")
            continue
        if not line.name.startswith("tf_Compute"):
            continue
        threads += 1
        for event in line.events:
            name = names[event.metadata_id].name
            if name == "ExecutorState::Process":
                executor_ps += event.duration_ps
                continue
            if name == "ExecutorState::ProcessAsync::Start":
                # An asynchronous kernel (collectives, receives): its node
                # name and op type are in the event's stats.
                stats = {stat_names[s.metadata_id].name: s for s in event.stats}
                if "kernel_type" not in stats:
                    continue
                node = _stat_text(stats.get("name"), stat_names)
                op_type = _stat_text(stats["kernel_type"], stat_names)
            else:
                node, sep, op_type = name.rpartition(":")
                if not sep or "::" in name or " " in op_type:
                    continue
            kind = op_kind(node, op_type)
            kinds_ms[kind] += event.duration_ps / 1e9
            kinds_n[kind] += 1
            types[op_type] += 1
            types_ms[op_type] += event.duration_ps / 1e9
            busy_ps += event.duration_ps
    per = devices * steps
    return {
        "ops_per_device_step": sum(kinds_n.values()) / per,
        "op_ms_per_device_step": busy_ps / 1e9 / per,
        "by_kind": {k: {"ops": kinds_n[k] / per, "ms": kinds_ms[k] / per} for k in sorted(kinds_n)},
        "executor_ms_outside_ops_per_step": (executor_ps - busy_ps) / 1e9 / steps,
        "executor_ms_per_step": executor_ps / 1e9 / steps,
        "collective_threads_ms_per_step": collective_ps / 1e9 / steps,
        "compute_threads": threads,
        "top_op_types_per_device_step": {t: n / per for t, n in types.most_common(12)},
        "top_op_types_ms_per_device_step": {t: ms / per for t, ms in types_ms.most_common(12)},
    }


def _stat_text(stat, stat_names):
    if stat is None:
        return ""
    if stat.str_value:
        return stat.str_value
    return stat_names[stat.ref_value].name if stat.ref_value else ""


@contextlib.contextmanager
def host_timers():
    """Time tfshard's host-side work per fit: batch packing, the compiled
    step call and the copy of the logs to the host."""
    from tfshard import training

    spent = collections.Counter()
    originals = (training.shard_batch, training._to_host, training._Step.__call__)

    def timed(key, fn):
        def wrapper(*args, **kwargs):
            begin = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[key] += time.perf_counter() - begin
        return wrapper

    def step_until_done(step, data):
        # The call returns before the devices finish (DTensor's parallel
        # device runs asynchronously): wait for the outputs here, so that
        # "logs to host" is only the copy.
        outputs = originals[2](step, data)
        originals[1](outputs)
        return outputs

    training.shard_batch = timed("batch packing (shard_batch)", originals[0])
    training._to_host = timed("logs to host (_to_host)", originals[1])
    training._Step.__call__ = timed("compiled step call, until done", step_until_done)
    try:
        yield spent
    finally:
        training.shard_batch, training._to_host, training._Step.__call__ = originals


def _measure(run, steps, devices, keep=None):
    import tensorflow as tf

    run.fit(2)  # trace, compile and warm up
    with host_timers() as spent:
        begin, cpu = time.perf_counter(), time.process_time()
        times, _, _ = run.fit(steps)
        wall, cpu = time.perf_counter() - begin, time.process_time() - cpu
    host = {k: 1000 * v / steps for k, v in spent.items()}
    if host:
        host["rest of Keras's fit loop"] = 1000 * wall / steps - sum(host.values())
    with tempfile.TemporaryDirectory(prefix="tfshard_profile_") as logdir:
        tf.profiler.experimental.start(logdir)
        begin = time.perf_counter()
        run.fit(steps)
        profiled_wall = time.perf_counter() - begin
        tf.profiler.experimental.stop()
        profile = parse_profile(logdir, devices, steps)
        if keep:
            import shutil

            shutil.copytree(logdir, keep, dirs_exist_ok=True)
    threads = profile["compute_threads"]
    profile["compute_threads_idle_ms_per_step"] = (
        threads * 1000 * profiled_wall / steps - profile["executor_ms_per_step"]
    )
    return {
        "ms_per_step": 1000 * float(np.median(times[1:])),
        "fit_ms_per_step": 1000 * wall / steps,
        "cpu_ms_per_step": 1000 * cpu / steps,
        "profiled_ms_per_step": 1000 * profiled_wall / steps,
        "host_ms_per_step": host,
        "profile": profile,
    }


def graph_op_counts(model):
    """Ops of the traced train step before DTensor expands it: all, and the
    layout ops tfshard and Keras put in (Relayout, CopyToMesh...)."""
    step = getattr(model.train_function, "step", None)
    if step is None or not step._functions:
        return {}
    compiled = next(iter(step._functions.values()))
    graph = compiled.get_concrete_function().graph
    types = collections.Counter()

    def visit(g):
        for op in g.get_operations():
            types[op.type] += 1
        for function in g._functions.values():
            visit(function.graph) if hasattr(function, "graph") else None

    visit(graph)
    layout_ops = {t: n for t, n in types.items() if t in ("Relayout", "RelayoutLike", "CopyToMesh",
                                                          "CopyToMeshGrad", "DTensorRestoreV2")}
    return {"ops": sum(types.values()), "layout_ops": layout_ops,
            "ReadVariableOp": types["ReadVariableOp"], "AssignVariableOp": types["AssignVariableOp"]}


def breakdown_llama(config, mesh_shape=(2, 4), *, steps=5, out=print):
    """Profile the Llama case on one device and on ``mesh_shape``; print
    and return the table's numbers."""
    from tfshard.app import bench_llama

    x, y = bench_llama.make_data(config, steps + 2)
    plain = bench_llama.build_llama(config)
    sharded = bench_llama.build_llama(config, tuple(mesh_shape))
    sharded.set_weights(plain.get_weights())
    devices = mesh_shape[0] * mesh_shape[1]
    results = {
        "tf 1 device": _measure(bench_llama._TensorFlowRun(plain, x, y, config["batch_size"]), steps, 1),
        "tfshard %dx%d" % tuple(mesh_shape): _measure(
            bench_llama._TensorFlowRun(sharded, x, y, config["batch_size"]), steps, devices,
            keep=os.environ.get("TFSHARD_KEEP_PROFILE")),
    }
    results["tfshard %dx%d" % tuple(mesh_shape)]["graph"] = graph_op_counts(sharded)
    _print(config, results, out)
    return {"config": config, "mesh": list(mesh_shape), "steps": steps, "runs": results}


def _print(config, results, out):
    names = list(results)
    out(f"Breakdown of a training step, keras-hub Llama ({config}); ms per step; "
        "op figures per device")
    rows = [("step (median, no profiler)", lambda r: f"{r['ms_per_step']:.1f}"),
            ("process CPU time per step (all threads)", lambda r: f"{r['cpu_ms_per_step']:.1f}"),
            ("step under the profiler", lambda r: f"{r['profiled_ms_per_step']:.1f}"),
            ("ops per device", lambda r: f"{r['profile']['ops_per_device_step']:.0f}"),
            ("op time per device", lambda r: f"{r['profile']['op_ms_per_device_step']:.1f}")]
    kinds = sorted({k for r in results.values() for k in r["profile"]["by_kind"]})
    for kind in kinds:
        rows.append((f"  {kind}", lambda r, k=kind: (
            "-" if k not in r["profile"]["by_kind"] else
            f"{r['profile']['by_kind'][k]['ms']:.1f} ({r['profile']['by_kind'][k]['ops']:.0f} ops)")))
    rows += [
        ("executor time outside ops (all threads)",
         lambda r: f"{r['profile']['executor_ms_outside_ops_per_step']:.1f}"),
        ("compute threads idle (all threads)",
         lambda r: f"{r['profile']['compute_threads_idle_ms_per_step']:.1f}"),
        ("collective threads busy", lambda r: f"{r['profile']['collective_threads_ms_per_step']:.1f}"),
    ]
    host_keys = sorted({k for r in results.values() for k in r["host_ms_per_step"]})
    for key in host_keys:
        rows.append((f"host: {key}", lambda r, k=key: (
            f"{r['host_ms_per_step'][k]:.1f}" if k in r["host_ms_per_step"] else "-")))
    width = max(len(label) for label, _ in rows) + 2
    out(f"{'':<{width}}" + "".join(f"{n:>24}" for n in names))
    for label, cell in rows:
        out(f"{label:<{width}}" + "".join(f"{cell(results[n]):>24}" for n in names))
    for name, r in results.items():
        if r.get("graph"):
            out(f"{name}: traced step graph before expansion: {r['graph']}")
        out(f"{name}: most launched op types per device per step: "
            + ", ".join(f"{t} {n:.0f}" for t, n in r["profile"]["top_op_types_per_device_step"].items()))
        out(f"{name}: op types by time per device per step (ms): "
            + ", ".join(f"{t} {n:.1f}" for t, n in r["profile"]["top_op_types_ms_per_device_step"].items()))
