"""Test session setup: 8 virtual CPU devices, before TensorFlow starts."""

import gc
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tfshard  # noqa: E402

NUM_DEVICES = 8
tfshard.use_virtual_devices(NUM_DEVICES)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# (data, model) mesh shapes every parity test runs on.
MESH_SHAPES = [(1, 1), (1, 8), (2, 4), (4, 2), (8, 1)]
SHARDED_MESH_SHAPES = [(1, 8), (2, 4), (4, 2)]


# Optional test dependencies skip their tests where missing, but CI installs the
# whole test extra (and keras-hub): there a missing one is an error, not a skip.
OPTIONAL_TEST_MODULES = ("jax", "keras_hub", "sklearn", "nbclient")


def pytest_sessionstart(session):
    import importlib.util

    if os.environ.get("CI", "").lower() not in ("1", "true"):
        return
    missing = [m for m in OPTIONAL_TEST_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise pytest.UsageError(
            f"CI=true but {missing} are not installed, so their tests would skip; install "
            "the README's test command (pip install -e '.[cpu,test]' and keras-hub)."
        )


def pytest_collection_finish(session):
    """Every test starts with ``keras.backend.clear_session()``, whose
    ``gc.collect()`` walked the ~450,000 objects TensorFlow, Keras and the
    test modules create on import: 1-2 s per test, a third of the suite's
    time. Those objects live as long as the process, so they are moved out
    of the collector's reach once, after collection; each test's collection
    then only walks what earlier tests left."""
    gc.collect()
    gc.freeze()


def make_strategy(data, model, **rules):
    mesh = tfshard.Mesh({"batch": data, "model": model})
    builder = tfshard.StrategyBuilder(mesh).data_parallel("batch").tensor_parallel("model")
    if rules:
        builder.rules(rules)
    return builder.build()


def mesh_id(shape):
    return f"{shape[0]}x{shape[1]}"


@pytest.fixture
def rng():
    return np.random.RandomState(0)


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    keras.backend.clear_session()
    yield
