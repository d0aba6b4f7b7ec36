"""Metric objects, losses and optimizers made outside ``strategy.scope()``
give one-device numbers (issue 23), or a clear error before DTensor runs.

keras-io's ``run_experiment`` builds and compiles the model in a function and
passes metric objects made elsewhere; before the fix, their variables stayed
plain, every device wrote its own partial totals into them, and ``fit``
reported wrong training metrics that changed between identical runs (even on
an 8x1 mesh that splits nothing but the batch).
"""

import inspect
import re

import keras
import numpy as np
import pytest
import tensorflow as tf
import tfshard
from tfshard import _dtensor

from conftest import mesh_id
from test_fit_common import D_FF, D_IN, MLP_RULES, mesh_strategy

CLASSES = 10
N = 64
METRIC_TOL = dict(rtol=1e-6, atol=1e-6)


def data(seed=0, n=N):
    rng = np.random.RandomState(seed)
    x = rng.randn(n, D_IN).astype("float32")
    labels = rng.randint(0, CLASSES, size=(n,))
    return x, labels


def classifier(outputs=CLASSES, activation=None, seed=0):
    """Dense(16->32, column-parallel) -> Dense(outputs, row-parallel)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((D_IN,), name="x")
    h = keras.layers.Dense(D_FF, activation="relu", name="ffn_in")(inputs)
    out = keras.layers.Dense(outputs, activation=activation, name="ffn_out")(h)
    return keras.Model(inputs, out, name="classifier")


def in_scope(strategy):
    return strategy.scope() if strategy is not None else _no_scope()


class _no_scope:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def same_names(history):
    """History keys without Keras's uniquifying suffixes (``auc_1`` ...)."""
    return {re.sub(r"_\d+$", "", k): np.asarray(v, "float64") for k, v in history.items()}


def assert_logs_equal(got, expected, what, tol=METRIC_TOL):
    assert sorted(got) == sorted(expected), (what, sorted(got), sorted(expected))
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], err_msg=f"{what}: {key}", **tol)


# ------------------------------------------------ keras-io's run_experiment
def run_experiment(strategy, optimizer, loss, metrics):
    """keras-io's pattern: model and compile in a function (here in the
    scope); optimizer, loss and metric objects made by the caller, before it."""
    x, labels = data()
    x_test, labels_test = data(seed=1, n=32)
    with in_scope(strategy):
        model = classifier()
        model.compile(optimizer=optimizer, loss=loss, metrics=metrics)
    history = model.fit(x, labels, batch_size=16, epochs=2, validation_split=0.25, verbose=0)
    evaluation = model.evaluate(x_test, labels_test, batch_size=16, verbose=0, return_dict=True)
    return model, same_names(history.history), evaluation


