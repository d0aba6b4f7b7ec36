"""ExpertParallelMoE against reference_moe on the same weights: gating
semantics, forward, aux loss, gradients, Adam steps and shard sizes on
several meshes and expert layouts, collectives, model.fit, errors."""

import keras
import numpy as np
import pytest
import tensorflow as tf
import tfshard
from tfshard import comm
from tfshard.layers import ExpertParallelMoE, reference_moe
from tfshard.layers.moe import expert_capacity, top_k_gating

from conftest import make_strategy

BATCH, SEQ, D_MODEL, EXPERTS, D_FF = 4, 64, 8, 8, 16
# 8 groups of 8 tokens per example: the groups split over any expert axis of
# these meshes. Capacity ceil(2 * 1.0 * 8 / 8) = 2 slots per expert and
# group for 16 routes: tokens overflow (checked in test_capacity_overflow).
MOE = dict(top_k=2, capacity_factor=1.0, group_size=8)
TOL = dict(rtol=1e-5, atol=1e-5)

# (data, model), rules, expected (expert_in_kernel spec)
LAYOUTS = {
    "1x8-experts-model": ((1, 8), {}, ("model", None, None)),
    "2x4-experts-model": ((2, 4), {}, ("model", None, None)),
    "2x4-experts-batch-dff-model": ((2, 4), {"experts": "batch"}, ("batch", None, "model")),
    "4x2-experts-batch-dff-model": ((4, 2), {"experts": "batch"}, ("batch", None, "model")),
    "4x2-experts-model": ((4, 2), {}, ("model", None, None)),
    "8x1-experts-batch": ((8, 1), {"experts": "batch"}, ("batch", None, "model")),
    "2x4-no-expert-parallel-dff-model": ((2, 4), {"experts": None}, (None, None, "model")),
}


@pytest.fixture(scope="module")
def x():
    return np.random.RandomState(1).randn(BATCH, SEQ, D_MODEL).astype("float32")


def moe_layer(strategy=None, seed=0, **kwargs):
    options = {**MOE, **kwargs}
    keras.utils.set_random_seed(seed)
    if strategy is None:
        layer = ExpertParallelMoE(EXPERTS, D_FF, **options)
    else:
        with strategy.scope():
            layer = ExpertParallelMoE(EXPERTS, D_FF, **options)
    layer.build((None, SEQ, D_MODEL))
    return layer


def objective(layer, x):
    y = layer(x)
    y = tf.convert_to_tensor(y) if not tfshard._dtensor.is_dtensor(y) else y
    return tf.reduce_mean(tf.square(y)) + tf.reduce_mean(y) + tf.add_n(layer.losses)


