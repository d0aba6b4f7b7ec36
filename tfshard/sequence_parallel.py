"""Sequence parallelism (Megatron-SP, Korthikanti et al. 2022) for the
column- and row-parallel ``Dense`` and ``EinsumDense`` layers of a plan.

With ``StrategyBuilder.sequence_parallel()``, a transformer's activations
``[batch, seq, hidden]`` between its tensor-parallel regions (the norms,
dropout and residual adds) are split over the sequence (dimension 1) on the
tensor axis: each of the t devices keeps s/t tokens of them, where without it
every device keeps them all. The regions' edges move the data:

* **column-parallel** (query/key/value, the first feed-forward projections):
  ``y = AG(x) · W`` — the sequence-split input is all-gathered once per
  traced graph (projections that read one tensor share the gather); the
  input gradient ``dx = RS(dy · Wᵀ)``: each device's ``dy · Wᵀ`` is a partial
  sum over its columns, summed and scattered over the sequence in one
  reduce-scatter (Megatron's backward of *g*), where plain tensor
  parallelism all-reduces it.
* **row-parallel** (attention's output, the last feed-forward projection):
  ``y = RS(h · W)`` — the partial sums over the split rows are summed and
  scattered over the sequence in one reduce-scatter, where plain tensor
  parallelism all-reduces them; backward ``dh = AG(dy) · Wᵀ``.

So each all-reduce of a block becomes a reduce-scatter plus an all-gather
(the same bytes on a ring). The bias and the activation follow as in
``Dense.call``/``EinsumDense.call``: a row-parallel bias is added to each
device's tokens, a column-parallel one to its columns.

With ``recompute("selective")`` too, the row-parallel edge of a feed-forward
takes the column-parallel layer's pre-activation ``z`` and recomputes the
activation in its backward pass, so of the two ``d_ff/t``-sized tensors
Megatron keeps per block only ``z`` is kept; the vocabulary-parallel
embedding's tied logits are a column-parallel edge too (the final norm's
output is gathered again in backward, not kept whole).

Both edges are custom gradients with every layout pinned: DTensor's layout
propagation would otherwise push the sequence split into the contraction
(which then all-gathers the weights), it fuses an all-reduce into a
reduce-scatter only when the scatter directly follows it, and it all-reduces
each of query/key/value's input gradients before TensorFlow sums them.
"""

from __future__ import annotations

import re
import weakref

import keras
import tensorflow as tf

from tfshard import _keras, recompute
from tfshard.errors import ShardingError, StrategyError
from tfshard.layout import KEEP
from tfshard.tensors import spec_of

DENSE = "keras.src.layers.core.dense:Dense"
EINSUM_DENSE = "keras.src.layers.core.einsum_dense:EinsumDense"
PURPOSE = ("sequence parallelism: a column-parallel layer all-gathers its sequence-split "
           "input, a row-parallel one reduce-scatters its output over the sequence")

_GATHERED = weakref.WeakKeyDictionary()  # traced graph -> {(input, strategy): gathered input}
_ACTIVATED = weakref.WeakKeyDictionary()  # traced graph -> {activation(z): (activation, z)}


def layer_call(original, layer, inputs, *args, **kwargs):
    """``Dense.call``/``EinsumDense.call`` with the sequence split, for a
    layer whose style declares it; every other call runs ``original``."""
    declaration = _sequence_declaration(layer, inputs)
    if declaration is None:
        return original(layer, inputs, *args, **kwargs)
    strategy, declaration = declaration
    equation = _equation(layer, inputs.shape.rank)
    _check(strategy, layer, inputs, equation)
    kernel_spec = _compute_spec(strategy, layer.kernel)
    kernel = tf.convert_to_tensor(keras.ops.convert_to_tensor(layer.kernel))  # a value, not the variable
    if declaration.sequence == "gather":
        x = column_parallel(strategy, inputs, kernel, kernel_spec, equation, declaration.outputs)
    else:
        x = row_parallel(strategy, inputs, kernel, kernel_spec, equation, declaration.inputs)
    if layer.bias is not None:
        x = keras.ops.add(x, layer.bias)
    if layer.activation is not None:
        z, x = x, layer.activation(x)
        activation = recompute.recomputed_activation(layer)
        if activation is not None and declaration.sequence == "gather" and not tf.executing_eagerly():
            _ACTIVATED.setdefault(x.graph, {})[x.ref()] = (activation, z)
    return x


