"""Random layers and ``keras.random`` draw exactly what one device draws.

With the same seed, a layer built under a strategy and called on a split
input (batch, features or both, in a traced function as ``fit`` runs it)
gives the unsharded layer's output to the bit, because every draw is made
at its global shape and each device keeps its slice (``random_streams=
"global"``, the default)."""

import random

import keras
import numpy as np
import pytest
import tensorflow as tf
import tfshard

LAYOUTS = [
    ((2, 4), ("batch",)),
    ((2, 4), ("model",)),
    ((2, 4), ("batch", "model")),
    ((1, 8), ("model",)),
]
LAYOUT_IDS = ["2x4-batch", "2x4-features", "2x4-both", "1x8-features"]

rng = np.random.RandomState(0)
VECTORS = rng.randn(4, 8).astype("float32")
SEQUENCES = rng.randn(4, 6, 8).astype("float32")
IMAGES = rng.uniform(0, 255, size=(4, 6, 6, 8)).astype("float32")
VOLUMES = rng.randn(4, 4, 4, 4, 8).astype("float32")

L = keras.layers
LAYERS = {
    "Dropout": (lambda: L.Dropout(0.3, seed=1), VECTORS),
    "Dropout_noise_shape": (lambda: L.Dropout(0.3, noise_shape=(None, 1, 8), seed=1), SEQUENCES),
    "AlphaDropout": (lambda: L.AlphaDropout(0.3, seed=1), VECTORS),
    "GaussianDropout": (lambda: L.GaussianDropout(0.3, seed=1), VECTORS),
    "GaussianNoise": (lambda: L.GaussianNoise(0.3, seed=1), SEQUENCES),
    "SpatialDropout1D": (lambda: L.SpatialDropout1D(0.3, seed=1), SEQUENCES),
    "SpatialDropout2D": (lambda: L.SpatialDropout2D(0.3, seed=1), IMAGES),
    "SpatialDropout3D": (lambda: L.SpatialDropout3D(0.3, seed=1), VOLUMES),
    "RandomContrast": (lambda: L.RandomContrast(0.3, seed=1), IMAGES),
    "RandomBrightness": (lambda: L.RandomBrightness(0.3, seed=1), IMAGES),
}


# keras.layers' random augmentation layers (all of Keras 3.15 but
# RandomElasticTransform, a clear error on a mesh: see
# test_elastic_transform_with_a_drawn_sigma_is_a_clear_error), on images of 8 channels (any split) or RGB (3 channels: batch
# splits only).
RGB = rng.uniform(0, 255, size=(4, 8, 8, 3)).astype("float32")
AUGMENTATIONS = {
    "RandomFlip": lambda: L.RandomFlip(seed=1),
    "RandomTranslation": lambda: L.RandomTranslation(0.2, 0.2, seed=1),
    "RandomRotation": lambda: L.RandomRotation(0.2, seed=1),
    "RandomZoom": lambda: L.RandomZoom(0.2, seed=1),
    "RandomCrop": lambda: L.RandomCrop(4, 4, seed=1),
    "RandomShear": lambda: L.RandomShear(0.2, 0.2, seed=1),
    "RandomPerspective": lambda: L.RandomPerspective(0.5, seed=1),
    "RandomErasing": lambda: L.RandomErasing(factor=1.0, seed=1),
    "RandomGaussianBlur": lambda: L.RandomGaussianBlur(factor=1.0, kernel_size=3, seed=1),
    "RandomInvert": lambda: L.RandomInvert(factor=0.5, seed=1),
    "RandomPosterization": lambda: L.RandomPosterization(factor=(1, 4), seed=1),
    "Solarization": lambda: L.Solarization(addition_factor=0.3, threshold_factor=0.5, seed=1),
    "CutMix": lambda: L.CutMix(seed=1),
    "MixUp": lambda: L.MixUp(seed=1),
}
RGB_AUGMENTATIONS = {
    "RandomHue": lambda: L.RandomHue(0.3, value_range=(0, 255), seed=1),
    "RandomSaturation": lambda: L.RandomSaturation(0.3, value_range=(0, 255), seed=1),
    "RandomGrayscale": lambda: L.RandomGrayscale(factor=0.5, seed=1),
    "RandomColorDegeneration": lambda: L.RandomColorDegeneration(0.5, value_range=(0, 255), seed=1),
    "RandomColorJitter": lambda: L.RandomColorJitter(
        value_range=(0, 255), brightness_factor=0.2, contrast_factor=0.2, saturation_factor=0.2,
        hue_factor=0.2, seed=1),
    "RandomSharpness": lambda: L.RandomSharpness(0.5, value_range=(0, 255), seed=1),
    "RandAugment": lambda: L.RandAugment(value_range=(0, 255), seed=1),
}
# RandAugment runs every operation and keeps the drawn ones with where();
# AugMix picks its operations with Python's random module (see
# test_augmix_draws_one_device_numbers). Both reach Equalization, whose
# nonzero() and bincount tfshard replaces on a mesh (tfshard/_ops/images.py).


