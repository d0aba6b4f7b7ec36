import keras
import numpy as np
import pytest
from conftest import make_strategy

import tfshard
from tfshard.layout import LogicalRules, validate_spec
from tfshard.plans import Plan


@pytest.fixture(scope="module")
def mesh():
    return tfshard.Mesh({"batch": 2, "model": 4})


def test_valid_spec_is_returned_as_tuple(mesh):
    assert validate_spec([None, "model"], (3, 8), mesh, name="w") == (None, "model")


@pytest.mark.parametrize(
    "spec, shape, message",
    [
        ((None,), (3, 8), r"'w'.*has 1 entries but the tensor has rank 2"),
        ((None, "tensor"), (3, 8), r"names mesh axis 'tensor'.*\['batch', 'model'\]"),
        (("model", "model"), (8, 8), r"uses mesh axis 'model' for both dimension 0 and dimension 1"),
        ((None, "model"), (3, 10), r"dimension 1 has size 10.*'model' \(size 4\).*multiple of 4"),
        ("model", (8,), "must be a tuple"),
        ((None, 3), (3, 8), "must be a mesh axis name or None"),
    ],
)
def test_validate_spec_errors_name_the_thing_and_the_fix(mesh, spec, shape, message):
    with pytest.raises(tfshard.ShardingError, match=message):
        validate_spec(spec, shape, mesh, name="Variable 'w'")


def test_logical_rules_accept_mesh_tf_strings():
    rules = LogicalRules("batch:batch, d_ff:model,heads:model")
    assert rules.as_dict() == {"batch": "batch", "d_ff": "model", "heads": "model"}
    assert rules.spec_for(("batch", None, "d_ff")) == ("batch", None, "model")


def test_logical_rules_first_claim_of_an_axis_wins():
    rules = LogicalRules({"experts": "model", "d_ff": "model"})
    assert rules.spec_for(("experts", None, "d_ff")) == ("model", None, None)


def test_logical_rules_reject_malformed_strings():
    with pytest.raises(tfshard.ShardingError, match="'d_ff' in .* is not of the form"):
        LogicalRules("batch:batch,d_ff")


def test_plan_paths_fullmatch_exact_first_and_ambiguity():
    plan = Plan({"dense/kernel": (None, "model"), ".*/kernel": ("model", None), "x/.*": (None, None)})
    assert plan.variable_spec("y/dense/kernel_2") is None  # fullmatch, not search
    assert plan.variable_spec("y/dense/kernel") == ("model", None)
    assert plan.variable_spec("dense/bias") is None
    assert plan.variable_spec("dense/kernel") == (None, "model")  # an exact key wins (LayoutMap's rule)
    with pytest.raises(tfshard.ShardingError) as err:
        plan.variable_spec("x/kernel")
    assert "'x/kernel'" in str(err.value) and "'.*/kernel'" in str(err.value) and "'x/.*'" in str(err.value)


def test_strategy_rejects_unknown_axes(mesh):
    with pytest.raises(tfshard.StrategyError, match="no axis 'tensor'"):
        tfshard.StrategyBuilder(mesh).tensor_parallel("tensor")
    with pytest.raises(tfshard.ShardingError, match="'heads' maps to mesh axis 'mdl'"):
        tfshard.StrategyBuilder(mesh).rules({"heads": "mdl"})
    with pytest.raises(tfshard.ShardingError, match="mesh axis 'mdl' is not on the mesh"):
        tfshard.StrategyBuilder(mesh).shard("dense/kernel", (None, "mdl"))
    with pytest.raises(tfshard.StrategyError, match="both use mesh axis 'batch'"):
        tfshard.StrategyBuilder(mesh).data_parallel("batch").tensor_parallel("batch").build()
    with pytest.raises(tfshard.StrategyError, match="must be a tfshard.Mesh"):
        tfshard.StrategyBuilder({"batch": 2})


def test_indivisible_layer_size_names_variable_and_fix():
    strategy = make_strategy(2, 4)
    with strategy.scope():
        layer = tfshard.layers.ColumnParallelDense(10, name="ffn_in")
        with pytest.raises(tfshard.ShardingError) as err:
            layer.build((None, 16))
    text = str(err.value)
    assert "'ffn_in/kernel'" in text and "size 10" in text and "multiple of 4" in text


def test_path_rule_rank_mismatch_names_variable():
    mesh = tfshard.Mesh({"batch": 2, "model": 4})
    strategy = tfshard.StrategyBuilder(mesh).shard(".*dense/kernel", ("model",)).build()
    with strategy.scope():
        layer = keras.layers.Dense(8, name="dense")
        with pytest.raises(tfshard.ShardingError, match=r"'dense/kernel'.*rank 2"):
            layer.build((None, 4))


def test_path_rules_shard_stock_layers():
    mesh = tfshard.Mesh({"batch": 2, "model": 4})
    strategy = tfshard.StrategyBuilder(mesh).shard("dense/kernel", ("model", None)).build()
    with strategy.scope():
        layer = keras.layers.Dense(8, name="dense")
        layer.build((None, 4))
    assert tfshard.layout_of(layer.kernel) == ("model", None)
    assert tfshard.local_shape(layer.kernel) == (1, 8)
    assert tfshard.layout_of(layer.bias) == (None,)
    assert np.asarray(layer.bias).shape == (8,)
