"""Models users already have, unchanged, give one-device numbers.

Each case is code nobody here wrote, run as its authors wrote it, where an
op's DTensor expansion used to give other numbers or a raw error:

* keras-io's guide "Distributed training with Keras" (guides/distribution.py):
  its model with ``Dropout(0.4)`` after ``keras.utils.set_random_seed``,
  under ``keras.distribution.DataParallel`` / ``ModelParallel`` (the guide's
  layout map) and ``tfshard.StrategyBuilder``, on 8x1, 4x2, 2x4 and 1x8;
* ``keras.ops.top_k`` in the gradient path under a split batch;
* keras-hub's QwenMoe and Qwen3Moe under their own ``get_layout_map``
  (whose ``feedforward_gate_dense`` key also catches the MoE router);
* stock pooling layers after a channel-split ``BatchNormalization``.
"""

import keras
import numpy as np
import pytest
import tfshard

from test_fit_common import assert_history_close, assert_weights_close

MESHES = [(8, 1), (4, 2), (2, 4), (1, 8)]
TOL = dict(rtol=1e-5, atol=1e-5)


def keras_mesh(shape, axes=("data", "model")):
    return keras.distribution.DeviceMesh(shape, list(axes), keras.distribution.list_devices())


def builder(shape, axes=("batch", "model")):
    mesh = tfshard.Mesh(dict(zip(axes, shape)))
    return tfshard.StrategyBuilder(mesh).data_parallel(axes[0]).tensor_parallel(axes[1])


def fit_and_evaluate(model, x, y, **fit):
    history = model.fit(x, y, shuffle=False, verbose=0, **fit).history
    return history, model.evaluate(x, y, batch_size=fit.get("batch_size"), verbose=0)


# ------------------------------------------- keras-io distribution guide
def guide_model():
    """guides/distribution.py's model (its Dense layers named as its
    ModelParallel section names them), compiled as the guide does."""
    keras.utils.set_random_seed(1337)
    layers = keras.layers
    inputs = layers.Input(shape=(28, 28, 1))
    y = layers.Flatten()(inputs)
    y = layers.Dense(units=200, activation="relu", name="d1")(y)
    y = layers.Dropout(0.4)(y)
    outputs = layers.Dense(units=10, activation="softmax", name="d2")(y)
    model = keras.Model(inputs=inputs, outputs=outputs)
    model.compile(loss="mse", optimizer="adam")
    return model


def guide_layout_map(mesh):
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map["d1/kernel"] = (None, "model")
    layout_map["d1/bias"] = ("model",)
    layout_map["d2/output"] = ("data", None)
    return layout_map


@pytest.fixture(scope="module")
def guide_data():
    rng = np.random.RandomState(0)
    x = rng.rand(64, 28, 28, 1).astype("float32")
    y = keras.utils.to_categorical(rng.randint(0, 10, size=(64,)), 10)
    return x, y


@pytest.fixture(scope="module")
def guide_reference(guide_data):
    return fit_and_evaluate(guide_model(), *guide_data, batch_size=16, epochs=2)


def _guide_under(distribution, guide_data):
    keras.distribution.set_distribution(distribution)
    try:
        model = guide_model()
        return model, fit_and_evaluate(model, *guide_data, batch_size=16, epochs=2)
    finally:
        keras.distribution.set_distribution(None)


def assert_same_run(got, expected):
    history, loss = got
    assert_history_close(history, expected[0], tol=TOL)
    np.testing.assert_allclose(loss, expected[1], **TOL)
    assert history["loss"][0] != history["loss"][1]  # it trains


