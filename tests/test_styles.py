"""Styles and plans: stock Keras layers split by a plan equal one device,
and a plan is data (it prints, round-trips through JSON/YAML and becomes a
keras LayoutMap)."""

import json

import keras
import numpy as np
import pytest
import yaml
from conftest import SHARDED_MESH_SHAPES, mesh_id
from parity import check_parity, strategy_for

import tfshard
from tfshard.plans import Plan
from tfshard.styles import (
    ColumnParallel,
    HeadParallel,
    HiddenParallel,
    Replicate,
    RowParallel,
    VocabParallel,
)

rng = np.random.RandomState(0)
X = rng.randn(8, 6, 16).astype("float32")
IDS = rng.randint(0, 32, size=(8, 6)).astype("int32")

MLP_PLAN = {".*ffn_in": ColumnParallel(), ".*ffn_out": RowParallel(), ".*norm": HiddenParallel()}


def stock_mlp():
    inputs = keras.Input((6, 16))
    h = keras.layers.Dense(32, activation="relu", name="ffn_in")(inputs)
    h = keras.layers.Dense(16, name="ffn_out")(h)
    h = keras.layers.LayerNormalization(name="norm")(h)
    return keras.Model(inputs, h, name="mlp")


@pytest.mark.parametrize("shape", SHARDED_MESH_SHAPES, ids=mesh_id)
def test_stock_dense_mlp_under_a_plan_equals_one_device(shape):
    check_parity(
        stock_mlp, shape, X, plan=MLP_PLAN, rules={"d_model": "model"},
        expect_specs={
            "ffn_in/kernel": (None, "model"), "ffn_in/bias": ("model",),
            "ffn_out/kernel": ("model", None), "ffn_out/bias": (None,),
            "norm/gamma": ("model",),
        },
    )


@pytest.mark.parametrize("shape", SHARDED_MESH_SHAPES, ids=mesh_id)
def test_stock_multi_head_attention_under_head_parallel_equals_one_device(shape):
    def attention():
        return keras.layers.MultiHeadAttention(8, 2, name="attn")

    check_parity(
        attention, shape, X, X, call=lambda layer, q, v: layer(q, v, use_causal_mask=True),
        plan={keras.layers.MultiHeadAttention: HeadParallel()},
        expect_specs={
            "attn/query/kernel": (None, "model", None),
            "attn/key/bias": ("model", None),
            "attn/attention_output/kernel": ("model", None, None),
            "attn/attention_output/bias": (None,),
        },
    )


def test_stock_grouped_query_attention_splits_key_value_heads():
    def gqa():
        return keras.layers.GroupQueryAttention(2, 8, 4, name="gqa")

    check_parity(
        gqa, (2, 4), X, X, call=lambda layer, q, v: layer(q, v, use_causal_mask=True),
        plan={"gqa": HeadParallel()},
        expect_specs={
            "gqa/query/kernel": (None, "model", None),
            "gqa/key/kernel": (None, "model", None),
            "gqa/attention_output/kernel": ("model", None, None),
        },
    )


def test_stock_embedding_under_vocab_parallel_equals_one_device():
    def embed():
        inputs = keras.Input((6,), dtype="int32")
        return keras.Model(inputs, keras.layers.Embedding(32, 16, name="embed")(inputs))

    check_parity(embed, (2, 4), IDS, plan={".*embed": VocabParallel()},
                 optimizer=lambda: keras.optimizers.SGD(0.1),
                 expect_specs={"embed/embeddings": ("model", None)})


def test_spec_entries_and_styles_resolve_in_one_place():
    """A variable entry wins over its layer's style; an activation entry lays
    out a layer's output (the precedence of Strategy.variable_spec)."""
    plan = {".*ffn_in": ColumnParallel(), "ffn_in/bias": (None,), "ffn_out/output": ("batch", None, None)}
    with strategy_for((2, 4), plan=plan).scope() as strategy:
        model = stock_mlp()
    by_path = {w.path: w for w in model.weights}
    assert tfshard.layout_of(by_path["ffn_in/kernel"]) == (None, "model")  # the style
    assert tfshard.layout_of(by_path["ffn_in/bias"]) == (None,)  # the entry wins
    assert tfshard.layout_of(by_path["ffn_out/kernel"]) == (None, None)  # nothing: replicated
    assert strategy.output_spec("ffn_out/output", (None, 6, 16)) == (tfshard.KEEP, None, None)
    # A stock Dense left out of the plan next to split ones still trains like one device.
    check_parity(stock_mlp, (2, 4), X, plan={".*ffn_in": ColumnParallel(), "ffn_out/kernel": ("model", None)},
                 expect_specs={"ffn_out/kernel": ("model", None)})


