"""A step that fails on the mesh raises its root error as a clear tfshard
error, and leaves the process healthy (issue 23).

Before the fix, ``fit`` often reported only a ``CancelledError``, the root
error surfaced at the next op (even a plain Keras ``predict``), a step that
failed before a collective group had ever completed cancelled that group for
good (every later collective over those mesh axes failed), and the optimizer
could read different iteration counts on different devices in the next step.
"""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf
import tfshard
from tfshard import _dtensor, step_guards

from test_fit_common import D_FF, D_IN, MLP_RULES

CLASSES = 4
N, BATCH = 64, 16
TOL = dict(rtol=1e-5, atol=1e-5)
RAW_TEXT = ("Encountered when executing", "root error(s)", "{{function_node", "CancelledError")


def fresh_strategy(shape, tag=""):
    """A mesh whose axis names no earlier test used: its collective groups
    are new, so a failing first step could cancel them (the warm-up in
    tfshard.step_guards must prevent it)."""
    suffix = re.sub(r"\W", "_", f"{shape[0]}x{shape[1]}_{tag}")
    names = ("rows_" + suffix, "cols_" + suffix)
    builder = (
        tfshard.StrategyBuilder(tfshard.Mesh({names[0]: shape[0], names[1]: shape[1]}))
        .data_parallel(names[0])
        .tensor_parallel(names[1])
    )
    for pattern, spec in MLP_RULES:
        builder.shard(pattern, tuple(names[1] if a == "model" else a for a in spec))
    return builder.build()


class NumericsCheck(keras.layers.Layer):
    def call(self, x):
        return tf.debugging.check_numerics(x, f"{self.name} checked")


