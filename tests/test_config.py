"""Config validation and the CLI."""

import glob
import json
import os

import numpy as np
import pytest
import yaml

from tfshard.app import cli
from tfshard.app import config as config_lib

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def write(tmp_path, data):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize("name", sorted(os.listdir(CONFIGS)))
def test_shipped_configs_validate_and_open_with_a_header(name):
    path = os.path.join(CONFIGS, name)
    config = config_lib.load(path)
    assert config["mesh"]["batch"] * config["mesh"]["model"] == 8
    with open(path) as f:
        header = f.readline()
    assert header.startswith("# "), f"{name} must open with a comment header"


@pytest.mark.parametrize(
    "data, message",
    [
        ({"modle": {}}, r"unknown section 'modle'"),
        ({"model": {"d_modle": 8}}, r"unknown key model.'d_modle'.*'d_model'"),
        ({"train": {"steps": "ten"}}, r"'train.steps': expected int, got 'ten'"),
        ({"train": {"steps": 0}}, r"'train.steps': 0 is below the minimum 1"),
        ({"train": {"optimizer": "adamax"}}, r"'train.optimizer': 'adamax' is not one of"),
        ({"model": {"heads": 6}}, r"model.heads=6 is not divisible by mesh.model=4"),
        ({"train": {"batch_size": 33}}, r"train.batch_size=33 is not divisible by mesh.batch=2"),
        ({"model": {"d_model": 30, "heads": 4}}, r"model.d_model=30 is not divisible by model.heads=4"),
        ({"model": True}, r"section 'model' must be a mapping"),
    ],
)
def test_bad_configs_name_the_key(tmp_path, data, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.load(write(tmp_path, data))


def test_overrides_are_parsed_as_yaml(tmp_path):
    config = config_lib.load(
        write(tmp_path, {}), ["train.steps=7", "train.learning_rate=1e-2", "model.kind=cnn"]
    )
    assert config["train"]["steps"] == 7
    assert config["train"]["learning_rate"] == 0.01
    assert config["model"]["kind"] == "cnn"
    with pytest.raises(config_lib.ConfigError, match="section.key=value"):
        config_lib.load(write(tmp_path, {}), ["train.steps"])


def test_rules_accept_mesh_tf_syntax(tmp_path):
    from tfshard.app import jobs

    config = config_lib.load(write(tmp_path, {"layout": {"rules": "batch:batch,d_ff:model"}}))
    strategy = jobs.build_strategy(config)
    assert strategy.logical_rules.axis_for("d_ff") == "model"
    assert strategy.logical_rules.axis_for("batch") == "batch"


def test_cli_reports_config_errors_without_a_traceback(tmp_path, capsys):
    code = cli.main(["train", write(tmp_path, {"train": {"stepz": 1}})])
    assert code == 2
    assert "unknown key train.'stepz'" in capsys.readouterr().err


@pytest.mark.parametrize("flag", [["bench", "--rounds", "0"], ["train", "--steps", "0"], ["bench", "--steps", "x"]])
def test_cli_rejects_non_positive_counts(flag, capsys):
    command, *rest = flag
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, os.path.join(CONFIGS, "transformer_2x4.yaml"), *rest])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {rest[0]}" in err and ("must be > 0" in err or "is not an int" in err)


def test_cli_bench_refuses_jax_for_moe_before_timing(capsys):
    code = cli.main(["bench", os.path.join(CONFIGS, "transformer_moe_2x4.yaml"), "--jax",
                     "--meshes", "1x1", "--steps", "2"])
    assert code == 2
    captured = capsys.readouterr()
    assert "model.moe_experts" in captured.err
    assert "ms/step" not in captured.out  # nothing was timed


def test_cli_trains_the_cnn_config(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(
        ["train", os.path.join(CONFIGS, "cnn_2x4_channels.yaml"), "--steps", "4",
         "--set", f"output.dir={out}", "--set", "data.eval_batches=1"]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "per-device shape" in text and "held-out loss" in text
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["mesh"] == {"batch": 2, "model": 4}
    assert metrics["per_device_bytes"] > 0


SMALL = ["--set", "model.layers=1", "--set", "model.seq_len=16", "--set", "train.batch_size=16",
         "--set", "data.max_bytes=200000", "--set", "data.eval_batches=1"]


# Every shipped config (cnn_2x4_channels has its own, fuller test above).
EVERY_CONFIG = sorted(
    os.path.basename(p)[: -len(".yaml")]
    for p in glob.glob(os.path.join(CONFIGS, "*.yaml"))
    if not p.endswith("cnn_2x4_channels.yaml")
)


@pytest.mark.parametrize("name", EVERY_CONFIG)
def test_cli_smoke_every_config(name, tmp_path, capsys):
    extra = SMALL if name.startswith("transformer") else ["--set", "data.eval_batches=1"]
    code = cli.main(
        ["train", os.path.join(CONFIGS, f"{name}.yaml"), "--steps", "3",
         "--set", f"output.dir={tmp_path}"] + extra
    )
    assert code == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 3
    assert all(np.isfinite(metrics["train_loss"]))


def test_cli_inspect_prints_layouts_and_communication(capsys):
    code = cli.main(["inspect", os.path.join(CONFIGS, "transformer_2x4.yaml")] + SMALL)
    assert code == 0
    text = capsys.readouterr().out
    assert "block_0/ffn_in/kernel" in text and "(-, model)" in text
    assert "estimated communication per training step" in text
    assert "all-reduces" in text


def test_transformer_converges_the_same_on_2x4_and_one_device(tmp_path):
    from tfshard.app import jobs

    losses = {}
    for data, model in ((2, 4), (1, 1)):
        config = config_lib.load(
            os.path.join(CONFIGS, "transformer_2x4.yaml"),
            ["train.steps=8", f"mesh.batch={data}", f"mesh.model={model}",
             f"output.dir={tmp_path / str(model)}"] + SMALL[1::2],
        )
        losses[(data, model)] = jobs.train(config, verbose=0)["train_loss"]
    np.testing.assert_allclose(losses[(2, 4)], losses[(1, 1)], rtol=1e-4, atol=1e-4)
    assert losses[(1, 1)][-1] < losses[(1, 1)][0]
