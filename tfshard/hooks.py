"""The Keras integration: what runs inside Keras when a variable or layer
is on a mesh.

``import tfshard`` registers these functions as the hooks of
``tfshard._keras``'s patch table (see ``tfshard._keras.describe_patches``):

* variable creation: a variable created under a strategy (or an optimizer
  slot of one) becomes a DTensor variable laid out as the strategy resolves
  it (:meth:`tfshard.Strategy.variable_spec`);
* layer creation and calls: a layer created under a strategy builds under it;
  its calls compute on the mesh (so the op replacements of
  ``tfshard._ops`` apply), its style's activation layouts and the plan's
  output entries are applied, and the outermost eager call takes plain
  values in and gives plain values out;
* backend ops: convolutions on all-gathered weights, the masked local lookup
  of a table split by rows;
* reads of FSDP-style weights and ZeRO gradient layouts.
"""

from __future__ import annotations

import functools

import keras
import numpy as np
import tensorflow as tf
from keras import tree

from tfshard import _dtensor, _keras, context_parallel, recompute, sequence_parallel
from tfshard._ops import recurrence
from tfshard.layout import KEEP, validate_spec
from tfshard.strategy import (
    _computing_on,
    computing_on,
    current_strategy,
    mesh_computation,
    strategy_of_layer,
)
from tfshard.tensors import VariableLayout, masked_local_lookup


def _make_variable(kvar, value):
    layout = _keras.variable_layout(kvar)
    declared = _keras.variable_shape(kvar)
    if isinstance(layout, VariableLayout):
        # Created with a tfshard layout: an optimizer slot (Keras passes the
        # parameter's ``_layout`` to its slots).
        strategy = layout.strategy
        spec = strategy.optimizer_state_spec(layout.spec, declared)
        spec = validate_spec(spec, declared, strategy.mesh, name=f"Variable {kvar.path!r}")
    elif layout is not None:
        # A keras.distribution.TensorLayout given explicitly (Variable(...,
        # layout=...)): honoured as the spec under an active strategy, as
        # Keras's own get_variable_layout does.
        strategy = current_strategy()
        if strategy is None or not isinstance(layout, keras.distribution.TensorLayout):
            return None
        shape = declared if declared is not None else value.shape
        spec = validate_spec(
            layout.axes, shape, strategy.mesh, name=f"Variable {kvar.path!r} (its layout=)"
        )
        spec = strategy.parameter_spec(spec, shape, trainable=kvar.trainable)
    else:
        strategy = current_strategy()
        if strategy is None:
            return None
        shape = declared if declared is not None else value.shape
        layers = _keras.enclosing_layers()
        owner, parents = (layers[-1], layers[:-1]) if layers else (None, [])
        spec = strategy.variable_spec(kvar.path, shape, name=kvar.name, layer=owner, parents=parents)
        # ZeRO-3: a trainable weight is stored split over the data axis too.
        spec = strategy.parameter_spec(spec, shape, trainable=kvar.trainable)
    return strategy._variable_on_mesh(kvar, value, spec)


def _variable_to_numpy(tf_variable):
    if _dtensor.is_dtensor(tf_variable):
        return _dtensor.to_numpy(tf_variable)
    return None


def _layer_created(layer):
    strategy = current_strategy()
    if strategy is None:
        return
    object.__setattr__(layer, "_tfshard_strategy", strategy)
    build = layer.build

    @functools.wraps(build)
    def build_in_scope(*args, **kwargs):
        # Attributes set in __init__ (after __new__, where this runs) are
        # there by build time: keras-hub's RWKV-7 recurrence.
        recurrence.prepare(layer)
        with strategy._ensure_scope():
            return build(*args, **kwargs)

    object.__setattr__(layer, "build", build_in_scope)
    context_parallel.prepare(layer, strategy)  # before recompute: it recomputes the gathers too
    if strategy.recompute is not None:
        recompute.prepare(layer, strategy.recompute)


