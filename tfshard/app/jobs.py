"""The jobs behind the CLI: train and inspect a config (bench: tfshard.app.bench)."""

from __future__ import annotations

import builtins
import json
import os
import shutil
import time

import keras

from tfshard import multi_client
from tfshard.app import config as config_lib
from tfshard.errors import TfshardError


def print(*args, **kwargs):  # noqa: A001
    """The jobs' messages come from process 0 only in a multi-client job."""
    if multi_client.is_chief():
        builtins.print(*args, **kwargs)


def prepare_devices(config):
    """Split the host CPU into virtual devices when there is no accelerator.

    Must run before TensorFlow starts; the CLI calls it first thing.
    """
    import tensorflow as tf

    from tfshard.mesh import use_virtual_devices

    size = config["mesh"]["batch"] * config["mesh"]["model"]
    if os.environ.get(multi_client.ENV_JOBS):
        # Started by `tfshard launch` or a cluster scheduler: join the job.
        # Without an accelerator, each process brings its share of the mesh.
        clients = len(os.environ[multi_client.ENV_JOBS].split(","))
        accelerated = tf.config.list_physical_devices("GPU") or tf.config.list_physical_devices("TPU")
        own = os.environ.get(multi_client.ENV_DEVICES_PER_PROCESS) or accelerated
        _check_job_devices(config, clients, os.environ.get(multi_client.ENV_DEVICES_PER_PROCESS))
        multi_client.initialize_multi_client(
            devices_per_process=None if own else max(1, size // clients)
        )
        return
    if tf.config.list_physical_devices("GPU") or tf.config.list_physical_devices("TPU"):
        return
    use_virtual_devices(max(8, size))


def _check_job_devices(config, clients, devices_per_process):
    """The config's mesh against the job's processes and (when the launcher
    says) their devices, before any process starts TensorFlow."""
    batch, model = config["mesh"]["batch"], config["mesh"]["model"]
    size = batch * model
    mesh = f"mesh.batch x mesh.model = {batch} x {model} = {size} devices"
    if size % clients:
        raise config_lib.ConfigError(
            f"{mesh} cannot be spread evenly over the {clients} processes of this job; "
            f"use a mesh whose size is a multiple of {clients}."
        )
    try:
        per_process = int(devices_per_process) if devices_per_process else None
    except ValueError:
        return  # initialize_multi_client reports the malformed variable
    if per_process is not None and size > clients * per_process:
        raise config_lib.ConfigError(
            f"{mesh}, but this job has {clients} processes x {per_process} devices = "
            f"{clients * per_process}. Start each process with {size // clients} devices "
            f"(tfshard launch --devices-per-process {size // clients}) or use a smaller "
            "mesh (--set mesh.batch=... --set mesh.model=...)."
        )


def build_strategy(config, plan=None):
    """The config's strategy; with ``layout.auto``, the one ``plan`` (by
    default :func:`auto_plan`'s) makes."""
    from tfshard.mesh import Mesh
    from tfshard.strategy import StrategyBuilder

    mesh = Mesh({"batch": config["mesh"]["batch"], "model": config["mesh"]["model"]})
    if config["layout"].get("auto"):
        builder = (plan or auto_plan(config, mesh)).builder(mesh)
    else:
        builder = (
            StrategyBuilder(mesh).data_parallel("batch").tensor_parallel("model")
            .rules(config["layout"]["rules"])
        )
    return layout_options(builder, config).build()


def layout_options(builder, config):
    """The config's ``layout`` switches applied to ``builder``: random
    streams, sequence parallelism, recomputation."""
    layout = config["layout"]
    builder.random_streams(layout["random_streams"])
    builder.sequence_parallel(layout.get("sequence_parallel", False))
    if layout.get("recompute", "none") != "none":
        builder.recompute(layout["recompute"])
    return builder


def auto_plan(config, mesh=None):
    """``layout: auto``: the plan ``tfshard.auto_plan`` chooses for the
    config's model, within ``layout.rules``, for one global batch."""
    import keras

    from tfshard.auto_plan import auto_plan as make_plan
    from tfshard.mesh import Mesh

    model_cfg, train = config["model"], config["train"]
    mesh = mesh or Mesh({"batch": config["mesh"]["batch"], "model": config["mesh"]["model"]})
    inputs = (train["batch_size"], model_cfg["seq_len"]) if model_cfg["kind"] == "transformer" else None

    def build():  # uncompiled: Keras builds it without weights (an optimizer has a valued variable)
        keras.utils.set_random_seed(train["seed"])
        if model_cfg["kind"] == "transformer":
            from tfshard.app.models.transformer import build_transformer as builder
        else:
            from tfshard.app.models.cnn import build_cnn as builder
        return builder(model_cfg)[0]

    slots = {"adam": 2, "adamw": 2, "sgd": 1}[train["optimizer"]]  # (SGD with momentum)
    plan = make_plan(build, mesh, rules=config["layout"]["rules"], inputs=inputs,
                     data_axis="batch", tensor_axis="model", optimizer_slots=slots)
    keras.backend.clear_session()  # the model is built again, with the same layer names
    return plan


def load_data(config):
    """``(x_train, y_train), (x_eval, y_eval)`` for the config's model kind."""
    import numpy as np

    from tfshard.app import data

    model, train = config["model"], config["train"]
    n_train = train["steps"] * train["batch_size"]
    n_eval = config["data"]["eval_batches"] * train["batch_size"]
    source = config["data"]["source"]
    if model["kind"] == "transformer":
        if source not in ("auto", "stdlib"):
            raise config_lib.ConfigError(f"data.source={source!r} cannot feed a transformer; use stdlib.")
        tokens = data.stdlib_bytes(config["data"]["max_bytes"])
        if model["vocab"] < 256:
            tokens = np.minimum(tokens, model["vocab"] - 1)
        head, tail = data.split_tokens(tokens)
        return (
            data.lm_examples(head, model["seq_len"], n_train, train["seed"]),
            data.lm_examples(tail, model["seq_len"], n_eval, train["seed"] + 1),
        )
    if source not in ("auto", "digits"):
        raise config_lib.ConfigError(f"data.source={source!r} cannot feed a cnn; use digits.")
    images, labels = data.digits()
    rng = np.random.RandomState(train["seed"])
    order = rng.permutation(len(images))
    images, labels = images[order], labels[order]
    held = max(n_eval, len(images) // 10)
    x_eval, y_eval = images[:held][:n_eval], labels[:held][:n_eval]
    pick = rng.randint(held, len(images), size=n_train)
    return (images[pick], labels[pick]), (x_eval, y_eval)


def build_model(config, strategy=None):
    """The compiled reference model, sharded if ``strategy`` is given."""
    import contextlib

    from tfshard.app import models

    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    with scope:
        model = models.build(
            config["model"],
            learning_rate=config["train"]["learning_rate"],
            optimizer=config["train"]["optimizer"],
            seed=config["train"]["seed"],
        )
        model.optimizer.build(model.trainable_variables)
    return model


def _items_per_example(config):
    return config["model"]["seq_len"] if config["model"]["kind"] == "transformer" else 1


# ------------------------------------------------------------ train: checkpoints
CHECKPOINT_SUBDIR = "checkpoints"
RUN_CONFIG = "run_config.json"

# What a resumed run must share with the run that wrote its checkpoints: these
# keys fix the model, the optimizer state and the order of the training
# batches. The mesh, the layout rules, train.steps and the checkpoint cadence
# may change between runs (the checkpoint restores onto any mesh).
RESUME_MUST_MATCH = (
    "model",
    "data.source",
    "data.max_bytes",
    "train.batch_size",
    "train.seed",
    "train.optimizer",
    "train.learning_rate",  # the optimizer's learning-rate variable is checkpointed
)


def checkpoint_dir(config):
    """Where ``tfshard train`` keeps its checkpoints: ``<output.dir>/checkpoints``."""
    return os.path.join(config["output"]["dir"], CHECKPOINT_SUBDIR)


def replaced_dir(config):
    """Where ``train.resume=false`` keeps the replaced checkpoints until the
    new run has saved its own."""
    return checkpoint_dir(config).rstrip(os.sep) + ".replaced"


def _config_value(config, dotted):
    value = config
    for part in dotted.split("."):
        value = value[part]
    return value


def _flatten(name, value):
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in _flatten(f"{name}.{key}", sub).items()}
    return {name: value}


def _has_key(config, dotted):
    try:
        _config_value(config, dotted)
    except (KeyError, TypeError):
        return False
    return True


def _check_resume_config(config, saved, directory):
    """Raise a ConfigError naming every key that differs from the run that
    wrote the checkpoints in ``directory``. A key the saved config lacks
    (one added to the schema since) counts as its default."""
    defaults = config_lib.defaults()
    changed = []
    for key in RESUME_MUST_MATCH:
        now = _flatten(key, _config_value(config, key))
        before = _flatten(key, _config_value(saved, key)) if _has_key(saved, key) else {}
        for name in sorted(set(now) | set(before)):
            was = before[name] if name in before else (
                _config_value(defaults, name) if _has_key(defaults, name) else None
            )
            if now.get(name) != was:
                changed.append(f"{name}={now.get(name)!r} (the checkpoints have {was!r})")
    if changed:
        raise config_lib.ConfigError(
            f"cannot resume from the checkpoints in {directory!r}: " + "; ".join(changed)
            + ". Use the values the checkpoints were trained with, or start afresh with "
            "--set train.resume=false (replaces those checkpoints) or another output.dir. "
            "The mesh, layout rules and train.steps may change on resume."
        )


def _resume_point(config):
    """Start afresh, or find the latest checkpoint of an earlier run and
    check that this config can continue it (before anything is built).

    Returns ``(step, path)``: the step training continues from and the
    checkpoint to restore (``None`` when starting afresh).
    """
    from tfshard import checkpoint

    directory = checkpoint_dir(config)
    steps = config["train"]["steps"]
    latest = checkpoint.latest_checkpoint(directory)
    if latest is not None and not config["train"]["resume"]:
        # Moved aside, not deleted: a run that fails before its own final
        # checkpoint leaves the old ones in <dir>.replaced.
        aside = replaced_dir(config)
        print(f"train.resume=false: moving the checkpoints in {directory} to {aside} "
              "(deleted once this run has saved its own)")
        if os.path.exists(aside):
            shutil.rmtree(aside)
        os.replace(directory, aside)
        latest = None
    run_config = os.path.join(directory, RUN_CONFIG)
    if latest is None:
        os.makedirs(directory, exist_ok=True)
        with open(run_config, "w") as f:
            json.dump(config, f, indent=2)
        return 0, None
    if os.path.exists(run_config):
        with open(run_config) as f:
            _check_resume_config(config, json.load(f), directory)
    step = int(checkpoint.read_manifest(latest)["step"])
    if step > steps:
        raise config_lib.ConfigError(
            f"train.steps={steps} is below step {step} of the latest checkpoint {latest!r}. "
            f"Raise train.steps (e.g. --steps {2 * step}) to train on, or start afresh with "
            "--set train.resume=false (replaces the checkpoints) or another output.dir."
        )
    return step, latest


def _restore(model, path, steps):
    """Restore ``path`` into ``model`` (onto its mesh, whatever the saving
    run's was) and say so."""
    from tfshard import checkpoint

    checkpoint.restore_checkpoint(model, path)
    manifest = checkpoint.read_manifest(path)
    saved_mesh = (manifest.get("mesh") or {}).get("axes")
    where = "x".join(str(n) for n in saved_mesh.values()) if saved_mesh else "one device"
    print(f"resuming from {path} (step {manifest['step']} of {steps}; saved on {where})")


def _stream_checkpoint(directory, save_freq, max_to_keep):
    from tfshard.callbacks import ShardedCheckpoint

    class StreamCheckpoint(ShardedCheckpoint):
        """The train job's batches are one stream of train.steps batches, run
        as a single epoch, that a later run may extend (a larger
        train.steps). So a checkpoint's position is always "batch <step> of
        epoch 0": a resumed run passes over that many batches of the same
        stream and continues, running loss included. The end of the epoch is
        not recorded (it would make a longer resumed run start a new epoch)."""

        def on_epoch_end(self, epoch, logs=None):
            pass  # save_freq is always an int here; see the class docstring

    return StreamCheckpoint(directory, save_freq=save_freq, max_to_keep=max_to_keep)


class _TrainedSteps(keras.callbacks.Callback):
    """Per trained step: the global step, Keras's logged loss (the running
    mean over the epoch) and the seconds the step took (callbacks such as
    checkpoint saves excluded). Batches a resumed run passes over (they
    were trained before the restart) do not move the optimizer's iteration
    count and are not recorded."""

    def __init__(self):
        super().__init__()
        self.steps, self.losses, self.seconds = [], [], []
        self._begin = None

    def _iterations(self):
        return int(self.model.optimizer.iterations.numpy())

    def on_train_begin(self, logs=None):
        self._last = self._iterations()

    def on_train_batch_begin(self, batch, logs=None):
        self._begin = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        seconds = time.perf_counter() - self._begin
        step = self._iterations()
        if step == self._last:
            return  # passed over, not trained
        self._last = step
        self.steps.append(step)
        self.losses.append(float(logs["loss"]))
        self.seconds.append(seconds)


def _summaries(config, model, variables):
    """The TensorBoard callback (every process runs it, process 0 writes),
    or None when ``output.tensorboard`` is false."""
    from tfshard.app import tensorboard
    from tfshard.report import variable_table

    if not config["output"]["tensorboard"]:
        return None
    unit = "tokens" if config["model"]["kind"] == "transformer" else "images"
    return tensorboard.TrainSummaries(
        tensorboard.log_dir(config),
        items_per_step=config["train"]["batch_size"] * _items_per_example(config),
        unit=unit,
        texts={"layout": tensorboard.preformatted(variable_table(variables)),
               "memory": tensorboard.memory_text(model)},
        write=multi_client.is_chief(),
    )


def train(config, *, verbose=1):
    """Train a config; returns the metrics dict (also written as JSON).

    TensorBoard logs go to ``<output.dir>/tensorboard`` (see
    :mod:`tfshard.app.tensorboard`; ``output.tensorboard: false`` turns
    them off). Checkpoints go to ``<output.dir>/checkpoints`` every
    ``train.checkpoint_every`` steps and at the end. With ``train.resume``
    (the default) a run continues from the latest of them, on whatever mesh
    the config now names, up to ``train.steps`` in all.
    """
    from tfshard import checkpoint
    from tfshard.report import per_device_bytes, variable_table

    train_cfg = config["train"]
    steps, batch = train_cfg["steps"], train_cfg["batch_size"]
    start_step, resumed_from = multi_client.run_on_chief(  # process 0 reads/prepares the dir
        "train (resume point)", lambda: _resume_point(config), error=TfshardError
    )
    directory = checkpoint_dir(config)

    plan = auto_plan(config) if config["layout"].get("auto") else None
    if plan is not None:
        print(plan)
    strategy = build_strategy(config, plan)
    (x, y), (x_eval, y_eval) = load_data(config)
    model = build_model(config, strategy)
    variables = list(model.variables) + list(model.optimizer.variables)
    print(f"mesh {strategy.mesh}, rules {strategy.logical_rules}")
    print(variable_table(variables))
    if resumed_from is not None:
        _restore(model, resumed_from, steps)
    summaries = _summaries(config, model, variables)
    summary_callbacks = [summaries] if summaries else []
    before = model.evaluate(x_eval, y_eval, batch_size=batch, verbose=0, return_dict=True,
                            callbacks=summary_callbacks)
    recorder = _TrainedSteps()
    start = time.perf_counter()
    if start_step < steps:
        saver = _stream_checkpoint(
            directory,
            save_freq=train_cfg["checkpoint_every"] or steps,
            max_to_keep=train_cfg["keep_checkpoints"] or None,
        )
        model.fit(
            x, y, batch_size=batch, epochs=1, shuffle=False, verbose=verbose,
            callbacks=summary_callbacks + [saver, recorder],  # summaries first: times the step alone
        )
        if multi_client.is_chief() and checkpoint.latest_checkpoint(directory) is not None:
            shutil.rmtree(replaced_dir(config), ignore_errors=True)
    else:
        print(f"already at step {start_step} = train.steps; nothing to train "
              "(raise --steps to train on)")
    elapsed = time.perf_counter() - start
    after = model.evaluate(x_eval, y_eval, batch_size=batch, verbose=0, return_dict=True,
                           callbacks=summary_callbacks)
    if summaries:
        summaries.close()

    steady = recorder.seconds[1:] or recorder.seconds  # the first step compiles
    step_time = sum(steady) / len(steady) if steady else float("nan")
    metrics = {
        "config": config,
        "mesh": dict(strategy.mesh.axes),
        "steps": int(model.optimizer.iterations.numpy()),
        "start_step": start_step,
        "resumed_from": resumed_from,
        "eval_before": before,
        "eval_after": after,
        "train_steps": recorder.steps,
        "train_loss": recorder.losses,
        "seconds": elapsed,
        "ms_per_step": 1000 * step_time,
        "items_per_second": batch * _items_per_example(config) / step_time,
        "per_device_bytes": per_device_bytes(variables),
        "checkpoints": checkpoint.list_checkpoints(directory),
    }
    out_dir = config["output"]["dir"]
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "metrics.json")
    if not recorder.steps:  # nothing trained: keep the last run's metrics.json
        print(f"held-out loss {after['loss']:.4f} at step {metrics['steps']}; checkpoints in {directory}")
        return metrics
    if multi_client.is_chief():
        with open(path, "w") as f:
            json.dump(metrics, f, indent=2, default=float)
    unit = "tokens/s" if config["model"]["kind"] == "transformer" else "images/s"
    print(
        f"held-out loss {before['loss']:.4f} -> {after['loss']:.4f} over steps "
        f"{start_step + 1}..{metrics['steps']}; {metrics['ms_per_step']:.1f} ms/step, "
        f"{metrics['items_per_second']:.0f} {unit}; "
        f"{metrics['per_device_bytes'] / 2**20:.2f} MiB params+optimizer per device; "
        f"checkpoints in {directory}; metrics in {path}"
        + (f"; tensorboard --logdir {summaries.log_dir}" if summaries else "")
    )
    return metrics


def inspect(config):
    """Build without training; print layouts, per-device totals and the
    estimated communication per step."""
    from tfshard.app.estimate import communication_estimate
    from tfshard.report import variable_table

    plan = auto_plan(config) if config["layout"].get("auto") else None
    if plan is not None:
        print(plan.explain())
        print()
    strategy = build_strategy(config, plan)
    model = build_model(config, strategy)
    variables = list(model.variables) + list(model.optimizer.variables)
    print(f"mesh {strategy.mesh}, rules {strategy.logical_rules}")
    print(variable_table(variables))
    print()
    if plan is None:
        print(communication_estimate(config))
    return model
