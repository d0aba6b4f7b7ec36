"""Keras callbacks for sharded training.

``ShardedCheckpoint`` saves tfshard checkpoints during ``model.fit`` and
resumes from them, so a script that is simply re-run after a crash finishes
with the same weights and losses as a run that never crashed:

    callbacks = [tfshard.callbacks.ShardedCheckpoint("ckpts", save_freq=100)]
    model.fit(x, y, epochs=10, callbacks=callbacks)   # re-run after a crash

How the resume works
    At the start of ``fit`` the latest committed checkpoint in the directory
    is restored (weights, optimizer slots and iteration count, onto whatever
    mesh the model is on now). The checkpoint's metadata records where
    training was: the epoch, the batches already done in that epoch, the
    global step, and the values of the metric variables (the running means
    that ``fit`` logs). ``fit`` then starts at that epoch (Keras's
    ``model._initial_epoch``, as ``keras.callbacks.BackupAndRestore`` does).
    Within the epoch, the batches already trained are drawn from the data and
    passed over without training, and the metric values are put back, so the
    logged losses continue exactly where they were.

    Exact resumption needs the data to arrive in the same order on the re-run
    (``shuffle=False``, or a dataset whose order depends only on the epoch)
    and layers without random state (dropout's generator state is not
    checkpointed).
"""

from __future__ import annotations

import warnings

import keras
import numpy as np

from tfshard import _keras
from tfshard import checkpoint as _checkpoint

__all__ = ["ShardedCheckpoint"]

STATE_KEY = "tfshard.callbacks.ShardedCheckpoint"


def _metric_state(model):
    return [
        {
            "path": v.path,
            "shape": [int(d) for d in v.shape],
            "dtype": str(v.dtype),
            "value": np.asarray(v.numpy()).tolist(),
        }
        for v in model.metrics_variables
    ]


def _restore_metric_state(model, saved):
    # Matched by position and shape: metric names may carry uniquifying
    # suffixes that differ between processes.
    variables = list(model.metrics_variables)
    if [[int(d) for d in v.shape] for v in variables] != [s["shape"] for s in saved]:
        warnings.warn(
            "ShardedCheckpoint: the model's metrics differ from the "
            "checkpoint's, so the logged metrics restart from zero for the "
            "resumed epoch (weights and optimizer state are restored).",
            stacklevel=2,
        )
        return
    for v, s in zip(variables, saved):
        v.assign(np.asarray(s["value"], dtype=s["dtype"]))


def _training_state(path):
    """The training position ShardedCheckpoint recorded in checkpoint
    ``path`` (None for a checkpoint from save_checkpoint), validated."""
    metadata = _checkpoint.read_manifest(path).get("metadata")
    state = metadata.get(STATE_KEY) if isinstance(metadata, dict) else None
    if state is None:
        return None
    try:
        position = {key: int(state[key]) for key in ("global_step", "epoch", "batch")}
    except (KeyError, TypeError, ValueError):
        raise _checkpoint.CheckpointError(
            f"Checkpoint {path!r} is corrupt or incomplete: the training position "
            f"ShardedCheckpoint recorded in its manifest.json (metadata {STATE_KEY!r}) "
            f"is {state!r}, without integer global_step, epoch and batch. The model was "
            "not changed. Delete that checkpoint to resume from the one before it."
        ) from None
    metrics = state.get("metrics") or []
    if not isinstance(metrics, list):
        metrics = []
    return dict(position, metrics=metrics)


