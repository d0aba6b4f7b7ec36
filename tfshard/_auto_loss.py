"""What the compiled loss and metrics do with vocabulary-split logits, for
:mod:`tfshard._auto_cost`'s estimate.

* TensorFlow's fused sparse cross-entropy (any other loss too) needs whole
  classes: the logits are all-gathered over the tensor axis, one launch.
* ``keras.losses.SparseCategoricalCrossentropy(from_logits=True)`` and
  tfshard's ``VocabParallelSparseCategoricalCrossentropy`` run vocab-parallel
  in a traced step (:mod:`tfshard._ops.cross_entropy`): an all-reduce (max)
  of the per-token max, then one launch of the per-token sum of exponentials
  and the label's logit (DTensor combines the two sums). No gather.
* A compiled metric reads the logits whole (keras-hub's CausalLMs compile
  ``SparseCategoricalAccuracy``: an argmax over the classes), so they are
  gathered anyway; DTensor then takes the loss's max from the gathered copy
  (measured on keras-hub Llama, 2x4), leaving the gather and the sums.

Measured launches per logits projection, forward: 1 (fused), 2
(vocab-parallel, with or without metrics).
"""

from __future__ import annotations

import keras


def loss_splits_logits(model):
    """Whether ``model``'s compiled loss runs vocab-parallel on split logits
    (an uncompiled model: no, the fused op is assumed)."""
    from tfshard.losses import VocabParallelSparseCategoricalCrossentropy

    loss = getattr(model, "loss", None)
    if isinstance(loss, VocabParallelSparseCategoricalCrossentropy):
        return True
    if isinstance(loss, keras.losses.SparseCategoricalCrossentropy):
        return bool(loss.get_config().get("from_logits"))
    return False


def metrics_read_logits(model):
    """Whether ``model`` compiles metrics (they read the logits whole)."""
    if not getattr(model, "compiled", False):
        return False
    try:
        config = model.get_compile_config() or {}
    except Exception:  # noqa: BLE001  (a model that cannot serialise its compile arguments)
        return True
    return bool(config.get("metrics") or config.get("weighted_metrics"))


def logits_rows(row, setting, index, classes, width, what):
    """The collectives of one call ``index`` that makes ``classes`` logits
    per token split over the tensor axis, from inputs of ``width`` features
    (``row(stage, kind, axis, nbytes, what)`` makes a row)."""
    t, axis = setting.tokens, setting.tensor_axis
    rows = [row(("bwd", index), "all_reduce", axis, t * width * 4, f"{what} input gradient")]
    if not setting.loss_splits_logits:
        return [row(("fwd", index), "all_gather", axis, t * classes * 4, f"{what} gathered for the loss")] + rows
    if setting.metrics_read_logits:
        rows.append(row(("fwd", index), "all_gather", axis, t * classes * 4, f"{what} gathered for the metrics"))
    else:
        rows.append(row(("loss", 0), "all_reduce", axis, t * 4, "vocab-parallel loss: max over the classes"))
    rows.append(row(("loss", 1), "all_reduce", axis, t * 4, "vocab-parallel loss: sum of exponentials"))
    rows.append(row(("loss", 1), "all_reduce", axis, t * 4, "vocab-parallel loss: the label's logit"))
    return rows
