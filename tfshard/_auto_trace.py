"""What :func:`tfshard.auto_plan` reads a model from: an abstract build and
a record of which layer calls feed which.

* :func:`build_abstract` creates the model without materialising its
  weights (``keras.StatelessScope(initialize_variables=False)``: variables
  get their shapes, never their values; one made from a value, such as an
  optimizer's iteration count when a keras-hub task compiles in its
  constructor, keeps the value as its initializer).
* :func:`trace_calls` traces one call of the model into a single TensorFlow
  graph (a ``tf.function`` trace, so nothing runs) while every layer's
  ``call`` is wrapped to record its input and output tensors. Functional
  models (keras-hub's backbones and tasks) and subclassed ones are traced
  alike: the calls of their sublayers happen inside the one graph. A
  layer that contracts a projection's kernel itself (``ops.matmul(x,
  dense.kernel)``) is recorded as a call of that projection.
* :meth:`Trace.producers` walks the graph backwards from a call's input to
  the layer calls that produced it, and says whether the way between them
  is elementwise only (activations, products, sums, casts, dropout), which
  is what keeps a tensor-parallel split of the last dimension local.
"""

from __future__ import annotations

import dataclasses
import functools

import keras
import numpy as np
import tensorflow as tf
from keras import tree

from tfshard import _keras
from tfshard.errors import StrategyError

# TensorFlow ops through which a split of the last dimension stays local.
ELEMENTWISE_OPS = frozenset(
    """Identity IdentityN Cast Mul AddV2 Add Sub RealDiv Div DivNoNan Neg Relu Relu6 Elu Selu
    LeakyRelu Sigmoid Tanh Erf Erfc Exp Expm1 Log Log1p Softplus Softsign Pow Square Sqrt Rsqrt
    Maximum Minimum SelectV2 Select Abs Sign Floor Ceil Round StopGradient PreventGradient
    GreaterEqual Greater Less LessEqual Equal NotEqual LogicalAnd LogicalOr LogicalNot
    BiasAdd ClipByValue Reciprocal Inv SquaredDifference Gelu""".split()
)
# Ops that read only a tensor's shape: not a data dependency.
_SHAPE_OPS = frozenset({"Shape", "ShapeN", "Size", "Rank"})
# Where a walk backwards ends without reaching a layer call.
_SOURCE_OPS = frozenset({"Placeholder", "Const", "ReadVariableOp", "VarHandleOp"})


@dataclasses.dataclass(eq=False)
class Call:
    """One call of one layer during the trace."""

    index: int
    layer: object
    parent: "Call | None"
    inputs: list
    outputs: list = dataclasses.field(default_factory=list)
    options: dict = dataclasses.field(default_factory=dict)  # non-tensor arguments
    children: list = dataclasses.field(default_factory=list)

    @property
    def path(self):
        return layer_path(self.layer)

    def ancestors(self):
        call, out = self.parent, []
        while call is not None:
            out.append(call)
            call = call.parent
        return out

    def __repr__(self):
        return f"Call({self.index}, {self.path!r})"


def layer_path(layer):
    return getattr(layer, "path", None) or layer.name


def all_layers(model):
    """``model`` and every layer under it, parents first, each once."""
    seen, out = set(), []

    def visit(layer):
        if id(layer) in seen:
            return
        seen.add(id(layer))
        out.append(layer)
        for child in _keras.sublayers(layer):
            visit(child)

    visit(model)
    return out


# ------------------------------------------------------------------ build
def build_abstract(build_model):
    """``(model, note)``: the model ``build_model`` (a zero-argument callable,
    or a model) makes, built without weights when Keras allows it. ``note``
    says how it was built when that is not abstractly."""
    if isinstance(build_model, keras.layers.Layer):
        return build_model, None
    if not callable(build_model):
        raise StrategyError(
            f"auto_plan(build_model, ...): build_model is {type(build_model).__name__}; pass a "
            "zero-argument function that builds the model (e.g. lambda: "
            "keras_hub.models.LlamaCausalLM(...)) or a built Keras model."
        )
    try:
        # Variables made from a value (an optimizer's iteration count and
        # learning rate: keras-hub tasks compile in their constructor) keep
        # the value as their initializer.
        with _keras.values_as_initializers(), keras.StatelessScope(initialize_variables=False):
            model = build_model()
        note = None
    except ValueError as err:
        if "stateless scope" not in str(err):
            raise
        # Something else Keras refuses in a stateless scope: build with
        # weights instead, and say so.
        model = build_model()
        note = (
            "built with its weights (Keras cannot build it abstractly: "
            + str(err).splitlines()[0].rstrip(". ")
            + "); pass a function that builds the backbone alone to avoid it"
        )
    if not isinstance(model, keras.layers.Layer):
        raise StrategyError(
            f"auto_plan: build_model() returned {type(model).__name__}, not a Keras model or layer."
        )
    return model, note


