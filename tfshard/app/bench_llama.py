"""``tfshard bench --llama``: keras-hub's Llama on three stacks, interleaved.

The same ``LlamaCausalLM`` (random init, no preset download), the same
initial weights and batches, trained with Adam by ``model.fit`` on:

* TensorFlow on one device (plain Keras, no tfshard);
* tfshard on each requested mesh (default 2x4), sharded by keras-hub's own
  ``LlamaBackbone.get_layout_map`` through ``StrategyBuilder.from_keras``;
* Keras 3's JAX backend with ``keras.distribution.ModelParallel`` and the
  same layout map, on as many virtual XLA CPU devices, in a child process
  (``tfshard/app/_jax_llama.py``) that waits for the parent's orders.

Each round runs ``steps`` batches on every stack in turn (A, B, C, A, B, C,
...), so a slow spell of the shared machine hits all of them alike. A run's
ms/step is the median over rounds of its steady steps (a fit call's first
step is left out). Each run's process CPU time per step (all its threads)
is reported too: on a machine shared with other jobs it moves less than
wall time, and it is the work a stack spends on a step. The losses of every run are compared step by step: the
three stacks must compute the same training run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

# The configuration: 4 layers, d=256, 8 query / 4 key-value heads,
# d_ff=1024, vocabulary 8192, sequence 128, global batch 16, Adam.
CASES = {
    "full": dict(num_layers=4, hidden_dim=256, num_query_heads=8, num_key_value_heads=4,
                 intermediate_dim=1024, vocabulary_size=8192, seq_len=128, batch_size=16),
    "small": dict(num_layers=2, hidden_dim=64, num_query_heads=8, num_key_value_heads=4,
                  intermediate_dim=256, vocabulary_size=1024, seq_len=32, batch_size=16),
    "tiny": dict(num_layers=1, hidden_dim=16, num_query_heads=4, num_key_value_heads=2,
                 intermediate_dim=32, vocabulary_size=64, seq_len=8, batch_size=8),
}
BACKBONE_KEYS = ("num_layers", "hidden_dim", "num_query_heads", "num_key_value_heads",
                 "intermediate_dim", "vocabulary_size")
LEARNING_RATE = 1e-3
SEED = 0
PLAIN = "tf 1 device"
JAX_TIMEOUT_S = 1800


def case_config(name="full", overrides=()):
    """A case of :data:`CASES` with ``key=value`` overrides (ints)."""
    from tfshard.app.config import ConfigError

    if name not in CASES:
        raise ConfigError(f"bench --llama: unknown case {name!r}; use one of {sorted(CASES)}.")
    config = dict(CASES[name])
    for item in overrides:
        key, _, value = item.partition("=")
        key = key.strip().removeprefix("llama.")
        if key not in config or not value.strip().isdigit():
            raise ConfigError(
                f"bench --llama: --set {item!r}; write KEY=INT with KEY one of {sorted(config)}."
            )
        config[key] = int(value)
    return config


def make_data(config, batches, seed=SEED):
    """``batches`` batches of random token ids: ``(x, y)`` for ``fit``."""
    rng = np.random.RandomState(seed)
    rows = batches * config["batch_size"]
    tokens = rng.randint(0, config["vocabulary_size"], size=(rows, config["seq_len"] + 1))
    tokens = tokens.astype("int32")
    x = {"token_ids": tokens[:, :-1], "padding_mask": np.ones((rows, config["seq_len"]), "int32")}
    return x, tokens[:, 1:]


def keras_mesh(shape):
    import keras

    devices = keras.distribution.list_devices()[: shape[0] * shape[1]]
    return keras.distribution.DeviceMesh(tuple(shape), ["batch", "model"], devices)


def build_llama(config, mesh_shape=None):
    """A compiled ``LlamaCausalLM``; on a mesh, laid out by keras-hub's map."""
    import contextlib

    import keras
    import keras_hub

    import tfshard

    scope = contextlib.nullcontext()
    if mesh_shape is not None:
        layout_map = keras_hub.models.LlamaBackbone.get_layout_map(keras_mesh(mesh_shape))
        scope = tfshard.StrategyBuilder.from_keras(layout_map).build().scope()
    with scope:
        keras.utils.set_random_seed(SEED)
        backbone = keras_hub.models.LlamaBackbone(**{k: config[k] for k in BACKBONE_KEYS})
        model = keras_hub.models.LlamaCausalLM(backbone=backbone, preprocessor=None)
        model.compile(
            optimizer=keras.optimizers.Adam(LEARNING_RATE),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            weighted_metrics=[],
        )
    return model