class ShardedCheckpoint(keras.callbacks.Callback):
    """Save tfshard checkpoints during ``fit``; resume from the latest one.

    Args:
        directory: where the ``ckpt-<step>`` checkpoints go.
        save_freq: ``"epoch"`` to save at the end of every epoch, or an int
            ``n`` to save after every ``n`` training batches (counted over the
            whole run, across epochs and restarts).
        max_to_keep: keep at most this many checkpoints (``None``: all).

    A checkpoint's step is the number of batches trained so far. When
    training ends, the final state is saved too if it is not yet.
    """

    def __init__(self, directory, save_freq="epoch", max_to_keep=None):
        super().__init__()
        if save_freq != "epoch" and (
            isinstance(save_freq, bool) or not isinstance(save_freq, int) or save_freq < 1
        ):
            raise _checkpoint.CheckpointError(
                f"ShardedCheckpoint(save_freq={save_freq!r}): use 'epoch' or a "
                "positive int number of batches."
            )
        if max_to_keep is not None and (
            isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1
        ):
            raise _checkpoint.CheckpointError(
                f"ShardedCheckpoint(max_to_keep={max_to_keep!r}): use a positive "
                "int, or None to keep every checkpoint."
            )
        self.directory = str(directory)
        self.save_freq = save_freq
        self.max_to_keep = max_to_keep
        self._reset()

    def _reset(self):
        self._global_step = 0  # batches trained, over all runs
        self._epoch = 0  # the current epoch
        self._batch = 0  # batches done (trained or passed over) in it
        self._last_saved_step = None
        self._to_skip = 0  # batches of the resumed epoch to pass over
        self._skipped_call = False
        self._pending_metrics = None
        self._original_train_function = None
        self._set_initial_epoch = False
        self.restored_path = None

    # ------------------------------------------------------------ resume
    def on_train_begin(self, logs=None):
        # A fit that crashed while passing over batches left its skipper.
        self._uninstall_skipper()
        function = getattr(self.model, "train_function", None)
        while hasattr(function, "_tfshard_original"):
            function = function._tfshard_original
        if function is not None:
            self.model.train_function = function
        self._reset()
        optimizer = getattr(self.model, "optimizer", None)
        path = _checkpoint.latest_checkpoint(self.directory)
        if path is None:
            iterations = getattr(optimizer, "iterations", None)
            if iterations is not None:
                self._global_step = int(np.asarray(iterations.numpy()))
            return
        state = _training_state(path)  # checked before the model changes
        _checkpoint.restore_checkpoint(self.model, path)
        self.restored_path = path
        if state is None:
            # A checkpoint from save_checkpoint: weights and optimizer state,
            # no record of the epoch; training starts at epoch 0.
            self._global_step = int(_checkpoint.read_manifest(path)["step"])
            self._last_saved_step = self._global_step
            return
        self._global_step = state["global_step"]
        self._last_saved_step = self._global_step
        epoch, batch = state["epoch"], state["batch"]
        if epoch:
            _keras.set_initial_epoch(self.model, epoch)
            self._set_initial_epoch = True
        if batch:
            self._to_skip = batch
            self._pending_metrics = state.get("metrics") or []
            self._install_skipper()

    def _install_skipper(self):
        model = self.model
        original = model.train_function
        self._original_train_function = original

        def skip_trained_batches(iterator):
            if self._to_skip <= 0:
                self._uninstall_skipper()
                return original(iterator)
            n = min(self._to_skip, max(int(model.steps_per_execution), 1))
            for _ in range(n):
                data = next(iterator)  # drawn, not trained: done before the crash
                if self._pending_metrics is not None:
                    self._restore_metrics(data)
            self._to_skip -= n
            self._skipped_call = True
            if self._to_skip <= 0:
                self._uninstall_skipper()
            return model.get_metrics_result()

        skip_trained_batches._tfshard_original = original
        model.train_function = skip_trained_batches

    def _uninstall_skipper(self):
        if self._original_train_function is not None:
            self.model.train_function = self._original_train_function
            self._original_train_function = None

    def _restore_metrics(self, data):
        """Put back the running metric values of the batches already done
        in the resumed epoch (fit has just reset the metrics)."""
        saved, self._pending_metrics = self._pending_metrics, None
        model = self.model
        if len(model.metrics_variables) != len(saved):
            # Keras on TensorFlow creates compiled metrics' variables in the
            # first traced train step; create them now from this batch, as
            # Keras itself does under a tf.distribute strategy.
            try:
                _keras.symbolic_build(model, data)
            except Exception:  # leave it to the warning below
                pass
        _restore_metric_state(model, saved)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._batch = 0

    # -------------------------------------------------------------- save
    def on_train_batch_end(self, batch, logs=None):
        done = int(batch) + 1  # Keras passes the index of the last batch run
        trained = max(done - self._batch, 0)
        self._batch = done
        if self._skipped_call:
            self._skipped_call = False
            return
        before = self._global_step
        self._global_step += trained
        if isinstance(self.save_freq, int) and (
            self._global_step // self.save_freq > before // self.save_freq
        ):
            self._save()

    def on_epoch_end(self, epoch, logs=None):
        self._epoch = epoch + 1
        self._batch = 0
        if self.save_freq == "epoch":
            self._save()

    def on_train_end(self, logs=None):
        self._uninstall_skipper()
        if self._set_initial_epoch:
            _keras.set_initial_epoch(self.model, None)
            self._set_initial_epoch = False
        if self._global_step != self._last_saved_step and self._global_step > 0:
            self._save()

    def _save(self):
        if self._global_step == self._last_saved_step:
            return
        state = {
            "epoch": self._epoch,
            "batch": self._batch,
            "global_step": self._global_step,
            "metrics": _metric_state(self.model) if self._batch else [],
        }
        _checkpoint.save_checkpoint(
            self.model,
            self.directory,
            step=self._global_step,
            max_to_keep=self.max_to_keep,
            metadata={STATE_KEY: state},
        )
        self._last_saved_step = self._global_step
