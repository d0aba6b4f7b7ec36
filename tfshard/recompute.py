"""Activation recomputation: keep less for backward, run parts of the
forward pass again during it (``StrategyBuilder.recompute``).

``"full"``
    Megatron's full recomputation: every *block* (a layer that holds other
    layers and whose parent is a model: a transformer block, a keras-hub
    decoder layer) keeps only its inputs; its backward pass runs its forward
    pass again first.
``"selective"``
    Megatron's selective recomputation (Korthikanti et al., 2022): the
    attention core (scores, softmax, dropout, the weighted sum of values) of
    every Keras ``MultiHeadAttention`` / ``GroupQueryAttention`` and every
    keras-hub attention layer (their ``_compute_attention``) is recomputed,
    so the ``a·s²·b`` scores are not kept; the projections' inputs and
    outputs still are. So are, as Megatron-Core's selective
    modules ``layernorm`` and ``moe_act``/``mlp`` do, the cheap elementwise
    parts whose TensorFlow gradients keep more than Megatron counts: every
    ``LayerNormalization`` / ``RMSNormalization`` (which keeps its broadcast
    ``rsqrt(var)·γ`` and per-token statistics; recomputed, it keeps its
    input only) and the activation of a ``Dense`` / ``EinsumDense`` whose
    gradient reads more than its output (erf-GELU keeps three ``d_ff``-sized
    tensors, SiLU two; recomputed, each keeps its input only). What is then
    kept is Megatron's per-layer count exactly, without the scores
    (``tests/test_recompute.py``).

Why not ``keras.RematScope``: on the TensorFlow backend it wraps a layer's
``call`` in ``tf.recompute_grad`` as is, and ``tf.custom_gradient`` refuses
keyword arguments inside a ``tf.function`` ("supports keywords arguments
only when eager execution is enabled"), so every layer called with
``training=...`` fails in a compiled step (pinned by
``tests/test_recompute.py``). tfshard's wrapper passes the floating-point
tensors positionally and binds everything else in a closure.

Gradients are those of the plain step: the recomputation runs the same ops
on the same values. Random ops would not draw the same numbers again, so a
recomputed layer with active dropout is an error.
"""

from __future__ import annotations

import functools

import keras
import tensorflow as tf
from keras import tree

from tfshard import _dtensor, _keras
from tfshard.errors import StrategyError

MODES = ("selective", "full")
ATTENTION_LAYERS = (keras.layers.MultiHeadAttention, keras.layers.GroupQueryAttention)
NORM_LAYERS = (keras.layers.LayerNormalization, keras.layers.RMSNormalization)
PROJECTION_LAYERS = (keras.layers.Dense, keras.layers.EinsumDense)
# Activations whose gradient reads only their output, which the next layer
# keeps anyway as its input: recomputing them would keep their input too.
OUTPUT_GRADIENT_ACTIVATIONS = frozenset({"linear", "relu", "relu6", "sigmoid", "tanh", "softmax"})


def check_mode(mode):
    if mode not in MODES:
        raise StrategyError(
            f"recompute({mode!r}): use 'selective' (recompute each attention core: "
            "its scores are not kept) or 'full' (recompute each block: only its "
            "inputs are kept)."
        )
    return mode


