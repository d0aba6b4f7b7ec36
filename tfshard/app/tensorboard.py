"""TensorBoard logs of ``tfshard train`` (``output.tensorboard``, on by default).

Written under ``<output.dir>/tensorboard`` by :class:`TrainSummaries`, a
``keras.callbacks.TensorBoard``: Keras's callback supplies the writers and
its ``train/`` and ``validation/`` directories. Each ``evaluate`` the
callback is passed to is logged in ``validation/`` under Keras's tag,
``evaluation_loss_vs_iterations``, at the optimizer's step (the job
evaluates the held-out batches before and after training). In ``train/``,
per trained step (the optimizer's iteration, so a resumed run continues the
curves):

* ``loss``: Keras's logged training loss (the running mean over the run's
  batches, as the progress bar shows it);
* ``learning_rate``, ``ms_per_step`` (callbacks excluded) and
  ``tokens_per_second`` (``images_per_second`` for a CNN);

and two text summaries at the first step: ``layout`` (every variable's
spec and per-device shape, the table ``tfshard train`` prints) and
``memory`` (per-device bytes of parameters and optimizer state).

    tensorboard --logdir runs/transformer_2x4/tensorboard
"""

from __future__ import annotations

import os
import time

import keras

from tfshard import to_numpy

SUBDIR = "tensorboard"


def log_dir(config):
    """Where ``tfshard train`` writes TensorBoard logs: ``<output.dir>/tensorboard``."""
    return os.path.join(config["output"]["dir"], SUBDIR)


def memory_text(model):
    """Per-device bytes of parameters and optimizer state, as a Markdown table."""
    from tfshard.report import format_bytes, variable_rows

    groups = (("parameters", model.variables), ("optimizer state", model.optimizer.variables))
    lines = ["| | per device | unsharded |", "| --- | ---: | ---: |"]
    totals = [0, 0]
    for label, variables in groups:
        rows = variable_rows(list(variables))
        local = sum(r["per_device_bytes"] for r in rows)
        whole = sum(r["global_bytes"] for r in rows)
        totals = [totals[0] + local, totals[1] + whole]
        lines.append(f"| {label} | {format_bytes(local)} | {format_bytes(whole)} |")
    lines.append(f"| **total** | **{format_bytes(totals[0])}** | **{format_bytes(totals[1])}** |")
    return "\n".join(lines)


def preformatted(text):
    """``text`` as a Markdown code block: TensorBoard renders text summaries
    as Markdown, and a table printed in columns must keep them."""
    return "\n".join("    " + line for line in text.splitlines())


class TrainSummaries(keras.callbacks.TensorBoard):
    """Keras's TensorBoard callback with per-step scalars at the optimizer's
    step and the job's text summaries (see the module docstring).

    Batches a resumed run passes over (trained before the restart; the
    optimizer's step does not move) are not logged. Writers stay open
    across the job's ``evaluate`` and ``fit`` calls until :meth:`close`.

    In a multi-client job every process runs the callback (reading a
    variable of the mesh is collective, so all processes read alike) and
    only process 0 (``write=True``) writes.
    """

    def __init__(self, directory, *, items_per_step, unit, texts=None, write=True):
        super().__init__(log_dir=directory, write_graph=False, update_freq="epoch", profile_batch=0)
        self.items_per_step = items_per_step
        self.unit = unit
        self.texts = dict(texts or {})  # name -> Markdown, written at the first step
        self.write = write
        self._last_step = None
        self._begin = None

    def set_model(self, model):
        # Keras resets its writers on every fit/evaluate; keep them open.
        writers = self._writers
        super().set_model(model)
        self._writers = writers

    def _step(self):
        return int(to_numpy(self.model.optimizer.iterations))

    # Keras's on_train_begin/on_test_begin only open a writer (for
    # batch-level summaries this callback does not use); a process that does
    # not write must not create event files.
    def on_test_begin(self, logs=None):
        pass

    def on_train_begin(self, logs=None):
        self._last_step = self._step()
        if self.texts and self.write:
            import tensorflow as tf

            with self._train_writer.as_default():
                for name, text in self.texts.items():
                    tf.summary.text(name, text, step=self._last_step)
            self.texts = {}

    def on_train_batch_begin(self, batch, logs=None):
        self._begin = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        import tensorflow as tf

        seconds = time.perf_counter() - self._begin
        step = self._step()
        if step == self._last_step:
            return  # passed over on resume, not trained
        self._last_step = step
        scalars = {
            "learning_rate": float(to_numpy(self.model.optimizer.learning_rate)),
            "ms_per_step": 1000.0 * seconds,
            f"{self.unit}_per_second": self.items_per_step / seconds,
        }
        if logs and "loss" in logs:
            scalars["loss"] = float(logs["loss"])
        if not self.write:
            return
        with self._train_writer.as_default():
            for name, value in scalars.items():
                tf.summary.scalar(name, value, step=step)

    def on_test_end(self, logs=None):
        import tensorflow as tf

        # Keras's own logs the optimizer's step as a (possibly DTensor)
        # variable; write the same tag with the step as a number.
        step = self._step()
        if not self.write:
            return
        with self._val_writer.as_default():
            for name, value in (logs or {}).items():
                tf.summary.scalar(f"evaluation_{name}_vs_iterations", float(value), step=step)
            self._val_writer.flush()

    def on_epoch_end(self, epoch, logs=None):
        pass  # the job's one epoch is a stream of steps; the steps are logged

    def on_train_end(self, logs=None):
        if self.write:
            self._train_writer.flush()

    def close(self):
        for writer in self._writers.values():
            writer.close()
        self._writers = {}