def test_guide_data_parallel_equals_one_device(guide_data, guide_reference):
    model, got = _guide_under(keras.distribution.DataParallel(), guide_data)
    assert_same_run(got, guide_reference)


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_guide_model_parallel_equals_one_device(shape, guide_data, guide_reference):
    mesh = keras_mesh(shape)
    distribution = keras.distribution.ModelParallel(
        layout_map=guide_layout_map(mesh), batch_dim_name="data"
    )
    model, got = _guide_under(distribution, guide_data)
    assert tfshard.layout_of(model.get_layer("d1").kernel) == (None, "model")
    assert_same_run(got, guide_reference)


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_guide_model_under_strategy_builder_equals_one_device(shape, guide_data, guide_reference):
    strategy = builder(shape).shard("d1/kernel", (None, "model")).shard("d1/bias", ("model",)).build()
    with strategy.scope():
        model = guide_model()
    got = fit_and_evaluate(model, *guide_data, batch_size=16, epochs=2)
    assert_same_run(got, guide_reference)


def test_per_device_random_streams_opt_out_differs(guide_data, guide_reference):
    """The documented opt-out: DTensor's own per-device streams train, with
    other numbers than one device."""
    strategy = builder((2, 4)).random_streams("per_device").build()
    with strategy.scope():
        model = guide_model()
    history, _ = fit_and_evaluate(model, *guide_data, batch_size=16, epochs=2)
    assert np.all(np.isfinite(history["loss"]))
    assert abs(history["loss"][0] - guide_reference[0]["loss"][0]) > 1e-5
    with pytest.raises(tfshard.StrategyError, match="random_streams"):
        builder((2, 4)).random_streams("local")


# ------------------------------------------------------------------ top_k
class TopK(keras.layers.Layer):
    """Keeps the 4 largest features of each row (keras.ops.top_k)."""

    def call(self, x):
        values, _ = keras.ops.top_k(x, 4)
        return values


def top_k_model():
    keras.utils.set_random_seed(3)
    model = keras.Sequential([
        keras.Input((16,)), keras.layers.Dense(32, name="wide"), TopK(), keras.layers.Dense(3, name="out"),
    ], name="top_k_mlp")
    model.compile(optimizer="adam", loss="mse")
    return model


@pytest.mark.parametrize("shape", [(8, 1), (2, 4)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_top_k_in_the_gradient_path_trains_like_one_device(shape):
    rng = np.random.RandomState(1)
    x, y = rng.randn(32, 16).astype("float32"), rng.randn(32, 3).astype("float32")
    plain = top_k_model()
    expected = plain.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0).history
    with builder(shape).shard(".*wide/kernel", (None, "model")).build().scope():
        model = top_k_model()
    history = model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0).history
    assert_history_close(history, expected, tol=TOL)
    assert_weights_close(model, plain)


# -------------------------------------------------------- keras-hub MoE
keras_hub = pytest.importorskip("keras_hub")

VOCAB, SEQ = 64, 8
MOE = {
    "qwen_moe": lambda: (
        keras_hub.models.QwenMoeBackbone,
        keras_hub.models.QwenMoeCausalLM,
        dict(num_layers=1, num_query_heads=4, num_key_value_heads=4, hidden_dim=16,
             intermediate_dim=32, moe_intermediate_dim=16, shared_expert_intermediate_dim=16,
             num_experts=4, top_k=2),
    ),
    "qwen3_moe": lambda: (
        keras_hub.models.Qwen3MoeBackbone,
        keras_hub.models.Qwen3MoeCausalLM,
        dict(num_layers=1, num_query_heads=4, num_key_value_heads=4, hidden_dim=16,
             intermediate_dim=32, moe_intermediate_dim=16, num_experts=4, top_k=2, head_dim=4),
    ),
}


def moe_causal_lm(family):
    backbone_cls, task_cls, config = MOE[family]()
    keras.utils.set_random_seed(0)
    model = task_cls(backbone=backbone_cls(vocabulary_size=VOCAB, **config), preprocessor=None)
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