def recomputed(fn, owner):
    """``fn`` whose backward pass runs it again (``tf.recompute_grad``)
    instead of keeping its intermediate tensors; inside a traced function
    only (eager calls run ``fn`` as is). ``owner`` names the layer in
    errors."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if tf.executing_eagerly():
            return fn(*args, **kwargs)
        _check_no_dropout(owner, kwargs)
        flat = tree.flatten((args, kwargs))
        positions = [i for i, x in enumerate(flat) if isinstance(x, tf.Tensor) and x.dtype.is_floating]

        outputs = {}

        def forward(*tensors):
            items = list(flat)
            for i, tensor in zip(positions, tensors):
                items[i] = tensor
            a, k = tree.pack_sequence_as((args, kwargs), items)
            with _dtensor.fresh_variable_reads():  # seen by the recomputation's tape
                out = fn(*a, **k)
            # tf.custom_gradient returns tensors only: None outputs (attention
            # scores nobody asked for) are put back afterwards.
            outputs.setdefault("structure", out)
            return [y for y in tree.flatten(out) if y is not None]

        tensors = tf.recompute_grad(forward)(*(flat[i] for i in positions))
        it = iter(tensors)
        structure = outputs["structure"]
        return tree.pack_sequence_as(
            structure, [None if y is None else next(it) for y in tree.flatten(structure)]
        )

    return run


def _check_no_dropout(layer, kwargs):
    if kwargs.get("training") is False:
        return
    rates, pending = [], [layer]
    while pending:
        sub = pending.pop()
        pending += _keras.sublayers(sub)
        if isinstance(sub, keras.layers.Dropout) and sub.rate:
            rates.append((sub.name, sub.rate))
        elif isinstance(sub, ATTENTION_LAYERS) and getattr(sub, "dropout", 0):
            rates.append((sub.name, sub.dropout))
    if rates:
        raise StrategyError(
            f"recompute: layer {layer.name!r} is recomputed in the backward pass but draws "
            f"random numbers in training (dropout {rates}); the recomputation would draw "
            "other numbers and give other gradients. Set the dropout rate to 0, or build "
            "the model without StrategyBuilder.recompute."
        )


def _is_block(layer):
    """A layer holding other layers, not itself a model, whose parent (the
    layer whose call encloses it) is a model."""
    if isinstance(layer, keras.Model) or not _keras.sublayers(layer):
        return False
    enclosing = _keras.enclosing_layers()
    parents = enclosing[:-1] if enclosing and enclosing[-1] is layer else enclosing
    return bool(parents) and isinstance(parents[-1], keras.Model)


def prepare(layer, mode):
    """Make ``layer`` (just created under a strategy with ``recompute(mode)``)
    recompute what ``mode`` says when it is called in a traced step."""
    if mode == "selective":
        if isinstance(layer, ATTENTION_LAYERS) or _keras.has_attention_core(layer):
            _keras.wrap_attention_core(layer, lambda core: recomputed(core, layer))
        elif isinstance(layer, NORM_LAYERS):
            object.__setattr__(layer, "call", recomputed(layer.call, layer))
        elif isinstance(layer, PROJECTION_LAYERS):
            _recompute_activation(layer)
        return
    call = layer.call
    recomputing = recomputed(call, layer)

    @functools.wraps(call)
    def call_recomputing_blocks(*args, **kwargs):
        if not tf.executing_eagerly() and _is_block(layer):
            return recomputing(*args, **kwargs)
        return call(*args, **kwargs)

    object.__setattr__(layer, "call", call_recomputing_blocks)


def _recompute_activation(layer):
    """Make ``layer``'s activation (read when it is called: it is set after
    the layer is created) recompute in the backward pass, keeping its input
    only, unless its gradient reads nothing but its output."""
    call = layer.call

    @functools.wraps(call)
    def call_recomputing_activation(*args, **kwargs):
        activation = layer.activation
        name = getattr(activation, "__name__", "linear")
        if tf.executing_eagerly() or activation is None or name in OUTPUT_GRADIENT_ACTIVATIONS:
            return call(*args, **kwargs)
        object.__setattr__(layer, "activation", recomputed(activation, layer))
        object.__setattr__(layer, "_tfshard_recomputed_activation", activation)
        try:
            return call(*args, **kwargs)
        finally:
            object.__setattr__(layer, "activation", activation)
            object.__setattr__(layer, "_tfshard_recomputed_activation", None)

    object.__setattr__(layer, "call", call_recomputing_activation)


def recomputed_activation(layer):
    """The activation ``layer`` is recomputing in the call running now (see
    :func:`_recompute_activation`), or None."""
    return getattr(layer, "_tfshard_recomputed_activation", None)