def check(enabled, tensor_axis, context_axis):
    """``StrategyBuilder.build``'s check of ``sequence_parallel()``."""
    if not enabled:
        return
    if tensor_axis is None:
        raise StrategyError(
            "sequence_parallel(): it splits the sequence over the tensor axis, and the "
            "strategy has none; call tensor_parallel(axis) too, or drop sequence_parallel()."
        )
    if context_axis is not None:
        raise StrategyError(
            f"sequence_parallel() with context_parallel({context_axis!r}): both split "
            "dimension 1 (the sequence), over different axes; use one of them."
        )


def _sequence_declaration(layer, inputs):
    strategy = layer.__dict__.get("_tfshard_strategy")
    if strategy is None or not strategy.sequence_parallel or strategy.mesh.size == 1:
        return None
    if isinstance(inputs, keras.KerasTensor) or not isinstance(inputs, tf.Tensor):
        return None
    declaration = strategy.declaration(layer, _keras.enclosing_layers())
    if declaration is None or declaration.sequence is None:
        return None
    return strategy, declaration


def sequence_spec(strategy, rank):
    """Dimension 1 (the sequence) split over the tensor axis, the batch
    keeping its split."""
    return (KEEP, strategy.tensor_axis) + (None,) * (rank - 2)


def _whole_spec(rank):
    return (KEEP,) + (None,) * (rank - 1)


def _reduce_scatter(strategy, partial, rank):
    """Partial sums summed (laid out whole), then split over the sequence:
    DTensor fuses the adjacent pair into one reduce-scatter."""
    return strategy.place(strategy.place(partial, _whole_spec(rank)), sequence_spec(strategy, rank))


def gathered(strategy, x, purpose="forward"):
    """``x`` all-gathered over the sequence, once per traced graph and
    ``purpose``: the layers that read one tensor (query, key and value)
    share the gather. No gradient flows through it: :func:`column_parallel`
    gives ``x`` its gradient directly. The backward pass gathers again
    (``purpose="backward"``) rather than keep the whole tensor from the
    forward pass, as Megatron-LM does: only ``x``'s tokens are kept."""
    if tf.executing_eagerly():
        return tf.stop_gradient(strategy.place(x, _whole_spec(x.shape.rank)))
    cache = _GATHERED.setdefault(x.graph, {})
    key = (x.ref(), id(strategy), purpose)
    if key not in cache:
        source = x if purpose == "forward" else tf.identity(x)
        cache[key] = tf.stop_gradient(strategy.place(source, _whole_spec(x.shape.rank)))
    return cache[key]


def column_parallel(strategy, x, kernel, kernel_spec, equation, output_axes):
    """``einsum(equation, AG(x), kernel)``; backward ``dx = RS(...)``.
    ``kernel_spec``: the kernel's layout as the layer computes with it."""
    inputs, kernel_letters, output = _parts(equation)
    whole = gathered(strategy, x)
    rank = x.shape.rank

    @tf.custom_gradient
    def forward(x, kernel):
        y = strategy.constrain(tf.einsum(equation, whole, kernel), output_axes)

        def grad(dy):
            dy = strategy.constrain(dy, output_axes)
            dx = tf.einsum(f"{output},{kernel_letters}->{inputs}", dy, kernel)
            # Partial sums over this device's columns: summed, then each
            # device keeps its tokens (DTensor fuses the pair into one
            # reduce-scatter).
            dx = _reduce_scatter(strategy, dx, rank)
            with tf.control_dependencies([dy]):  # gathered again here, not kept from forward
                again = gathered(strategy, x, "backward")
            dk = tf.einsum(f"{inputs},{output}->{kernel_letters}", again, dy)
            return dx, _pinned(strategy, dk, kernel_spec)

        return y, grad

    return forward(x, kernel)


def row_parallel(strategy, h, kernel, kernel_spec, equation, input_axes):
    """``RS(einsum(equation, h, kernel))``; backward ``dh = AG(dy)·Wᵀ``.

    When ``h = activation(z)`` is the output of a column-parallel layer whose
    activation selective recomputation recomputes, the edge takes ``z``
    instead and recomputes ``h`` in its backward pass (for ``dW = hᵀ·dy``
    and ``dz = dh·activation'(z)``): the step keeps ``z`` alone of the
    feed-forward's two ``d_ff``-sized tensors."""
    inputs, kernel_letters, output = _parts(equation)
    rank = len(output)
    activation, source = _activation_source(h)

    @tf.custom_gradient
    def forward(source, kernel):
        h = source if activation is None else strategy.constrain(activation(source), input_axes)
        # Partial sums over this device's rows: summed and scattered over
        # the sequence (one reduce-scatter).
        y = _reduce_scatter(strategy, tf.einsum(equation, h, kernel), rank)

        def grad(dy):
            dy = strategy.place(dy, _whole_spec(rank))  # all-gather over the sequence
            dh = strategy.constrain(tf.einsum(f"{output},{kernel_letters}->{inputs}", dy, kernel),
                                    input_axes)
            if activation is None:
                dk = tf.einsum(f"{inputs},{output}->{kernel_letters}", h, dy)
                return dh, _pinned(strategy, dk, kernel_spec)
            with tf.GradientTape() as tape:
                with tf.control_dependencies([dy]):  # run again here, not kept from forward
                    again = tf.identity(source)
                tape.watch(again)
                h_again = activation(again)
            dk = tf.einsum(f"{inputs},{output}->{kernel_letters}", h_again, dy)
            return tape.gradient(h_again, again, output_gradients=dh), _pinned(strategy, dk, kernel_spec)

        return y, grad

    return forward(source, kernel)


