"""``keras.ops.reshape`` of flattened rows back into (batch, sequence, ...)
on a mesh (``tfshard._ops.reshape``): Qwen3.5's gated delta-net normalizes
its output per head on rows ``(B*S*H, D)``, multiplies by a gate made from
a head-split projection, and reshapes to ``(B, S, H*D)`` for a row-parallel
``out_proj``. DTensor computes that forward pass but rejects its gradient
("output layout of Relayout op after layout propagation does not match")
unless the reshape's output is laid out whole but for the batch, which
tfshard's reshape does. Values, gradients and trained weights equal one
device's."""

import keras
import numpy as np
import pytest
from keras import ops

import tfshard
from tfshard import _keras, styles
from tfshard._ops.reshape import rows_unflattened
from tfshard.plans import Plan

from parity import check_parity, strategy_for
from test_fit_common import assert_history_close, assert_weights_close

HEADS, HEAD_DIM, SEQ, HIDDEN = 4, 4, 8, 16


@pytest.mark.parametrize("src, dst, expected", [
    ((256, 4), (8, 8, 16), True),  # rows -> (B, S, H*D): no dim DTensor can split
    ((None, 4), (None, 8, None), True),  # the same with the batch unknown: (B, S, -1)
    ((64, 16), (8, 8, 16), False),  # (B*S, F) -> (B, S, F): F keeps its split
    ((None, 16), (None, 8, 16), False),
    ((None, 8, 16), (None, 8, 4, None), False),  # heads split out: (B, S, H, -1)
    ((None, 8, 4, 4), (None, 8, None), False),  # heads merged: (B, S, -1)
    ((None, 8, 4, 4), (None, 4), False),  # flattened to rows: D keeps its split
    ((8, 8, 16), (8, 8, 4, 4), False),
    ((16,), (4, 4), False),  # rank 1 has no rows (a weight vector reshaped to broadcast)
    ((32,), (1, 1, 32), False),
])
def test_which_reshapes_are_laid_out_whole(src, dst, expected):
    assert rows_unflattened(src, dst) is expected


class GatedHeadNorm(keras.layers.Layer):
    """The tail of keras-hub's Qwen3_5GatedDeltaNet: per-head RMS norm with a
    scale on flattened rows, gated by a projection, back to (B, S, H*D)."""

    def build(self, input_shape):
        self.core = keras.layers.Dense(HEADS * HEAD_DIM, use_bias=False, name="core")
        self.in_proj_z = keras.layers.Dense(HEADS * HEAD_DIM, use_bias=False, name="in_proj_z")
        self.out_proj = keras.layers.Dense(HIDDEN, use_bias=False, name="out_proj")
        for layer in (self.core, self.in_proj_z):
            layer.build(input_shape)
        self.out_proj.build((None, None, HEADS * HEAD_DIM))
        self.scale = self.add_weight(shape=(HEAD_DIM,), initializer="random_normal", name="scale")

    def call(self, x):
        batch, seq = ops.shape(x)[0], ops.shape(x)[1]
        z = ops.reshape(self.in_proj_z(x), (batch, seq, HEADS, HEAD_DIM))
        core = ops.reshape(self.core(x), (batch, seq, HEADS, HEAD_DIM))
        rows, gate = ops.reshape(core, (-1, HEAD_DIM)), ops.reshape(z, (-1, HEAD_DIM))
        rows = rows * ops.rsqrt(ops.mean(rows * rows, axis=-1, keepdims=True) + 1e-6) * self.scale
        rows = rows * keras.activations.silu(gate)
        return self.out_proj(ops.reshape(rows, (batch, seq, -1)))


def build():
    model = keras.Sequential([keras.Input((SEQ, HIDDEN)), GatedHeadNorm(name="gdn")], name="gated")
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    return model


PLAN = Plan({".*gdn/in_proj_z": styles.ColumnParallel(), ".*gdn/out_proj": styles.RowParallel()})


def _data():
    rng = np.random.RandomState(0)
    return rng.randn(16, SEQ, HIDDEN).astype("float32"), rng.randn(16, SEQ, HIDDEN).astype("float32")


def test_gradients_and_a_step_equal_one_device():
    x, _ = _data()
    check_parity(build, (2, 4), x[:8], plan=PLAN,
                 expect_specs={"in_proj_z/kernel": (None, "model"), "out_proj/kernel": ("model", None)})


def _fit(strategy):
    x, y = _data()
    keras.utils.set_random_seed(0)
    plain = build()
    expected = plain.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0).history
    with strategy.scope():
        keras.utils.set_random_seed(0)
        sharded = build()
    return plain, expected, sharded, sharded.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)


def test_fit_traced_for_any_batch_size_equals_one_device():
    plain, expected, sharded, fitted = _fit(strategy_for((2, 4), plan=PLAN))
    assert_history_close(fitted.history, expected)
    assert_weights_close(sharded, plain)


def test_without_it_dtensor_rejects_the_gradient(monkeypatch):
    """Pins the DTensor behaviour the replacement exists for: a TensorFlow
    upgrade that fixes it makes this fail, and the replacement can go."""
    monkeypatch.delitem(_keras.hooks.backend_ops, ("numpy", "reshape"))
    with pytest.raises(tfshard.TfshardError, match="Relayout op after layout propagation"):
        _fit(strategy_for((2, 4), plan=PLAN))