@pytest.mark.parametrize("family", sorted(MOE))
def test_keras_hub_moe_trains_like_one_device_under_its_own_layout_map(family):
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, VOCAB, size=(16, SEQ + 1)).astype("int32")
    x = {"token_ids": tokens[:, :-1], "padding_mask": np.ones((16, SEQ), "int32")}
    y = tokens[:, 1:]
    plain = moe_causal_lm(family)
    logits = plain.predict(x, batch_size=8, verbose=0)
    expected = plain.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0).history

    backbone_cls = MOE[family]()[0]
    keras.backend.clear_session()  # the same auto-generated layer names
    layouts = backbone_cls.get_layout_map(keras_mesh((2, 4), ("batch", "model")))
    with keras.distribution.ModelParallel(layout_map=layouts, batch_dim_name="batch").scope():
        model = moe_causal_lm(family)
    # keras-hub's feedforward_gate_dense key also matches the router: its
    # expert dimension is split, and the router's one_hot/top_k follow it.
    routers = [v for v in model.weights if "sparse_feedforward_gate_dense" in v.path]
    assert routers and all(tfshard.layout_of(v) == ("batch", "model") for v in routers)
    np.testing.assert_allclose(model.predict(x, batch_size=8, verbose=0), logits, **TOL)
    history = model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0).history
    assert_history_close(history, expected, tol=TOL)
    assert_weights_close(model, plain)


# ---------------------------------------------- pooling on split channels
POOLS = {
    "max2d": lambda: keras.layers.MaxPooling2D(),
    "avg2d_same": lambda: keras.layers.AveragePooling2D(3, 2, padding="same"),
    "max2d_same": lambda: keras.layers.MaxPooling2D(3, 2, padding="same"),
    "global_avg2d": lambda: keras.layers.GlobalAveragePooling2D(),
    "global_max2d": lambda: keras.layers.GlobalMaxPooling2D(),
}


def convnet(pool, rank=2):
    """Conv(use_bias=False) -> BatchNormalization -> ReLU -> pool -> Dense."""
    keras.utils.set_random_seed(5)
    conv = {1: keras.layers.Conv1D, 2: keras.layers.Conv2D, 3: keras.layers.Conv3D}[rank]
    model = keras.Sequential([
        keras.Input((6,) * rank + (3,)),
        conv(8, 3, use_bias=False, name="conv"),
        keras.layers.BatchNormalization(name="bn"),
        keras.layers.ReLU(),
        pool(),
        keras.layers.Flatten(),
        keras.layers.Dense(4, name="out"),
    ], name="convnet")
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _pooling_parity(pool, rank, shape):
    rng = np.random.RandomState(2)
    x = rng.rand(16, *(6,) * rank, 3).astype("float32")
    y = rng.randint(0, 4, size=(16,))
    plain = convnet(pool, rank)
    expected = fit_and_evaluate(plain, x, y, batch_size=8, epochs=2)
    strategy = (
        builder(shape)
        .shard(".*conv/kernel", (None,) * (rank + 1) + ("model",))  # output channels
        .shard(".*bn/(gamma|beta|moving_mean|moving_variance)", ("model",))
        .build()
    )
    with strategy.scope():
        model = convnet(pool, rank)
    assert tfshard.layout_of(model.get_layer("bn").gamma) == ("model",)
    got = fit_and_evaluate(model, x, y, batch_size=8, epochs=2)
    assert_history_close(got[0], expected[0], tol=TOL)
    np.testing.assert_allclose(got[1], expected[1], **TOL)
    assert_weights_close(model, plain)


@pytest.mark.parametrize("shape", [(2, 4), (1, 8)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("pool", sorted(POOLS))
def test_pooling_after_channel_split_batch_norm_trains_like_one_device(pool, shape):
    _pooling_parity(POOLS[pool], 2, shape)


@pytest.mark.parametrize(
    "rank,pool",
    [
        (1, lambda: keras.layers.MaxPooling1D(2)),
        (1, lambda: keras.layers.AveragePooling1D(3, 2, padding="same")),
        (1, lambda: keras.layers.GlobalAveragePooling1D()),
        (3, lambda: keras.layers.MaxPooling3D(2)),
        (3, lambda: keras.layers.AveragePooling3D(2, padding="same")),
        (3, lambda: keras.layers.GlobalMaxPooling3D()),
    ],
    ids=["max1d", "avg1d_same", "global_avg1d", "max3d", "avg3d_same", "global_max3d"],
)
def test_1d_and_3d_pooling_after_channel_split_batch_norm(rank, pool):
    _pooling_parity(pool, rank, (2, 4))
