"""One Keras script for two backends (used by tests/test_interop.py).

    KERAS_BACKEND=jax        python tests/_interop_script.py   # Keras's own distribution
    KERAS_BACKEND=tensorflow python tests/_interop_script.py   # through tfshard

The script is plain ``keras.distribution`` code: a ``DeviceMesh`` of 2x4
CPU devices, a ``LayoutMap`` with tensor-parallel, FSDP-style
(``("model", "batch")``) and ``"<layer>/output"`` entries, and
``ModelParallel``. On TensorFlow the only extra line is ``import tfshard``
(and its virtual devices). It prints one JSON object: the sharding spec of
every variable, the predictions and the training losses, which the test
compares across backends. Weights are set from numpy, so both backends start
from the same values whatever their random generators do. The test runs the
TensorFlow half in its own process (``run()``), which already has the 8
virtual devices, and the JAX half in a subprocess.
"""

import json
import os

import keras
import numpy as np

BACKEND = keras.backend.backend()
if BACKEND == "tensorflow":
    import tfshard

VOCAB, SEQ, DIM, HEADS, KEY_DIM, FF, N, BATCH = 32, 8, 16, 4, 4, 32, 16, 8


def tiny_transformer():
    tokens = keras.Input((SEQ,), dtype="int32", name="tokens")
    h = keras.layers.Embedding(VOCAB, DIM, name="embed")(tokens)
    a = keras.layers.MultiHeadAttention(HEADS, KEY_DIM, name="attn")(h, h, use_causal_mask=True)
    h = keras.layers.LayerNormalization(name="ln1")(keras.layers.Add()([h, a]))
    f = keras.layers.Dense(FF, activation="relu", name="ffn_in")(h)
    f = keras.layers.Dense(DIM, name="ffn_out")(f)
    h = keras.layers.LayerNormalization(name="ln2")(keras.layers.Add()([h, f]))
    logits = keras.layers.Dense(VOCAB, name="head")(h)
    return keras.Model(tokens, logits, name="tiny_lm")


def layout_map(mesh):
    layouts = keras.distribution.LayoutMap(mesh)
    layouts["embed/embeddings"] = ("model", "batch")  # vocab x data (FSDP)
    layouts[".*attn/(query|key|value)/kernel"] = ("batch", "model", None)
    layouts[".*attn/(query|key|value)/bias"] = keras.distribution.TensorLayout(("model", None))
    layouts[".*attn/attention_output/kernel"] = ("model", None, "batch")
    layouts["ffn_in/kernel"] = ("batch", "model")
    layouts["ffn_in/bias"] = ("model",)
    layouts["ffn_out/kernel"] = ("model", "batch")
    layouts["ffn_in/output"] = ("batch", None, "model")  # an activation layout
    return layouts


def spec_of(variable):
    if BACKEND == "jax":
        spec = list(variable.value.sharding.spec)
    else:
        spec = list(tfshard.layout_of(variable))
    return spec + [None] * (len(variable.shape) - len(spec))


def run():
    """Build, shard, predict and fit; the results as a JSON-able dict."""
    devices = keras.distribution.list_devices()[:8]
    mesh = keras.distribution.DeviceMesh((2, 4), ("batch", "model"), devices)
    distribution = keras.distribution.ModelParallel(
        layout_map=layout_map(mesh), batch_dim_name="batch"
    )
    keras.distribution.set_distribution(distribution)

    model = tiny_transformer()
    rng = np.random.RandomState(0)
    model.set_weights(
        [rng.normal(0.0, 0.2, w.shape).astype("float32") for w in model.get_weights()]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    tokens = rng.randint(0, VOCAB, size=(N, SEQ)).astype("int32")
    labels = np.roll(tokens, -1, axis=1)
    result = {
        "backend": keras.backend.backend(),
        "specs": {v.path: spec_of(v) for v in model.weights},
        "predictions": np.asarray(model.predict(tokens, batch_size=BATCH, verbose=0)).tolist(),
    }
    history = model.fit(tokens, labels, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    result["losses"] = history.history["loss"]
    result["trained_weights"] = {v.path: np.asarray(v.numpy()).tolist() for v in model.weights[:3]}

    try:
        import keras_hub
    except ImportError as err:  # the test fails on this when it can import keras_hub
        result["hub_error"] = repr(err)
        keras_hub = None
    if keras_hub is not None:
        hub_map = keras_hub.models.LlamaBackbone.get_layout_map(mesh)
        keras.distribution.set_distribution(
            keras.distribution.ModelParallel(layout_map=hub_map, batch_dim_name="batch")
        )
        backbone = keras_hub.models.LlamaBackbone(
            vocabulary_size=64, num_layers=1, num_query_heads=4, num_key_value_heads=2,
            hidden_dim=16, intermediate_dim=32,
        )
        result["hub_specs"] = {v.path: spec_of(v) for v in backbone.weights}
    keras.distribution.set_distribution(None)
    return result


if __name__ == "__main__":
    if os.environ.get("KERAS_BACKEND") == "jax":
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
        )
    elif BACKEND == "tensorflow":
        tfshard.use_virtual_devices(8)  # before TensorFlow starts
    print("RESULT " + json.dumps(run()))
