"""``keras.ops.clip`` on a mesh after a strided slice (a step) of a split
tensor: GPT-OSS's experts clip the interleaved gate/up halves of an
expert-split einsum output (``gate_up[..., ::2]``). TensorFlow's gradient of
clip (``where(x <= max, dy, 0)`` from Minimum/Maximum) reaches the strided
slice's gradient with the experts whole while DTensor expects them split
("shape of dy was [4,...] instead of [1,...]"); tfshard's clip masks the
gradient by multiplication instead, which DTensor expands."""

import keras
import numpy as np
from keras import ops

from parity import assert_spec, strategy_for
from test_fit_common import assert_history_close, assert_weights_close

EXPERTS, HIDDEN, INNER, TOKENS = 4, 8, 6, 16


class InterleavedExpertGLU(keras.layers.Layer):
    """GptOssExperts' computation: an expert-split einsum, the interleaved
    gate/up halves taken with a step, clipped."""

    def build(self, _):
        self.gate_up = self.add_weight(shape=(EXPERTS, HIDDEN, 2 * INNER), name="gate_up")
        self.gate_up_bias = self.add_weight(shape=(EXPERTS, 2 * INNER), name="gate_up_bias")
        self.router = self.add_weight(shape=(HIDDEN, EXPERTS), name="router")
        self.down = self.add_weight(shape=(EXPERTS, INNER, HIDDEN), name="down")

    def call(self, x):
        gate_up = ops.einsum("th,ehm->etm", x, self.gate_up) + self.gate_up_bias[:, None, :]
        gate, up = gate_up[..., ::2], gate_up[..., 1::2]
        gate = ops.clip(gate, -1e9, 0.5)  # clipped often enough to test the mask
        up = ops.clip(up, -0.5, 0.5)
        out = ops.einsum("etm,emh->eth", (up + 1) * gate * ops.sigmoid(gate), self.down)
        scores = ops.softmax(ops.matmul(x, self.router), axis=-1)  # (tokens, experts)
        return ops.sum(out * ops.expand_dims(ops.transpose(scores), -1), axis=0)


def build():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((HIDDEN,)), InterleavedExpertGLU(name="experts")], name="glu")
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    return model


def test_clip_of_a_strided_slice_of_split_experts_trains_like_one_device():
    rng = np.random.RandomState(0)
    x, y = rng.randn(TOKENS, HIDDEN).astype("float32"), rng.randn(TOKENS, HIDDEN).astype("float32")
    fit = dict(batch_size=8, epochs=2, shuffle=False, verbose=0)
    plain = build()
    expected = plain.fit(x, y, **fit).history
    expert_split = ("model", None, None)
    strategy = strategy_for((2, 4), shards=[(".*gate_up", expert_split), (".*gate_up_bias", ("model", None)),
                                            (".*down", expert_split)])
    with strategy.scope():
        sharded = build()
    assert_history_close(sharded.fit(x, y, **fit).history, expected)
    assert_weights_close(sharded, plain)
    assert_spec(sharded, "gate_up", expert_split, strategy)