def forward_and_grads(layer, x):
    """Output, aux loss, objective, input gradient and weight gradients, in
    a tf.function (an eager tape's gradient of a DTensor input meets plain
    tensors DTensor rejects); on a mesh the input is placed split by batch
    (as fit does), so the input gradient takes the layer's backward
    collectives."""
    strategy = layer.sharding_strategy
    x = tf.constant(x) if strategy is None else strategy.place(x, strategy.batch_spec(x.shape))

    @tf.function(autograph=False)
    def run(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = objective(layer, x)
        return layer.losses[0], loss, tape.gradient(loss, [x] + layer.trainable_variables)

    aux, loss, (dx, *grads) = run(x)
    return layer(x), aux, loss, dx, grads


# ---------------------------------------------------------------- gating
def gshard_gating_loop(logits, top_k, capacity):
    """GShard's routing token by token: all first choices in token order,
    then all second choices, each into the next free slot of its expert."""
    groups, size, experts = logits.shape
    gates = np.exp(logits - logits.max(-1, keepdims=True))
    gates /= gates.sum(-1, keepdims=True)
    combine = np.zeros((groups, size, experts, capacity))
    for g in range(groups):
        ranked = np.argsort(-gates[g], axis=-1)
        chosen = gates[g][np.arange(size)[:, None], ranked[:, :top_k]]
        if top_k > 1:
            chosen = chosen / (chosen.sum(-1, keepdims=True) + 1e-9)
        filled = np.zeros(experts, int)
        for k in range(top_k):
            for s in range(size):
                e = ranked[s, k]
                if filled[e] < capacity:
                    combine[g, s, e, filled[e]] = chosen[s, k]
                    filled[e] += 1
    first = np.eye(experts)[gates.argmax(-1)]
    aux = np.mean(first.mean(1) * gates.mean(1)) * experts**2
    return combine, aux


@pytest.mark.parametrize("top_k, capacity", [(1, 2), (2, 2), (2, 3), (3, 1)])
def test_gating_matches_gshard_token_by_token(top_k, capacity):
    logits = np.random.RandomState(top_k * 10 + capacity).randn(3, 8, 4).astype("float32") * 2
    combine, dispatch, aux = top_k_gating(tf.constant(logits), top_k, capacity)
    expected, expected_aux = gshard_gating_loop(logits.astype("float64"), top_k, capacity)
    np.testing.assert_allclose(combine.numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(dispatch.numpy(), (expected > 0).astype("float32"))
    np.testing.assert_allclose(float(aux), expected_aux, rtol=1e-5)
    # Some routes overflowed, and the slots are filled from 0 upwards.
    assert dispatch.numpy().sum() < 3 * 8 * top_k
    assert dispatch.numpy().sum(axis=1).max() <= 1


def test_capacity_overflow_is_exercised(x):
    """The parity data drops routes (second choices, and whole tokens)."""
    layer = moe_layer()
    assert layer.capacity == expert_capacity(8, EXPERTS, 2, 1.0) == 2
    groups = x.reshape(-1, MOE["group_size"], D_MODEL)
    _, dispatch, _ = top_k_gating(groups @ layer.router_kernel.numpy(), 2, layer.capacity)
    routes = dispatch.numpy().sum(axis=(2, 3))  # per token: 0, 1 or 2
    assert (routes < 2).mean() > 0.2 and (routes == 0).any() and (routes == 2).any()


def test_reference_is_the_layer_outside_a_strategy(x):
    layer = moe_layer()
    assert layer.sharding_strategy is None
    assert all(tfshard.layout_of(w) is None for w in layer.weights)
    y = layer(x)
    expected, aux = reference_moe(
        x, layer.router_kernel, layer.expert_in_kernel, layer.expert_out_kernel, **MOE
    )
    np.testing.assert_array_equal(y.numpy(), expected.numpy())
    np.testing.assert_allclose(float(layer.losses[0]), 1e-2 * float(aux), rtol=1e-6)
    # Per expert: a token routed to one expert only, with gate 1, is that
    # expert's FFN (top-1, ample capacity).
    one = moe_layer(top_k=1, capacity_factor=8.0)
    tokens = x[:1, :8]
    out = one(tokens).numpy()[0]
    gates = tf.nn.softmax(tokens[0] @ one.router_kernel.numpy()).numpy()
    for s in range(8):
        e = gates[s].argmax()
        ffn = np.maximum(tokens[0, s] @ one.expert_in_kernel.numpy()[e], 0)
        ffn = ffn @ one.expert_out_kernel.numpy()[e]
        np.testing.assert_allclose(out[s], gates[s, e] * ffn, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- parity
@pytest.fixture(scope="module")
def reference(x):
    """Forward, aux loss, gradients and weights after 2 Adam steps, plain."""
    keras.backend.clear_session()
    layer = moe_layer()
    initial = [w.numpy() for w in layer.weights]
    y, aux, loss, dx, grads = forward_and_grads(layer, x)
    optimizer = keras.optimizers.Adam(1e-2)
    for _ in range(2):
        with tf.GradientTape() as tape:
            value = objective(layer, x)
        optimizer.apply_gradients(zip(tape.gradient(value, layer.trainable_variables),
                                      layer.trainable_variables))
    return dict(
        initial=initial, y=y.numpy(), aux=float(aux), loss=float(loss), dx=dx.numpy(),
        grads=[g.numpy() for g in grads], stepped=[w.numpy() for w in layer.weights],
    )


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_parity_forward_aux_gradients_and_adam(name, x, reference):
    shape, rules, expert_spec = LAYOUTS[name]
    strategy = make_strategy(*shape, **rules)
    layer = moe_layer(strategy)
    for w, value in zip(layer.weights, reference["initial"]):
        np.testing.assert_array_equal(w.numpy(), value, err_msg=w.path)

    # Experts split over their axis, d_ff over the tensor axis when free.
    router, expert_in, expert_out = layer.weights
    assert tfshard.layout_of(router) == (None, None)
    assert tfshard.layout_of(expert_in) == expert_spec
    assert tfshard.layout_of(expert_out) == (expert_spec[0], expert_spec[2], None)
    sizes = dict(zip(("batch", "model"), shape))
    e_parts, f_parts = sizes.get(expert_spec[0], 1), sizes.get(expert_spec[2], 1)
    assert tfshard.local_shape(expert_in) == (EXPERTS // e_parts, D_MODEL, D_FF // f_parts)
    shard = tfshard._dtensor.unpack(expert_out)[0]
    assert tuple(shard.shape) == (EXPERTS // e_parts, D_FF // f_parts, D_MODEL)
    assert shard.shape.num_elements() * e_parts * f_parts == np.prod(expert_out.shape)

    y, aux, loss, dx, grads = forward_and_grads(layer, x)
    np.testing.assert_allclose(tfshard.to_numpy(y), reference["y"], **TOL)
    np.testing.assert_allclose(float(tfshard.to_numpy(aux)), reference["aux"], rtol=1e-6)
    np.testing.assert_allclose(float(tfshard.to_numpy(loss)), reference["loss"], rtol=1e-6)
    # The input gradient (all-gathered over the expert axis when the experts
    # are off the data axis) comes back laid out like the input.
    assert tfshard.layout_of(dx) == tfshard.layout_of(y), (tfshard.layout_of(dx), tfshard.layout_of(y))
    np.testing.assert_allclose(tfshard.to_numpy(dx), reference["dx"], **TOL)
    for g, expected, w in zip(grads, reference["grads"], layer.trainable_variables):
        assert tfshard.layout_of(g) == tfshard.layout_of(w), w.path
        np.testing.assert_allclose(tfshard.to_numpy(g), expected, err_msg=w.path, **TOL)

    optimizer = keras.optimizers.Adam(1e-2)
    for _ in range(2):
        with tf.GradientTape() as tape:
            value = objective(layer, x)
        optimizer.apply_gradients(zip(tape.gradient(value, layer.trainable_variables),
                                      layer.trainable_variables))
    for w, expected in zip(layer.weights, reference["stepped"]):
        np.testing.assert_allclose(w.numpy(), expected, err_msg=w.path, **TOL)
        assert tfshard.layout_of(w) is not None
    # Adam's two slots per expert kernel are split like it.
    for slot in optimizer.variables:
        if "expert" in slot.path and len(slot.shape) == 3:
            param = expert_in if "expert_in" in slot.path else expert_out
            assert tfshard.layout_of(slot) == tfshard.layout_of(param), slot.path
            assert tuple(tfshard._dtensor.unpack(slot)[0].shape) == tfshard.local_shape(param)


@pytest.mark.parametrize("rules", [{}, {"experts": "batch"}], ids=["experts-model", "experts-batch"])
def test_partial_batch_runs_replicated(rules, x):
    """3 examples cannot split over the 2-way data axis: the batch runs
    replicated (as in fit's last batch) and the result is unchanged."""
    plain = moe_layer()
    layer = moe_layer(make_strategy(2, 4, **rules))
    np.testing.assert_allclose(layer(x[:3]).numpy(), plain(x[:3]).numpy(), **TOL)


# ----------------------------------------------------------- collectives
COUNT_SCRIPT = """
import numpy as np, tensorflow as tf, tfshard
from tfshard import comm
from tfshard.layers import ExpertParallelMoE

def main():
    out = {}
    x = np.random.RandomState(0).randn(4, 64, 8).astype("float32")
    for name, rules in (("model", {}), ("batch", {"experts": "batch"}), ("none", {"experts": None})):
        mesh = tfshard.Mesh({"batch": 2, "model": 4})
        builder = tfshard.StrategyBuilder(mesh).data_parallel("batch").tensor_parallel("model")
        strategy = builder.rules(rules).build()
        with strategy.scope():
            layer = ExpertParallelMoE(8, 16, group_size=8)
        layer(x)
        xs = strategy.place(x, ("batch", None, None))

        def train(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.reduce_sum(tf.square(layer(x))) + tf.add_n(layer.losses)
            return tape.gradient(loss, [x] + layer.trainable_variables)

        out[name] = comm.count_collectives(layer, xs)
        out[name + "_train"] = comm.count_collectives(train, xs)
    out["none_train_launched"] = comm.count_collectives(train, xs, stage="optimized")
    return out
"""


def test_dispatch_and_combine_are_all_to_all():
    counts = comm.run_in_subprocess(COUNT_SCRIPT)

    # Experts on the data axis (GShard's layout), d_ff on the tensor axis:
    # dispatch and combine are one all-to-all each over 'batch'; inside the
    # experts, the row-parallel sum over 'model'. Nothing is gathered.
    assert counts["batch"] == {("all_to_all", "batch"): 2, ("all_reduce", "model"): 1}
    # Training: both directions, and over 'batch' only the router's
    # gradient sum (each expert's kernels see all of their tokens).
    assert counts["batch_train"] == {
        ("all_to_all", "batch"): 4,
        ("all_reduce", "model"): 2,
        ("all_reduce", "batch"): 1,
    }, counts["batch_train"]

    # Experts on the tensor axis: each device slices its share of the groups
    # (all_scatter: local), dispatch and combine are all-to-alls over
    # 'model', and the one all-gather is the combined *output*, made whole
    # on 'model' again for the next layer. Nothing crosses 'batch'.
    assert counts["model"] == {
        ("all_scatter", "model"): 1,
        ("all_to_all", "model"): 2,
        ("all_gather", "model"): 1,
    }
    # Training: the gradient sums are of the router (tokens split over
    # 'batch' and groups over 'model') and of the two expert kernels (each
    # expert sees the tokens of both 'batch' shards); the all-scatters are
    # local slices.
    assert counts["model_train"] == {
        ("all_to_all", "model"): 4,
        ("all_gather", "model"): 2,  # output fwd, input grad bwd
        ("all_reduce", ("batch", "model")): 1,
        ("all_reduce", "batch"): 2,
        ("all_scatter", "model"): 2,
    }, counts["model_train"]

    # No expert parallelism, d_ff on 'model': a Megatron FFN per expert,
    # one all-reduce forward and one backward; the three replicated
    # weights' gradient sums over 'batch' launch as one.
    assert counts["none"] == {("all_reduce", "model"): 1}
    assert counts["none_train"] == {("all_reduce", "model"): 2, ("all_reduce", "batch"): 3}
    assert counts["none_train_launched"] == {("all_reduce", "model"): 2, ("all_reduce", "batch"): 1}


# ------------------------------------------------------------------- fit
def tiny_moe_lm(strategy=None):
    def build():
        keras.utils.set_random_seed(0)
        tokens = keras.Input((16,), dtype="int32")
        h = keras.layers.Embedding(32, D_MODEL)(tokens)
        h = h + ExpertParallelMoE(EXPERTS, D_FF, top_k=2, capacity_factor=1.0, group_size=2)(h)
        logits = keras.layers.Dense(32)(h)
        model = keras.Model(tokens, logits)
        model.compile(
            optimizer=keras.optimizers.Adam(1e-2),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=False,
        )
        return model

    if strategy is None:
        return build()
    with strategy.scope():
        return build()


FIT = dict(batch_size=8, epochs=2, shuffle=False, verbose=0)


@pytest.fixture(scope="module")
def fit_reference():
    """Plain Keras: the data, the loss history and the trained weights."""
    rng = np.random.RandomState(5)
    # 2 batches of 8, then 5 examples: that batch runs replicated over 'batch'.
    x = rng.randint(0, 32, size=(21, 16)).astype("int32")
    y = np.roll(x, -1, axis=1)
    keras.backend.clear_session()
    plain = tiny_moe_lm()
    history = plain.fit(x, y, **FIT).history["loss"]
    return x, y, history, [w.numpy() for w in plain.weights]


@pytest.mark.parametrize(
    "rules, expert_spec, parts",
    [({}, ("model", None, None), 4), ({"experts": "batch"}, ("batch", None, "model"), 8)],
    ids=["experts-model", "experts-batch"],
)
def test_fit_matches_the_reference_model(rules, expert_spec, parts, fit_reference):
    x, y, history, weights = fit_reference
    sharded = tiny_moe_lm(make_strategy(2, 4, **rules))
    np.testing.assert_allclose(sharded.fit(x, y, **FIT).history["loss"], history, **TOL)
    for w, expected in zip(sharded.weights, weights):
        np.testing.assert_allclose(w.numpy(), expected, err_msg=w.path, **TOL)
    moe = next(layer for layer in sharded.layers if isinstance(layer, ExpertParallelMoE))
    assert tfshard.layout_of(moe.expert_in_kernel) == expert_spec
    shard = tfshard._dtensor.unpack(moe.expert_in_kernel)[0]
    assert shard.shape.num_elements() == EXPERTS * D_MODEL * D_FF // parts


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "shape, rules, kwargs, message",
    [
        ((2, 4), {}, dict(num_experts=6), r"num_experts=6 cannot be split evenly over mesh axis 'model' of size 4"),
        ((2, 4), {}, dict(group_size=32), r"2 routing group\(s\) per example \(group_size=32\).*'model' of size 4.*group_size=16"),
        ((2, 4), {"experts": "batch"}, dict(d_ff=6), r"expert_in_kernel.*size 6.*'model' \(size 4\)"),
        ((2, 4), {"experts": None, "d_ff": "batch"}, {}, r"'d_ff' maps to the data axis 'batch'"),
        ((1, 1), {}, dict(group_size=5), r"group_size=5 does not divide the 64 tokens"),
    ],
)
def test_bad_layouts_fail_before_dtensor(shape, rules, kwargs, message):
    options = {**MOE, **kwargs}
    experts, d_ff = options.pop("num_experts", EXPERTS), options.pop("d_ff", D_FF)
    with make_strategy(*shape, **rules).scope():
        layer = ExpertParallelMoE(experts, d_ff, name="moe", **options)
    with pytest.raises(tfshard.TfshardError, match=message) as err:
        layer.build((None, SEQ, D_MODEL))
    assert "moe" in str(err.value)
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(top_k=3, num_experts=2), r"top_k=3 with num_experts=2"),
        (dict(num_experts=0), r"num_experts=0"),
        (dict(capacity_factor=0), r"capacity_factor=0"),
        (dict(group_size=0), r"group_size=0"),
    ],
)
def test_bad_arguments(kwargs, message):
    args = {"num_experts": 4, "d_ff": 8, **kwargs}
    with pytest.raises(tfshard.TfshardError, match=message):
        ExpertParallelMoE(args.pop("num_experts"), args.pop("d_ff"), **args)


def test_config_round_trip_and_logical_axes():
    layer = ExpertParallelMoE(4, 8, top_k=1, capacity_factor=2.0, group_size=4,
                              activation="gelu", aux_loss_weight=0.1)
    assert layer.logical_axes == {
        "router_kernel": (None, None),
        "expert_in_kernel": ("experts", None, "d_ff"),
        "expert_out_kernel": ("experts", "d_ff", None),
    }
    clone = ExpertParallelMoE.from_config(layer.get_config())
    for attr in ("num_experts", "d_ff", "top_k", "capacity_factor", "group_size", "aux_loss_weight"):
        assert getattr(clone, attr) == getattr(layer, attr), attr
    assert keras.saving.get_registered_name(ExpertParallelMoE) == "tfshard>ExpertParallelMoE"


# ------------------------------------------------------ transformer, config
def lm_loss_and_gradients(model, tokens, labels, strategy=None):
    """The compiled loss plus the MoE aux losses, and its gradients, traced
    as fit traces them."""
    import contextlib

    @tf.function(autograph=False)
    def run(tokens, labels):
        with strategy.scope() if strategy else contextlib.nullcontext():
            with tf.GradientTape() as tape:
                logits = model(tokens, training=True)
                loss = model.loss(labels, logits) + tf.add_n(model.losses)
            return loss, tape.gradient(loss, model.trainable_variables)

    return run(tokens, labels)


def test_transformer_moe_blocks_and_config_checks(tmp_path):
    from tfshard.app import config as config_lib
    from tfshard.app import models

    config = config_lib.validate({
        "model": dict(d_model=16, heads=4, d_ff=16, layers=2, seq_len=8, moe_experts=4,
                      moe_every=2, moe_group_size=2),
        "layout": {"rules": "batch:batch,d_ff:model,heads:model,vocab:model"},
    })
    tokens = np.random.RandomState(0).randint(0, 256, size=(4, 8)).astype("int32")
    plain = models.build(config["model"])
    strategy = make_strategy(2, 4)
    with strategy.scope():
        sharded = models.build(config["model"])
    # GShard's every other block: block_1's FFN is the mixture of experts.
    paths = [w.path for w in sharded.weights]
    assert "block_1/moe/expert_in_kernel" in paths and "block_0/ffn_in/kernel" in paths
    assert not any(p.startswith(("block_0/moe", "block_1/ffn_in", "block_1/ffn_out")) for p in paths)
    expert = next(w for w in sharded.weights if w.path == "block_1/moe/expert_in_kernel")
    assert tfshard.layout_of(expert) == ("model", None, None)
    np.testing.assert_allclose(sharded(tokens).numpy(), plain(tokens).numpy(), **TOL)

    # Gradients of the LM loss plus the aux loss, and the weights after an
    # Adam step with them.
    labels = np.roll(tokens, -1, axis=1)
    loss, grads = lm_loss_and_gradients(plain, tokens, labels)
    placed = [strategy.place(a, ("batch", None)) for a in (tokens, labels)]
    sharded_loss, sharded_grads = lm_loss_and_gradients(sharded, *placed, strategy=strategy)
    np.testing.assert_allclose(float(tfshard.to_numpy(sharded_loss)), float(loss), rtol=1e-6)
    assert len(sharded_grads) == len(grads) == len(sharded.trainable_variables)
    # (Values only: with the experts on 'model' some gradients, e.g. the
    # position table's, come out split by sequence over 'model'; the
    # optimizer step lays them out like their variables.)
    for got, want, w in zip(sharded_grads, grads, sharded.trainable_variables):
        np.testing.assert_allclose(tfshard.to_numpy(got), tf.convert_to_tensor(want).numpy(),
                                   err_msg=w.path, **TOL)
    plain.optimizer.apply_gradients(zip(grads, plain.trainable_variables))
    with strategy.scope():
        sharded.optimizer.apply_gradients(zip(sharded_grads, sharded.trainable_variables))
    for got, want in zip(sharded.weights, plain.weights):
        assert tfshard.layout_of(got) is not None, got.path
        np.testing.assert_allclose(got.numpy(), want.numpy(), err_msg=want.path, **TOL)

    for model, message in [
        (dict(moe_experts=6), r"model.moe_experts=6 is not divisible by mesh.model=4"),
        (dict(moe_experts=8, moe_group_size=32), r"2 routing groups per sequence cannot be split over mesh.model=4"),
        (dict(moe_experts=8, moe_group_size=7), r"moe_group_size=7 does not divide model.seq_len=64"),
        (dict(moe_experts=2, moe_top_k=3), r"moe_top_k=3 exceeds model.moe_experts=2"),
    ]:
        with pytest.raises(config_lib.ConfigError, match=message):
            config_lib.validate({"model": model})
    # Experts on the data axis: any number of groups per sequence.
    config_lib.validate({"model": dict(moe_experts=8, moe_group_size=32),
                         "layout": {"rules": "batch:batch,experts:batch,d_ff:model"}})
