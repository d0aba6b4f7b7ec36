"""tfshard.memory.memory_by_kind: per-device bytes of a training step by
kind, activations measured from the tensors the step keeps for backward and
checked against a Megatron-style per-layer formula."""

import contextlib

import keras
import numpy as np
import pytest

import tfshard
from tfshard.app import config as config_lib
from tfshard.app import data as data_lib
from tfshard.app import models
from tfshard.errors import StrategyError
from tfshard.memory import memory_by_kind

S, B, H, A, FF, V = 16, 4, 32, 8, 128, 256  # sequence, batch, width, heads, d_ff, vocab
F32 = 4


def transformer_config(layers):
    return {**config_lib.defaults()["model"], "d_model": H, "heads": A, "d_ff": FF, "vocab": V,
            "layers": layers, "seq_len": S}


@pytest.fixture(scope="module")
def batch():
    x, y = data_lib.lm_examples(data_lib.stdlib_bytes(100_000), S, B, seed=0)
    return x, y


def strategy_for(shape, stage=0):
    if shape is None:
        return None
    builder = (tfshard.StrategyBuilder(tfshard.Mesh({"batch": shape[0], "model": shape[1]}))
               .data_parallel("batch").tensor_parallel("model"))
    if stage:
        builder.shard_optimizer_state("batch", stage=stage)
    return builder.build()


def measure(layers, shape, batch, stage=0):
    strategy = strategy_for(shape, stage)
    with strategy.scope() if strategy else contextlib.nullcontext():
        model = models.build(transformer_config(layers), seed=0)
    return model, memory_by_kind(model, batch)


_MEASURED = {}


def measured(layers, shape, batch, stage=0):
    key = (layers, shape, stage)
    if key not in _MEASURED:
        _MEASURED[key] = measure(layers, shape, batch, stage)
    return _MEASURED[key]


@pytest.fixture(scope="module", autouse=True)
def _release():
    yield
    _MEASURED.clear()


def block_activation_bytes(s, b, h, a, ff, t):
    """Bytes one device keeps for backward per pre-norm transformer block
    (float32, no dropout), ``b`` the per-device batch, ``t`` the tensor-
    parallel size.

    Megatron's count (Korthikanti et al. 2022, eq. 2) in float32 elements
    without dropout (no masks, the softmax output is the dropout output):
    the two norm inputs, the QKV input and the MLP input, whole on every
    device (4sbh); Q, K, V, the output projection's input (4sbh/t), the
    GELU's input and output (2sb*ff/t) and the softmax output (as^2b/t)
    split. Keras and TensorFlow keep three things more, each a named kept
    tensor in the measured list: each LayerNormalization keeps its
    broadcast ``rsqrt(var) * gamma`` (2sbh), TensorFlow's erf-GELU gradient
    reads four d_ff-sized tensors where Megatron counts two (2sb*ff/t), and
    the norms' per-token mean, rsqrt and -mean (6sb).
    """
    megatron = 4 * s * b * h + (4 * s * b * h + 2 * s * b * ff + a * s * s * b) / t
    keras_extra = 2 * s * b * h + 2 * s * b * ff / t + 6 * s * b
    return F32 * int(megatron + keras_extra)


