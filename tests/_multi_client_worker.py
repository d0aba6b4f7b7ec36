"""Worker for the multi-client tests: run by ``tfshard launch`` (one fresh
Python process per client) or alone as the single-process reference.

    python _multi_client_worker.py MODE OUT [options]

Modes:
  suite OUT [--checkpoint CKPT]
      On a 2x4 mesh: fit the reference MLP (tfshard/app/examples/mlp.py's
      column -> row MLP) with global input, again with per-process input,
      and a tiny transformer with per-process input; record the loss after
      every step and the final weights and optimizer slots
      (OUT/results-<rank>.npz, OUT/logs-<rank>.json); save the per-process
      MLP to OUT/ckpts; with --checkpoint, restore CKPT into a fresh MLP and
      record its state.
  restore OUT --checkpoint CKPT
      Restore CKPT into a fresh MLP and record its state.
  crash OUT [--heartbeat S]
      Fit for ever, writing OUT/pid-<rank>.txt and OUT/step-<rank>.txt, until
      the test kills (or stops) a process.
Outside a multi-client job (no DTENSOR_JOBS) the worker uses 8 virtual CPUs
in one process: the reference run.
"""

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

D_IN, D_FF, D_OUT = 32, 256, 10
GLOBAL_BATCH = 16
SEQ, VOCAB = 8, 64


def start(heartbeat=None):
    import tfshard

    if os.environ.get("DTENSOR_JOBS"):
        tfshard.initialize_multi_client(seed=1234, heartbeat_timeout=heartbeat)
    else:
        tfshard.use_virtual_devices(8)
    return tfshard


def strategy_2x4(tfshard):
    mesh = tfshard.Mesh({"batch": 2, "model": 4})
    return tfshard.StrategyBuilder(mesh).data_parallel("batch").tensor_parallel("model").build()


def build_model(tfshard, keras, kind):
    keras.utils.set_random_seed(0)
    if kind == "mlp":
        model = keras.Sequential(
            [
                keras.Input((D_IN,)),
                tfshard.layers.ColumnParallelDense(D_FF, activation="relu", name="ffn_in"),
                tfshard.layers.RowParallelDense(D_OUT, name="ffn_out"),
            ],
            name="mlp",
        )
        model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
        return model
    from tfshard.app import models

    model = models.build(
        {
            "kind": "transformer", "vocab": VOCAB, "seq_len": SEQ, "d_model": 32,
            "heads": 4, "d_ff": 64, "layers": 1, "dropout": 0.0,
            "tie_embeddings": True,
        },
        learning_rate=1e-2,
        optimizer="adam",
        seed=0,
    )
    return model


def data(kind, steps):
    import numpy as np

    rng = np.random.RandomState(0)
    n = steps * GLOBAL_BATCH
    if kind == "mlp":
        teacher = rng.randn(D_IN, D_OUT).astype("float32")
        x = rng.randn(n, D_IN).astype("float32")
        return x, np.tanh(x @ teacher).astype("float32")
    tokens = rng.randint(0, VOCAB, size=(n, SEQ + 1)).astype("int32")
    return tokens[:, :-1], tokens[:, 1:]


def state(model):
    return [v.numpy() for v in model.weights + model.optimizer.variables]


class Losses:
    def __init__(self, keras):
        outer = self

        class Recorder(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                outer.values.append(float(logs["loss"]))

        self.values = []
        self.callback = Recorder()


def fit(tfshard, keras, model, strategy, args, x, y):
    import tensorflow as tf

    losses = Losses(keras)
    if args.input == "process":
        context = tfshard.multi_client.input_context(strategy)
        dataset = context.shard_dataset(
            tf.data.Dataset.from_tensor_slices((x, y)), GLOBAL_BATCH
        )
        model.fit(dataset, epochs=1, shuffle=False, verbose=2, callbacks=[losses.callback])
    else:
        model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=2,
                  callbacks=[losses.callback])
    return losses.values


def write(out, name, payload):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, name), "w") as f:
        json.dump(payload, f)


def rank():
    from tfshard import multi_client

    return multi_client.client_id()