# ------------------------------------------------------------------ trace
def input_specs(model, inputs=None):
    """The structure of ``tf.TensorSpec`` one call of ``model`` takes:
    from ``inputs`` (shapes, arrays, KerasTensors or specs, in the model's
    input structure) or else the model's own symbolic inputs."""
    if inputs is None:
        try:
            inputs = model.input
        except (AttributeError, ValueError):
            inputs = None
        if inputs is None:
            raise StrategyError(
                f"auto_plan: model {model.name!r} has no symbolic inputs (a subclassed model); "
                "pass inputs= with the shape of one batch, e.g. inputs=(8, 128) or "
                "inputs={'token_ids': (8, 128)}."
            )

    def spec(x):
        if isinstance(x, tf.TensorSpec):
            return x
        if isinstance(x, keras.KerasTensor):
            return tf.TensorSpec((None,) + tuple(x.shape[1:]), x.dtype)
        if isinstance(x, (np.ndarray, tf.Tensor)) or hasattr(x, "dtype"):
            dtype = x.dtype if str(x.dtype) != "float64" else "float32"
            return tf.TensorSpec((None,) + tuple(np.shape(x)[1:]), dtype)
        raise StrategyError(f"auto_plan(inputs=...): cannot read a tensor shape from {x!r}.")

    def is_shape(x):
        return isinstance(x, tuple) and all(d is None or isinstance(d, int) for d in x)

    def shape_spec(x):
        return tf.TensorSpec((None,) + tuple(x[1:]), "float32") if is_shape(x) else x

    if is_shape(inputs):
        return tf.TensorSpec((None,) + tuple(inputs[1:]), _first_input_dtype(model))
    inputs = tree.traverse(lambda x: shape_spec(x) if is_shape(x) else None, inputs, top_down=True)
    return tree.map_structure(spec, inputs)


def _first_input_dtype(model):
    try:
        first = tree.flatten(model.input)[0]
        return first.dtype
    except (AttributeError, ValueError, IndexError):
        return "float32"


class Trace:
    """Every layer call of one traced model call, in call order."""

    def __init__(self, model, calls, graph):
        self.model, self.calls, self.graph = model, calls, graph
        self._owner = {}
        for call in calls:  # inner calls end first: the innermost call owns a tensor
            if not any(len(w.shape) >= 2 for w in call.layer.weights):
                continue  # layers without matrices (dropout, softmax, rotary, norms) are ops like any other
            for tensor in call.outputs:
                self._owner.setdefault(_key(tensor), call)
        self.by_layer = {}
        for call in calls:
            self.by_layer.setdefault(id(call.layer), []).append(call)

    def calls_of(self, layer):
        return self.by_layer.get(id(layer), [])

    def producers(self, tensor, *, consumer=None, elementwise_only=False):
        """``{call: elementwise}``: the nearest calls of layers with weight matrices whose outputs
        ``tensor`` is computed from; ``elementwise`` is True when some way
        from that call to ``tensor`` passes only elementwise ops. Calls that
        enclose ``consumer`` do not count as producers (their inputs are not
        their outputs). With ``elementwise_only`` the walk stops at any other
        op."""
        skip = set(consumer.ancestors()) if consumer is not None else set()
        found = {}
        stack = [(tensor, True)]
        seen = set()
        while stack:
            t, clean = stack.pop()
            key = (_key(t), clean)
            if key in seen:
                continue
            seen.add(key)
            owner = self._owner.get(_key(t))
            if owner is not None and owner is not consumer and owner not in skip:
                found[owner] = found.get(owner, False) or clean
                continue
            op = t.op
            if op.type in _SOURCE_OPS or op.type in _SHAPE_OPS:
                continue
            elementwise = op.type in ELEMENTWISE_OPS
            if elementwise_only and not elementwise:
                continue
            for source in op.inputs:
                if source.dtype == tf.resource:
                    continue
                stack.append((source, clean and elementwise))
        return found


def _key(tensor):
    return (id(tensor.graph), tensor.name)


def _recording_call(layer, original, calls, stack):
    @functools.wraps(original)
    def call(*args, **kwargs):
        flat = tree.flatten((args, kwargs))
        record = Call(
            index=len(calls),
            layer=layer,
            parent=stack[-1] if stack else None,
            inputs=[x for x in flat if tf.is_tensor(x) and not isinstance(x, tf.SparseTensor)],
            options={k: v for k, v in kwargs.items() if isinstance(v, (bool, int, float, str))},
        )
        calls.append(record)
        if record.parent is not None:
            record.parent.children.append(record)
        stack.append(record)
        try:
            out = original(*args, **kwargs)
        finally:
            stack.pop()
        record.outputs = [x for x in tree.flatten(out) if tf.is_tensor(x) and hasattr(x, "graph")]
        return out

    return call


