"""``layout: auto`` in configs, ``tfshard train`` and ``tfshard inspect --auto``."""

import keras
import pytest
import yaml

import tfshard
from tfshard.app import cli, jobs
from tfshard.app import config as config_lib

SMALL = {
    "model": {"d_model": 32, "heads": 8, "d_ff": 64, "layers": 2, "seq_len": 16},
    "mesh": {"batch": 2, "model": 4},
    "train": {"steps": 2, "batch_size": 8},
    "data": {"max_bytes": 20000, "eval_batches": 1},
}


def write(tmp_path, data):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_layout_auto_is_a_config_shorthand(tmp_path):
    config = config_lib.load(write(tmp_path, {**SMALL, "layout": "auto"}))
    assert config["layout"]["auto"] is True
    assert config["layout"]["rules"] == config_lib.defaults()["layout"]["rules"]
    # --set works on the expanded section.
    config = config_lib.load(write(tmp_path, {**SMALL, "layout": "auto"}), ["layout.rules='heads:'"])
    assert config["layout"] == {"auto": True, "rules": "heads:", "random_streams": "global",
                                "sequence_parallel": False, "recompute": "none"}
    with pytest.raises(config_lib.ConfigError, match=r"section 'layout' must be a mapping or 'auto'"):
        config_lib.load(write(tmp_path, {**SMALL, "layout": "automatic"}))


def test_layout_auto_lays_out_the_reference_transformer_as_its_hand_written_rules(tmp_path):
    auto = config_lib.load(write(tmp_path, {**SMALL, "layout": "auto"}))
    keras.backend.clear_session()
    planned = jobs.build_model(auto, jobs.build_strategy(auto))
    keras.backend.clear_session()
    hand = config_lib.load(write(tmp_path, SMALL))
    written = jobs.build_model(hand, jobs.build_strategy(hand))
    specs = [(v.path, tfshard.spec_of(v)) for v in planned.variables + planned.optimizer.variables]
    assert specs == [(v.path, tfshard.spec_of(v)) for v in written.variables + written.optimizer.variables]
    assert sum(1 for _, spec in specs if any(spec)) >= 13


def test_layout_auto_within_the_rules_replicates_what_they_keep_whole(tmp_path):
    config = config_lib.load(write(tmp_path, {**SMALL, "layout": {"auto": True, "rules": "heads:"}}))
    plan = jobs.auto_plan(config)
    text = plan.explain()
    assert "replicated (rule heads -> None)" in text, text
    assert not any("attention" in str(key) for key, _ in plan), str(plan)


def test_inspect_auto_explains_the_plan(tmp_path, capsys):
    assert cli.main(["inspect", "--auto", write(tmp_path, SMALL)]) == 0
    out = capsys.readouterr().out
    assert "auto plan for" in out and "HeadParallel()" in out, out
    assert "multi-head attention, 8 heads -> 32: split by heads over model" in out, out
    assert "collectives per step (cost model):" in out, out
    assert "built with its weights" not in out  # the config's model is built abstractly


def test_train_with_layout_auto(tmp_path, capsys):
    one_block = {**SMALL["model"], "layers": 1}  # (the layouts are checked above: keep it cheap)
    path = write(tmp_path, {**SMALL, "model": one_block, "layout": "auto", "output": {"dir": str(tmp_path / "run")}})
    assert cli.main(["train", path]) == 0
    out = capsys.readouterr().out
    assert "auto plan for" in out and "held-out loss" in out, out
