"""What a user sees from `tfshard train`: tfshard's table, Keras's progress
bar and the result line, no TensorFlow C++ log lines unless -v; and the
TensorBoard logs it writes (scalars per step, held-out loss per
evaluation, the layout and memory text)."""

import glob
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tfshard import _native_logs
from tfshard.app import cli

ROOT = os.path.join(os.path.dirname(__file__), "..")
CONFIG = os.path.join(ROOT, "configs", "transformer_2x4.yaml")
SMALL = [
    "model.layers=1", "model.d_model=32", "model.heads=8", "model.d_ff=64",
    "model.seq_len=16", "train.batch_size=8", "data.max_bytes=100000",
    "data.eval_batches=1",
]
STEPS = 3


def command(*args):
    argv = [sys.executable, "-m", "tfshard.app.cli", *args]
    for item in SMALL:
        argv += ["--set", item]
    return argv


def user_env():
    """The environment of a user who set no TensorFlow logging variable."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_CPP_MIN_LOG_LEVEL", "TFSHARD_DEBUG", "TF_CPP_VMODULE", "TF_CPP_MAX_VLOG_LEVEL")}
    env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def run(argv, cwd):
    done = subprocess.run(argv, cwd=cwd, env=user_env(), capture_output=True, text=True, timeout=900)
    return done.returncode, done.stdout + done.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One small `tfshard train` run as a user starts it (a subprocess)."""
    out = tmp_path_factory.mktemp("run")
    code, output = run(command("train", CONFIG, "--steps", str(STEPS), "--set", f"output.dir={out}"), out)
    assert code == 0, output
    return out, output


def test_train_shows_tfshard_and_keras_output_only(trained):
    _, output = trained
    lines = output.splitlines()
    native = [line for line in lines if _native_logs.is_native_log_line(line)]
    assert not native, f"TensorFlow C++ log lines in the output:\n" + "\n".join(native[:5])
    assert not [line for line in lines if line[:5] in ("E0000", "I0000", "W0000")]
    assert any(line.startswith("path") and "per-device shape" in line for line in lines)  # layout table
    assert any(line.startswith("total: ") and "per device" in line for line in lines)
    assert f"{STEPS}/{STEPS}" in output and "━" in output  # Keras's progress bar
    assert any(line.startswith("held-out loss ") and "ms/step" in line for line in lines)


def test_verbose_shows_tensorflow_lines(tmp_path):
    """With -v, TensorFlow's own start-up lines (oneDNN's note, printed while
    TensorFlow is imported) reach the user, as without tfshard; the command
    then stops at once on a missing config, which keeps the test short."""
    for flags, shown in ((["-v"], True), ([], False)):
        code, output = run([sys.executable, "-m", "tfshard.app.cli", *flags, "inspect", "missing.yaml"], tmp_path)
        assert code == 2 and "tfshard: error: config file 'missing.yaml' does not exist" in output, output
        native = [line for line in output.splitlines() if _native_logs.is_native_log_line(line)]
        assert bool(native) == shown, (flags, output[-2000:])