def trace_calls(model, inputs=None):
    """Trace one call of ``model`` (no weights needed) into a :class:`Trace`."""
    specs = input_specs(model, inputs)
    calls, stack, wrapped = [], [], []
    layers = all_layers(model)
    for layer in layers:
        previous = layer.__dict__.get("call", _MISSING)
        object.__setattr__(layer, "call", _recording_call(layer, layer.call, calls, stack))
        wrapped.append((layer, previous))
    recorders = _direct_kernel_recorders(layers, calls, stack)
    earlier = {key: _keras.hooks.backend_ops.get(key) for key in recorders}
    for key, recorder in recorders.items():
        _keras.hooks.backend_ops[key] = _keras.chained(recorder, earlier[key])
    try:
        with keras.StatelessScope(initialize_variables=False):
            function = tf.function(lambda x: model(x, training=False), autograph=False)
            graph = function.get_concrete_function(specs).graph
    finally:
        for key, previous in earlier.items():
            if previous is None:
                _keras.hooks.backend_ops.pop(key, None)
            else:
                _keras.hooks.backend_ops[key] = previous
        for layer, previous in wrapped:
            if previous is _MISSING:
                layer.__dict__.pop("call", None)
            else:
                object.__setattr__(layer, "call", previous)
    return Trace(model, calls, graph)


# ------------------------------------------------- kernels used directly
# Some layers read a projection's kernel in their own code instead of calling
# the projection (keras-hub's Gemma4 decoder: ``ops.matmul(x,
# self.gating_ffw.kernel)``). While tracing, the Keras contractions record
# such a use as a call of the projection, from the other operand to the
# result, when it contracts the kernel's dims that the projection's own
# equation contracts (the same linear map, so the same split applies).
def _direct_kernel_recorders(layers, calls, stack):
    kernels = {}
    for layer in layers:
        kernel = getattr(layer, "kernel", None) if isinstance(
            layer, (keras.layers.Dense, keras.layers.EinsumDense)) else None
        if isinstance(kernel, keras.Variable):
            kernels[id(kernel)] = (layer, _contracted_kernel_dims(layer))

    def record(name, x, kernel, contracted, out):
        found = kernels.get(id(kernel))
        if found is None or sorted(contracted or []) != found[1] or not tf.is_tensor(out):
            return
        layer = found[0]
        if any(call.layer is layer for call in stack):
            return  # the projection's own call
        record = Call(index=len(calls), layer=layer, parent=stack[-1] if stack else None,
                      inputs=[x] if tf.is_tensor(x) else [], outputs=[out], options={"direct": name})
        calls.append(record)
        if record.parent is not None:
            record.parent.children.append(record)

    def matmul(original, x1, x2):
        out = original(x1, x2)
        rank = len(getattr(x2, "shape", ()))
        record("matmul", x1, x2, [0] if rank == 2 else None, out)
        return out

    def tensordot(original, x1, x2, axes=2):
        out = original(x1, x2, axes=axes)
        if isinstance(axes, int):
            contracted = list(range(axes))
        elif isinstance(axes, (list, tuple)) and len(axes) == 2:
            second = axes[1]
            contracted = list(second) if isinstance(second, (list, tuple)) else [second]
            contracted = [int(d) % len(x2.shape) for d in contracted] if hasattr(x2, "shape") else None
        else:
            contracted = None
        record("tensordot", x1, x2, contracted, out)
        return out

    def einsum(original, subscripts, *operands, **kwargs):
        out = original(subscripts, *operands, **kwargs)
        if isinstance(subscripts, str) and len(operands) == 2 and "->" in subscripts and "." not in subscripts:
            inputs, output = subscripts.replace(" ", "").split("->")
            first, second = inputs.split(",")
            record("einsum", operands[0], operands[1],
                   [d for d, c in enumerate(second) if c in first and c not in output], out)
        return out

    return {("numpy", "matmul"): matmul, ("numpy", "tensordot"): tensordot, ("numpy", "einsum"): einsum}


def _contracted_kernel_dims(layer):
    """Kernel dims the projection's own computation sums over."""
    if not isinstance(layer, keras.layers.EinsumDense):
        return [0]
    inputs, rest = layer.equation.split(",")
    kernel, output = rest.split("->")
    return [d for d, c in enumerate(kernel) if c in inputs and c not in output]


_MISSING = object()
