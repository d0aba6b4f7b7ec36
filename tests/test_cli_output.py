"""What a user sees from `tfshard train`: tfshard's table, Keras's progress
bar and the result line, no TensorFlow C++ log lines unless -v."""

import os
import subprocess
import sys

import pytest

from tfshard import _native_logs

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
    code, output = run(command("inspect", CONFIG, "-v"), tmp_path)
    assert code == 0, output
    assert any(_native_logs.is_native_log_line(line) for line in output.splitlines()), output[-2000:]


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
