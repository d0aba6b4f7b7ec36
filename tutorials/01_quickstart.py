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
# # tfshard quickstart: a mesh, layouts, `model.fit`, and the shards
#
# This notebook splits a small Keras model across 8 devices: 2-way data
# parallel × 4-way tensor parallel. On a machine without accelerators the 8
# devices are virtual CPUs, which must be created before TensorFlow starts,
# so that is the first cell.

# %%
import os

import tfshard

tfshard.use_virtual_devices(8)
SMALL = bool(os.environ.get("TFSHARD_TUTORIAL_SMALL"))  # the test suite sets this

# %% [markdown]
# ## A mesh and a strategy
#
# A mesh names the axes of a device grid. The strategy says which axis
# splits batches (data parallel) and which splits layers (tensor parallel).

# %%
import keras
import numpy as np

mesh = tfshard.Mesh({"batch": 2, "model": 4})
strategy = tfshard.StrategyBuilder(mesh).data_parallel("batch").tensor_parallel("model").build()
print(mesh, mesh.shape, mesh.size)

# %% [markdown]
# ## A Megatron MLP
#
# `ColumnParallelDense` splits its output units over the `model` axis;
# `RowParallelDense` splits its inputs and all-reduces its output. Build the
# model inside `strategy.scope()`; outside a scope the same layers are plain
# `keras.layers.Dense`.

# %%
def build(column, row):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((20,)),
            column(128, activation="relu", name="ffn_in"),
            keras.layers.LayerNormalization(),
            row(3, name="ffn_out"),
        ],
        name="mlp",
    )
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


with strategy.scope():
    sharded = build(tfshard.layers.ColumnParallelDense, tfshard.layers.RowParallelDense)
plain = build(keras.layers.Dense, keras.layers.Dense)

# %% [markdown]
# ## Train with plain Keras
#
# `fit`, `evaluate` and `predict` are Keras's own. Batches are split over the
# `batch` axis; the last, partial batch is kept (no sample is dropped).

# %%
rng = np.random.RandomState(0)
x = rng.randn(203 if not SMALL else 45, 20).astype("float32")
y = (x[:, :3] @ rng.randn(3, 3)).argmax(-1)
epochs = 5 if not SMALL else 2

history = sharded.fit(x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0)
reference = plain.fit(x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0)
for epoch, (a, b) in enumerate(zip(history.history["loss"], reference.history["loss"])):
    print(f"epoch {epoch}: tfshard {a:.5f}  plain Keras {b:.5f}")

# %% [markdown]
# The two runs are the same computation, so they match to float32 rounding:

# %%
gap = np.abs(sharded.predict(x, verbose=0) - plain.predict(x, verbose=0)).max()
print(f"max |prediction difference| = {gap:.2e}")
assert gap < 1e-4

# %% [markdown]
# ## Where the bytes live
#
# Each variable's spec names the mesh axis that splits each dimension. Adam's
# slots take their parameter's layout, so they are split too.

# %%
print(strategy.describe(sharded))

# %%
kernel = sharded.get_layer("ffn_in").kernel
print("spec", tfshard.spec_of(kernel), "global", tuple(kernel.shape), "per device", tfshard.local_shape(kernel))
