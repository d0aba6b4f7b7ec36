"""What one device holds during a training step, by kind: parameters,
gradients, optimizer state and activations.

    breakdown = tfshard.memory.memory_by_kind(model, (x, y))
    breakdown.activations          # bytes one device keeps for backward
    print(breakdown.table())

Every number is bytes on one device (the first of the mesh; layouts split
evenly, so every device holds as much), read from shards, not computed from
specs:

parameters
    The model's weights, each the shard this device stores
    (``dtensor.unpack``): with ZeRO-3 split over the data axis too.
gradients
    Each trainable weight's gradient as the step holds it for the optimizer
    update (:meth:`tfshard.Strategy.hold_gradients`: split like the slots
    with ZeRO-2/3, like the parameter otherwise), the shard of the gradient
    the probe step computes.
optimizer
    The optimizer's variables (slots, counters); built if it is not yet.
activations
    The tensors the step keeps from its forward pass for its backward pass,
    the quantity Megatron's activation-memory model counts (Korthikanti et
    al., 2022). Method: one step (forward, the compiled loss,
    ``GradientTape.gradient``) is traced as a ``tf.function``; the ops traced
    before ``gradient`` is called are the forward pass, the rest the backward
    pass. A forward tensor is *kept* when a backward op reads its value (an
    op that reads only its shape, such as ``Shape``, ``Size``, ``ZerosLike``,
    does not keep it) and it depends on the batch (weights and constants are
    not activations). A view (``Identity``, ``Reshape``, ``ExpandDims``,
    ``Squeeze``, ``StopGradient``) counts once, as the tensor it views. The
    function returns the kept tensors; DTensor lays them out as in the real
    step, and each counts with the shape of this device's shard. Buffers an
    op uses only while it runs are not counted, nor is anything inside
    nested functions or control flow.
parameter_copies
    Not one of the four kinds: tensors the step keeps for backward that
    derive from weights alone, such as ZeRO-3's all-gathered parameters
    (whole over the data axis from the layer's forward until its backward).

The probe runs one forward and backward pass on ``batch`` and applies no
update; non-trainable state the forward pass changes (normalization
statistics, random seeds, metric totals) is put back.
"""

from __future__ import annotations

import contextlib
import dataclasses

import keras
import numpy as np
import tensorflow as tf
from keras import tree
from keras.utils import unpack_x_y_sample_weight

from tfshard import _dtensor
from tfshard.errors import StrategyError
from tfshard.report import format_bytes
from tfshard.training import shard_batch, strategy_of_model

__all__ = ["KeptTensor", "MemoryBreakdown", "kept_for_backward", "memory_by_kind"]

# Backward ops that read only a tensor's shape, dtype or layout: they do not
# keep its buffer alive (RelayoutLike: the gradient of a Relayout, laid out
# like the forward input).
SHAPE_ONLY_OPS = frozenset({"Shape", "ShapeN", "Size", "Rank", "ZerosLike", "OnesLike", "RelayoutLike"})
# Ops whose output shares its input's buffer; a Relayout does when DTensor
# gives its output the input's layout (checked once the layouts are known).
VIEW_OPS = frozenset({"Identity", "Reshape", "ExpandDims", "Squeeze", "StopGradient", "Snapshot"})
RELAYOUT_OPS = frozenset({"Relayout"})


@dataclasses.dataclass(frozen=True)
class KeptTensor:
    """One tensor the step keeps for backward."""

    name: str  # the graph tensor's name (op name and output index)
    op_type: str
    global_shape: tuple
    local_shape: tuple
    dtype: str
    bytes: int  # per device
    from_batch: bool  # False: derived from weights alone (a parameter copy)


