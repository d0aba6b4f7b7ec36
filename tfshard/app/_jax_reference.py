"""The reference transformer on Keras 3's JAX backend, for ``tfshard bench --jax``.

Run as a script in a child process (``KERAS_BACKEND=jax``); it imports only
Keras and NumPy, never tfshard (whose import requires the TensorFlow
backend). The model is the one ``tfshard.app.models.transformer`` builds, from
stock Keras layers, sharded the Megatron way with
``keras.distribution.ModelParallel`` and a ``LayoutMap``: heads, d_ff and the
vocabulary over ``model``, batches over ``batch``. Prints one JSON line.
"""

import json
import os
import time

import keras
import numpy as np


class PositionEmbedding(keras.layers.Layer):
    def __init__(self, max_length, **kwargs):
        super().__init__(**kwargs)
        self.max_length = max_length

    def build(self, input_shape):
        self.table = self.add_weight(
            name="embeddings", shape=(self.max_length, input_shape[-1]),
            initializer=keras.initializers.RandomNormal(stddev=0.02),
        )

    def call(self, x):
        return x + self.table[: keras.ops.shape(x)[1]]


class TiedLogits(keras.layers.Layer):
    def __init__(self, embedding, **kwargs):
        super().__init__(**kwargs)
        self.embedding = embedding

    def call(self, h):
        return keras.ops.matmul(h, keras.ops.transpose(self.embedding.embeddings))


def build_transformer(cfg):
    if cfg.get("moe_experts", 0) > 0:
        # tfshard.app.bench.check_jax_reference_config refuses these configs first.
        raise ValueError(
            f"model.moe_experts={cfg['moe_experts']}: the JAX reference builds the dense "
            "transformer only; set model.moe_experts=0 or drop --jax."
        )
    tokens = keras.Input((cfg["seq_len"],), dtype="int32")
    embedding = keras.layers.Embedding(cfg["vocab"], cfg["d_model"], name="token_embedding")
    h = PositionEmbedding(cfg["seq_len"], name="position_embedding")(embedding(tokens))
    for i in range(cfg["layers"]):
        x = h
        a = keras.layers.LayerNormalization(epsilon=1e-5, name=f"block_{i}_attention_norm")(x)
        a = keras.layers.MultiHeadAttention(
            cfg["heads"], cfg["d_model"] // cfg["heads"], name=f"block_{i}_attention"
        )(a, a, use_causal_mask=True)
        x = x + a
        f = keras.layers.LayerNormalization(epsilon=1e-5, name=f"block_{i}_ffn_norm")(x)
        f = keras.layers.Dense(cfg["d_ff"], activation="gelu", name=f"block_{i}_ffn_in")(f)
        f = keras.layers.Dense(cfg["d_model"], name=f"block_{i}_ffn_out")(f)
        h = x + f
    h = keras.layers.LayerNormalization(epsilon=1e-5, name="final_norm")(h)
    if cfg.get("tie_embeddings", True):
        logits = TiedLogits(embedding, name="tied_logits")(h)
    else:
        logits = keras.layers.Dense(cfg["vocab"], name="lm_head")(h)
    return keras.Model(tokens, logits)


def megatron_layout_map(device_mesh):
    """Heads, d_ff and vocab over 'model' (the tfshard default rules)."""
    layout_map = keras.distribution.LayoutMap(device_mesh)
    layout_map["token_embedding/embeddings"] = ("model", None)
    layout_map[r".*attention/(query|key|value)/kernel"] = (None, "model", None)
    layout_map[r".*attention/(query|key|value)/bias"] = ("model", None)
    layout_map[r".*attention/attention_output/kernel"] = ("model", None, None)
    layout_map[r".*ffn_in/kernel"] = (None, "model")
    layout_map[r".*ffn_in/bias"] = ("model",)
    layout_map[r".*ffn_out/kernel"] = ("model", None)
    layout_map[r"lm_head/kernel"] = (None, "model")
    return layout_map


def main():
    request = json.loads(os.environ["TFSHARD_BENCH_REQUEST"])
    config, (data, model_axis), steps = request["config"], request["mesh"], request["steps"]
    arrays = np.load(request["data"])
    x, y = arrays["x"], arrays["y"]
    devices = keras.distribution.list_devices()[: data * model_axis]
    mesh = keras.distribution.DeviceMesh((data, model_axis), ["batch", "model"], devices)
    keras.distribution.set_distribution(
        keras.distribution.ModelParallel(layout_map=megatron_layout_map(mesh), batch_dim_name="batch")
    )
    keras.utils.set_random_seed(config["train"]["seed"])
    model = build_transformer(config["model"])
    optimizer = {
        "adam": lambda lr: keras.optimizers.Adam(lr),
        "adamw": lambda lr: keras.optimizers.AdamW(lr),
        "sgd": lambda lr: keras.optimizers.SGD(lr, momentum=0.9),
    }[config["train"]["optimizer"]](config["train"]["learning_rate"])
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    times = []

    class Timer(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            times.append(time.perf_counter())

        def on_train_batch_end(self, batch, logs=None):
            times.append(time.perf_counter())

    batch = config["train"]["batch_size"]
    model.fit(x[: steps * batch], y[: steps * batch], batch_size=batch, epochs=1,
              shuffle=False, verbose=0, callbacks=[Timer()])
    durations = np.diff(times)
    steady = float(np.median(durations[1:]))
    per_device = 0
    for v in list(model.variables) + list(model.optimizer.variables):
        shards = v.value.addressable_shards
        per_device += shards[0].data.size * shards[0].data.dtype.itemsize
    print(json.dumps({
        "ms_per_step": 1000 * steady,
        "first_step_extra_s": float(durations[0] - steady),
        "trace_count": None,
        "per_device_bytes": int(per_device),
    }))


if __name__ == "__main__":
    main()
