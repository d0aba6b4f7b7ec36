# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Checkpoints across meshes, and how the split scales
#
# A sharded checkpoint is written shard by shard: no device or host ever
# holds the whole model. This notebook saves one on a 2×4 mesh and restores
# it onto a 4×2 mesh, a 1×8 mesh and a single device, checking that every
# weight and every optimizer slot comes back bit for bit. It then trains
# with `tfshard train` as two processes (`tfshard launch`), resumes that
# run in one process on another mesh, and looks at how per-device memory
# and communication scale with the mesh.

# %%
import os

import tfshard

tfshard.use_virtual_devices(8)
SMALL = bool(os.environ.get("TFSHARD_TUTORIAL_SMALL"))  # the test suite sets this

# %%
import contextlib
import json
import subprocess
import sys
import tempfile

import matplotlib.pyplot as plt
import numpy as np

from tfshard import report
from tfshard.app import config as config_lib
from tfshard.app import data, estimate, models, plots

WORK = tempfile.mkdtemp(prefix="tfshard-tutorial-04-")
MODEL = config_lib.defaults()["model"]
if SMALL:
    MODEL.update(d_model=32, heads=8, d_ff=64, layers=1, seq_len=16)
    STEPS, BATCH = 3, 8
else:
    MODEL.update(d_model=64, heads=8, d_ff=256, layers=2, seq_len=64)
    STEPS, BATCH = 20, 32
RULES = "batch:batch,heads:model,d_ff:model,vocab:model"

tokens = data.stdlib_bytes(200_000 if SMALL else 2_000_000)
x, y = data.lm_examples(tokens, MODEL["seq_len"], 2 * STEPS * BATCH, seed=0)


def strategy_for(data_ways, model_ways):
    mesh = tfshard.Mesh({"batch": data_ways, "model": model_ways})
    return tfshard.StrategyBuilder(mesh).data_parallel("batch").rules(RULES).build()


def build(strategy=None, seed=0):
    with strategy.scope() if strategy else contextlib.nullcontext():
        model = models.build(MODEL, learning_rate=3e-3, seed=seed)
        model.optimizer.build(model.trainable_variables)
    return model


def train(model, first_step, steps):
    losses = []
    for step in range(first_step, first_step + steps):
        batch = slice(step * BATCH, (step + 1) * BATCH)
        losses.append(model.train_on_batch(x[batch], y[batch], return_dict=True)["loss"])
    return np.array(losses)


# %% [markdown]
# ## Save on a 2×4 mesh
#
# Train a few steps, then save. `save_checkpoint` writes the weights, the
# optimizer's slots and iteration count, and a JSON manifest into
# `ckpt-<step>`, atomically: it writes a temporary directory, renames it,
# and writes a `COMMITTED` marker last, so a crash mid-save never leaves a
# checkpoint that looks complete.

# %%
source = build(strategy_for(2, 4))
train(source, 0, STEPS)
path = tfshard.save_checkpoint(source, os.path.join(WORK, "ckpts"))
print(path)
for name in sorted(os.listdir(path)):
    print(f"  {name:<40} {os.path.getsize(os.path.join(path, name)):>8} bytes")

manifest = tfshard.checkpoint.read_manifest(path)
print("step", manifest["step"], "mesh", manifest["mesh"]["axes"])
for entry in manifest["variables"][:4]:
    print(" ", entry["path"], entry["shape"], entry["spec"])

# %% [markdown]
# ## Restore onto other meshes, and onto one device
#
# Build the same model on each target, with a *different* initial seed so
# that nothing matches by accident, and restore. DTensor reads, on each
# device, just the slice that device's new layout needs.

# %%
def state(model):
    """Every weight and optimizer variable, as numpy (global values)."""
    return [v.numpy() for v in model.weights] + [v.numpy() for v in model.optimizer.variables]


