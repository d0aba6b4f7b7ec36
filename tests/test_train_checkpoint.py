"""`tfshard train` saves checkpoints and resumes from them: same steps, same
losses as a run that never stopped, also onto another mesh shape."""

import json
import os
import shutil

import numpy as np
import pytest

from tfshard.app import cli, jobs

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "transformer_2x4.yaml")
# A small model whose heads, d_ff and vocab split over 4 or 8 devices.
SMALL = [
    "model.layers=1", "model.d_model=32", "model.heads=8", "model.d_ff=64",
    "model.seq_len=16", "train.batch_size=8", "data.max_bytes=100000",
    "data.eval_batches=1",
]
STEPS = 5
# (A save costs seconds on a busy CPU, so the runs below save few checkpoints.)


def train(out, steps, *extra):
    """Run ``tfshard train`` in this process; returns (exit code, metrics)."""
    argv = ["train", CONFIG, "--steps", str(steps), "--set", f"output.dir={out}"]
    for item in SMALL + list(extra):
        argv += ["--set", item]
    code = cli.main(argv)
    path = os.path.join(out, "metrics.json")
    metrics = json.load(open(path)) if os.path.exists(path) else None
    return code, metrics


def checkpoint_names(out):
    return sorted(
        (n for n in os.listdir(os.path.join(out, "checkpoints")) if n.startswith("ckpt-")),
        key=lambda n: int(n.split("-")[1]),
    )


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The reference: STEPS steps on 2x4 without a stop."""
    out = tmp_path_factory.mktemp("straight")
    code, metrics = train(out, STEPS)
    assert code == 0
    assert metrics["train_steps"] == list(range(1, STEPS + 1))
    assert metrics["start_step"] == 0 and metrics["resumed_from"] is None
    assert checkpoint_names(out) == [f"ckpt-{STEPS}"]  # checkpoint_every=0: at the end only
    return metrics


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, straight):
    """A 2x4 run of 3 steps, checkpointed every 2 steps and at the end."""
    out = tmp_path_factory.mktemp("stopped")
    code, metrics = train(out, 3, "train.checkpoint_every=2")
    assert code == 0
    assert checkpoint_names(out) == ["ckpt-2", "ckpt-3"]
    np.testing.assert_allclose(metrics["train_loss"], straight["train_loss"][:3], rtol=1e-6)
    return out, metrics


def copy_of(stopped, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(stopped[0], out)
    return out


def assert_continues(resumed, straight, first_step, rtol):
    """The resumed run trains steps first_step..STEPS, and its logged losses
    (Keras's running mean over the epoch, restored at the restart) and the
    final held-out loss are the uninterrupted run's."""
    assert resumed["start_step"] == first_step - 1
    assert resumed["steps"] == STEPS
    assert resumed["train_steps"] == list(range(first_step, STEPS + 1))
    np.testing.assert_allclose(resumed["train_loss"], straight["train_loss"][first_step - 1:], rtol=rtol)
    np.testing.assert_allclose(resumed["eval_after"]["loss"], straight["eval_after"]["loss"], rtol=rtol)


def test_stop_and_resume_on_the_same_mesh(straight, stopped, tmp_path, capsys):
    out = copy_of(stopped, tmp_path)
    capsys.readouterr()
    code, resumed = train(out, STEPS, "train.keep_checkpoints=2")
    assert code == 0
    assert "resuming from" in capsys.readouterr().out
    assert resumed["resumed_from"].endswith("ckpt-3")
    # The restored weights are the ones the first run ended with.
    np.testing.assert_allclose(
        resumed["eval_before"]["loss"], stopped[1]["eval_after"]["loss"], rtol=1e-6
    )
    assert_continues(resumed, straight, 4, rtol=1e-6)
    assert checkpoint_names(out) == ["ckpt-3", f"ckpt-{STEPS}"]  # the 2 newest

    # Re-running the finished job trains nothing and keeps its metrics.
    code, again = train(out, STEPS)
    assert code == 0
    assert "nothing to train" in capsys.readouterr().out
    assert again == resumed


def test_resume_a_2x4_run_onto_1x8(straight, stopped, tmp_path, capsys):
    out = copy_of(stopped, tmp_path)
    # As if the run had died after step 2: only the mid-run checkpoint is left.
    shutil.rmtree(out / "checkpoints" / "ckpt-3")
    capsys.readouterr()

    code, resumed = train(out, STEPS, "mesh.batch=1", "mesh.model=8")
    assert code == 0
    assert "saved on 2x4" in capsys.readouterr().out
    assert resumed["mesh"] == {"batch": 1, "model": 8}
    assert_continues(resumed, straight, 3, rtol=1e-5)
    # Each device now holds 1/8 of the split weights instead of 1/4.
    assert resumed["per_device_bytes"] < straight["per_device_bytes"]
    manifest = json.load(open(out / "checkpoints" / f"ckpt-{STEPS}" / "manifest.json"))
    assert manifest["mesh"]["axes"] == {"batch": 1, "model": 8}


def test_resume_refuses_a_config_that_changes_the_run(straight, stopped, tmp_path, capsys):
    out = copy_of(stopped, tmp_path)
    capsys.readouterr()

    # Another batch size (or model, seed, optimizer...) cannot continue it.
    code, _ = train(out, 4, "train.batch_size=16", "model.d_ff=128")
    assert code == 2
    err = capsys.readouterr().err
    assert "train.batch_size=16 (the checkpoints have 8)" in err
    assert "model.d_ff=128 (the checkpoints have 64)" in err
    assert "train.resume=false" in err

    # Fewer steps than the checkpoint already has is an error too.
    code, _ = train(out, 2)
    assert code == 2
    assert "train.steps=2 is below step 3 of the latest checkpoint" in capsys.readouterr().err
    assert checkpoint_names(out) == ["ckpt-2", "ckpt-3"]  # untouched

    # train.resume=false moves them aside first: a run that then fails (say,
    # out of memory while building) loses nothing.
    def out_of_memory(*args, **kwargs):
        raise MemoryError("simulated")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(jobs, "build_model", out_of_memory)
        with pytest.raises(MemoryError):
            train(out, 1, "train.resume=false")
    replaced = out / "checkpoints.replaced"
    assert sorted(n for n in os.listdir(replaced) if n.startswith("ckpt-")) == ["ckpt-2", "ckpt-3"]

    # train.resume=false starts afresh, replacing the old checkpoints.
    code, fresh = train(out, 1, "train.resume=false")
    assert code == 0
    assert fresh["start_step"] == 0 and fresh["train_steps"] == [1]
    np.testing.assert_allclose(fresh["train_loss"], straight["train_loss"][:1], rtol=1e-6)
    assert checkpoint_names(out) == ["ckpt-1"]
    assert not replaced.exists()  # deleted once the new run saved its own
