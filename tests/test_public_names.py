"""The top-level public names: few (at most 20), each resolving; the former
top-level names still importable as the objects of their submodules."""

import tfshard
from tfshard import checkpoint, errors, interop, layout, tensors

# Former top-level names (not in __all__ any more) -> where they live now.
FORMER = {
    "KEEP": layout,
    "LogicalRules": layout,
    "validate_spec": layout,
    "latest_checkpoint": checkpoint,
    "list_checkpoints": checkpoint,
    "read_manifest": checkpoint,
    "enable_keras_distribution": interop,
    "layout_of": tensors,
    **{name: errors for name in (
        "MeshError", "ShardingError", "StrategyError", "VirtualDeviceError", "MultiClientError",
        "ProcessLostError", "UnsupportedFeatureError", "CheckpointError",
        "CheckpointMismatchError", "CheckpointNotFoundError",
    )},
}


def test_all_is_short_and_every_name_resolves():
    names = tfshard.__all__
    assert len(names) <= 20, names
    assert len(set(names)) == len(names)
    missing = [name for name in names if not hasattr(tfshard, name)]
    assert not missing
    star = {}
    exec("from tfshard import *", star)  # noqa: S102
    assert set(star) - {"__builtins__"} == set(names)


def test_newcomer_names_are_public():
    for name in ("Mesh", "use_virtual_devices", "StrategyBuilder", "Strategy", "Plan", "styles",
                 "layers", "losses", "spec_of", "local_shape", "to_numpy", "save_checkpoint",
                 "restore_checkpoint", "initialize_multi_client", "TfshardError", "current_strategy"):
        assert name in tfshard.__all__, name
    assert tfshard.Plan is tfshard.plans.Plan


def test_former_top_level_names_still_import():
    for name, module in FORMER.items():
        assert name not in tfshard.__all__, name
        assert getattr(tfshard, name) is getattr(module, name), name
    for module in ("interop", "comm", "multi_client"):  # former public submodule attributes
        assert getattr(tfshard, module).__name__ == f"tfshard.{module}"


def test_layout_of_is_the_former_name_of_spec_of():
    assert tfshard.layout_of is tfshard.spec_of is tensors.spec_of
    assert tfshard.spec_of([1.0, 2.0]) is None  # a value that is not on a mesh