@pytest.mark.parametrize("shape", [None, (2, 4), (1, 8)], ids=["plain", "2x4", "1x8"])
def test_activations_per_block_follow_the_formula(batch, shape):
    one = measured(1, shape, batch)[1]
    two = measured(2, shape, batch)[1]
    dp, tp = shape or (1, 1)
    assert two.activations - one.activations == block_activation_bytes(S, B // dp, H, A, FF, tp)
    # With t = 1 the formula is Megatron's sbh(34 + 5as/h) without its
    # dropout masks, in float32, plus Keras's extras.
    if shape is None:
        assert two.activations - one.activations == F32 * (26 * S * B * H + A * S * S * B + 6 * S * B)


def test_tensor_parallelism_divides_what_megatron_says_it_does(batch):
    plain = measured(2, None, batch)[1].activations - measured(1, None, batch)[1].activations
    tp4 = measured(2, (2, 4), batch)[1].activations - measured(1, (2, 4), batch)[1].activations
    # Replicated over 'model': 6sbh + 6sb of the 26sbh + as^2b/... per block.
    replicated = F32 * (6 * S * (B // 2) * H + 6 * S * (B // 2))
    assert tp4 - replicated == (plain / 2 - replicated) / 4  # half the batch, the rest over t


def test_parameters_gradients_optimizer_are_the_shards(batch):
    model, plain = measured(1, None, batch)
    size = sum(int(np.prod(w.shape)) for w in model.weights) * F32
    assert plain.parameters == plain.gradients == size
    # Adam: two slots per weight, plus its iteration count (int64) and
    # learning rate (float32).
    assert plain.optimizer == 2 * size + 8 + 4
    sharded_model, sharded = measured(2, (2, 4), batch, stage=3)
    params = sum(int(np.prod(tfshard._dtensor.unpack(w)[0].shape)) for w in sharded_model.weights) * F32
    assert sharded.parameters == params
    assert sharded.gradients == params  # ZeRO-3: gradients held like the parameters
    assert sharded.optimizer == 2 * params + 8 + 4
    # ... and the all-gathered weights the step keeps for backward are
    # listed apart, each whole over 'batch' (global / tp).
    copies = [k for k in sharded.kept if not k.from_batch]
    assert copies and sharded.parameter_copies == sum(k.bytes for k in copies)
    assert sharded.activations == measured(2, (2, 4), batch)[1].activations


def test_unbuilt_optimizer_and_uncompiled_model(batch):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(StrategyError, match="not compiled.*model.compile"):
        memory_by_kind(model, (np.zeros((2, 4), "float32"), np.zeros((2, 2), "float32")))
    model.compile(optimizer="adam", loss="mse")
    breakdown = memory_by_kind(model, (np.zeros((2, 4), "float32"), np.zeros((2, 2), "float32")))
    assert breakdown.parameters == (4 * 2 + 2) * F32
    # What the step keeps: the input (for the kernel's gradient), the
    # prediction minus the target (for the squared error's) and the loss
    # sum the mean divides (a scalar).
    assert [(k.op_type, k.local_shape) for k in breakdown.kept] == [
        ("Placeholder", (2, 4)), ("Sub", (2, 2)), ("Sum", ())]
    assert breakdown.activations == (2 * 4 + 2 * 2 + 1) * F32
    assert "activations" in breakdown.table()


def test_bench_memory_prints_bytes_by_kind_per_mesh_and_zero_stage(capsys):
    """``tfshard bench CONFIG --memory --zero-stages 0,3``: one row per run;
    ZeRO-3 divides parameters, gradients and Adam's state by the data axis
    too and leaves the activations as they are."""
    import os

    from tfshard.app import cli

    config = os.path.join(os.path.dirname(__file__), "..", "configs", "transformer_2x4.yaml")
    small = ["--set", "model.d_model=32", "--set", "model.heads=8", "--set", "model.d_ff=64",
             "--set", "model.layers=1", "--set", "model.seq_len=16", "--set", "train.batch_size=8",
             "--set", "data.max_bytes=100000"]
    assert cli.main(["bench", config, "--memory", "--meshes", "2x4", "--zero-stages", "0,3", *small]) == 0
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        if line.startswith(("plain", "tfshard")):
            name, numbers = line[:28].strip(), [int(n.replace(",", "")) for n in line[28:].split()]
            rows[name] = dict(zip(("parameters", "gradients", "optimizer", "activations", "total"), numbers))
    assert list(rows) == ["plain keras 1 device", "tfshard 2x4", "tfshard 2x4 zero-3"], rows
    plain, tp, zero3 = rows.values()
    assert tp["activations"] == zero3["activations"] < plain["activations"] / 2
    assert zero3["parameters"] < tp["parameters"] < plain["parameters"] / 2
    assert zero3["optimizer"] < tp["optimizer"]
    assert cli.main(["bench", config, "--memory", "--zero-stages", "0,4", *small]) == 2
    assert "--zero-stages '0,4'" in capsys.readouterr().err
