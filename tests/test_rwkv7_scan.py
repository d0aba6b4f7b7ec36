"""keras-hub's RWKV-7 recurrence on a mesh (``tfshard._ops.recurrence``).

keras-hub computes the generalized delta rule of RWKV-7's time mixing with
a ``tf.TensorArray``, which DTensor cannot lay out; tfshard runs the same
arithmetic unrolled, split by batch and heads. Checked here: the
replacement equals keras-hub's original (forward, final state and
gradients) on 2x4 with the heads split; a time-mixing
layer whose projections are split trains like one device; and the DTensor
behaviour the formulation avoids (a strided slice that drops a dim
mislays the splits of the others), pinned. The whole RWKV-7 causal LM
under ``auto_plan`` is ``tests/test_keras_hub_families.py``'s "rwkv7"
(``TFSHARD_ALL_FAMILIES=1``).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
import tfshard
from tfshard.layout import KEEP
from tfshard._ops import recurrence

from conftest import make_strategy
from parity import strategy_for
from test_fit_common import assert_history_close, assert_weights_close

pytest.importorskip("keras_hub")
from keras_hub.src.models.rwkv7 import rwkv7_layer  # noqa: E402

ORIGINAL = rwkv7_layer.rnn_generalized_delta_rule
B, T = 4, 4


def _inputs(heads, size, seed=0):
    rng = np.random.RandomState(seed)
    r, k, v = (rng.randn(B, T, heads, size).astype("float32") for _ in range(3))
    w = -0.5 - np.abs(rng.randn(B, T, heads, size)).astype("float32")  # keras-hub's w < -0.5
    kk = rng.randn(B, T, heads, size).astype("float32")
    kk /= np.linalg.norm(kk, axis=-1, keepdims=True)
    a = 1 / (1 + np.exp(-rng.randn(B, T, heads, size))).astype("float32")
    state = rng.randn(B, heads, size, size).astype("float32") * 0.1
    return [r, w, k, v, -kk, (kk * a).astype("float32")], state


def test_the_replacement_computes_keras_hub_recurrence():
    """Forward, final state and the gradients of every input and of the
    initial state, on 2x4 with the 4 heads split over model, against
    keras-hub's TensorArray loop on one device."""
    arrays, state = _inputs(4, 4)

    def run(scan, tensors, initial):
        with tf.GradientTape() as tape:
            tape.watch(tensors + [initial])
            out, final = scan(*tensors, initial_state=initial)
            loss = tf.reduce_sum(out * out) + tf.reduce_sum(final * final)
        return [out, final] + tape.gradient(loss, tensors + [initial])

    expected = tf.function(lambda *t: run(ORIGINAL, list(t[:-1]), t[-1]))(*arrays, state)
    strategy = make_strategy(2, 4)
    spec = (KEEP, None, None, None)
    placed = [strategy.place(x, strategy.batch_spec(x.shape)) for x in arrays + [state]]
    with strategy.scope():
        got = tf.function(lambda *t: run(
            lambda *a, **kw: recurrence.delta_rule_scan(ORIGINAL, *a, **kw),
            [strategy.place(x, spec) for x in t[:-1]], t[-1]))(*placed)
    names = ["out", "final_state", "dr", "dw", "dk", "dv", "da", "db", "dstate"]
    for name, g, e in zip(names, got, expected):
        np.testing.assert_allclose(tfshard.to_numpy(g), e.numpy(), rtol=1e-5, atol=1e-5, err_msg=name)
    # the output stays split by heads: no gather inside the scan
    assert tfshard.spec_of(got[0]) == ("batch", None, "model", None)


class TimeMix(keras.layers.Layer):
    """keras-hub's RWKV-7 time mixing alone (its output, not the state)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.mix = rwkv7_layer.RWKV7TimeMix(16, 4, 8, 8, 8, 8, name="mix")

    def build(self, shape):
        self.mix.build(shape)

    def call(self, x):
        return self.mix(x)[0]


def _model():
    keras.backend.clear_session()  # the same weight paths in both builds
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((T, 16)), TimeMix(name="time_mix")])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    return model


def test_a_time_mixing_layer_with_split_projections_trains_like_one_device():
    rng = np.random.RandomState(0)
    x, y = rng.randn(16, T, 16).astype("float32"), rng.randn(16, T, 16).astype("float32")
    fit = dict(batch_size=16, epochs=1, shuffle=False, verbose=0)  # one step
    plain = _model()
    expected = plain.fit(x, y, **fit).history
    strategy = strategy_for((2, 4), shards=[(".*receptance/kernel", (None, "model")),
                                           (".*key/kernel", (None, "model")),
                                           (".*output_layer/kernel", ("model", None))])
    with strategy.scope():
        sharded = _model()
    assert_history_close(sharded.fit(x, y, **fit).history, expected)
    assert_weights_close(sharded, plain)
    assert tfshard.spec_of(sharded.get_layer("time_mix").mix.receptance.kernel) == (None, "model")


def test_dtensor_mislays_a_strided_slice_that_drops_a_dim():
    """Pins the DTensor behaviour ``recurrence._row``/``_column`` avoid:
    ``x[:, t]`` of ``x`` laid out ``(batch, -, model, -)`` is laid out
    ``(batch, -, model)``, the heads' split moved onto the last dim, so its
    global value is wrong; ``x[:, t:t + 1]`` (the time dim kept) is right.
    If a TensorFlow upgrade fixes it, this fails: the simpler slices may
    then be used."""
    strategy = make_strategy(2, 4)
    x = np.arange(4 * 3 * 4 * 4, dtype="float32").reshape(4, 3, 4, 4)
    placed = strategy.place(x, ("batch", None, "model", None))
    dropped = tf.function(lambda v: v[:, 1])(placed)
    kept = tf.function(lambda v: v[:, 1:2])(placed)
    np.testing.assert_array_equal(tfshard.to_numpy(kept), x[:, 1:2])
    assert tfshard.spec_of(dropped) == ("batch", None, "model")
    assert not np.array_equal(tfshard.to_numpy(dropped), x[:, 1])
