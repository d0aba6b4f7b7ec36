"""Spatially split images: halo-exchange Conv2D, pooling, BatchNorm and a
small ResNet, against plain Keras on the same weights."""

import glob
import os
import re
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
import tfshard
from tfshard.layers import (
    SpatialParallelAveragePooling2D,
    SpatialParallelConv2D,
    SpatialParallelMaxPooling2D,
    describe_tiling,
)
from tfshard.layers.spatial import DimPlan

from conftest import make_strategy, mesh_id

TOL = dict(rtol=1e-5, atol=1e-5)
B, W, C, F = 4, 7, 3, 4


def height_strategy(shape):
    return make_strategy(*shape, height="model")


def pick_height(n, k, s, padding):
    """The smallest height that splits into n bands (odd bands first)."""
    for odd_only in (True, False):
        for band in range(1, 16):
            if odd_only and band % 2 == 0:
                continue
            try:
                DimPlan(n * band, n, k, s, 1, padding, what="height", layer="t", axis="model")
            except tfshard.ShardingError:
                continue
            return n * band
    return None  # no height splits evenly in and out


def fwd_and_grads(layer, x, training=None):
    @tf.function
    def run(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x) if training is None else layer(x, training=training)
            # a weighted loss, so every output position matters differently
            loss = tf.reduce_mean(tf.square(y) * tf.range(1.0, 1.0 + y.shape[-1]))
        return y, tape.gradient(loss, [x] + layer.trainable_weights)

    return run(x)


def check_parity(plain, sharded, x, strat, training=None):
    if plain.weights or not plain.built:
        plain.build(x.shape)
        sharded.build(x.shape)
        sharded.set_weights(plain.get_weights())
    y_p, g_p = fwd_and_grads(plain, tf.constant(x), training)
    xs = strat.place(x, ("batch", "model", None, None))
    y_s, g_s = fwd_and_grads(sharded, xs, training)
    np.testing.assert_allclose(tfshard.to_numpy(y_s), y_p.numpy(), **TOL)
    assert len(g_s) == len(g_p)
    for gs, gp in zip(g_s, g_p):
        np.testing.assert_allclose(tfshard.to_numpy(gs), gp.numpy(), **TOL)
    return y_s, g_s


CONV_GRID = [(k, s, p) for p in ("same", "valid") for s in (1, 2) for k in (1, 3, 5, 7)]


@pytest.mark.parametrize("k,s,padding", CONV_GRID, ids=[f"k{k}-s{s}-{p}" for k, s, p in CONV_GRID])
def test_spatial_conv_parity_2x4(k, s, padding):
    run_conv_case((2, 4), k, s, padding)


SUBSET = [((1, 8), 3, 1, "same"), ((1, 8), 5, 2, "valid"), ((4, 2), 3, 2, "same"), ((4, 2), 7, 1, "valid")]


@pytest.mark.parametrize(
    "shape,k,s,padding", SUBSET, ids=[f"{mesh_id(m)}-k{k}-s{s}-{p}" for m, k, s, p in SUBSET]
)
def test_spatial_conv_parity_other_meshes(shape, k, s, padding):
    run_conv_case(shape, k, s, padding)