def _activation_source(h):
    """``(activation, z)`` when ``h`` is (a relayout of) a recomputed
    activation's output ``activation(z)`` registered by :func:`layer_call`,
    else ``(None, h)``."""
    if tf.executing_eagerly():
        return None, h
    registered = _ACTIVATED.get(h.graph, {})
    tensor = h
    while tensor.ref() not in registered and tensor.op.type in ("Relayout", "Identity"):
        tensor = tensor.op.inputs[0]
    return registered.get(tensor.ref(), (None, h))


def tied_logits(strategy, hidden, table, table_variable, equation, output_axes):
    """A vocabulary-split table's tied logits ``einsum(equation, AG(hidden),
    table)`` from sequence-split ``hidden``: a column-parallel edge, so the
    backward pass gathers ``hidden`` again instead of keeping it whole, and
    its gradient (partial sums over the vocabulary shards) is
    reduce-scattered over the sequence."""
    return column_parallel(strategy, hidden, table, _compute_spec(strategy, table_variable), equation,
                           output_axes)


def _compute_spec(strategy, weight):
    """The layout a layer computes with for ``weight`` (None for a tensor,
    e.g. a LoRA kernel, which has no stored layout)."""
    stored = spec_of(weight)
    return None if stored is None else strategy.compute_spec(stored)


def _pinned(strategy, dk, spec):
    return dk if spec is None else strategy.place(dk, spec)


def _equation(layer, rank):
    """The layer's contraction as an explicit einsum equation."""
    if isinstance(layer, keras.layers.EinsumDense):
        equation = layer.equation.replace(" ", "")
        if "..." in equation:
            inputs, rest = equation.split(",")
            fill = "".join(c for c in "ABCDEFGHIJ" if c not in equation)[: rank - len(inputs) + 3]
            equation = equation.replace("...", fill)
        return equation
    letters = "abcdefgh"[: rank - 1]
    return f"{letters}y,yz->{letters}z"


def _parts(equation):
    match = re.fullmatch(r"(\w+),(\w+)->(\w+)", equation)
    return match.groups()


def _check(strategy, layer, inputs, equation):
    where = f"layer {_keras.layer_path(layer)!r} ({type(layer).__name__})"
    if getattr(layer, "quantization_mode", None):
        raise ShardingError(
            f"Sequence parallelism: {where} is quantized ({layer.quantization_mode}); "
            "tfshard splits the sequence only for float kernels. Build the strategy "
            "without .sequence_parallel() or leave this layer out of the plan."
        )
    rank = inputs.shape.rank
    inputs_letters, kernel_letters, output = _parts(equation)
    if rank is None or rank < 3 or inputs_letters[0] != output[0] or inputs_letters[1] != output[1]:
        raise ShardingError(
            f"Sequence parallelism: {where} maps {equation!r} on an input of shape "
            f"{tuple(inputs.shape)}; it needs [batch, sequence, ...] in and out. Leave "
            "this layer out of the plan's column/row-parallel entries."
        )
    size = strategy.tensor_parallel_size
    if inputs.shape[1] is not None and inputs.shape[1] % size:
        raise ShardingError(
            f"Sequence parallelism: {where} gets a sequence of {inputs.shape[1]} tokens, "
            f"which tensor axis {strategy.tensor_axis!r} (size {size}) does not divide. "
            f"Pad the sequence to a multiple of {size}."
        )


def install():
    """Route ``Dense.call`` and ``EinsumDense.call`` through :func:`layer_call`."""
    for owner in (DENSE, EINSUM_DENSE):
        _keras.hooks.backend_ops[(owner, "call")] = layer_call
    _keras.install(_keras.layer_method_patches({(DENSE, "call"): PURPOSE,
                                                (EINSUM_DENSE, "call"): PURPOSE}))