def _gathered_op(op, inputs, *args, **kwargs):
    """Run a backend op whose DTensor expansion needs whole weights and whole
    feature dimensions (convolutions: "Filter for convolution must have
    fully replicated layout", "Conv input's channel dimension must be
    replicated").

    Sharded weight variables are all-gathered for the op (forward:
    all-gather; backward: the gradient is sliced back to the shard), so
    parameters and optimizer slots stay sharded at rest. The input keeps its
    batch sharding; its other dims are replicated. The output is pinned to
    the layout the expansion produces, so a consumer (a sharded bias) cannot
    push another layout back onto the op.
    """
    strategy = mesh_computation()
    if strategy is None or (tf.executing_eagerly() and not _dtensor.is_dtensor(inputs)):
        return op(inputs, *args, **kwargs)

    def gather(x):
        layout = _keras.variable_layout(x) if isinstance(x, keras.Variable) else None
        if isinstance(layout, VariableLayout) and any(layout.spec):
            return strategy.place(x.value, (None,) * len(layout.spec))
        if isinstance(x, tf.Tensor) and not isinstance(x, keras.KerasTensor) and x.shape.rank:
            if not tf.executing_eagerly() or _dtensor.is_dtensor(x):
                return strategy.place(x, (None,) * x.shape.rank)  # a filter passed as a tensor
        return x

    def features_whole(x):
        return strategy.place(x, (KEEP,) + (None,) * (len(x.shape) - 1))

    inputs = features_whole(inputs)
    out = op(inputs, *(gather(a) for a in args), **{k: gather(v) for k, v in kwargs.items()})
    return features_whole(out)


def _pin_gradients(grads, variables):
    """Gradients laid out as the strategy holds them for the optimizer
    update (:meth:`Strategy.hold_gradients`; only with ZeRO)."""
    strategies = {
        id(layout.strategy): layout.strategy
        for layout in map(_keras.variable_layout, variables)
        if isinstance(layout, VariableLayout)
    }
    for strategy in strategies.values():
        grads = strategy.hold_gradients(grads, variables)
    return grads


def _read_variable(kvar, value):
    """A weight read by an op inside a layer call, laid out as the strategy
    computes with it (:meth:`Strategy.compute_spec`). For a weight split
    over the data axis (FSDP): forward, an all-gather over that axis;
    backward, the gradient (summed over the batch shards, an all-reduce over
    the data axis) is sliced back to the shard. Everywhere else (optimizer
    updates, checkpoints) the weight is read as stored."""
    layout = _keras.variable_layout(kvar)
    if not isinstance(layout, VariableLayout) or _keras.current_call_context() is None:
        return value
    compute = layout.strategy.compute_spec(layout.spec)
    if compute == layout.spec:
        return value
    return layout.strategy.place(value, compute)


def _take(original, x, indices, axis=None):
    """``ops.take(table, ids, axis=0)`` (``keras.layers.Embedding`` and
    keras-hub's ``ReversibleEmbedding`` lookups) on a table whose rows are
    split over a mesh axis.

    Forward: Megatron's masked local lookup (``tfshard.tensors.masked_local_lookup``):
    each device looks the ids up in its own rows, one all-reduce of the
    output over that axis; the table is never gathered over it (a table
    also split over the data axis, FSDP-style, is first all-gathered over
    the data axis only). Backward: what ``tf.gather`` gives plain Keras, the
    upstream rows with their ids as ``tf.IndexedSlices`` (duplicates not
    summed), so optimizers that treat sparse gradients their own way (Keras's
    Adam squares each slice) match the unsharded model exactly.
    """
    layout = _keras.variable_layout(x) if isinstance(x, keras.Variable) else None
    if (
        not isinstance(layout, VariableLayout)
        or axis != 0
        or len(layout.spec) != 2
        or isinstance(indices, (tf.SparseTensor, tf.RaggedTensor))
        or not tf.as_dtype(x.dtype).is_floating  # quantized tables: no gradient, DTensor's gather
    ):
        return original(x, indices, axis=axis)
    strategy = layout.strategy
    compute = strategy.compute_spec(layout.spec)
    split_axis = compute[0]
    if split_axis is None:
        return original(x, indices, axis=axis)
    vocab, dim = (int(d) for d in x.shape)
    size = strategy.mesh.axis_size(split_axis)
    rows = vocab // size
    ids = tf.convert_to_tensor(indices)
    if not ids.dtype.is_integer:
        ids = tf.cast(ids, "int32")
    if tf.executing_eagerly() and not _dtensor.is_dtensor(ids):
        ids = strategy.place(ids, strategy.batch_spec(tuple(ids.shape)))
    elif ids.shape.rank:
        ids = strategy.place(ids, (KEEP,) + (None,) * (ids.shape.rank - 1))
    ids = tf.where(ids < 0, ids + vocab, ids)  # negative ids count from the end
    stored = tf.convert_to_tensor(x.value)  # as stored: no compute relayout

    @tf.custom_gradient
    def lookup(table):
        table = strategy.place(table, compute)  # all-gather over the data axis, if split
        # (V, D) -> (tp, V/tp, D), split on dim 0: one slab per device.
        slabs = strategy.place(tf.reshape(table, (size, rows, dim)), (split_axis, None, None))
        out = masked_local_lookup(strategy, slabs, ids, split_axis, size, rows)

        def grad(upstream):
            return tf.IndexedSlices(
                tf.reshape(upstream, (-1, dim)),
                tf.reshape(ids, (-1,)),
                tf.constant((vocab, dim), dtype=ids.dtype),
            )

        return out, grad

    return lookup(stored)