def strategy_for(shape):
    mesh = tfshard.Mesh({"batch": shape[0], "model": shape[1]})
    return tfshard.StrategyBuilder(mesh).data_parallel("batch").tensor_parallel("model").build()


def full_spec(rank, split):
    spec = [None] * rank
    if "batch" in split:
        spec[0] = "batch"
    if "model" in split:
        spec[-1] = "model"
    return tuple(spec)


def traced_on_mesh(strategy, fn, x, spec):
    """``fn(x)`` in a tf.function on ``x`` placed as ``spec``, read back."""

    @tf.function
    def run(x):
        with strategy.scope():
            return fn(x)

    return tfshard.to_numpy(run(strategy.place(x, spec)))


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_random_layer_draws_one_device_numbers(name, layout):
    make, x = LAYERS[name]
    expected = np.asarray(make()(x, training=True))
    shape, split = layout
    strategy = strategy_for(shape)
    with strategy.scope():
        layer = make()
    got = traced_on_mesh(strategy, lambda t: layer(t, training=True), x, full_spec(x.ndim, split))
    np.testing.assert_array_equal(got, expected)
    assert not np.array_equal(got, x)  # it did draw


DRAWS = {
    "normal": lambda seed, x: keras.random.normal((4, 8), seed=seed) * x,
    "uniform": lambda seed, x: keras.random.uniform((4, 8), seed=seed) + x,
    "truncated_normal": lambda seed, x: keras.random.truncated_normal((4, 8), seed=seed) - x,
    "randint": lambda seed, x: keras.ops.cast(keras.random.randint((4, 8), 0, 9, seed=seed), "float32") * x,
    "gamma": lambda seed, x: keras.random.gamma((4, 8), 2.0, seed=seed) * x,
    "binomial": lambda seed, x: keras.random.binomial((4, 8), 5.0, 0.3, seed=seed) + x,
    "beta": lambda seed, x: keras.random.beta((4, 8), 2.0, 3.0, seed=seed) * x,
    "dropout": lambda seed, x: keras.random.dropout(x, 0.5, seed=seed),
    "categorical": lambda seed, x: keras.ops.cast(keras.random.categorical(x, 3, seed=seed), "float32"),
    "shuffle": lambda seed, x: keras.random.shuffle(x, seed=seed),
}


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("name", sorted(DRAWS))
def test_keras_random_draws_one_device_numbers(name, layout):
    draw = DRAWS[name]
    expected = np.asarray(draw(keras.random.SeedGenerator(7), VECTORS))
    shape, split = layout
    strategy = strategy_for(shape)
    with strategy.scope():
        seed = keras.random.SeedGenerator(7)
    got = traced_on_mesh(strategy, lambda t: draw(seed, t), VECTORS, full_spec(2, split))
    np.testing.assert_array_equal(got, expected)