def run_conv_case(shape, k, s, padding):
    dp, n = shape
    h = pick_height(n, k, s, padding)
    strat = height_strategy(shape)
    if h is None:
        # e.g. "valid", k=3 on 4 bands: H = 4b gives H - 2 rows out, never
        # divisible by 4. No equal split exists; the layer says so.
        with strat.scope():
            layer = SpatialParallelConv2D(F, k, strides=s, padding=padding)
        with pytest.raises(tfshard.ShardingError, match="output height .* cannot be split"):
            layer(np.zeros((B, 8 * n, W, C), "float32"))
        return
    x = np.random.RandomState(k * 10 + s).randn(B, h, W, C).astype("float32")
    plain = keras.layers.Conv2D(F, k, strides=s, padding=padding, bias_initializer="random_normal")
    with strat.scope():
        layer = SpatialParallelConv2D(F, k, strides=s, padding=padding, bias_initializer="random_normal")
    y_s, _ = check_parity(plain, layer, x, strat)
    # the output stays split: each device holds one band of rows
    out_h = y_s.shape[1]
    assert tfshard.layout_of(y_s) == ("batch", "model", None, None)
    assert tfshard.local_shape(y_s) == (B // dp, out_h // n, y_s.shape[2], F)
    assert tfshard.layout_of(layer.kernel) == (None, None, None, None)


@pytest.mark.parametrize("k,s,padding", [(3, 1, "same"), (3, 2, "valid")], ids=["k3-s1-same", "k3-s2-valid"])
def test_height_and_width_split_2d_tiles(k, s, padding):
    mesh = tfshard.Mesh({"batch": 2, "h": 2, "w": 2})
    strat = (
        tfshard.StrategyBuilder(mesh).data_parallel("batch").rules({"height": "h", "width": "w"}).build()
    )
    x = np.random.RandomState(3).randn(B, 6, 6, C).astype("float32")  # 3x3-pixel tiles
    plain = keras.layers.Conv2D(F, k, strides=s, padding=padding, bias_initializer="random_normal")
    with strat.scope():
        layer = SpatialParallelConv2D(F, k, strides=s, padding=padding, bias_initializer="random_normal")
    plain.build(x.shape)
    layer.build(x.shape)
    layer.set_weights(plain.get_weights())
    y_p, g_p = fwd_and_grads(plain, tf.constant(x))
    xs = strat.place(x, ("batch", "h", "w", None))
    y_s, g_s = fwd_and_grads(layer, xs)
    np.testing.assert_allclose(tfshard.to_numpy(y_s), y_p.numpy(), **TOL)
    for gs, gp in zip(g_s, g_p):
        np.testing.assert_allclose(tfshard.to_numpy(gs), gp.numpy(), **TOL)
    assert tfshard.layout_of(y_s) == ("batch", "h", "w", None)
    assert tfshard.local_shape(y_s) == (B // 2, y_s.shape[1] // 2, y_s.shape[2] // 2, F)


POOLS = [
    ("max", 2, None, "valid", 8),
    ("max", 3, 2, "same", 16),
    ("avg", 3, 1, "same", 8),
    ("avg", 2, None, "valid", 8),
]


@pytest.mark.parametrize("kind,size,strides,padding,h", POOLS, ids=[f"{p[0]}{p[1]}-{p[3]}" for p in POOLS])
def test_pooling_on_split_images(kind, size, strides, padding, h):
    x = np.random.RandomState(5).randn(B, h, 6, C).astype("float32")
    base, ours = {
        "max": (keras.layers.MaxPooling2D, SpatialParallelMaxPooling2D),
        "avg": (keras.layers.AveragePooling2D, SpatialParallelAveragePooling2D),
    }[kind]
    plain = base(size, strides=strides, padding=padding)
    strat = height_strategy((2, 4))
    with strat.scope():
        layer = ours(size, strides=strides, padding=padding)
    y_s, _ = check_parity(plain, layer, x, strat)
    assert tfshard.layout_of(y_s) == ("batch", "model", None, None)
    assert tfshard.local_shape(y_s)[1] == y_s.shape[1] // 4


def test_stock_global_average_pooling_and_batchnorm_on_split_images():
    """Stock GAP and BatchNormalization reduce over the global tensor, so on
    a split image DTensor all-reduces across the data axis and the spatial
    shards: synchronized BatchNorm, equal to Keras on the full batch."""
    x = (np.random.RandomState(6).randn(B, 8, 6, C) * 3 + 1).astype("float32")
    strat = height_strategy((2, 4))
    check_parity(keras.layers.GlobalAveragePooling2D(), _in(strat, keras.layers.GlobalAveragePooling2D), x, strat)

    plain = keras.layers.BatchNormalization(momentum=0.5)
    sharded = _in(strat, keras.layers.BatchNormalization, momentum=0.5)
    y_s, _ = check_parity(plain, sharded, x, strat, training=True)
    assert tfshard.layout_of(y_s) == ("batch", "model", None, None)
    for p, s in zip(plain.weights, sharded.weights):  # moving stats updated alike
        np.testing.assert_allclose(s.numpy(), p.numpy(), **TOL)
    np.testing.assert_allclose(plain.moving_mean.numpy(), 0.5 * x.mean((0, 1, 2)), rtol=1e-5)


def _in(strat, cls, **kwargs):
    with strat.scope():
        return cls(**kwargs)


def resnet(conv, pool, seed, use_bias=True):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((16, 6, 3))
    x = conv(8, 3, padding="same", use_bias=use_bias)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    y = conv(8, 3, padding="same", use_bias=use_bias)(x)
    y = keras.layers.BatchNormalization()(y)
    x = keras.layers.ReLU()(keras.layers.Add()([x, y]))
    x = pool(2)(x)
    x = conv(8, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(3)(x))


@pytest.mark.parametrize("use_bias", [True, False], ids=["bias", "no-bias"])
def test_small_resnet_fit_matches_keras(use_bias):
    # use_bias=False: BatchNormalization right after the convolution (the
    # ResNet way) broke DTensor's own relayout gradient.
    rng = np.random.RandomState(8)
    x = rng.randn(16, 16, 6, 3).astype("float32")
    y = rng.randn(16, 3).astype("float32")
    plain = resnet(keras.layers.Conv2D, keras.layers.MaxPooling2D, 0, use_bias)
    strat = height_strategy((2, 4))
    with strat.scope():
        sharded = resnet(SpatialParallelConv2D, SpatialParallelMaxPooling2D, 0, use_bias)
        sharded.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    plain.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    for p, s in zip(plain.weights, sharded.weights):
        np.testing.assert_array_equal(p.numpy(), s.numpy())
    h_p = plain.fit(x, y, batch_size=8, epochs=3, verbose=0, shuffle=False).history["loss"]
    h_s = sharded.fit(x, y, batch_size=8, epochs=3, verbose=0, shuffle=False).history["loss"]
    np.testing.assert_allclose(h_s, h_p, rtol=1e-4, atol=1e-5)
    assert h_s[-1] < h_s[0]
    for p, s in zip(plain.weights, sharded.weights):
        np.testing.assert_allclose(s.numpy(), p.numpy(), rtol=1e-4, atol=1e-4)


# -------------------------------------------------------------- collectives
DUMP_SCRIPT = textwrap.dedent(
    """
    import sys
    import tfshard
    tfshard.use_virtual_devices(8)
    import keras
    import numpy as np, tensorflow as tf
    from tfshard.layers import SpatialParallelConv2D
    mesh = tfshard.Mesh({"batch": 2, "model": 4})
    strat = (tfshard.StrategyBuilder(mesh).data_parallel("batch")
             .rules({"height": "model"}).build())
    with strat.scope():
        layer = SpatialParallelConv2D(4, 3, padding="same")
        # The ResNet way: a bias-free conv, then BatchNormalization (its
        # output relayout takes the stop_gradient path of _unblock).
        bare = SpatialParallelConv2D(4, 3, padding="same", use_bias=False)
        norm = keras.layers.BatchNormalization()
    for built in (layer, bare, norm):
        built.build((None, 32, 8, 4))
    x = strat.place(np.ones((4, 32, 8, 4), "float32"), ("batch", "model", None, None))

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.square(layer(x)))
        return tape.gradient(loss, [x] + layer.trainable_weights)

    @tf.function
    def bn_step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.square(norm(bare(x), training=True)))
        return tape.gradient(loss, [x] + bare.trainable_weights + norm.trainable_weights)

    step(x)
    bn_step(x)
    """
)


def _collectives(mlir_text):
    out = []
    for line in mlir_text.splitlines():
        m = re.search(r'"tf\.DTensor(AllGather|AllReduce|AllScatter|AllToAll|ReduceScatter)"', line)
        if m:
            shape = re.search(r"-> tensor<([0-9x]+)x?f32>", line)
            dims = [int(d) for d in shape.group(1).split("x") if d] if shape else []
            out.append((m.group(1), int(np.prod(dims)) if dims else 1))
    return out


@pytest.fixture(scope="module")
def step_collectives(tmp_path_factory):
    """``{"step": [(kind, size)], "bn_step": [...]}``: the collectives of
    both steps of DUMP_SCRIPT, from DTensor's SPMD dump (one child
    process)."""
    dump = tmp_path_factory.mktemp("spmd_dump")
    env = dict(os.environ)
    env.update(
        TF_DUMP_GRAPH_PREFIX=str(dump),
        TF_CPP_VMODULE="dtensor_mlir_passes=1",
        MLIR_BRIDGE_LOG_PASS_FILTER="DTensorSPMDExpansion",
        TF_CPP_MIN_LOG_LEVEL="2",
        PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(tfshard.__file__)), env.get("PYTHONPATH", "")]),
    )
    subprocess.run([sys.executable, "-c", DUMP_SCRIPT], env=env, check=True, capture_output=True, timeout=300)
    out = {}
    for name in ("step", "bn_step"):
        files = glob.glob(str(dump / f"*after_DTensorSPMDExpansion*__inference_{name}_*.mlir"))
        assert len(files) == 1, (name, os.listdir(dump))
        with open(files[0]) as handle:
            out[name] = _collectives(handle.read())
    return out