def classifier(seed=0, extra=None):
    """check_input -> ffn_in (column-parallel) -> check_hidden -> ffn_out
    (row-parallel: an all-reduce over the tensor axis)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((D_IN,), name="x")
    h = NumericsCheck(name="check_input")(inputs)
    if extra is not None:
        h = extra(h)
    h = keras.layers.Dense(D_FF, name="ffn_in")(h)
    h = NumericsCheck(name="check_hidden")(h)
    h = keras.layers.Activation("relu", name="relu")(h)
    out = keras.layers.Dense(CLASSES, name="ffn_out")(h)
    return keras.Model(inputs, out, name="classifier")


def compiled(model, optimizer):
    model.compile(
        optimizer,
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def data(seed=0, n=N):
    rng = np.random.RandomState(seed)
    return rng.randn(n, D_IN).astype("float32"), rng.randint(0, CLASSES, size=(n,)).astype("int32")


# How each test breaks a step: (cause, row or column, node, words of the message).
FAILURES = {
    # A bad batch: the devices holding its first shard fail at once.
    "nan-input-in-first-step": ("nan_input", 3, "check_input", ("NaN", "check the batch")),
    # A NaN weight in one column shard: only the devices holding that shard
    # fail; the others reach ffn_out's all-reduce and wait there for them, so
    # (without tfshard's warm-up) its collective group would be cancelled for
    # good and every later step on the mesh would fail.
    "nan-weight-in-first-step": ("nan_weight", 0, "check_hidden", ("NaN", "check the batch")),
    # The first step trains; the second fails.
    "bad-label-in-second-step": ("bad_label", BATCH + 5, "SparseSoftmaxCrossEntropyWithLogits", ("out of range",)),
}


def break_step(cause, index, models):
    """The batch to fit, after breaking ``models`` (or the batch) as ``cause`` says."""
    x, labels = data()
    if cause == "nan_input":
        x[index, 2] = np.nan
    elif cause == "bad_label":
        labels[index] = CLASSES + 3
    else:
        for model in models:
            kernel = model.get_layer("ffn_in").kernel
            value = kernel.numpy()
            value[:, index] = np.nan
            kernel.assign(value)
    return x, labels


def mend(cause, models, kernels):
    if cause == "nan_weight":
        for model, value in zip(models, kernels):
            model.get_layer("ffn_in").kernel.assign(value)


def assert_copies_agree(model):
    """Every device holding a shard of a variable holds the same values."""
    variables = list(model.variables) + list(model.optimizer.variables) + list(model.metrics_variables)
    for variable in variables:
        layout = _dtensor.layout_of(variable)
        copies = {}
        for part, location in zip(_dtensor.unpack(variable), layout.mesh.local_device_locations()):
            shard = str(_dtensor._shard_index(layout, tuple(variable.shape), location))
            copies.setdefault(shard, []).append(part.numpy())
        for parts in copies.values():
            for part in parts[1:]:
                np.testing.assert_array_equal(part, parts[0], err_msg=variable.path)


def assert_weights_close(a, b):
    for wa, wb in zip(a.weights + a.optimizer.variables, b.weights + b.optimizer.variables):
        np.testing.assert_allclose(wa.numpy(), wb.numpy(), err_msg=wa.path, **TOL)


@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_failed_step_raises_its_root_error_and_the_process_stays_healthy(failure, tmp_path):
    cause, index, node, words = FAILURES[failure]
    strategy = fresh_strategy((2, 4), tag=failure)
    plain = compiled(classifier(), keras.optimizers.Adam(0.01))
    with strategy.scope():
        sharded = compiled(classifier(), keras.optimizers.Adam(0.01))
    kernels = [m.get_layer("ffn_in").kernel.numpy() for m in (plain, sharded)]
    x_bad, labels_bad = break_step(cause, index, (plain, sharded))

    with pytest.raises(tf.errors.InvalidArgumentError):
        plain.fit(x_bad, labels_bad, batch_size=BATCH, epochs=1, verbose=0)
    with pytest.raises(tfshard.TfshardError) as info:
        sharded.fit(x_bad, labels_bad, batch_size=BATCH, epochs=1, verbose=0)
    error = info.value
    # The root error, still catchable as TensorFlow's class, as with plain Keras.
    assert isinstance(error, tf.errors.InvalidArgumentError)
    assert not isinstance(error, tf.errors.CancelledError)
    message = str(error)
    assert "train step of model 'classifier'" in message
    assert re.search(rf"at node '[^']*{node}[^']*'", message), message
    assert all(word in message for word in words), message
    assert not [text for text in RAW_TEXT if text in message], message
    assert "process, the strategy and the model remain usable" in message

    # Healthy: the next op, even a plain Keras one, does not meet the error.
    x, labels = data()
    assert classifier(seed=3).predict(x, verbose=0).shape == (N, CLASSES)
    mend(cause, (plain, sharded), kernels)
    expected_predictions = plain.predict(x, verbose=0)
    # Copies agree, and the failed step left the weights alone.
    assert_copies_agree(sharded)
    for p, s in zip(plain.weights, sharded.weights):
        np.testing.assert_allclose(s.numpy(), p.numpy(), err_msg=s.path, **TOL)
    np.testing.assert_allclose(sharded.predict(x, batch_size=BATCH, verbose=0), expected_predictions, **TOL)
    if cause == "nan_input":  # a failed predict step raises and recovers too
        with pytest.raises(tfshard.TfshardError, match="predict step of model 'classifier'"):
            sharded.predict(x_bad, batch_size=BATCH, verbose=0)
        np.testing.assert_allclose(sharded.predict(x, batch_size=BATCH, verbose=0), expected_predictions, **TOL)
    with strategy.scope():
        fresh = keras.Variable(np.arange(32.0, dtype="float32").reshape(8, 4))
    fresh.assign(fresh.numpy() + 1.0)
    assert fresh.numpy().sum() == np.arange(32.0).sum() + 32
    path = tfshard.save_checkpoint(sharded, tmp_path / "ckpt")
    with strategy.scope():
        restored = compiled(classifier(seed=7), keras.optimizers.Adam(0.01))
    tfshard.restore_checkpoint(restored, path)
    for r, s in zip(restored.weights, sharded.weights):
        np.testing.assert_array_equal(r.numpy(), s.numpy())

    # The same model trains on like the one-device model that met the same
    # failure. Whether a failed step advanced the optimizer's iteration count
    # is a race in plain Keras too; the one-device model takes the sharded
    # one's count (an eager write on the sharded model would hide a device
    # that reads another count inside the next step).
    plain.optimizer.iterations.assign(int(sharded.optimizer.iterations.numpy()))
    expected = plain.fit(x, labels, batch_size=BATCH, epochs=2, verbose=0).history
    history = sharded.fit(x, labels, batch_size=BATCH, epochs=2, verbose=0).history
    for key in expected:
        np.testing.assert_allclose(history[key], expected[key], err_msg=key, **TOL)
    assert_weights_close(sharded, plain)
    assert_copies_agree(sharded)


def test_an_op_dtensor_cannot_run_is_a_clear_error_and_training_goes_on():
    """tf.linalg.lu (Lu) has no DTensor layout rule (and tfshard does not run it
    replicated, as it does MatrixDiagPartV3 and the other ops the op sweep found)."""
    strategy = fresh_strategy((4, 2))
    diagonal = keras.layers.Lambda(
        lambda t: tf.reshape(tf.linalg.lu(tf.reshape(t, (-1, 4, 4)))[0], (-1, 16)), name="diagonal"
    )
    with strategy.scope():
        model = compiled(classifier(extra=diagonal), keras.optimizers.Adam(0.01))
    x, labels = data()
    with pytest.raises(tfshard.UnsupportedFeatureError) as info:
        model.fit(x, labels, batch_size=BATCH, epochs=1, verbose=0)
    message = str(info.value)
    assert "'Lu'" in message and "no layout rule" in message
    assert not [text for text in RAW_TEXT if text in message], message

    # A new model on the same mesh trains like one device.
    plain = compiled(classifier(seed=2), keras.optimizers.Adam(0.01))
    with strategy.scope():
        sharded = compiled(classifier(seed=2), keras.optimizers.Adam(0.01))
    expected = plain.fit(x, labels, batch_size=BATCH, epochs=2, verbose=0).history
    history = sharded.fit(x, labels, batch_size=BATCH, epochs=2, verbose=0).history
    for key in expected:
        np.testing.assert_allclose(history[key], expected[key], err_msg=key, **TOL)


def test_input_of_the_wrong_feature_size_then_the_right_one():
    """Keras rejects the wrong input while tracing; the step is not left
    bound to it (each input signature gets its own function)."""
    strategy = fresh_strategy((2, 4))
    plain = compiled(classifier(), keras.optimizers.Adam(0.01))
    with strategy.scope():
        sharded = compiled(classifier(), keras.optimizers.Adam(0.01))
    x, labels = data()
    with pytest.raises(ValueError, match="expected shape=\\(None, 16\\)"):
        sharded.fit(x[:, :8], labels, batch_size=BATCH, epochs=1, verbose=0)
    expected = plain.fit(x, labels, batch_size=BATCH, epochs=1, verbose=0).history
    history = sharded.fit(x, labels, batch_size=BATCH, epochs=1, verbose=0).history
    for key in expected:
        np.testing.assert_allclose(history[key], expected[key], err_msg=key, **TOL)
    assert sharded.train_function.step.trace_count == 1


def test_resync_gives_every_copy_of_a_shard_the_first_devices_values():
    """After a failure, tfshard rewrites each variable from the copy on the
    first device holding each shard (tfshard.step_guards.resync)."""
    from tensorflow.experimental import dtensor

    strategy = fresh_strategy((2, 4), tag="resync")
    with strategy.scope():
        layer = keras.layers.Dense(D_FF, name="ffn_in")  # column-parallel: 4 shards x 2 copies
        layer.build((None, D_IN))
    variable = layer.kernel
    assert not step_guards.resync(variable)  # copies agree: nothing to report
    layout = _dtensor.layout_of(variable)
    spec = _dtensor.spec_of_layout(layout)
    locations = layout.mesh.local_device_locations()
    parts = [np.full(tuple(part.shape), float(i), "float32") for i, part in enumerate(_dtensor.unpack(variable))]
    _keras_value(variable).assign(dtensor.pack([tf.constant(p) for p in parts], layout))
    assert step_guards.resync(variable)
    first = {}
    for part, location in zip(_dtensor.unpack(variable), locations):
        shard = tuple(location[axis] for axis in spec if axis is not None)
        first.setdefault(shard, part.numpy())
        np.testing.assert_array_equal(part.numpy(), first[shard])
    assert len(first) == 4
    assert not step_guards.resync(variable)


def _keras_value(variable):
    from tfshard import _keras

    return _keras.backend_variable(variable)