def experiment_objects():
    return dict(
        optimizer=keras.optimizers.AdamW(learning_rate=0.01, weight_decay=1e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[
            keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
            keras.metrics.SparseTopKCategoricalAccuracy(5, name="top-5-accuracy"),
        ],
    )


@pytest.fixture(scope="module")
def one_device_experiment():
    keras.backend.clear_session()
    _, history, evaluation = run_experiment(None, **experiment_objects())
    return history, evaluation


@pytest.mark.parametrize("shape", [(8, 1), (2, 4), (1, 8)], ids=mesh_id)
def test_run_experiment_with_metrics_made_outside_scope_matches_one_device(shape, one_device_experiment):
    expected_history, expected_evaluation = one_device_experiment
    strategy = mesh_strategy(shape)
    runs = []
    for _ in range(2):  # two identical runs: the numbers must not move
        objects = experiment_objects()  # made outside the scope
        model, history, evaluation = run_experiment(strategy, **objects)
        assert_logs_equal(history, expected_history, f"fit on {mesh_id(shape)}")
        assert_logs_equal(evaluation, expected_evaluation, f"evaluate on {mesh_id(shape)}")
        runs.append(history)
        for metric in objects["metrics"]:  # their variables now live on the mesh
            for variable in metric.variables:
                assert tfshard.layout_of(variable) == (None,) * len(variable.shape), variable.path
        assert tfshard.layout_of(objects["optimizer"].iterations) == ()
    assert_logs_equal(runs[1], runs[0], "second identical run")


# ----------------------------------------------- every built-in metric class
# Each metric class with the output kind it scores and its constructor
# arguments. A Keras upgrade that adds a metric fails
# test_the_table_covers_every_keras_metric until it is listed here.
KINDS = {
    "sparse": {
        "SparseCategoricalAccuracy": {},
        "SparseCategoricalCrossentropy": {},
        "SparseTopKCategoricalAccuracy": {"k": 3},
    },
    "onehot": {
        "CategoricalAccuracy": {},
        "CategoricalCrossentropy": {},
        "TopKCategoricalAccuracy": {"k": 3},
        "CategoricalHinge": {},
        "KLDivergence": {},
        "F1Score": {},
        "FBetaScore": {"beta": 2.0},
    },
    "binary": {
        "AUC": {},
        "BinaryAccuracy": {},
        "BinaryCrossentropy": {},
        "FalseNegatives": {},
        "FalsePositives": {},
        "TrueNegatives": {},
        "TruePositives": {},
        "Precision": {},
        "Recall": {},
        "PrecisionAtRecall": {"recall": 0.5},
        "RecallAtPrecision": {"precision": 0.5},
        "SensitivityAtSpecificity": {"specificity": 0.5},
        "SpecificityAtSensitivity": {"sensitivity": 0.5},
        "Hinge": {},
        "SquaredHinge": {},
        "Poisson": {},
    },
    "regression": {
        "MeanSquaredError": {},
        "MeanAbsoluteError": {},
        "MeanAbsolutePercentageError": {},
        "MeanSquaredLogarithmicError": {},
        "RootMeanSquaredError": {},
        "LogCoshError": {},
        "CosineSimilarity": {},
        "R2Score": {},
        "PearsonCorrelation": {},
        "ConcordanceCorrelation": {},
        "Accuracy": {},
        "MeanMetricWrapper": {"fn": keras.losses.mean_squared_error},
    },
}
# Confusion-matrix metrics: a clear UnsupportedFeatureError at fit (DTensor
# cannot run their ScatterNd; see test_dtensor_still_rejects_int64_scatter_nd).
UNSUPPORTED = {
    "IoU": ("sparse_probabilities", {"num_classes": 4, "target_class_ids": [0, 1], "sparse_y_pred": False}),
    "MeanIoU": ("sparse_probabilities", {"num_classes": 4, "sparse_y_pred": False}),
    "OneHotIoU": ("onehot", {"num_classes": 4, "target_class_ids": [0, 1]}),
    "OneHotMeanIoU": ("onehot", {"num_classes": 4}),
    "BinaryIoU": ("binary", {}),
}
# Not compile() metrics: the abstract base, and the value trackers a custom
# train_step feeds (covered by test_custom_train_step_trackers_made_outside_scope).
NOT_COMPILE_METRICS = {"Metric", "Mean", "Sum"}

KIND_SETUP = {  # output units, activation, loss, targets
    "sparse": (4, "softmax", "sparse_categorical_crossentropy"),
    "sparse_probabilities": (4, "softmax", "sparse_categorical_crossentropy"),
    "onehot": (4, "softmax", "categorical_crossentropy"),
    "binary": (1, "sigmoid", "binary_crossentropy"),
    "regression": (4, "softplus", "mse"),
}


def targets(kind, n=48, seed=0):
    rng = np.random.RandomState(seed)
    labels = rng.randint(0, 4, size=(n,))
    if kind.startswith("sparse"):
        return labels.astype("int32")
    if kind == "onehot":
        return np.eye(4, dtype="float32")[labels]
    if kind == "binary":
        return (rng.rand(n, 1) > 0.5).astype("float32")
    return (rng.rand(n, 4) + 0.5).astype("float32")


def test_the_table_covers_every_keras_metric():
    metric_classes = {
        name for name, obj in vars(keras.metrics).items()
        if inspect.isclass(obj) and issubclass(obj, keras.metrics.Metric)
    }
    listed = set(UNSUPPORTED) | NOT_COMPILE_METRICS
    for table in KINDS.values():
        listed |= set(table)
    assert metric_classes == listed, (
        f"unlisted: {sorted(metric_classes - listed)}, gone: {sorted(listed - metric_classes)}"
    )


def fit_with_metrics(strategy, kind, metrics):
    units, activation, loss = KIND_SETUP[kind]
    x, _ = data(n=48)
    with in_scope(strategy):
        model = classifier(units, activation)
        model.compile(keras.optimizers.Adam(0.01), loss, metrics=metrics)
    history = model.fit(x, targets(kind), batch_size=16, epochs=2, validation_split=0.25, verbose=0)
    return same_names(history.history)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_builtin_metric_made_outside_scope_matches_one_device(kind):
    def metrics():
        return [getattr(keras.metrics, name)(**kwargs) for name, kwargs in KINDS[kind].items()]

    expected = fit_with_metrics(None, kind, metrics())
    got = fit_with_metrics(mesh_strategy((2, 4)), kind, metrics())  # made outside the scope
    # +1: the loss; x2: training and validation.
    assert len(got) == 2 * (len(KINDS[kind]) + 1)
    assert_logs_equal(got, expected, kind, tol=dict(rtol=1e-5, atol=1e-6))


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_metrics_dtensor_cannot_run_are_a_clear_error_before_any_step(name):
    kind, kwargs = UNSUPPORTED[name]
    units, activation, loss = KIND_SETUP[kind]
    metric = getattr(keras.metrics, name)(**kwargs)
    with mesh_strategy((2, 4)).scope():
        model = classifier(units, activation)
        model.compile(keras.optimizers.Adam(0.01), loss, metrics=[metric])
    before = [w.numpy() for w in model.weights]
    x, _ = data(n=32)
    with pytest.raises(tfshard.UnsupportedFeatureError) as info:
        model.fit(x, targets(kind, n=32), batch_size=16, epochs=1, verbose=0)
    message = str(info.value)
    assert repr(metric.name) in message and name in message
    assert "model.predict" in message  # the fix
    for w, value in zip(model.weights, before):  # no step ran
        np.testing.assert_array_equal(w.numpy(), value)


def test_dtensor_still_rejects_int64_scatter_nd():
    """Pins the DTensor limitation behind UNSUPPORTED: when a TensorFlow
    upgrade lifts it, this fails and the IoU metrics can be enabled."""
    strategy = mesh_strategy((2, 4))
    indices = _dtensor.distribute(
        np.array([[0, 1], [1, 1], [2, 0], [3, 3]], "int64"), strategy.dtensor_layout(("batch", None))
    )
    updates = _dtensor.distribute(np.ones(4, "int32"), strategy.dtensor_layout(("batch",)))

    @tf.function
    def confusion(i, u):
        return tf.scatter_nd(i, u, (4, 4))

    with pytest.raises(tf.errors.InvalidArgumentError, match="int64"):
        _dtensor.to_numpy(confusion(indices, updates))


# ------------------------- string metrics, weighted metrics, other objects
def test_string_and_weighted_metrics_loss_and_optimizer_made_outside_scope():
    x, labels = data()
    weights = np.random.RandomState(3).rand(N).astype("float32")

    def objects():
        return dict(
            optimizer=keras.optimizers.RMSprop(0.01),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy", keras.metrics.SparseTopKCategoricalAccuracy(3, name="top3")],
            weighted_metrics=["accuracy", keras.metrics.SparseCategoricalCrossentropy(from_logits=True, name="wxent")],
        )

    def run(strategy, compiled):
        with in_scope(strategy):
            model = classifier()
            model.compile(**compiled)
        history = model.fit(
            x, labels, sample_weight=weights, batch_size=16, epochs=2, validation_split=0.25, verbose=0
        )
        return same_names(history.history)

    expected = run(None, objects())
    got = run(mesh_strategy((2, 4)), objects())
    assert {"accuracy", "top3", "weighted_accuracy", "wxent", "val_wxent"} <= set(got)
    assert_logs_equal(got, expected, "string and weighted metrics")


def test_metric_objects_shared_by_one_device_and_mesh_runs():
    """Metrics made once and used by a one-device run, two meshes, and a
    one-device run again (a comparison script) give the same numbers."""
    x, labels = data()
    metrics = [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]

    def run(strategy):
        with in_scope(strategy):
            model = classifier()
            model.compile(
                keras.optimizers.Adam(0.01),
                keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=metrics,
            )
        return same_names(model.fit(x, labels, batch_size=16, epochs=1, verbose=0).history)

    expected = run(None)
    for strategy in (mesh_strategy((2, 4)), mesh_strategy((4, 2)), None):
        assert_logs_equal(run(strategy), expected, repr(strategy))


# ------------------------------------------------ custom train_step state


class TrackedModel(keras.Model):
    """keras-io's custom train_step, with trackers made elsewhere."""

    def __init__(self, trackers, extra=None, **kwargs):
        super().__init__(**kwargs)
        self.ffn_in = keras.layers.Dense(D_FF, activation="relu", name="ffn_in")
        self.ffn_out = keras.layers.Dense(CLASSES, name="ffn_out")
        self.trackers = trackers
        self.extra = extra

    def call(self, x):
        return self.ffn_out(self.ffn_in(x))

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = self.compute_loss(x=x, y=y, y_pred=self(x, training=True))
        grads = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply(grads, self.trainable_variables)
        self.trackers[0].update_state(loss)
        self.trackers[1].update_state(tf.cast(tf.shape(y)[0], "float32"))
        if self.extra is not None:
            self.extra.assign_add(1.0)
        return {t.name: t.result() for t in self.trackers}

    @property
    def metrics(self):
        return list(self.trackers)


def test_custom_train_step_trackers_made_outside_scope():
    x, labels = data()
    rules = tuple((".*" + p, s) for p, s in MLP_RULES)

    def run(strategy):
        trackers = [keras.metrics.Mean(name="loss"), keras.metrics.Sum(name="samples")]
        with in_scope(strategy):
            keras.utils.set_random_seed(0)
            model = TrackedModel(trackers, name="tracked")
            model.compile(keras.optimizers.Adam(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return same_names(model.fit(x, labels, batch_size=16, epochs=2, verbose=0).history)

    expected = run(None)
    assert expected["samples"].tolist() == [N, N]
    assert_logs_equal(run(mesh_strategy((2, 4), rules)), expected, "custom train_step")


def test_plain_variable_a_step_writes_is_a_clear_error():
    """A variable the step writes that tfshard cannot attribute to the
    model, its optimizer or its metrics: an error naming it, not silently
    per-device copies."""
    x, labels = data(n=32)
    counter = keras.Variable(0.0, name="steps_seen")  # outside the scope, untracked
    rules = tuple((".*" + p, s) for p, s in MLP_RULES)
    with mesh_strategy((2, 4), rules).scope():
        keras.utils.set_random_seed(0)
        trackers = [keras.metrics.Mean(name="loss"), keras.metrics.Sum(name="samples")]
        model = TrackedModel(trackers, extra=_Untracked(counter), name="tracked")
        model.compile(keras.optimizers.Adam(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with pytest.raises(tfshard.StrategyError, match=r"steps_seen.*not on the strategy's mesh"):
        model.fit(x, labels, batch_size=16, epochs=1, verbose=0)


class _Untracked:
    """Hides a variable from Keras's tracking (as a closure or global would)."""

    def __init__(self, variable):
        self._variable = variable

    def assign_add(self, delta):
        self._variable.assign_add(delta)


def test_per_output_metrics_and_losses_made_outside_scope():
    """A two-output model with per-output metric objects, losses and loss
    weights, all made before the scope."""
    x, labels = data()
    targets_reg = np.random.RandomState(5).randn(N, 3).astype("float32")

    def run(strategy):
        metrics = {"cls": [keras.metrics.SparseCategoricalAccuracy(name="acc")], "reg": [keras.metrics.MeanAbsoluteError(name="mae"), "mse"]}
        losses = {"cls": keras.losses.SparseCategoricalCrossentropy(from_logits=True), "reg": keras.losses.MeanSquaredError()}
        optimizer = keras.optimizers.Adam(0.01)
        with in_scope(strategy):
            keras.utils.set_random_seed(0)
            inputs = keras.Input((D_IN,), name="x")
            h = keras.layers.Dense(D_FF, activation="relu", name="ffn_in")(inputs)
            model = keras.Model(
                inputs, {"cls": keras.layers.Dense(CLASSES, name="cls")(h), "reg": keras.layers.Dense(3, name="reg")(h)}
            )
            model.compile(optimizer, losses, metrics=metrics, loss_weights={"cls": 1.0, "reg": 0.5})
        history = model.fit(
            x, {"cls": labels, "reg": targets_reg}, batch_size=16, epochs=2, validation_split=0.25, verbose=0
        )
        return same_names(history.history)

    expected = run(None)
    got = run(mesh_strategy((2, 4), rules=(("ffn_in/kernel", (None, "model")),)))
    assert {"cls_acc", "reg_mae", "reg_mse", "val_cls_acc"} <= set(got)
    assert_logs_equal(got, expected, "per-output metrics")