def test_attention_dropout_draws_one_device_numbers():
    """MultiHeadAttention's dropout on its (batch, heads, q, k) scores,
    with heads split over the model axis by path rules."""
    x = SEQUENCES

    def make():
        return L.MultiHeadAttention(4, 2, dropout=0.5, seed=3, name="attn")

    plain = make()
    expected = np.asarray(plain(x, x, training=True))
    strategy = (
        tfshard.StrategyBuilder(tfshard.Mesh({"batch": 2, "model": 4}))
        .data_parallel("batch").tensor_parallel("model")
        .shard(".*attn/(query|key|value)/kernel", (None, "model", None))
        .shard(".*attn/attention_output/kernel", ("model", None, None))
        .build()
    )
    with strategy.scope():
        layer = make()
        layer.build(x.shape, x.shape)
    layer.set_weights(plain.get_weights())
    assert tfshard.layout_of(layer.query_dense.kernel) == (None, "model", None)
    got = traced_on_mesh(strategy, lambda t: layer(t, t, training=True), x, ("batch", None, None))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def _check_augmentation(make, x, layout):
    expected = np.asarray(make()(x, training=True))
    shape, split = layout
    strategy = strategy_for(shape)
    with strategy.scope():
        layer = make()
    got = traced_on_mesh(strategy, lambda t: layer(t, training=True), x, full_spec(x.ndim, split))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-3)  # pixel values up to 255
    assert not np.allclose(got, x[:, : got.shape[1], : got.shape[2]])  # it did draw


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
def test_augmentation_layer_draws_one_device_numbers(name, layout):
    _check_augmentation(AUGMENTATIONS[name], IMAGES, layout)


@pytest.mark.parametrize("name", sorted(RGB_AUGMENTATIONS))
def test_color_augmentation_layer_draws_one_device_numbers(name):
    _check_augmentation(RGB_AUGMENTATIONS[name], RGB, LAYOUTS[0])  # RGB: split the batch


def _augmix_seed_with(name, tries=50):
    """A Python random seed for which AugMix's chains include ``name``
    (AugMix picks its operations with Python's ``random`` module)."""
    layer = L.AugMix(value_range=(0, 255), seed=1)
    for seed in range(tries):
        random.seed(seed)
        chains = layer.get_random_transformation(RGB, training=True)["chain_transforms"]
        if any(step["layer_name"] == name for chain in chains for step in chain):
            return seed
    raise AssertionError(f"no seed below {tries} picks {name}")


@pytest.mark.parametrize("name", ["Equalization", "AugMix"])
def test_augmix_draws_one_device_numbers(name):
    """Equalization (on TensorFlow it finds the first nonzero histogram bin
    with nonzero(), a value-dependent shape, and counts bins with bincount,
    a run-time length) equals one device on a mesh, and so does AugMix with
    a draw whose chains include it."""
    if name == "Equalization":
        make, seed = (lambda: L.Equalization(value_range=(0, 255))), 0
    else:
        make, seed = (lambda: L.AugMix(value_range=(0, 255), seed=1)), _augmix_seed_with("equalization")
    random.seed(seed)
    expected = np.asarray(make()(RGB, training=True))
    strategy = strategy_for((2, 4))
    with strategy.scope():
        layer = make()
    random.seed(seed)
    got = traced_on_mesh(strategy, lambda t: layer(t, training=True), RGB, ("batch", None, None, None))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-3)  # pixel values up to 255
    assert not np.allclose(got, RGB)


def test_elastic_transform_with_a_drawn_sigma_is_a_clear_error():
    """RandomElasticTransform draws its blur's sigma, so the kernel size is a
    run-time shape DTensor cannot lay out: a clear error when the step is
    traced (the raw DTensor error took TensorFlow minutes to format)."""
    strategy = strategy_for((2, 4))
    with strategy.scope():
        layer = L.RandomElasticTransform(factor=1.0, scale=1.0, value_range=(0, 255), seed=1)

    @tf.function(autograph=False)
    def run(x):
        with strategy.scope():
            return layer(x, training=True)

    with pytest.raises(tfshard.errors.UnsupportedFeatureError, match="sigma.*input pipeline") as err:
        run(strategy.place(RGB, ("batch", None, None, None)))
    assert "UnknownError" not in str(err.value) and "MLIR" not in str(err.value)