expected = state(source)
targets = {"4x2": strategy_for(4, 2), "1x8": strategy_for(1, 8), "1 device (plain Keras)": None}
restored = {}
for name, strategy in targets.items():
    model = build(strategy, seed=1)
    assert not np.array_equal(state(model)[0], expected[0])
    tfshard.restore_checkpoint(model, os.path.join(WORK, "ckpts"))  # the latest committed checkpoint
    for got, want in zip(state(model), expected):
        np.testing.assert_array_equal(got, want)
    restored[name] = model
    kernel = model.get_layer("block_0").ffn_in.kernel
    print(f"{name:>24}: all {len(expected)} variables equal; ffn_in/kernel spec "
          f"{tfshard.spec_of(kernel)}, per device {tfshard.local_shape(kernel)}")

# %% [markdown]
# The optimizer state came back too (Adam's moments and its step count), so
# training goes on from where it stopped. Continue the 2×4 model and the
# model restored on 1×8 with the same batches: the losses agree.

# %%
more = 2 if SMALL else 10
continued = train(source, STEPS, more)
continued_1x8 = train(restored["1x8"], STEPS, more)
print("2x4 (never stopped):", np.round(continued, 5))
print("1x8 (restored)     :", np.round(continued_1x8, 5))
np.testing.assert_allclose(continued_1x8, continued, rtol=1e-4, atol=1e-4)

# %% [markdown]
# ## Resuming `tfshard train`, across processes and meshes
#
# `tfshard train` checkpoints into `<output.dir>/checkpoints` every
# `train.checkpoint_every` steps and at the end, and by default
# (`train.resume: true`) a re-run continues from the latest checkpoint, up
# to `train.steps` in all, on whatever mesh the config now names. It passes
# over the batches already trained, so the resumed run sees the same
# batches as a run that never stopped.
#
# On a cluster each host runs one process and the processes form one
# DTensor mesh (a *multi-client* job). `tfshard launch --processes N` starts
# N such processes on this machine, each bringing its share of the virtual
# CPUs (here 2 processes × 4 devices for the 2×4 mesh), and prefixes their
# output with their rank. Every process writes its own shards of a
# checkpoint; process 0 commits it and writes the metrics.
#
# Below, a two-process job trains 2 steps on 2×4; then this notebook's
# single process resumes it on a 1×8 mesh up to step 4. In a shell:
#
# ```bash
# tfshard launch --processes 2 -- tfshard train configs/transformer_2x4.yaml --steps 2
# tfshard train configs/transformer_2x4.yaml --steps 4 --set mesh.batch=1 --set mesh.model=8
# ```

# %%
from tfshard.app import cli

CONFIG = os.path.join("..", "configs", "transformer_2x4.yaml")
run_dir = os.path.join(WORK, "run")
SETTINGS = [f"output.dir={run_dir}", "data.eval_batches=1", f"data.max_bytes={200_000 if SMALL else 2_000_000}",
            f"train.batch_size={BATCH}"]
SETTINGS += [f"model.{key}={MODEL[key]}" for key in ("d_model", "d_ff", "layers", "seq_len")]


def train_args(steps, *extra):
    args = ["train", CONFIG, "--steps", str(steps)]
    for item in SETTINGS + list(extra):
        args += ["--set", item]
    return args


def metrics():
    with open(os.path.join(run_dir, "metrics.json")) as f:
        return json.load(f)


job = subprocess.run(
    [sys.executable, "-m", "tfshard.app.cli", "launch", "--processes", "2", "--",
     sys.executable, "-m", "tfshard.app.cli"] + train_args(2),
    capture_output=True, text=True, timeout=600,
)
print("\n".join(line for line in job.stdout.splitlines() if "held-out" in line or "mesh" in line))
assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
first = metrics()

# %% [markdown]
# Now resume in this process on 1×8 (this calls the CLI in-process, so the
# layout table and progress bar print here):

# %%
assert cli.main(train_args(4, "mesh.batch=1", "mesh.model=8")) == 0
resumed = metrics()
print("two processes:", first["mesh"], "steps", first["train_steps"], np.round(first["train_loss"], 4))
print("resumed      :", resumed["mesh"], "steps", resumed["train_steps"], np.round(resumed["train_loss"], 4))
print("checkpoints  :", [os.path.basename(p) for p in resumed["checkpoints"]])
assert resumed["start_step"] == 2 and resumed["train_steps"] == [3, 4]
# The resumed model starts from exactly the weights the two processes saved.
np.testing.assert_allclose(resumed["eval_before"]["loss"], first["eval_after"]["loss"], rtol=1e-5)