@pytest.mark.parametrize("argv, orig_argv, env, expected", [
    (["/venv/bin/tfshard", "train", "c.yaml"], [], {}, "3"),
    (["/x/cli.py", "train", "c.yaml"], ["python", "-m", "tfshard.app.cli", "train", "c.yaml"], {}, "3"),
    (["/venv/bin/tfshard", "train", "c.yaml", "-v"], [], {}, None),
    (["/venv/bin/tfshard", "--debug", "inspect", "c.yaml"], [], {}, None),
    (["/venv/bin/tfshard", "train", "c.yaml"], [], {"TFSHARD_DEBUG": "1"}, None),
    (["/venv/bin/tfshard", "train", "c.yaml"], [], {"TF_CPP_MIN_LOG_LEVEL": "0"}, None),  # the user's choice
    # -v after `--` belongs to the command `tfshard launch` runs, which decides for itself
    (["/venv/bin/tfshard", "launch", "--processes", "2", "--", "tfshard", "train", "-v"], [], {}, "3"),
    (["/x/pytest", "-v"], ["python", "-m", "pytest", "-v"], {}, None),  # not the command
    (["-c"], ["python", "-c", "import tfshard"], {}, None),
])
def test_quiet_level_for_the_command_only(monkeypatch, argv, orig_argv, env, expected):
    for key in ("TF_CPP_MIN_LOG_LEVEL", "TFSHARD_DEBUG"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert _native_logs.quiet_command_level(argv, orig_argv) == expected
    assert os.environ.get("TF_CPP_MIN_LOG_LEVEL") == (expected or env.get("TF_CPP_MIN_LOG_LEVEL"))


def test_native_log_line_pattern():
    assert _native_logs.is_native_log_line(
        "E0000 00:00:1796195915.459537   21248 op_level_cost_estimator.cc:1126] Incompatible Matrix dimensions")
    assert _native_logs.is_native_log_line(
        "I0000 00:00:1796195924.401107   18834 dtensor_device.cc:1695] DTensor cache key lookup missed")
    assert _native_logs.is_native_log_line(
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR")
    assert not _native_logs.is_native_log_line("E0000 is a name a user may print")
    assert not _native_logs.is_native_log_line("UserWarning: something that matters")


# ------------------------------------------------------------ TensorBoard
def events(directory):
    """{tag: [(step, value)]} of every event file in ``directory``."""
    found = {}
    files = sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*")))
    assert files, f"no event files in {directory}"
    for path in files:
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                found.setdefault(value.tag, []).append((event.step, tf.make_ndarray(value.tensor)))
    return {tag: sorted(items, key=lambda item: item[0]) for tag, items in found.items()}


def test_tensorboard_scalars_per_step(trained):
    out, _ = trained
    train = events(os.path.join(out, "tensorboard", "train"))
    steps = list(range(1, STEPS + 1))
    for tag in ("loss", "learning_rate", "ms_per_step", "tokens_per_second"):
        assert [step for step, _ in train[tag]] == steps, tag
        assert all(np.isfinite(float(v)) and float(v) > 0 for _, v in train[tag]), tag
    assert [float(v) for _, v in train["learning_rate"]] == pytest.approx([3e-3] * STEPS)
    # tokens/s is the batch's tokens over the step's time
    for (_, ms), (_, rate) in zip(train["ms_per_step"], train["tokens_per_second"]):
        assert float(rate) == pytest.approx(8 * 16 / (float(ms) / 1000), rel=1e-4)
    import json

    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert [float(v) for _, v in train["loss"]] == pytest.approx(metrics["train_loss"], rel=1e-6)


def test_tensorboard_held_out_loss_per_evaluation(trained):
    import json

    out, _ = trained
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    held_out = events(os.path.join(out, "tensorboard", "validation"))["evaluation_loss_vs_iterations"]
    assert [step for step, _ in held_out] == [0, STEPS]
    assert [float(v) for _, v in held_out] == pytest.approx(
        [metrics["eval_before"]["loss"], metrics["eval_after"]["loss"]], rel=1e-6)


def test_tensorboard_layout_and_memory_text(trained):
    out, _ = trained
    train = events(os.path.join(out, "tensorboard", "train"))
    layout = train["layout"][0][1].item().decode()
    assert "token_embedding/embeddings" in layout and "(model, -)" in layout and "per device" in layout
    memory = train["memory"][0][1].item().decode()
    assert "parameters" in memory and "optimizer state" in memory and "per device" in memory


def test_tensorboard_curves_continue_on_resume(tmp_path):
    """A resumed run logs at the optimizer's step: the curves go on from the
    checkpoint (steps 1, 2 then 3), not from 1 again."""
    base = ["train", CONFIG, "--set", f"output.dir={tmp_path}"]
    for item in SMALL:
        base += ["--set", item]
    assert cli.main(base + ["--steps", "2"]) == 0
    assert cli.main(base + ["--steps", "3"]) == 0
    train = events(os.path.join(tmp_path, "tensorboard", "train"))
    assert [step for step, _ in train["loss"]] == [1, 2, 3]
    held_out = events(os.path.join(tmp_path, "tensorboard", "validation"))["evaluation_loss_vs_iterations"]
    assert [step for step, _ in held_out] == [0, 2, 2, 3]  # before/after each run


def test_tensorboard_off(tmp_path):
    argv = ["train", CONFIG, "--steps", "1", "--set", f"output.dir={tmp_path}", "--set", "output.tensorboard=false"]
    for item in SMALL:
        argv += ["--set", item]
    assert cli.main(argv) == 0
    assert os.path.exists(tmp_path / "metrics.json")
    assert not os.path.exists(tmp_path / "tensorboard")