class _TensorFlowRun:
    def __init__(self, model, x, y, batch_size):
        self.model, self.x, self.y, self.batch = model, x, y, batch_size
        self.start = 0

    def fit(self, steps):
        rows = steps * self.batch
        if self.start + rows > len(self.y):
            self.start = 0
        part = slice(self.start, self.start + rows)
        self.start += rows
        from tfshard.app._jax_llama import StepTimer  # Keras + keras-hub only: the JAX child's timer

        timer = StepTimer()
        self.model.fit({k: v[part] for k, v in self.x.items()}, self.y[part],
                       batch_size=self.batch, epochs=1, shuffle=False, verbose=0,
                       callbacks=[timer])
        return np.diff(timer.times).tolist(), timer.losses, np.diff(timer.cpu).tolist()

    def per_device_bytes(self):
        from tfshard.report import per_device_bytes

        return per_device_bytes(list(self.model.weights) + list(self.model.optimizer.variables))

    def close(self):
        pass


class _JaxRun:
    """The JAX child process, started once and driven by JSON lines."""

    def __init__(self, config, mesh_shape, weights, x, y, workdir):
        data = os.path.join(workdir, "data.npz")
        np.savez(data, labels=y, **x)
        weights_file = os.path.join(workdir, "weights.npz")
        np.savez(weights_file, **{f"w{i}": w for i, w in enumerate(weights)})
        env = {k: v for k, v in os.environ.items() if not k.startswith("TFSHARD_COMM")}
        env.update(
            KERAS_BACKEND="jax",
            JAX_PLATFORMS="cpu",
            XLA_FLAGS=f"--xla_force_host_platform_device_count={max(8, mesh_shape[0] * mesh_shape[1])}",
            TF_CPP_MIN_LOG_LEVEL=env.get("TF_CPP_MIN_LOG_LEVEL", "2"),
            TFSHARD_BENCH_REQUEST=json.dumps({
                "backbone": {k: config[k] for k in BACKBONE_KEYS},
                "mesh": list(mesh_shape), "batch_size": config["batch_size"],
                "learning_rate": LEARNING_RATE, "data": data, "weights": weights_file,
            }),
        )
        script = os.path.join(os.path.dirname(__file__), "_jax_llama.py")
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, script], env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        self.bytes = None
        self.weight_bytes = self._read()["per_device_weight_bytes"]

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith("@@"):
                return json.loads(line[2:])
        self.proc.wait(timeout=60)
        self.stderr.seek(0)
        raise RuntimeError(f"the JAX Llama reference failed:\n{self.stderr.read()[-3000:]}")

    def fit(self, steps):
        self.proc.stdin.write(json.dumps({"steps": steps}) + "\n")
        self.proc.stdin.flush()
        reply = self._read()
        self.bytes = reply["per_device_bytes"]
        return reply["times"], reply["losses"], reply["cpu"]

    def per_device_bytes(self):
        return self.bytes

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
        self.stderr.close()


def _jax_available():
    import importlib.util

    return importlib.util.find_spec("jax") is not None