# %% [markdown]
# ## Scaling: memory per device
#
# Tensor parallelism divides a layer's weights (and Adam's two moments per
# weight) by the model-axis size; what is replicated (norms, biases of
# row-parallel layers, position embeddings) does not shrink. Building the
# model on meshes of 1, 2, 4 and 8 devices (no training) shows how close
# each size comes to the ideal 1/n. ZeRO-1 (`shard_optimizer_state`) also
# splits the optimizer state over the data axis.

# %%
WIDTHS = [32, 64] if SMALL else [64, 128, 256]
WAYS = [1, 2, 4, 8]
memory = {}
for width in WIDTHS:
    sized = {**MODEL, "d_model": width, "d_ff": 4 * width}
    memory[width] = []
    for ways in WAYS:
        with strategy_for(1, ways).scope():
            model = models.build(sized, seed=0)
            model.optimizer.build(model.trainable_variables)
        memory[width].append(report.per_device_bytes(list(model.weights) + list(model.optimizer.variables)))
    print(f"d_model={width}: " + ", ".join(f"{n} device(s) {b / 2**20:.2f} MiB" for n, b in zip(WAYS, memory[width])))

fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(WAYS, 1 / np.array(WAYS), ":", color="gray", label="ideal 1/n")
for width, values in memory.items():
    ax.plot(WAYS, np.array(values) / values[0], "o-", label=f"d_model={width} ({values[0] / 2**20:.2f} MiB on 1)")
ax.set_xscale("log", base=2)
ax.set_yscale("log", base=2)
ax.set_xticks(WAYS, [str(n) for n in WAYS])
ax.set_yticks([1, 1 / 2, 1 / 4, 1 / 8], ["1", "1/2", "1/4", "1/8"])
ax.minorticks_off()
ax.set_xlabel("devices on the model axis (1 x n mesh)")
ax.set_ylabel("per-device memory\n(fraction of one device)")
ax.set_title("weights + Adam state per device")
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

for width, values in memory.items():
    assert all(a > b for a, b in zip(values, values[1:]))  # more devices, less memory each
    assert values[-1] < values[0] / 4  # 8 ways saves most of it

# %%
with_zero = {}
for name, zero in (("2x4", False), ("2x4 + ZeRO-1", True)):
    builder = tfshard.StrategyBuilder(tfshard.Mesh({"batch": 2, "model": 4})).data_parallel("batch").rules(RULES)
    if zero:
        builder.shard_optimizer_state("batch")
    with builder.build().scope():
        model = models.build(MODEL, seed=0)
        model.optimizer.build(model.trainable_variables)
    with_zero[name] = {
        "weights": report.per_device_bytes(model.weights),
        "optimizer state": report.per_device_bytes(model.optimizer.variables),
    }
plots.memory_bars(with_zero, title="ZeRO-1 halves Adam's state per device on 2 data shards")
plt.show()

# %% [markdown]
# ## Scaling: communication per step
#
# Memory is what tensor parallelism buys; communication is what it costs.
# The Megatron split all-reduces one activation per attention and per
# feed-forward layer, forward and backward, over the model axis: the volume
# grows with the tokens per data shard, not with the weights. Data
# parallelism instead all-reduces every gradient once per step. The
# estimates below are what `tfshard inspect` prints; `tfshard bench` times
# the meshes and counts the collectives DTensor really inserted. (On
# virtual CPU devices all "devices" share the same cores, so step times
# do not show a speed-up; the mesh there checks correctness.)

# %%
for shape in ((1, 8), (2, 4), (4, 2), (8, 1)):
    config = config_lib.validate(
        {"model": MODEL, "mesh": {"batch": shape[0], "model": shape[1]}, "train": {"batch_size": BATCH}}
    )
    print(estimate.communication_estimate(config), "\n")

# %%
import shutil

shutil.rmtree(WORK)  # the checkpoints and runs of this notebook
