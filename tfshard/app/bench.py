"""Benchmarks: step time, memory and communication of a config across meshes.

``tfshard bench CONFIG`` prints, in one run, for each mesh shape:

* ms/step and tokens/s (images/s), and the ratio to plain Keras on one
  device timed in the same run (the machine is noisy: compare ratios, not
  absolute times across runs);
* trace count of the compiled train step and the first step's extra time
  (tracing + DTensor compilation);
* per-device bytes of parameters + optimizer state;
* collectives per training step, by kind and mesh axis, read from DTensor's
  SPMD dump of the compiled train step (measured in a child process, because
  DTensor only dumps when TensorFlow starts with its logging flag).

With ``--memory`` it prints instead, for each mesh (and ZeRO stage, with
``--zero-stages``), the per-device bytes of one training step by kind:
parameters, gradients, optimizer state and activations
(:func:`tfshard.memory.memory_by_kind`; activations are the tensors the step
keeps for backward, at their local shard shapes).

Optionally (``--jax``) the same model is timed on Keras 3's JAX backend with
``keras.distribution.ModelParallel`` in a child process (see
``tfshard/app/_jax_reference.py``), when JAX is installed.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time

import keras
import numpy as np

DEFAULT_MESHES = ((1, 1), (1, 8), (2, 4), (8, 1))
TRAIN_STEP_PROGRAM = "run"  # the name of training._Step's tf.function


def parse_meshes(text):
    """``"1x1,2x4"`` -> ``[(1, 1), (2, 4)]``."""
    from tfshard.app.config import ConfigError

    meshes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ConfigError(
                f"--meshes: {item!r} is not a mesh shape; write DATAxMODEL, e.g. 2x4 "
                "(a comma-separated list: 1x1,1x8,2x4,8x1)."
            )
        meshes.append((int(parts[0]), int(parts[1])))
    return meshes


def with_mesh(config, shape):
    return {**config, "mesh": {**config["mesh"], "batch": shape[0], "model": shape[1]}}


class _StepTimes(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.times = [time.perf_counter()]

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter())


def time_training(config, mesh_shape=None, *, steps):
    """Fit ``steps`` batches; ``mesh_shape=None`` is plain Keras on one device.

    Returns ms/step (median of the steady steps), the first step's extra
    seconds over a steady step, the train step's trace count and the
    per-device bytes of parameters + optimizer state.
    """
    from tfshard.app import jobs
    from tfshard.report import per_device_bytes

    config = {**config, "train": {**config["train"], "steps": steps}}
    strategy = None if mesh_shape is None else jobs.build_strategy(with_mesh(config, mesh_shape))
    (x, y), _ = jobs.load_data(config)
    keras.utils.set_random_seed(config["train"]["seed"])
    model = jobs.build_model(config, strategy)
    timer = _StepTimes()
    batch = config["train"]["batch_size"]
    model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0, callbacks=[timer])
    durations = np.diff(timer.times)
    steady = float(np.median(durations[1:])) if len(durations) > 1 else float(durations[0])
    step = getattr(model.train_function, "step", None)
    variables = list(model.variables) + list(model.optimizer.variables)
    return {
        "ms_per_step": 1000 * steady,
        "first_step_extra_s": float(durations[0] - steady),
        "trace_count": None if step is None else step.trace_count,
        "per_device_bytes": per_device_bytes(variables),
    }


@contextlib.contextmanager
def dumped_train_step(config):
    """Fit one batch of ``config`` on its mesh with DTensor's pass dumps on;
    yields the dump directory (see :func:`tfshard.comm.dump_dir`)."""
    from tfshard import comm
    from tfshard.app import jobs

    config = {**config, "train": {**config["train"], "steps": 1}}
    strategy = jobs.build_strategy(config)
    (x, y), _ = jobs.load_data(config)
    model = jobs.build_model(config, strategy)
    batch = config["train"]["batch_size"]
    with comm.dump_dir() as directory:
        model.fit(x[:batch], y[:batch], batch_size=batch, epochs=1, verbose=0)
        yield directory


def count_step_collectives(config, mesh_shape, *, stages=("expanded", "optimized")):
    """Collectives in one compiled training step of ``config`` on a mesh,
    ``{stage: counts}`` (stages as in :func:`tfshard.comm.parse_dump_dir`).

    Needs DTensor's pass dumps (see :mod:`tfshard.comm`); run it through
    :func:`tfshard.comm.run_in_subprocess` or :func:`measure_collectives`.
    """
    from tfshard import comm

    with dumped_train_step(with_mesh(config, mesh_shape)) as directory:
        out = {}
        for stage in stages:
            counts, programs = comm.parse_dump_dir(directory, stage, program=TRAIN_STEP_PROGRAM)
            if programs != 1:
                raise comm.CollectiveCountError(
                    f"expected one compiled train step, found {programs} programs "
                    f"named {TRAIN_STEP_PROGRAM!r}"
                )
            out[stage] = counts
    return out


def _collectives_child():
    request = json.loads(os.environ["TFSHARD_BENCH_REQUEST"])
    out = {}
    for shape in request["meshes"]:
        out["x".join(map(str, shape))] = count_step_collectives(request["config"], tuple(shape))
    return out


def measure_collectives(config, meshes):
    """``{"2x4": {"expanded": counts, "optimized": counts}}`` for each mesh,
    measured in one child process."""
    from tfshard import comm

    size = max(8, *(a * b for a, b in meshes))
    request = json.dumps({"config": config, "meshes": [list(m) for m in meshes]})
    return comm.run_in_subprocess(
        "tfshard.app.bench:_collectives_child", devices=size, env={"TFSHARD_BENCH_REQUEST": request}
    )


def format_counts(counts):
    if not counts:
        return "none"
    parts = []
    for (kind, axis), n in sorted(counts.items(), key=str):
        axis = "+".join(axis) if isinstance(axis, tuple) else axis
        parts.append(f"{n} {kind}[{axis}]")
    return ", ".join(parts)


def to_json(results):
    """``results`` of :func:`bench` with collective counts as
    ``[kind, axis, n]`` lists (JSON has no tuple keys)."""
    from tfshard import comm

    def encode(value):
        if isinstance(value, comm.CollectiveCounts):
            return value.as_list()
        if isinstance(value, dict):
            return {str(k): encode(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [encode(v) for v in value]
        return value

    return encode(results)


def zero_strategy(config, stage):
    """``jobs.build_strategy(config)`` with ZeRO ``stage`` over the data axis
    (0: none)."""
    from tfshard.app import jobs
    from tfshard.mesh import Mesh
    from tfshard.strategy import StrategyBuilder

    builder = (
        StrategyBuilder(Mesh({"batch": config["mesh"]["batch"], "model": config["mesh"]["model"]}))
        .data_parallel("batch")
        .tensor_parallel("model")
        .rules(config["layout"]["rules"])
    )
    if stage:
        builder.shard_optimizer_state("batch", stage=stage)
    return jobs.layout_options(builder, config).build()


def memory_by_mesh(config, meshes, *, zero_stages=(0,), out=print):
    """Print and return ``{run: MemoryBreakdown}``: per-device bytes of one
    training step of ``config``'s model on one batch, by kind, for plain
    Keras on one device and for each mesh and ZeRO stage."""
    from tfshard.app import jobs
    from tfshard.memory import memory_by_kind

    (x, y), _ = jobs.load_data({**config, "train": {**config["train"], "steps": 1}})
    batch = config["train"]["batch_size"]
    runs = {"plain keras 1 device": None}
    for shape in meshes:
        for stage in zero_stages:
            name = f"tfshard {shape[0]}x{shape[1]}" + (f" zero-{stage}" if stage else "")
            runs[name] = (tuple(shape), stage)
    results = {}
    for name, run in runs.items():
        strategy = None if run is None else zero_strategy(with_mesh(config, run[0]), run[1])
        model = jobs.build_model(config, strategy)
        results[name] = memory_by_kind(model, (x[:batch], y[:batch]))
    out(f"per-device bytes of one training step, batch {batch} (tfshard.memory.memory_by_kind)")
    kinds = ("parameters", "gradients", "optimizer", "activations")
    header = f"{'run':<28}" + "".join(f"{k:>13}" for k in kinds) + f"{'total':>13}"
    out(header)
    out("-" * len(header))
    for name, r in results.items():
        out(f"{name:<28}" + "".join(f"{getattr(r, k):>13,}" for k in kinds) + f"{r.total:>13,}")
    return results


def check_jax_reference_config(config):
    """Raise ``ConfigError`` unless the JAX reference builds the same model as
    ``config``: it is the dense reference transformer (stock Keras layers
    with a ``LayoutMap``), so a CNN or a mixture-of-experts config would be
    compared with a different model."""
    from tfshard.app.config import ConfigError

    model = config["model"]
    if model["kind"] != "transformer":
        raise ConfigError(
            f"bench --jax: model.kind={model['kind']!r}; the JAX reference exists for "
            "the transformer only. Drop --jax, or bench a transformer config."
        )
    if model.get("moe_experts", 0) > 0:
        raise ConfigError(
            f"bench --jax: model.moe_experts={model['moe_experts']}; the JAX reference "
            "builds the dense transformer only (Keras has no expert-parallel layer to "
            "compare with), so it would time a different model. Drop --jax, or set "
            "model.moe_experts=0 (--set model.moe_experts=0) to compare the dense model."
        )


def run_jax_reference(config, mesh_shape, *, steps, timeout=900):
    """Time the same model on Keras's JAX backend with ModelParallel, in a
    child process. Returns ``None`` when JAX is not installed; raises
    ``ConfigError`` for a config the reference cannot build (see
    :func:`check_jax_reference_config`)."""
    import importlib.util
    import tempfile

    from tfshard.app import jobs

    check_jax_reference_config(config)
    if importlib.util.find_spec("jax") is None:
        return None
    script = os.path.join(os.path.dirname(__file__), "_jax_reference.py")
    (x, y), _ = jobs.load_data({**config, "train": {**config["train"], "steps": steps}})
    with tempfile.TemporaryDirectory(prefix="tfshard_bench_") as workdir:
        data = os.path.join(workdir, "data.npz")
        np.savez(data, x=x, y=y)
        env = {k: v for k, v in os.environ.items() if not k.startswith("TFSHARD_COMM")}
        devices = max(8, mesh_shape[0] * mesh_shape[1])
        env.update(
            KERAS_BACKEND="jax",
            JAX_PLATFORMS="cpu",
            XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
            TFSHARD_BENCH_REQUEST=json.dumps(
                {"config": config, "mesh": list(mesh_shape), "steps": steps, "data": data}
            ),
        )
        proc = subprocess.run(
            [sys.executable, script], env=env, capture_output=True, text=True, timeout=timeout
        )
    if proc.returncode != 0:
        raise RuntimeError(f"the JAX reference failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench(config, *, meshes=DEFAULT_MESHES, steps=None, rounds=2, collectives=True, jax=False,
          out=print):
    """Run the benchmark and print the table; returns the results dict."""
    if jax:
        check_jax_reference_config(config)  # before minutes of timing
    steps = steps or min(config["train"]["steps"], 20)
    steps = max(steps, 3)
    per_step = config["train"]["batch_size"] * (
        config["model"]["seq_len"] if config["model"]["kind"] == "transformer" else 1
    )
    unit = "tokens/s" if config["model"]["kind"] == "transformer" else "images/s"
    runs = [None] + [tuple(m) for m in meshes]
    samples = {run: [] for run in runs}
    first = {}
    # Rounds interleave the runs so that a slow spell of a shared machine
    # hits every run alike; the best round of each is reported.
    for _ in range(rounds):
        for run in runs:
            result = time_training(config, run, steps=steps)
            samples[run].append(result["ms_per_step"])
            first.setdefault(run, result)
    results = {}
    for run in runs:
        name = "plain keras 1 device" if run is None else "tfshard %dx%d" % run
        results[name] = {**first[run], "ms_per_step": min(samples[run])}
    base = results["plain keras 1 device"]["ms_per_step"]
    jax_results = {}
    if jax:
        for shape in meshes:
            reference = run_jax_reference(config, tuple(shape), steps=steps)
            if reference is None:
                out("(JAX is not installed: pip install jax, to compare with Keras's JAX backend)")
                break
            jax_results["jax ModelParallel %dx%d" % tuple(shape)] = reference
    counts = measure_collectives(config, [tuple(m) for m in meshes]) if collectives else {}

    out(f"{config['model']['kind']} model, batch {config['train']['batch_size']}, "
        f"{steps} steps per run, best of {rounds} interleaved rounds")
    header = f"{'run':<24}{'ms/step':>9}{unit:>11}{'vs plain':>10}{'traces':>8}{'compile s':>11}{'MiB/device':>12}"
    out(header)
    out("-" * len(header))
    for name, r in {**results, **jax_results}.items():
        out(
            f"{name:<24}{r['ms_per_step']:>9.1f}{per_step * 1000 / r['ms_per_step']:>11.0f}"
            f"{base / r['ms_per_step']:>9.2f}x{str(r.get('trace_count') or '-'):>8}"
            f"{r['first_step_extra_s']:>11.2f}{r['per_device_bytes'] / 2**20:>12.3f}"
        )
    if counts:
        out("")
        out("collectives per training step (DTensor SPMD dump of the compiled step)")
        for mesh, stages in counts.items():
            out(f"  {mesh}: launched: {format_counts(stages['optimized'])}")
            out(f"  {'':{len(mesh)}}  as expanded: {format_counts(stages['expanded'])}")
    return {"runs": results, "jax": jax_results, "collectives": counts, "unit": unit,
            "items_per_step": per_step, "plain_ms_per_step": base,
            "steps": steps, "rounds": rounds}
