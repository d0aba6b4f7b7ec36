"""Train a Megatron-style column -> row MLP on a 2x4 mesh of virtual CPUs.

    python -m tfshard.app.examples.mlp [--steps 30]

Prints the layout table (per-device shard shapes) and the loss per step, and
checks the result against the same MLP trained with plain Keras Dense layers.
"""

from __future__ import annotations

import argparse


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args(argv)

    import tfshard

    tfshard.use_virtual_devices(8)

    import keras
    import numpy as np
    import tensorflow as tf

    mesh = tfshard.Mesh({"batch": 2, "model": 4})
    strategy = (
        tfshard.StrategyBuilder(mesh).data_parallel("batch").tensor_parallel("model").build()
    )

    def build(column, row):
        keras.utils.set_random_seed(0)
        return keras.Sequential(
            [keras.Input((32,)), column(256, activation="relu", name="ffn_in"), row(10, name="ffn_out")],
            name="mlp",
        )

    with strategy.scope():
        model = build(tfshard.layers.ColumnParallelDense, tfshard.layers.RowParallelDense)
    reference = build(keras.layers.Dense, keras.layers.Dense)

    rng = np.random.RandomState(0)
    teacher = rng.randn(32, 10).astype("float32")
    x = rng.randn(args.steps * args.batch, 32).astype("float32")
    y = np.tanh(x @ teacher)

    def train(net):
        optimizer = keras.optimizers.Adam(1e-2)
        losses = []
        for step in range(args.steps):
            xb = x[step * args.batch : (step + 1) * args.batch]
            yb = y[step * args.batch : (step + 1) * args.batch]
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(net(xb) - yb))
            grads = tape.gradient(loss, net.trainable_variables)
            optimizer.apply_gradients(zip(grads, net.trainable_variables))
            losses.append(float(loss))
        return losses, optimizer

    losses, optimizer = train(model)
    ref_losses, _ = train(reference)
    for step in range(0, args.steps, max(1, args.steps // 10)):
        print(f"step {step:4d}  loss {losses[step]:.5f}  (plain Keras {ref_losses[step]:.5f})")
    print(f"final loss {losses[-1]:.5f} (plain Keras {ref_losses[-1]:.5f})")
    print()
    print(f"mesh {mesh}: parameters and Adam slots per device")
    print(strategy.describe())  # every variable made under the strategy, slots included
    gap = max(abs(a - b) for a, b in zip(losses, ref_losses))
    print(f"\nmax |loss - plain Keras loss| over {args.steps} steps: {gap:.2e}")
    if gap > 1e-4:
        raise SystemExit("sharded training diverged from plain Keras")


if __name__ == "__main__":
    main()
