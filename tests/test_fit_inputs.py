"""Every input Keras accepts, fit options and callbacks on a sharded model.

Each test runs the same thing on plain Keras and on the sharded twin (2x4
mesh, column/row MLP) and compares the History.
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
import tfshard

from test_fit_common import (
    BATCH,
    D_IN,
    D_OUT,
    N,
    TOL,
    assert_history_close,
    assert_mlp_is_sharded,
    assert_weights_close,
    classification_compile,
    classification_data,
    functional_mlp,
    mesh_strategy,
    plain_and_sharded,
    regression_compile,
    regression_data,
)

SHAPE = (2, 4)
STEPS = math.ceil(N / BATCH)  # 5: four batches of 8 and one of 5


# ------------------------------------------------------------------ inputs
def two_input_mlp(seed=0):
    """The MLP fed by two named inputs, concatenated to D_IN features."""
    keras.utils.set_random_seed(seed)
    a = keras.Input((D_IN // 2,), name="a")
    b = keras.Input((D_IN // 2,), name="b")
    h = keras.layers.Concatenate(name="concat")([a, b])
    h = keras.layers.Dense(32, activation="relu", name="ffn_in")(h)
    h = keras.layers.LayerNormalization(name="norm")(h)
    out = keras.layers.Dense(D_OUT, name="ffn_out")(h)
    return keras.Model({"a": a, "b": b}, out, name="two_input_mlp")


class Batches(keras.utils.PyDataset):
    def __init__(self, x, y=None):
        super().__init__()
        self.x, self.y = x, y

    def __len__(self):
        return STEPS

    def __getitem__(self, i):
        part = slice(i * BATCH, (i + 1) * BATCH)
        if self.y is None:
            return self.x[part]
        return self.x[part], self.y[part]


def batch_generator(x, y=None):
    while True:
        for start in range(0, N, BATCH):
            part = slice(start, start + BATCH)
            yield (x[part],) if y is None else (x[part], y[part])


def fit_and_predict_args(kind, x, y):
    """(fit args, fit kwargs, predict args, predict kwargs) for one input kind.

    Called once per model: a generator can only be consumed once.
    """
    if kind == "numpy":
        return (x, y), dict(batch_size=BATCH), (x,), dict(batch_size=BATCH)
    if kind == "dict":
        d = {"a": x[:, : D_IN // 2], "b": x[:, D_IN // 2 :]}
        return (d, y), dict(batch_size=BATCH), (d,), dict(batch_size=BATCH)
    if kind == "dataset":
        train = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
        return (train,), {}, (tf.data.Dataset.from_tensor_slices(x).batch(BATCH),), {}
    if kind == "generator":
        return (
            (batch_generator(x, y),),
            dict(steps_per_epoch=STEPS),
            (batch_generator(x),),
            dict(steps=STEPS),
        )
    if kind == "pydataset":  # (PyDataset batches are shuffled unless shuffle=False)
        return (Batches(x, y),), {}, (Batches(x),), {}
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["numpy", "dict", "dataset", "generator", "pydataset"])
def test_every_input_kind_gives_plain_keras_history(kind):
    x, y = regression_data()
    build = two_input_mlp if kind == "dict" else functional_mlp
    plain, sharded = plain_and_sharded(build, mesh_strategy(SHAPE))

    results = {}
    for name, model in (("plain", plain), ("sharded", sharded)):
        fit_args, fit_kwargs, predict_args, predict_kwargs = fit_and_predict_args(kind, x, y)
        history = model.fit(*fit_args, epochs=2, shuffle=False, verbose=0, **fit_kwargs).history
        predictions = model.predict(*predict_args, verbose=0, **predict_kwargs)
        results[name] = history, predictions

    assert_history_close(results["sharded"][0], results["plain"][0])
    assert len(results["sharded"][0]["loss"]) == 2
    predictions = results["sharded"][1]
    assert type(predictions) is np.ndarray and predictions.shape == (N, D_OUT)
    np.testing.assert_allclose(predictions, results["plain"][1], **TOL)
    assert_weights_close(sharded, plain)
    assert_mlp_is_sharded(sharded, SHAPE[1])


# ------------------------------------------- weights and validation options
def _scenario(name):
    """(data, compile fn, fit kwargs) for one fit option."""
    if name == "class_weight":
        x, y = classification_data()
        return (x, y), classification_compile, dict(class_weight={0: 1.0, 1: 3.0, 2: 0.5, 3: 2.0})
    x, y = regression_data()
    if name == "sample_weight":
        weights = np.random.RandomState(2).uniform(0.1, 2.0, size=(N,)).astype("float32")
        return (x, y), regression_compile, dict(sample_weight=weights)
    if name == "validation_data":
        x_val, y_val = regression_data(seed=1, n=13)  # 8 + a partial 5
        return (x, y), regression_compile, dict(validation_data=(x_val, y_val))
    if name == "validation_split":
        return (x, y), regression_compile, dict(validation_split=0.2)
    raise AssertionError(name)


@pytest.mark.parametrize(
    "option", ["sample_weight", "class_weight", "validation_data", "validation_split"]
)
def test_fit_options_give_plain_keras_history(option):
    (x, y), compile_fn, fit_kwargs = _scenario(option)
    extra = {"weighted_metrics": lambda: ["mae"]} if option == "sample_weight" else {}
    plain, sharded = plain_and_sharded(functional_mlp, mesh_strategy(SHAPE), compile_fn, **extra)
    fit = dict(batch_size=BATCH, epochs=2, shuffle=False, verbose=0, **fit_kwargs)
    expected = plain.fit(x, y, **fit).history
    history = sharded.fit(x, y, **fit).history
    if option.startswith("validation"):
        assert {"val_loss", "val_mae"} <= set(history)
    if option == "sample_weight":
        assert "weighted_mae" in history
    assert_history_close(history, expected)
    assert_weights_close(sharded, plain)


# --------------------------------------------------------------- callbacks
def test_history_early_stopping_and_lr_scheduler_match_plain_keras():
    x, y = regression_data()
    x_val, y_val = regression_data(seed=1, n=16)

    def callbacks():
        return [
            keras.callbacks.EarlyStopping(
                monitor="val_loss", min_delta=0.05, patience=1, restore_best_weights=True
            ),
            keras.callbacks.LearningRateScheduler(lambda epoch, lr: 0.02 * 0.5**epoch),
        ]

    plain, sharded = plain_and_sharded(functional_mlp, mesh_strategy(SHAPE))
    fit = dict(
        batch_size=BATCH, epochs=8, shuffle=False, verbose=0, validation_data=(x_val, y_val)
    )
    expected = plain.fit(x, y, callbacks=callbacks(), **fit)
    history = sharded.fit(x, y, callbacks=callbacks(), **fit)

    assert isinstance(history, keras.callbacks.History)
    assert history.model is sharded
    assert "learning_rate" in history.history
    assert history.epoch == expected.epoch
    assert len(history.epoch) < 8, "EarlyStopping should have stopped training"
    assert sharded.stop_training
    assert_history_close(history.history, expected.history)
    np.testing.assert_allclose(
        history.history["learning_rate"], [0.02 * 0.5**e for e in history.epoch], rtol=1e-6
    )
    np.testing.assert_allclose(
        float(sharded.optimizer.learning_rate.numpy()),
        float(plain.optimizer.learning_rate.numpy()),
        rtol=1e-6,
    )
    # restore_best_weights wrote global values back into the sharded variables.
    assert_weights_close(sharded, plain)
    assert_mlp_is_sharded(sharded, SHAPE[1])


def test_model_checkpoint_weights_load_into_plain_keras(tmp_path):
    x, y = regression_data()
    path = tmp_path / "mlp.weights.h5"
    strategy = mesh_strategy(SHAPE)
    with strategy.scope():
        sharded = regression_compile(functional_mlp())
    checkpoint = keras.callbacks.ModelCheckpoint(str(path), save_weights_only=True)
    sharded.fit(x, y, batch_size=BATCH, epochs=2, verbose=0, callbacks=[checkpoint])
    assert path.exists()

    # A plain model, built outside any strategy, from a different seed.
    plain = functional_mlp(seed=7)
    assert not np.allclose(plain.weights[0].numpy(), sharded.weights[0].numpy())
    plain.load_weights(str(path))
    assert tfshard.layout_of(plain.weights[0]) is None
    for p, s in zip(plain.weights, sharded.weights):
        assert p.path == s.path
        np.testing.assert_array_equal(p.numpy(), s.numpy(), err_msg=p.path)
    np.testing.assert_allclose(
        plain.predict(x, batch_size=BATCH, verbose=0),
        sharded.predict(x, batch_size=BATCH, verbose=0),
        rtol=1e-5,
        atol=1e-5,
    )

    # ... and back into a fresh sharded model, which stays sharded.
    with strategy.scope():
        again = functional_mlp(seed=9)
    again.load_weights(str(path))
    assert_mlp_is_sharded(again, SHAPE[1])
    for a, s in zip(again.weights, sharded.weights):
        np.testing.assert_array_equal(a.numpy(), s.numpy(), err_msg=a.path)


def _fit_with_tensorboard(log_dir, **tensorboard_kwargs):
    x, y = regression_data()
    x_val, y_val = regression_data(seed=1, n=16)
    with mesh_strategy(SHAPE).scope():
        model = regression_compile(functional_mlp())
    model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=2,
        verbose=0,
        validation_data=(x_val, y_val),
        callbacks=[keras.callbacks.TensorBoard(log_dir=str(log_dir), **tensorboard_kwargs)],
    )
    return model


def _assert_event_files(log_dir):
    for sub in ("train", "validation"):
        events = list((log_dir / sub).glob("events.out.tfevents.*"))
        assert events and events[0].stat().st_size > 0, sub


def test_tensorboard_callback_writes_train_and_validation_logs(tmp_path):
    _fit_with_tensorboard(tmp_path / "logs")
    _assert_event_files(tmp_path / "logs")


def test_tensorboard_weight_histograms_and_images(tmp_path):
    """Keras's TensorBoard(histogram_freq=1, write_images=True) logs sharded
    weights by their global values."""
    model = _fit_with_tensorboard(tmp_path / "logs", histogram_freq=1, write_images=True)
    _assert_event_files(tmp_path / "logs")
    counts, images = {}, set()
    for path in (tmp_path / "logs" / "train").glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.tag.endswith("/histogram"):
                    buckets = tf.make_ndarray(value.tensor)  # (left, right, count) rows
                    counts[value.tag[: -len("/histogram")]] = buckets[:, 2].sum()
                elif value.tag.endswith("/image"):
                    images.add(value.tag)
    for weight in model.weights:
        name = weight.path.replace(":", "_")
        assert counts[name] == np.prod(weight.shape), name  # every global element
    assert images


def test_progress_bar_prints(capsys):
    x, y = regression_data()
    with mesh_strategy(SHAPE).scope():
        model = regression_compile(functional_mlp())
    capsys.readouterr()
    model.fit(x, y, batch_size=BATCH, epochs=2, verbose=1)
    out = capsys.readouterr().out
    assert "Epoch 1/2" in out and "Epoch 2/2" in out
    assert f"{STEPS}/{STEPS}" in out
    assert "loss:" in out and "mae:" in out
    model.evaluate(x, y, batch_size=BATCH, verbose=1)
    out = capsys.readouterr().out
    assert f"{STEPS}/{STEPS}" in out and "loss:" in out