def _declaration_on_mesh(layer):
    """``(strategy, declaration)`` for a call of ``layer`` that computes on
    a mesh with devices to split over, else None."""
    strategy = layer.__dict__.get("_tfshard_strategy")
    if strategy is None or strategy.mesh.size == 1:
        return None  # nothing to split: the layer's own call, unchanged
    return strategy, strategy.declaration(layer, _keras.enclosing_layers())


def _layer_inputs(layer, args, kwargs):
    """The first input laid out as the layer's style declares."""
    found = _declaration_on_mesh(layer)
    if found is None or found[1] is None or found[1].inputs is None or not args:
        return args, kwargs
    strategy, declaration = found
    first = args[0]
    if isinstance(first, (tf.Tensor, tf.Variable)) and not isinstance(first, keras.KerasTensor):
        if not tf.executing_eagerly() or _dtensor.is_dtensor(first):
            args = (strategy.constrain(first, declaration.inputs),) + tuple(args[1:])
    return args, kwargs


def _layer_output(layer, outputs):
    """A layer's outputs laid out as its style declares, then as the plan's
    ``"<layer path>/output"`` entry says. (Under an active
    ``keras.distribution`` distribution Keras applies its own ``/output``
    layouts through ``distribute_tensor``, which tfshard supplies.)"""
    found = _declaration_on_mesh(layer)
    if found is None:
        strategy = layer.__dict__.get("_tfshard_strategy") or current_strategy()
        declaration = None
    else:
        strategy, declaration = found
    if strategy is None:
        return outputs
    if declaration is not None and declaration.outputs is not None:
        outputs = tree.map_structure(
            lambda y: strategy.constrain(y, declaration.outputs) if _on_mesh_value(y) else y,
            outputs,
        )
    if not strategy.plan.has_outputs() or _keras.keras_distribution() is not None:
        return outputs
    return _constrain_outputs(strategy, _keras.layer_path(layer) + "/output", outputs)


def _on_mesh_value(y):
    if isinstance(y, keras.KerasTensor) or not isinstance(y, tf.Tensor):
        return False
    return not tf.executing_eagerly() or _dtensor.is_dtensor(y)


def _constrain_outputs(strategy, path, outputs):
    """Lay out each tensor in ``outputs`` as the plan's entry for ``path``
    (``"<layer path>/output"``) says (nothing when no entry matches)."""
    if strategy.plan.output_rule(path) is None:
        return outputs

    def one(y):
        if not _on_mesh_value(y):
            return y
        spec = strategy.output_spec(path, tuple(y.shape))
        return y if spec is None else strategy.place(y, spec)

    return tree.map_structure(one, outputs)


def _call_scope(layer):
    # Only the strategy recorded at creation: cheap enough for every call of
    # every layer (plain Keras layers have none).
    strategy = layer.__dict__.get("_tfshard_strategy")
    if strategy is None or _computing_on.get() is strategy:
        return None
    return computing_on(strategy)


def _is_plain_array(x):
    if isinstance(x, np.ndarray):
        return x.ndim > 0
    if isinstance(x, tf.Tensor) and not isinstance(x, tf.RaggedTensor):
        return x.shape.rank not in (None, 0) and not _dtensor.is_dtensor(x)
    return False