def suite(tfshard, keras, args, me):
    """The equality and checkpoint runs, in one process start-up."""
    import numpy as np
    import tensorflow as tf

    results, logs = {}, {}
    strategy = strategy_2x4(tfshard)
    logs["devices"] = list(strategy.mesh.devices)
    logs["local_devices"] = list(strategy.mesh.local_devices)
    context = tfshard.multi_client.input_context(strategy)
    logs["input_context"] = [context.num_input_shards, context.input_shard_index]

    for kind, input_mode in (("mlp", "global"), ("mlp", "process"), ("transformer", "process")):
        args.input = input_mode
        with strategy.scope():
            model = build_model(tfshard, keras, kind)
        x, y = data(kind, args.steps)
        name = f"{kind}-{input_mode}"
        logs[name] = fit(tfshard, keras, model, strategy, args, x, y)
        for i, value in enumerate(state(model)):
            results[f"{name}/{i}"] = value
        if name == "mlp-process":
            logs["saved"] = tfshard.save_checkpoint(model, os.path.join(args.out, "ckpts"))
            # Evaluate and predict on per-process data, too.
            ds = context.shard_dataset(tf.data.Dataset.from_tensor_slices((x, y)), GLOBAL_BATCH)
            logs["evaluate"] = model.evaluate(ds, verbose=0)
            logs["predict"] = model.predict(x, batch_size=GLOBAL_BATCH, verbose=0).tolist()

    if args.checkpoint:
        with strategy.scope():
            fresh = build_model(tfshard, keras, "mlp")
        tfshard.restore_checkpoint(fresh, args.checkpoint)
        for i, value in enumerate(state(fresh)):
            results[f"restored/{i}"] = value
    np.savez(os.path.join(args.out, f"results-{me}.npz"), **results)
    write(args.out, f"logs-{me}.json", logs)


def main(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("mode")
    parser.add_argument("out")
    parser.add_argument("--checkpoint")
    parser.add_argument("--input", default="global", choices=["global", "process"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--model", default="mlp", choices=["mlp", "transformer"])
    parser.add_argument("--heartbeat", type=float, help="heartbeat_timeout in seconds")
    args = parser.parse_args(argv)

    tfshard = start(args.heartbeat)
    import keras

    me = rank()
    os.makedirs(args.out, exist_ok=True)
    if args.mode == "suite":
        suite(tfshard, keras, args, me)
    elif args.mode == "restore":
        strategy = strategy_2x4(tfshard)
        with strategy.scope():
            fresh = build_model(tfshard, keras, "mlp")
        tfshard.restore_checkpoint(fresh, args.checkpoint)
        import numpy as np

        np.savez(
            os.path.join(args.out, f"results-{me}.npz"),
            **{f"restored/{i}": value for i, value in enumerate(state(fresh))},
        )
    elif args.mode == "late":
        late_local_collective(tfshard, args, me)
    elif args.mode == "crash":
        crash(tfshard, keras, args, me)
    else:
        raise SystemExit(f"unknown mode {args.mode!r}")


def late_local_collective(tfshard, args, me):
    """Process 0 is done at once; process 1 then gathers a tensor split over
    'model', whose devices are all its own (a collective within one process,
    whose group process 0 still resolves)."""
    import time

    import numpy as np

    strategy = strategy_2x4(tfshard)
    x = strategy.place(np.arange(8.0, dtype="float32"), ("model",))
    if me == 1:
        time.sleep(3)
        write(args.out, "late-1.json", tfshard.to_numpy(x).tolist())


def crash(tfshard, keras, args, me):
    """Train for a long time, writing this process's pid and last step, until
    the test kills a process."""
    strategy = strategy_2x4(tfshard)
    with strategy.scope():
        model = build_model(tfshard, keras, "mlp")
    x, y = data("mlp", 8)

    class Progress(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            path = os.path.join(args.out, f"step-{me}.txt")
            with open(path + ".tmp", "w") as f:
                f.write(str(int(self.model.optimizer.iterations.numpy())))
            os.replace(path + ".tmp", path)

    with open(os.path.join(args.out, f"pid-{me}.txt"), "w") as f:
        f.write(str(os.getpid()))
    model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=100000, shuffle=False, verbose=0,
              callbacks=[Progress()])
    raise SystemExit("the crash run should have been stopped")


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