# Image 4x32x8x4 split 2-way on batch and 4-way on height: each data shard
# holds 2 x 32 x 8 x 4 floats; the border strips of its 4 bands (2 halo rows
# each, for a 3x3 kernel) are 2 x 4 x 2 x 8 x 4.
IMAGE_PER_DATA_SHARD = 2 * 32 * 8 * 4
STRIPS = 2 * 4 * 2 * 8 * 4


def check_only_strips_are_gathered(found):
    gathers = [size for kind, size in found if kind == "AllGather"]
    # forward: one gather of both strips; backward: the shifted strip grads
    assert gathers and gathers[0] == STRIPS, found
    assert max(gathers) <= STRIPS < IMAGE_PER_DATA_SHARD, found
    assert sum(gathers) <= 2 * STRIPS, found
    assert not [k for k, _ in found if k in ("AllToAll",)], found


def test_halo_exchange_never_gathers_the_image(step_collectives):
    """In DTensor's SPMD dump (forward + backward of one conv on a 2x4
    mesh), every all-gather moves only the border strips: 512 floats at
    most, not the 2048-float image each data shard holds."""
    found = step_collectives["step"]
    check_only_strips_are_gathered(found)
    reduces = sorted(size for kind, size in found if kind == "AllReduce")
    assert reduces == [4, 3 * 3 * 4 * 4], found  # bias and kernel gradients


