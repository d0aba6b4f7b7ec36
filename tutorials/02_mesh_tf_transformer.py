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
# # A Mesh-TensorFlow transformer: data × model parallel
#
# This notebook trains tfshard's reference transformer language model on
# four meshes of 8 devices: one device (1×1), pure tensor parallelism (1×8),
# 2-way data × 4-way tensor parallelism (2×4) and pure data parallelism
# (8×1). The layout is chosen by Mesh-TensorFlow **layout rules**, a string
# that maps the model's logical dimensions (`heads`, `d_ff`, `vocab`,
# `batch`) to mesh axes, so changing the split is a one-line edit. Each run
# is checked against plain Keras on one device, and the per-device memory
# of every layout is plotted.
#
# Virtual devices must exist before TensorFlow starts, so that comes first.

# %%
import os

import tfshard

tfshard.use_virtual_devices(8)
SMALL = bool(os.environ.get("TFSHARD_TUTORIAL_SMALL"))  # the test suite sets this

# %%
import contextlib

import matplotlib.pyplot as plt
import numpy as np

from tfshard import report
from tfshard.app import config as config_lib
from tfshard.app import data, estimate, models, plots

# %% [markdown]
# ## The model and the data
#
# `tfshard.app.models.build` makes the same decoder-only transformer as
# `tfshard train configs/transformer_2x4.yaml`: a vocab-parallel byte
# embedding (its table is reused for the output logits), pre-norm blocks of
# head-parallel attention and a Megatron feed-forward pair
# (`ColumnParallelDense` → `RowParallelDense`), and a vocab-parallel loss
# that never gathers the logits. The training text is the Python standard
# library's own source code, read as bytes: it is on every machine.

# %%
MODEL = config_lib.defaults()["model"]  # the model section of a config
if SMALL:
    MODEL.update(d_model=32, heads=8, d_ff=64, layers=1, seq_len=16)
    STEPS, BATCH = 6, 8
else:
    MODEL.update(d_model=64, heads=8, d_ff=256, layers=2, seq_len=64)
    STEPS, BATCH = 60, 32
print({key: MODEL[key] for key in ("d_model", "heads", "d_ff", "vocab", "layers", "seq_len")})

tokens = data.stdlib_bytes(200_000 if SMALL else 2_000_000)
train_tokens, held_out_tokens = data.split_tokens(tokens)
x, y = data.lm_examples(train_tokens, MODEL["seq_len"], STEPS * BATCH, seed=0)
x_eval, y_eval = data.lm_examples(held_out_tokens, MODEL["seq_len"], 2 * BATCH, seed=1)
print("inputs", x.shape, "targets (inputs shifted by one byte)", y.shape)
print(repr(bytes(x[0, :40].astype("uint8"))))

# %% [markdown]
# ## Layout rules
#
# Every tfshard layer names the logical dimensions of its weights: the
# attention kernels are `(d_model, heads, head_dim)`, the feed-forward
# kernels `(d_model, d_ff)` and `(d_ff, d_model)`, the embedding table
# `(vocab, d_model)`. A rule string in Mesh-TF's syntax maps those names to
# mesh axes; a name it does not mention stays whole (replicated). Megatron's
# split is:

# %%
RULES = "batch:batch,heads:model,d_ff:model,vocab:model"


def strategy_for(data_ways, model_ways, rules=RULES, zero=False):
    """A strategy whose layout is exactly ``rules``. (``.tensor_parallel("model")``
    would also map heads, d_ff, vocab and kv_heads to "model" by default.)"""
    mesh = tfshard.Mesh({"batch": data_ways, "model": model_ways})
    builder = tfshard.StrategyBuilder(mesh).data_parallel("batch").rules(rules)
    if zero:
        builder.shard_optimizer_state("batch")  # ZeRO-1: Adam's slots split over the data axis too
    return builder.build()


def build(strategy=None):
    """The compiled model (same seed, so the same initial weights), sharded
    if a strategy is given. The optimizer's slots are created in the scope
    too, so they take their parameters' layouts."""
    with strategy.scope() if strategy else contextlib.nullcontext():
        model = models.build(MODEL, learning_rate=3e-3, seed=0)
        model.optimizer.build(model.trainable_variables)
    return model


strategy = strategy_for(2, 4)
model = build(strategy)
print(strategy.logical_rules)
print(report.variable_table(model.weights))

# %% [markdown]
# Reading the table: `block_0/attention/query/kernel` has spec
# `(-, model, -)`, so its heads are split 4 ways and each device holds
# `heads / 4` of them; `ffn_in/kernel` is split by columns and `ffn_out/kernel`
# by rows (one all-reduce after the pair); the embedding table is split by
# vocabulary rows. Norms and position embeddings are small and replicated.
#
# ## Train on every mesh, and with plain Keras
#
# Outside a strategy the tfshard layers *are* their Keras bases, so
# `build()` with no strategy is the plain Keras model, with the same initial
# weights: the single-device reference. The same batches, in the same
# order, go to each run; `train_on_batch` returns each step's loss.

# %%
MESHES = [(1, 1), (1, 8), (2, 4), (8, 1)]