@dataclasses.dataclass(frozen=True)
class MemoryBreakdown:
    """Per-device bytes of one training step by kind (see the module doc)."""

    parameters: int
    gradients: int
    optimizer: int
    activations: int
    parameter_copies: int
    kept: tuple = ()  # KeptTensor, in graph order

    KINDS = ("parameters", "gradients", "optimizer", "activations")

    @property
    def total(self):
        """Parameters + gradients + optimizer state + activations."""
        return sum(getattr(self, kind) for kind in self.KINDS)

    def as_dict(self):
        return {kind: getattr(self, kind) for kind in self.KINDS + ("parameter_copies",)}

    def table(self):
        lines = [f"{'kind':<18}{'bytes/device':>14}{'':>3}"]
        for kind in self.KINDS + ("parameter_copies",):
            value = getattr(self, kind)
            lines.append(f"{kind:<18}{value:>14,}   {format_bytes(value)}")
        lines.append(f"{'total':<18}{self.total:>14,}   {format_bytes(self.total)}")
        return "\n".join(lines)


def _local_bytes(x):
    """Bytes of this device's shard of a tensor or variable (the whole value
    when it is not on a mesh) and the shard's shape; a sparse gradient
    (``tf.IndexedSlices``) counts its values and indices."""
    if isinstance(x, tf.IndexedSlices):
        values, indices = _local_bytes(x.values), _local_bytes(x.indices)
        return values[0] + indices[0], values[1]
    if _dtensor.is_dtensor(x):
        part = _dtensor.unpack(x)[0]
    else:
        part = x.value if isinstance(x, keras.Variable) else x
    return int(np.prod(part.shape, dtype=np.int64)) * tf.as_dtype(part.dtype).size, tuple(
        int(d) for d in part.shape
    )


def _layout_text(x):
    return _dtensor.layout_of(x).to_string() if _dtensor.is_dtensor(x) else None


def _view_root(tensor, forward, through=VIEW_OPS):
    while tensor.op.type in through and tensor.op.inputs and tensor.op.inputs[0].op in forward:
        tensor = tensor.op.inputs[0]
    return tensor


def kept_for_backward(forward_ops, backward_ops, batch_inputs):
    """The forward tensors backward ops read, as ``[(tensor, origin,
    from_batch)]``.

    ``forward_ops``/``backward_ops`` are the ops of one traced graph before
    and after ``GradientTape.gradient``; ``batch_inputs`` the graph's
    placeholders of the batch. Views count once, as the tensor they view.
    ``origin`` is the tensor a chain of views and relayouts starts from: a
    relayout whose output has ``origin``'s layout is the same buffer (the
    caller compares layouts). Variable reads (the parameters themselves)
    and tensors that depend neither on the batch nor on a variable
    (constants) are left out.
    """
    forward = set(forward_ops)
    backward = set(backward_ops)
    from_batch = {t.ref() for t in batch_inputs}
    from_weights = set()
    for op in forward_ops:  # graph order is a topological order
        inputs = [t.ref() for t in op.inputs]
        if any(t in from_batch for t in inputs):
            from_batch.update(t.ref() for t in op.outputs)
        elif op.type == "ReadVariableOp" or any(t in from_weights for t in inputs):
            from_weights.update(t.ref() for t in op.outputs)
    kept, seen = [], set()
    for op in forward_ops:
        for tensor in op.outputs:
            readers = [c for c in tensor.consumers() if c in backward and c.type not in SHAPE_ONLY_OPS]
            if not readers:
                continue
            view = _view_root(tensor, forward)
            key = view.ref()
            if key in seen or not (key in from_batch or key in from_weights):
                continue
            seen.add(key)
            origin = _view_root(view, forward, VIEW_OPS | RELAYOUT_OPS)
            if origin.op.type == "ReadVariableOp" and origin is view:
                continue  # the variable's own buffer: a parameter
            kept.append((view, origin, key in from_batch))
    return kept