def test_aliases_are_stock_layers_with_a_style():
    layer = tfshard.layers.ColumnParallelDense(8)
    assert isinstance(layer, keras.layers.Dense)
    assert layer.tfshard_style == ColumnParallel(dim="d_ff")
    attention = tfshard.layers.HeadParallelAttention(4, 2)
    assert type(attention).call is keras.layers.MultiHeadAttention.call  # no copied call
    assert attention.tfshard_style == HeadParallel()


# ------------------------------------------------------------ bad plans
def test_two_styles_on_one_layer_name_both_entries():
    strategy = strategy_for((2, 4), plan={".*ffn_in": ColumnParallel(), keras.layers.Dense: Replicate()})
    with strategy.scope(), pytest.raises(tfshard.ShardingError) as err:
        stock_mlp()
    text = str(err.value)
    assert "'.*ffn_in'" in text and "Dense" in text and "ColumnParallel" in text and "Replicate" in text


def test_a_style_on_a_layer_it_cannot_split_is_a_clear_error():
    strategy = strategy_for((2, 4), plan={".*norm": ColumnParallel()})
    with strategy.scope(), pytest.raises(tfshard.StrategyError, match="LayerNormalization 'norm'.*Dense or EinsumDense"):
        stock_mlp()


def test_bad_plan_keys_and_values():
    with pytest.raises(tfshard.StrategyError, match="unknown style 'Colum'"):
        Plan.from_config([{"match": "x", "style": "Colum"}])
    with pytest.raises(tfshard.ShardingError, match="not a valid regular expression"):
        Plan({"(": ColumnParallel()})
    with pytest.raises(tfshard.StrategyError, match="layer class takes a style"):
        Plan({keras.layers.Dense: (None, "model")})
    with pytest.raises(tfshard.ShardingError, match="mesh axis 'tp' is not on the mesh"):
        strategy_for((2, 4), plan={"x/kernel": (None, "tp")})
    with pytest.raises(TypeError):
        ColumnParallel("d_ff")  # keyword-only


# -------------------------------------------------------- plans as data
def test_plan_prints_and_round_trips_through_json_and_yaml():
    plan = Plan({
        ".*embed": VocabParallel(),
        keras.layers.MultiHeadAttention: HeadParallel(kv_heads="kv"),
        ".*ffn_in": ColumnParallel(gather_output=True),
        ".*ffn_out": RowParallel(),
        "head/kernel": (None, "model"),
        "head/output": ("batch", None, None),
    })
    text = str(plan)
    assert "HeadParallel(kv_heads='kv')" in text and "ColumnParallel(gather_output=True)" in text
    assert "'head/kernel'" in text and "(None, 'model')" in text
    for dump, load in ((json.dumps, json.loads), (yaml.safe_dump, yaml.safe_load)):
        again = Plan.from_config(load(dump(plan.to_config())))
        assert list(again) == list(plan)


def test_plan_to_keras_layout_map_lays_out_a_model_the_same():
    plan = Plan(MLP_PLAN)
    rules = tfshard.LogicalRules({"d_ff": "model", "d_model": None})
    device_mesh = keras.distribution.DeviceMesh((2, 4), ["batch", "model"], keras.distribution.list_devices())
    model = stock_mlp()
    layout_map = plan.to_layout_map(model, device_mesh, rules)
    assert dict((k, tuple(layout_map[k].axes)) for k in layout_map) == {
        "ffn_in/kernel": (None, "model"),
        "ffn_in/bias": ("model",),
        "ffn_out/kernel": ("model", None),
    }
    with keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch").scope():
        again = stock_mlp()
    with strategy_for((2, 4), plan=plan).scope():
        planned = stock_mlp()
    for a, b in zip(again.weights, planned.weights):
        assert tfshard.layout_of(a) == tfshard.layout_of(b), a.path