def bench_llama(config, *, meshes=((2, 4),), jax_meshes=((2, 4),), steps=5, rounds=3, out=print):
    """Time the case on every stack, interleaved; print and return results.

    Returns ``{"config", "steps", "rounds", "runs": {name: {...}},
    "ratios": {...}, "loss_max_rel_diff": float}``; each run holds
    ``ms_per_step`` (median of steady steps over rounds), ``round_ms``
    (each round's median), ``losses`` (every step's running loss),
    ``per_device_bytes`` (parameters + optimizer state) and
    ``first_fit_s`` (the first fit call, tracing and compiling included).
    """
    steps = max(int(steps), 3)
    x, y = make_data(config, steps * rounds)
    runs = {}
    plain = build_llama(config)
    runs[PLAIN] = _TensorFlowRun(plain, x, y, config["batch_size"])
    weights = plain.get_weights()
    for shape in meshes:
        model = build_llama(config, tuple(shape))
        model.set_weights(weights)
        runs["tfshard %dx%d" % tuple(shape)] = _TensorFlowRun(model, x, y, config["batch_size"])
    workdir = tempfile.TemporaryDirectory(prefix="tfshard_llama_")
    try:
        if jax_meshes and not _jax_available():
            out("(JAX is not installed: pip install jax, to compare with Keras's JAX backend)")
            jax_meshes = ()
        for shape in jax_meshes:
            runs["jax ModelParallel %dx%d" % tuple(shape)] = _JaxRun(
                config, tuple(shape), weights, x, y, workdir.name
            )
        samples = {name: {"times": [], "cpu": [], "losses": [], "round_ms": []} for name in runs}
        for _ in range(rounds):
            for name, run in runs.items():
                begin = time.perf_counter()
                times, losses, cpu = run.fit(steps)
                record = samples[name]
                record.setdefault("first_fit_s", time.perf_counter() - begin)
                record["times"].extend(times[1:])
                record["cpu"].extend(cpu[1:])
                record["round_ms"].append(1000 * float(np.median(times[1:])))
                record["losses"].extend(losses)
        results = {}
        for name, run in runs.items():
            record = samples[name]
            results[name] = {
                "ms_per_step": 1000 * float(np.median(record["times"])),
                "cpu_ms_per_step": 1000 * float(np.median(record["cpu"])),
                "round_ms": record["round_ms"],
                "losses": record["losses"],
                "per_device_bytes": run.per_device_bytes(),
                "first_fit_s": record["first_fit_s"],
            }
    finally:
        for run in runs.values():
            run.close()
        workdir.cleanup()
    return _report(config, results, steps, rounds, out)


def _report(config, results, steps, rounds, out):
    base = results[PLAIN]
    reference = np.asarray(base["losses"])
    diff = 0.0
    for r in results.values():
        diff = max(diff, float(np.max(np.abs(np.asarray(r["losses"]) - reference) / np.abs(reference))))
    ratios, cpu_ratios = {}, {}
    for name, r in results.items():
        if name.startswith("tfshard"):
            mesh = name.split()[-1]
            ratios[f"{name} / {PLAIN}"] = r["ms_per_step"] / base["ms_per_step"]
            cpu_ratios[f"{name} / {PLAIN}"] = r["cpu_ms_per_step"] / base["cpu_ms_per_step"]
            jax = results.get(f"jax ModelParallel {mesh}")
            if jax is not None:
                ratios[f"{name} / jax ModelParallel {mesh}"] = r["ms_per_step"] / jax["ms_per_step"]
                cpu_ratios[f"{name} / jax ModelParallel {mesh}"] = (
                    r["cpu_ms_per_step"] / jax["cpu_ms_per_step"])
    tokens = config["batch_size"] * config["seq_len"]
    out(f"keras-hub Llama ({', '.join(f'{k}={v}' for k, v in config.items())}), Adam, model.fit; "
        f"{steps} steps x {rounds} interleaved rounds, median of steady steps")
    header = (f"{'run':<26}{'ms/step':>9}{'CPU ms/step':>12}{'tokens/s':>10}{'rounds (ms)':>26}"
              f"{'MiB/device':>12}")
    out(header)
    out("-" * len(header))
    for name, r in results.items():
        rounds_text = " ".join(f"{t:.0f}" for t in r["round_ms"])
        mib = "-" if r["per_device_bytes"] is None else f"{r['per_device_bytes'] / 2**20:.2f}"
        out(f"{name:<26}{r['ms_per_step']:>9.1f}{r['cpu_ms_per_step']:>12.1f}"
            f"{tokens * 1000 / r['ms_per_step']:>10.0f}"
            f"{rounds_text:>26}{mib:>12}")
    for name, ratio in ratios.items():
        out(f"  {name}: {ratio:.2f}x wall, {cpu_ratios[name]:.2f}x CPU time")
    out(f"  losses agree across runs: max relative difference {diff:.1e} "
        f"over {len(reference)} steps")
    return {"case": "keras-hub llama", "config": config, "steps": steps, "rounds": rounds,
            "runs": results, "ratios": ratios, "cpu_ratios": cpu_ratios, "loss_max_rel_diff": diff}
