"""Test session setup: 8 virtual CPU devices, before TensorFlow starts."""

import gc
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tfshard  # noqa: E402

NUM_DEVICES = 8
tfshard.use_virtual_devices(NUM_DEVICES)

# Grappler (TensorFlow's graph optimizer) is off in the test processes: it
# was half of a small train step's compile time (12.5 -> 5.7 s of CPU for a
# one-block transformer on 2x4), and compiles are most of the suite. Both
# twins of a parity test run under the same setting, and collectives are
# counted in DTensor's passes, before Grappler. What users run with
# TensorFlow's defaults is still tested end to end, in fresh processes that
# do not read this file: the CLI's main job, the tutorials (the docs build),
# `tfshard bench`, multi-process jobs and the checkpoint workers.
# TFSHARD_TEST_GRAPPLER=1 runs the in-process tests with Grappler on.
if os.environ.get("TFSHARD_TEST_GRAPPLER", "") in ("", "0"):
    import tensorflow as tf  # noqa: E402

    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})

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


# Tests between two full garbage collections (see _fresh_keras_state).
COLLECT_EVERY = 20
_tests_since_collect = 0


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    """Keras's global state (names, graphs, kernel caches) is reset before
    every test. Its ``gc.collect()`` still cost 0.7 s a test (walking what
    earlier tests left), so a full collection runs every COLLECT_EVERY tests
    instead: Python's own generational collections run meanwhile, and the
    cycles of a few tests' models fit in memory many times over."""
    global _tests_since_collect
    _tests_since_collect += 1
    if _tests_since_collect >= COLLECT_EVERY:
        _tests_since_collect = 0
        gc.collect()
    keras.backend.clear_session(free_memory=False)
    yield


@pytest.fixture
def grappler_on():
    """Grappler on for one test (it is off in the test processes, see the
    top of this file): for tests that read what a compiled step keeps, as
    users' TensorFlow (with its defaults) compiles it."""
    import tensorflow as tf

    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": False})
    yield
    if os.environ.get("TFSHARD_TEST_GRAPPLER", "") in ("", "0"):
        tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