def test_bias_free_conv_then_batchnorm_never_gathers_the_image(step_collectives):
    """The ResNet path: SpatialParallelConv2D(use_bias=False) followed by a
    BatchNormalization training step. The output relayout whose gradient
    _unblock routes around DTensor's RelayoutLike still moves only the
    halo strips; everything else is per-channel."""
    found = step_collectives["bn_step"]
    check_only_strips_are_gathered(found)
    reduces = sorted(size for kind, size in found if kind == "AllReduce")
    # BatchNorm's mean and variance (synchronized over batch and bands),
    # the per-channel sums of its backward (its beta and gamma gradients,
    # which its input gradient reuses) and the kernel gradient.
    assert reduces == [4, 4, 4, 4, 3 * 3 * 4 * 4], found


# ------------------------------------------------------------------- errors
def test_bad_splits_have_clear_errors():
    strat = height_strategy((2, 4))
    with strat.scope():
        conv = SpatialParallelConv2D(F, 3, padding="same", name="stem")
        big = SpatialParallelConv2D(F, 7, padding="same", name="wide")
        valid = SpatialParallelConv2D(F, 3, padding="valid", name="v")
    x = np.zeros((B, 10, W, C), "float32")
    with pytest.raises(tfshard.ShardingError, match=r"'stem'.*height 10.*4 equal blocks.*'model'.*divisible by 4"):
        conv(x)
    with pytest.raises(tfshard.ShardingError, match=r"'wide'.*2 rows.*halo of 3 rows.*larger height"):
        big(np.zeros((B, 8, W, C), "float32"))
    with pytest.raises(tfshard.ShardingError, match=r"'v'.*output height 6 \(input height 8"):
        valid(np.zeros((B, 8, W, C), "float32"))
    bad = make_strategy(2, 4, height="batch")
    with bad.scope():
        clash = SpatialParallelConv2D(F, 3, padding="same", name="clash")
    with pytest.raises(tfshard.ShardingError, match=r"'clash'.*'batch'.*data axis"):
        clash(np.zeros((B, 8, W, C), "float32"))


def test_outside_a_strategy_it_is_conv2d():
    x = np.random.RandomState(9).randn(2, 8, 5, 3).astype("float32")
    theirs = keras.layers.Conv2D(4, 3, padding="same")
    ours = SpatialParallelConv2D(4, 3, padding="same")
    theirs.build(x.shape)
    ours.build(x.shape)
    ours.set_weights(theirs.get_weights())
    np.testing.assert_array_equal(ours(x).numpy(), theirs(x).numpy())
    clone = SpatialParallelConv2D.from_config(
        SpatialParallelConv2D(4, 3, height_dim="rows", width_dim=None).get_config()
    )
    assert clone.height_dim == "rows" and clone.width_dim is None


def test_describe_tiling():
    strat = height_strategy((2, 4))
    text = describe_tiling(("batch", "model", None, None), (8, 16, 6, 3), strat.mesh)
    assert "per-device tile (4, 4, 6, 3)" in text
    assert "4 row band(s) x 1 column band(s)" in text
    lines = text.splitlines()
    # device 5 is batch=1, model=1: samples 4:8, rows 4:8
    row5 = next(line for line in lines if line.split()[:1] == ["5"])
    assert row5.split()[1:] == ["1", "1", "4:8", "4:8", "0:6", "0:3"]
    x = strat.place(np.zeros((8, 16, 6, 3), "float32"), ("batch", "model", None, None))
    with strat.scope():
        assert describe_tiling(x) == text
    with pytest.raises(tfshard.ShardingError, match="cannot split"):
        describe_tiling(("batch", "model", None, None), (8, 10, 6, 3), strat.mesh)
