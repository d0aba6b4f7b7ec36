"""What ``import tfshard`` changes in Keras, and that it can be undone.

Every change is a row of ``tfshard._keras``'s patch tables. In a fresh
interpreter these tests snapshot every attribute of every module and class
of the Keras TensorFlow backend, layers, optimizers and trainer, import
tfshard, and check that exactly the documented patches changed something;
then ``uninstall()`` restores every attribute to the very object it was.
A plain Keras model (no strategy) trains to bit-identical weights and traces
the same graph with and without tfshard imported.
"""

import json
import os
import subprocess
import sys
import textwrap

SNAPSHOT = textwrap.dedent(
    """
    import importlib, inspect, json, os, pkgutil, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import keras

    PACKAGES = ["keras.src.backend.tensorflow", "keras.src.layers", "keras.src.optimizers",
                "keras.src.trainers", "keras.src.random", "keras.src.ops",
                "keras.src.distribution", "keras.src.backend.common", "keras.src.callbacks"]
    owners = {}
    for package in PACKAGES:
        root = importlib.import_module(package)
        names = [package] + [m.name for m in pkgutil.walk_packages(root.__path__, package + ".")
                             if "test" not in m.name]
        for name in names:
            try:
                module = importlib.import_module(name)
            except Exception:
                continue
            owners[name] = module
            for attr, value in list(vars(module).items()):
                if inspect.isclass(value) and value.__module__ == name:
                    owners[f"{name}:{attr}"] = value

    def snapshot():
        return {key: {a: id(v) for a, v in list(vars(owner).items())} for key, owner in owners.items()}

    def changed(before, after):
        out = set()
        for key in before:
            b, a = before[key], after[key]
            for attr in set(b) | set(a):
                if b.get(attr) != a.get(attr):
                    out.add(f"{key}.{attr}")
        return out

    before = snapshot()
    import tfshard
    from tfshard import _keras
    after_import = snapshot()
    documented = {f"{p.owner}.{p.attribute}" for p in _keras.installed_patches()}
    patched = changed(before, after_import)
    tfshard.interop.enable_keras_distribution(False)
    _keras.uninstall()
    restored = changed(before, snapshot())
    tfshard.hooks.install()
    tfshard._ops.install()
    tfshard.training.install()
    tfshard.interop.enable_keras_distribution(True)
    reinstalled = {f"{p.owner}.{p.attribute}" for p in _keras.installed_patches()}
    print(json.dumps(dict(documented=sorted(documented), patched=sorted(patched),
                          restored=sorted(restored), reinstalled=sorted(reinstalled))))
    """
)

PLAIN_RUN = textwrap.dedent(
    """
    import json, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import keras, numpy as np, tensorflow as tf
    if sys.argv[1] == "with":
        import tfshard
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, padding="same"),
        keras.layers.BatchNormalization(), keras.layers.ReLU(), keras.layers.MaxPooling2D(),
        keras.layers.Dropout(0.3), keras.layers.Flatten(), keras.layers.Dense(5),
    ])
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.RandomState(0)
    x, y = rng.rand(32, 8, 8, 3).astype("float32"), rng.randint(0, 5, size=(32,))
    losses = model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0).history["loss"]
    graph = tf.function(lambda t: model(t, training=True)).get_concrete_function(
        tf.TensorSpec((None, 8, 8, 3))).graph
    print(json.dumps(dict(
        losses=[float(v).hex() for v in losses],
        weights=[w.numpy().tobytes().hex() for w in model.weights],
        ops=[op.type for op in graph.get_operations()],
    )))
    """
)


def run_python(source, *args):
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, "-c", source, *args], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_changes_exactly_the_documented_patches_and_uninstall_restores_keras():
    out = run_python(SNAPSHOT)
    assert out["patched"] == out["documented"]  # nothing undocumented, nothing missing
    assert len(out["documented"]) >= 30
    assert out["restored"] == []  # every attribute is its original object again
    assert out["reinstalled"] == out["documented"]


def test_plain_keras_is_bit_identical_with_tfshard_imported():
    without, with_tfshard = run_python(PLAIN_RUN, "without"), run_python(PLAIN_RUN, "with")
    assert with_tfshard["losses"] == without["losses"]
    assert with_tfshard["weights"] == without["weights"]
    assert with_tfshard["ops"] == without["ops"]