def _traced_call(layer, call, args, kwargs):
    """``call(*args, **kwargs)`` run as a traced function, differentiable
    from eager code: DTensor cannot compile the backward function TensorFlow
    derives for an eagerly called function ("missing result layout
    attribute"), so the gradient is a second traced function that runs the
    layer again under a tape (recomputation) and returns the gradients of
    the floating inputs and of the variables the forward read."""
    functions = layer.__dict__.get("_tfshard_traced_call")
    if functions is None:
        def forward(a, k):
            return call(*a, **k)

        def backward(a, k, upstream, variables):
            watched = [x for x in tree.flatten((a, k)) if _is_float_tensor(x)]
            with tf.GradientTape() as tape:
                tape.watch(watched)
                out = call(*a, **k)
            grads = tape.gradient(tree.flatten(out), watched + list(variables), upstream)
            return grads[: len(watched)], grads[len(watched):]

        functions = tuple(
            tf.function(f, reduce_retracing=True, autograph=False) for f in (forward, backward)
        )
        object.__setattr__(layer, "_tfshard_traced_call", functions)
    forward, backward = functions
    flat = tree.flatten((args, kwargs))
    positions = [i for i, x in enumerate(flat) if _is_float_tensor(x)]

    def rebuild(tensors):
        items = list(flat)
        for i, tensor in zip(positions, tensors):
            items[i] = tensor
        return tree.pack_sequence_as((args, kwargs), items)

    @tf.custom_gradient
    def run(*tensors):
        a, k = rebuild(tensors)
        out = forward(a, k)

        def grad(*upstream, variables=None):
            variables = list(variables or [])
            inputs, weights = backward(a, k, list(upstream), variables)
            return list(inputs), list(weights)

        return out, grad

    return run(*(flat[i] for i in positions))


def _is_float_tensor(x):
    return isinstance(x, tf.Tensor) and x.dtype.is_floating


def _entry_call(layer, call, args, kwargs):
    """Outermost eager call of a sharded layer: plain in, plain out.
    ``call(*args, **kwargs)`` runs the layer (with its layouts)."""
    if _keras.current_call_context() is not None or not tf.executing_eagerly():
        return NotImplemented
    strategy = strategy_of_layer(layer)
    if strategy is None:
        return NotImplemented
    flat = tree.flatten((args, kwargs))
    if any(isinstance(x, keras.KerasTensor) for x in flat):
        return NotImplemented
    plain = any(_is_plain_array(x) for x in flat)

    def place(x):
        if _is_plain_array(x):
            return strategy.place(x, strategy.batch_spec(x.shape))
        return x

    args, kwargs = tree.map_structure(place, (args, kwargs))
    # Constants the layer makes (masks) are replicated DTensors on its mesh.
    with strategy._ensure_scope(), _dtensor.default_mesh(strategy.mesh._dtensor_mesh):
        if not layer.built:
            # Build symbolically first, so no variable is created while the
            # call below is being traced.
            def symbolic(x):
                if isinstance(x, tf.Tensor):
                    return keras.KerasTensor(tuple(x.shape), dtype=x.dtype.name)
                return x

            s_args, s_kwargs = tree.map_structure(symbolic, (args, kwargs))
            call(*s_args, **s_kwargs)
        try:
            out = call(*args, **kwargs)
        except tf.errors.UnimplementedError as err:
            if "got a regular tensor" not in str(err):
                raise
            # The layer made a plain non-scalar constant (e.g. a causal mask)
            # that eager DTensor ops reject. Traced, such constants live on
            # the mesh.
            out = _traced_call(layer, call, args, kwargs)
    if not plain:
        return out
    return tree.map_structure(
        lambda y: _dtensor.to_plain(y) if _dtensor.is_dtensor(y) else y, out
    )


def install():
    _keras.hooks.make_variable = _make_variable
    _keras.hooks.to_numpy = _variable_to_numpy
    _keras.hooks.layer_created = _layer_created
    _keras.hooks.entry_call = _entry_call
    _keras.hooks.pin_gradients = _pin_gradients
    _keras.hooks.read_variable = _read_variable
    conv = "convolution: DTensor expands it only with whole weights and whole channels"
    replacements = {
        ("nn", "conv"): (_gathered_op, conv),
        ("nn", "depthwise_conv"): (_gathered_op, conv),
        ("nn", "separable_conv"): (_gathered_op, conv),
        ("nn", "conv_transpose"): (_gathered_op, conv),
        ("numpy", "matmul"): (
            context_parallel.matmul,
            "context parallelism: Dense keeps the sequence split (tensordot's reshape gathers it)",
        ),
        ("numpy", "add"): (
            context_parallel.add,
            "context parallelism: bias adds keep the sequence split (DTensor's BiasAdd gathers it)",
        ),
        ("numpy", "take"): (
            _take, "a table split by rows: a masked local lookup, no gather of the table"
        ),
    }
    for key, (replacement, _) in replacements.items():
        _keras.hooks.backend_ops[key] = replacement
    _keras.hooks.layer_inputs = _layer_inputs
    _keras.hooks.layer_output = _layer_output
    _keras.hooks.call_scope = _call_scope
    _keras.install(_keras.CORE_PATCHES)
    sequence_parallel.install()
    _keras.install(_keras.backend_op_patches({k: purpose for k, (_, purpose) in replacements.items()}))
