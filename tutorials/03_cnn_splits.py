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
# # Splitting a CNN: by channels and by image tiles
#
# Mesh-TensorFlow splits convolutional networks two ways, and tfshard has
# layers for both:
#
# * **Channel split** (`ChannelParallelConv2D`): each device computes some of
#   a convolution's output channels (or reads some of its input channels),
#   like Megatron's column/row pair for dense layers.
# * **Spatial split** (`SpatialParallelConv2D`): each device holds a band (or
#   a tile) of every image. A 3×3 convolution near a band's edge needs a row
#   of the neighbouring band, the *halo*, which the layer exchanges.
#
# Both train the small ResNet of `tfshard.app.models` on scikit-learn's 8×8
# handwritten digits, and both are checked against plain Keras.

# %%
import os

import tfshard

tfshard.use_virtual_devices(8)
SMALL = bool(os.environ.get("TFSHARD_TUTORIAL_SMALL"))  # the test suite sets this

# %%
import contextlib

import keras
import matplotlib.pyplot as plt
import numpy as np

from tfshard import report
from tfshard.app import config as config_lib
from tfshard.app import data, models, plots

images, labels = data.digits()  # (1797, 8, 8, 1) in [0, 1], labels 0..9
rng = np.random.RandomState(0)
order = rng.permutation(len(images))
images, labels = images[order], labels[order]
x_test, y_test = images[:300], labels[:300]
x_train, y_train = images[300:], labels[300:]

STEPS, BATCH = (4, 16) if SMALL else (120, 32)
MODEL = config_lib.defaults()["model"]
MODEL.update(kind="cnn", width=16 if SMALL else 32, blocks=1 if SMALL else 2)

fig, axes = plt.subplots(1, 8, figsize=(8, 1.3))
for ax, image, label in zip(axes, x_train, y_train):
    ax.imshow(image[..., 0], cmap="gray_r")
    ax.set_title(str(label))
    ax.axis("off")
plt.show()

# %% [markdown]
# ## The model, its splits, and plain Keras
#
# `tfshard.app.models.build` makes a stem convolution, residual blocks of two
# 3×3 convolutions with BatchNormalization, global average pooling and a
# classifier. `split="channels"` uses channel-parallel convolutions,
# `split="spatial"` spatial ones. Built outside a strategy, both are the
# same plain Keras ResNet with the same initial weights: the reference.


# %%
def strategy_for(mesh_axes, rules):
    mesh = tfshard.Mesh(mesh_axes)
    return tfshard.StrategyBuilder(mesh).data_parallel("batch").rules(rules).build()


def build(split, strategy=None):
    with strategy.scope() if strategy else contextlib.nullcontext():
        model = models.build({**MODEL, "split": split}, learning_rate=3e-3, seed=0)
        model.optimizer.build(model.trainable_variables)
    return model


def train(model, steps=STEPS, dtype="float32"):
    """Per-step training losses, then the test loss and accuracy."""
    losses = []
    for step in range(steps):
        batch = np.arange(step * BATCH, (step + 1) * BATCH) % len(x_train)  # epoch after epoch
        losses.append(
            model.train_on_batch(x_train[batch].astype(dtype), y_train[batch], return_dict=True)["loss"]
        )
    test = model.evaluate(x_test.astype(dtype), y_test, batch_size=BATCH, verbose=0, return_dict=True)
    return np.array(losses), test


plain = build("channels")
for mine, theirs in zip(plain.get_weights(), build("spatial").get_weights()):
    np.testing.assert_array_equal(mine, theirs)
runs = {"plain Keras": (plain, *train(plain))}

# %% [markdown]
# ## Channel split
#
# On a 2×4 mesh with rules `batch:batch,channels:model`, the first
# convolution of each block splits its *output* channels 4 ways and the
# second splits its *input* channels, so the pair needs one all-reduce
# (Megatron's pattern). The stem stays whole.

# %%
channels_strategy = strategy_for({"batch": 2, "model": 4}, "batch:batch,channels:model")
channel_model = build("channels", channels_strategy)
print(report.variable_table([w for w in channel_model.weights if w.path.endswith("kernel")]))
runs["channel split 2x4"] = (channel_model, *train(channel_model))

# %% [markdown]
# ## Spatial split: how an image is tiled
#
# With rules `batch:batch,height:model` on the same 2×4 mesh, a batch of
# images laid out as `("batch", "model", None, None)` is split two ways by
# image and four ways by rows: each device holds half of the images and a
# band of 2 of their 8 rows. `describe_tiling` prints the plan;
# `tfshard.app.plots.tiling` draws it, with the device ids on each band.

# %%
spatial_strategy = strategy_for({"batch": 2, "model": 4}, "batch:batch,height:model")
mesh = spatial_strategy.mesh
SPEC = ("batch", "model", None, None)
sample = x_train[:2]  # one image per data-parallel half
print(report.describe_tiling(SPEC, sample.shape, mesh))

fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6))
plots.tiling(sample, SPEC, mesh, ax=left, title="2x4 mesh: 4 row bands per image")
plots.tiling(sample, SPEC, mesh, ax=right, halo_of=1,
             title="device 1 convolves its band plus 1 halo row\nfrom devices 0 and 2 (dashed)")
fig.tight_layout()
plt.show()

# %% [markdown]
# The picture is what the devices really hold: place the two images on the
# mesh with that spec and read back each device's piece.

# %%
placed = spatial_strategy.place(sample, SPEC)
shards = report.device_shards(placed)
for tile, shard in zip(report.device_tiles(SPEC, sample.shape, mesh), shards):
    np.testing.assert_array_equal(shard, sample[tile["slices"]])
