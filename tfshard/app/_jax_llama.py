"""keras-hub Llama on Keras 3's JAX backend with ``ModelParallel``, for
``tfshard bench --llama``.

Run as a script in a child process (``KERAS_BACKEND=jax``); it imports only
Keras, keras-hub and NumPy, never tfshard. It builds the same ``LlamaCausalLM``
as the parent, sharded by ``LlamaBackbone.get_layout_map`` (the map tfshard
uses), loads the parent's initial weights (so all runs start equal), then
serves the parent's requests on stdin, one JSON line each:

    {"steps": k}   fit the next k batches; answers {"times": [...], "losses": [...]}
    {"quit": true} exit

Answers are printed on stdout as one line prefixed with ``@@`` (Keras and
JAX may print other lines). The parent interleaves these requests with its
own TensorFlow runs, so a slow spell of a shared machine hits every run alike.
"""

import json
import os
import sys
import time

import keras
import keras_hub
import numpy as np

ANSWER = "@@"


class StepTimer(keras.callbacks.Callback):
    """Records each training batch's end time (wall and CPU) and running loss;
    the parent (``bench_llama``) uses it too, so every run is timed alike."""

    def on_train_begin(self, logs=None):
        self.times = [time.perf_counter()]
        self.cpu = [time.process_time()]
        self.losses = []

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter())
        self.cpu.append(time.process_time())
        self.losses.append(float(logs["loss"]))


def answer(obj):
    sys.stdout.write(ANSWER + json.dumps(obj) + "\n")
    sys.stdout.flush()


def main():
    request = json.loads(os.environ["TFSHARD_BENCH_REQUEST"])
    data_axis, model_axis = request["mesh"]
    devices = keras.distribution.list_devices()[: data_axis * model_axis]
    mesh = keras.distribution.DeviceMesh((data_axis, model_axis), ["batch", "model"], devices)
    layout_map = keras_hub.models.LlamaBackbone.get_layout_map(mesh)
    keras.distribution.set_distribution(
        keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")
    )
    backbone = keras_hub.models.LlamaBackbone(**request["backbone"])
    model = keras_hub.models.LlamaCausalLM(backbone=backbone, preprocessor=None)
    model.compile(
        optimizer=keras.optimizers.Adam(request["learning_rate"]),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[],
    )
    arrays = np.load(request["weights"])
    weights = [arrays[f"w{i}"] for i in range(len(arrays.files))]
    if [tuple(w.shape) for w in weights] != [tuple(v.shape) for v in model.weights]:
        raise SystemExit("the parent's weights do not fit this model")
    model.set_weights(weights)
    data = np.load(request["data"])
    x = {"token_ids": data["token_ids"], "padding_mask": data["padding_mask"]}
    y = data["labels"]
    batch = request["batch_size"]

    per_device = 0
    for v in list(model.weights):
        shard = v.value.addressable_shards[0].data
        per_device += shard.size * shard.dtype.itemsize

    answer({"ready": True, "per_device_weight_bytes": int(per_device)})
    start = 0
    for line in sys.stdin:
        order = json.loads(line)
        if order.get("quit"):
            break
        rows = order["steps"] * batch
        if start + rows > len(y):
            start = 0
        part = slice(start, start + rows)
        start += rows
        timer = StepTimer()
        model.fit({k: v[part] for k, v in x.items()}, y[part], batch_size=batch, epochs=1,
                  shuffle=False, verbose=0, callbacks=[timer])
        slots = sum(
            s.value.addressable_shards[0].data.size * s.value.addressable_shards[0].data.dtype.itemsize
            for s in model.optimizer.variables
        )
        answer({"times": np.diff(timer.times).tolist(), "losses": timer.losses,
                "cpu": np.diff(timer.cpu).tolist(),
                "per_device_bytes": int(per_device + slots)})


if __name__ == "__main__":
    main()