def train(model):
    losses = []
    for step in range(STEPS):
        batch = slice(step * BATCH, (step + 1) * BATCH)
        losses.append(model.train_on_batch(x[batch], y[batch], return_dict=True)["loss"])
    return np.array(losses)


runs = {}
for name, strategy in [("plain Keras", None)] + [("%dx%d" % shape, strategy_for(*shape)) for shape in MESHES]:
    model = build(strategy)
    losses = train(model)
    held_out = model.evaluate(x_eval, y_eval, batch_size=BATCH, verbose=0)
    runs[name] = {"model": model, "losses": losses, "held_out": held_out}
    print(f"{name:>12}: loss {losses[0]:.4f} -> {losses[-1]:.4f}, held-out {held_out:.4f}")

# %% [markdown]
# ## The same numbers on every mesh
#
# Splitting a computation changes only the order of some float32 sums, so
# every mesh's losses match plain Keras to rounding, step after step, and
# so do the trained weights.

# %%
reference = runs["plain Keras"]
for name, run in runs.items():
    gap = np.abs(run["losses"] - reference["losses"]).max()
    weight_gap = max(
        np.abs(a - b).max() for a, b in zip(run["model"].get_weights(), reference["model"].get_weights())
    )
    print(f"{name:>12}: max |loss - plain| = {gap:.1e}, max |weight - plain| = {weight_gap:.1e}")
    np.testing.assert_allclose(run["losses"], reference["losses"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(run["held_out"], reference["held_out"], rtol=1e-4)
    assert weight_gap < 1e-3

# %%
fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.5))
plots.loss_curves({name: run["losses"] for name, run in runs.items()}, ax=left,
                  title="training loss per step (the curves coincide)")
for name, run in runs.items():
    if name != "plain Keras":
        right.plot(np.arange(1, STEPS + 1), run["losses"] - reference["losses"], "o-", markersize=3, label=name)
right.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
right.set_xlabel("step")
right.set_ylabel("loss - plain Keras loss")
right.set_title("difference from one device (float32 rounding)")
right.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Per-device memory
#
# `tfshard.report` reads every variable's per-device shard shape (Adam's
# slots included). Tensor parallelism divides the split weights and their
# optimizer state by the model-axis size; data parallelism copies them.

# %%
GROUPS = {  # regexes over weight paths
    "embedding": r"token_embedding",
    "attention": r"attention/(query|key|value|attention_output)",
    "feed-forward": r"ffn_(in|out)",
    "norms, positions": r".",
}


def memory(model):
    """Per-device bytes of the weights by group, plus Adam's state (its m
    and v are laid out like their parameters)."""
    parts = report.per_device_bytes_by_group(model.weights, GROUPS)
    parts["optimizer state"] = report.per_device_bytes(model.optimizer.variables)
    return parts


by_mesh = {name: memory(run["model"]) for name, run in runs.items() if name != "plain Keras"}
for name, parts in by_mesh.items():
    print(f"{name}: {sum(parts.values()) / 1024:.1f} KiB per device")
one_device = sum(by_mesh["1x1"].values())
assert sum(by_mesh["1x8"].values()) < one_device / 4  # almost everything is split 8 ways
assert sum(by_mesh["8x1"].values()) == one_device  # pure data parallel: full copies

# %% [markdown]
# The rules are the only thing that decides this. On the same 2×4 mesh,
# splitting more logical dimensions saves more memory, and ZeRO-1
# (`shard_optimizer_state("batch")`) also splits Adam's state over the data
# axis. These models are only built, not trained.

# %%
VARIANTS = {
    "batch only": dict(rules="batch:batch"),
    "+heads": dict(rules="batch:batch,heads:model"),
    "+d_ff": dict(rules="batch:batch,heads:model,d_ff:model"),
    "+vocab": dict(rules=RULES),
    "+ZeRO-1": dict(rules=RULES, zero=True),
}
by_rules = {name: memory(build(strategy_for(2, 4, **kwargs))) for name, kwargs in VARIANTS.items()}
totals = [sum(parts.values()) for parts in by_rules.values()]
assert all(a > b for a, b in zip(totals, totals[1:])), totals

fig, (left, right) = plt.subplots(1, 2, figsize=(12, 3.8))
plots.memory_bars(by_mesh, ax=left, title="per device, by mesh shape (Megatron rules)")
plots.memory_bars(by_rules, ax=right, title="per device on 2x4, by layout rules")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## What it costs in communication
#
# The Megatron split all-reduces activations over the model axis (4 per
# block per step: attention and feed-forward outputs forward, their input
# gradients backward); data parallelism all-reduces gradients over the batch
# axis. `tfshard inspect` prints this estimate for a config, and
# `tfshard.comm.count_collectives` counts the collectives DTensor really
# inserted (see `tests/test_comm.py`).

# %%
for shape in MESHES[1:]:
    config = config_lib.validate(
        {"model": MODEL, "mesh": {"batch": shape[0], "model": shape[1]}, "train": {"batch_size": BATCH}}
    )
    print(estimate.communication_estimate(config), "\n")