print("device 1 holds", shards[1].shape, "= image 0, rows", report.device_tiles(SPEC, sample.shape, mesh)[1]["slices"][1])

# %% [markdown]
# ### Why the halo matters
#
# Convolving each band on its own, as if its neighbours were zero padding,
# is wrong on every row next to a band border. `SpatialParallelConv2D`
# exchanges those rows and matches the whole-image convolution exactly.

# %%
conv = keras.layers.Conv2D(4, 3, padding="same", use_bias=False)
whole = conv(sample).numpy()
bands = np.concatenate([conv(sample[:, r:r + 2]).numpy() for r in range(0, 8, 2)], axis=1)
with spatial_strategy.scope():
    split_conv = tfshard.layers.SpatialParallelConv2D(4, 3, padding="same", use_bias=False)
    split_conv.build(sample.shape)
split_conv.set_weights(conv.get_weights())
out = split_conv(placed)
print("output spec", tfshard.spec_of(out), "per-device shape", tfshard.local_shape(out))
with_halo = tfshard.to_numpy(out)
np.testing.assert_allclose(with_halo, whole, rtol=1e-5, atol=1e-5)

fig, axes = plt.subplots(1, 2, figsize=(6, 3.2))
for ax, result, title in ((axes[0], bands, "bands alone"), (axes[1], with_halo, "with halo exchange")):
    ax.imshow(np.abs(result - whole)[0].max(-1), cmap="Reds", vmin=0, vmax=np.abs(bands - whole).max())
    ax.set_title(f"{title}\nmax |error| {np.abs(result - whole).max():.1e}", fontsize=10)
    for border in (1.5, 3.5, 5.5):
        ax.axhline(border, color="black", linestyle="--", linewidth=1)
    ax.set_xticks([])
    ax.set_yticks([])
fig.suptitle("error of a 3x3 convolution of image 0 (dashed: band borders)", fontsize=10)
fig.tight_layout()
plt.show()

# %% [markdown]
# ### Tiles in two dimensions
#
# A third mesh axis splits the width too: on a `batch=2, rows=2, cols=2`
# mesh, rules `height:rows,width:cols` give every device a 4×4 tile. The
# corner rows arrive through the width exchange of the height-padded tile.

# %%
tiles_strategy = strategy_for({"batch": 2, "rows": 2, "cols": 2}, "batch:batch,height:rows,width:cols")
TILE_SPEC = ("batch", "rows", "cols", None)
plots.tiling(sample, TILE_SPEC, tiles_strategy.mesh, halo_of=0,
             title="2x2x2 mesh: 2x2 tiles per image; device 0's 3x3-conv window dashed")
plt.show()

# %% [markdown]
# ## Train the spatially split ResNet
#
# Every convolution of the model exchanges halos; BatchNormalization's
# moments reduce over the whole (split) batch and image, so it is
# synchronized BatchNorm with no extra code; global average pooling
# all-reduces over the bands.

# %%
for name, strategy in (("spatial split 2x4 (bands)", spatial_strategy),
                       ("spatial split 2x2x2 (tiles)", tiles_strategy)):
    model = build("spatial", strategy)
    runs[name] = (model, *train(model))

# %% [markdown]
# ## Parity with plain Keras
#
# Each split model starts out computing the same losses as the plain Keras
# model. Over many steps the float32 rounding differences (the split sums
# in another order) grow, as they would between two GPUs of different
# kinds: Adam and BatchNorm amplify them. The curves stay together and the
# test accuracy ends up the same to a point or two.

# %%
_, plain_losses, plain_test = runs["plain Keras"]
SPLITS = ("channel split 2x4", "spatial split 2x4 (bands)", "spatial split 2x2x2 (tiles)")
for name in SPLITS:
    _, losses, test = runs[name]
    print(f"{name}: test accuracy {test['accuracy']:.3f} (plain {plain_test['accuracy']:.3f}); "
          f"|loss gap| at step 3: {abs(losses[2] - plain_losses[2]):.1e}, largest: "
          f"{np.abs(losses - plain_losses).max():.1e}")
    np.testing.assert_allclose(losses[:3], plain_losses[:3], rtol=1e-5, atol=1e-5)
    if not SMALL:  # (a barely trained model's accuracy hinges on near-ties)
        assert abs(test["accuracy"] - plain_test["accuracy"]) < 0.03

plots.loss_curves({name: losses for name, (_, losses, _) in runs.items()},
                  title="training loss per step, float32")
plt.show()

# %% [markdown]
# To see that a split computes *exactly* the plain model's function, take
# rounding out of the picture: in float64 the channel-split and the
# spatially split models track plain Keras to ~1e-15, step after step.

# %%
keras.config.set_floatx("float64")
keras.config.set_dtype_policy("float64")  # layers made from here on compute in float64
try:
    steps64 = 3 if SMALL else 25
    plain64 = train(build("channels"), steps64, "float64")[0]
    for name, split, strategy in (("channel split 2x4", "channels", channels_strategy),
                                  ("spatial split 2x4", "spatial", spatial_strategy)):
        losses64 = train(build(split, strategy), steps64, "float64")[0]
        gap = np.abs(losses64 - plain64).max()
        print(f"{name}, float64, {steps64} steps: max |loss - plain Keras loss| = {gap:.1e}")
        assert gap < 1e-10
finally:
    keras.config.set_floatx("float32")
    keras.config.set_dtype_policy("float32")