def _probe_function(model, strategy, structure):
    trainable = model.trainable_variables
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    record = {}

    def probe(*flat):
        data = tree.pack_sequence_as(structure, list(flat))
        x, y, sample_weight = unpack_x_y_sample_weight(data)
        graph = tf.compat.v1.get_default_graph()
        with scope:
            with tf.GradientTape() as tape:
                y_pred = model(x, training=True)
                loss = model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight)
            forward_ops = list(graph.get_operations())
            grads = tape.gradient(loss, trainable)
            if strategy is not None:
                grads = strategy.hold_gradients(grads, trainable)
        backward_ops = graph.get_operations()[len(forward_ops):]
        kept = kept_for_backward(forward_ops, backward_ops, list(graph.inputs[: len(flat)]))
        record["kept"] = [
            (t.name, t.op.type, tuple(t.shape.as_list()), t.dtype.name, origin.name,
             origin.op.type == "ReadVariableOp", from_batch)
            for t, origin, from_batch in kept
        ]
        return [g for g in grads if g is not None], [t for t, _, _ in kept], [o for _, o, _ in kept]

    return tf.function(probe, autograph=False), record


def _check_model(model):
    if not getattr(model, "compiled", False) or getattr(model, "optimizer", None) is None:
        raise StrategyError(
            f"memory_by_kind({model.name!r}): the model is not compiled, so it has no "
            "loss to differentiate and no optimizer state; call "
            "model.compile(optimizer=..., loss=...) first."
        )


def memory_by_kind(model, batch, strategy=None):
    """Per-device bytes of one training step of ``model`` on ``batch`` (an
    ``(x, y)`` or ``(x, y, sample_weight)`` tuple of host arrays) by kind:
    a :class:`MemoryBreakdown` (see the module doc for the method).

    ``strategy`` defaults to the one the model was created under (None: a
    plain Keras model on one device).
    """
    _check_model(model)
    if strategy is None:
        strategy = strategy_of_model(model)
    optimizer = model.optimizer
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        if not model.built:
            x, _, _ = unpack_x_y_sample_weight(batch)
            model(x)
        if not optimizer.built:
            optimizer.build(model.trainable_variables)
    data = tuple(batch) if isinstance(batch, list) else batch
    if strategy is not None:
        placed = shard_batch(strategy, data)
    else:
        placed = tree.map_structure(lambda a: None if a is None else tf.convert_to_tensor(a), data)
    flat = tree.flatten(placed)
    structure = tree.map_structure(lambda _: 0, placed)
    state = [v for v in list(model.non_trainable_variables) + list(model.metrics_variables)]
    saved_state = [np.array(v.numpy()) for v in state]
    function, record = _probe_function(model, strategy, structure)
    try:
        grads, kept_values, origin_values = function(*flat)
    finally:
        for v, value in zip(state, saved_state):
            v.assign(value)

    parameters = sum(_local_bytes(v)[0] for v in model.weights)
    gradients = sum(_local_bytes(g)[0] for g in grads)
    seen = {id(v) for v in model.weights}
    optimizer_bytes = sum(_local_bytes(v)[0] for v in optimizer.variables if id(v) not in seen)
    kept, buffers = [], set()
    records = zip(record["kept"], kept_values, origin_values)
    for (name, op_type, shape, dtype, origin, is_variable, from_batch), value, origin_value in records:
        layout = _layout_text(value)
        same_buffer = origin != name and layout == _layout_text(origin_value)
        if same_buffer and (is_variable or (origin, layout) in buffers):
            continue  # a relayout to the layout it had (a variable's is a parameter)
        buffers.add((origin, layout))
        size, local = _local_bytes(value)
        kept.append(KeptTensor(name, op_type, shape, local, dtype, size, from_batch))
    return MemoryBreakdown(
        parameters=parameters,
        gradients=gradients,
        optimizer=optimizer_bytes,
        activations=sum(k.bytes for k in kept if k.from_batch),
        parameter_copies=sum(k.bytes for k in kept if not k.from_batch),
        kept=tuple(kept),
    )
