"""GShard's routing in plain Keras ops: each expert's capacity, top-k
gating (combine and dispatch tensors, the load-balancing loss) and the
unsharded mixture of experts that :class:`tfshard.layers.ExpertParallelMoE`
equals on one device. Re-exported by :mod:`tfshard.layers.moe`, whose
docstring explains the sharded layer and its collectives.
"""

from __future__ import annotations

import math

import keras
from keras import ops

from tfshard.errors import TfshardError

_GATE_EPSILON = 1e-9  # GShard's guard of the top-k renormalization


def expert_capacity(group_size, num_experts, top_k, capacity_factor):
    """Tokens each expert takes per group: ``ceil(k * factor * S / E)``,
    at least 1 and at most ``S`` (an expert sees a token at most once)."""
    wanted = math.ceil(top_k * capacity_factor * group_size / num_experts)
    return int(max(1, min(group_size, wanted)))


def top_k_gating(logits, top_k, capacity):
    """GShard's top-k gating with capacity.

    Args:
        logits: router logits ``(..., S, E)``; gating runs in float32.
        top_k: experts per token.
        capacity: buffer slots per expert and group (``C``).

    Returns ``(combine, dispatch, aux_loss)``: ``combine`` and ``dispatch``
    are ``(..., S, E, C)`` float32 (see the module docstring), ``aux_loss``
    the load-balancing loss (a scalar, averaged over the leading dims).
    """
    num_experts = int(logits.shape[-1])
    gates = ops.softmax(ops.cast(logits, "float32"), axis=-1)

    # Load balance, from the first choices before any token is dropped.
    first = ops.one_hot(ops.argmax(gates, axis=-1), num_experts, dtype="float32")
    density = ops.mean(first, axis=-2)
    density_proxy = ops.mean(gates, axis=-2)
    aux_loss = ops.mean(density * density_proxy) * float(num_experts * num_experts)

    remaining = gates
    filled = None  # (..., E): slots taken in each expert by earlier choices
    choices = []
    for k in range(top_k):
        choice = first if k == 0 else ops.one_hot(
            ops.argmax(remaining, axis=-1), num_experts, dtype="float32"
        )
        gate = ops.sum(gates * choice, axis=-1)  # (..., S)
        remaining = remaining * (1.0 - choice)
        # Place in the expert's buffer: tokens before this one in the group
        # (exclusive cumsum) plus the slots earlier choices took.
        position = ops.cumsum(choice, axis=-2) - choice
        if filled is not None:
            position = position + ops.expand_dims(filled, -2)
        kept = choice * ops.cast(ops.less(position, float(capacity)), "float32")
        taken = ops.sum(kept, axis=-2)
        filled = taken if filled is None else filled + taken
        slot = ops.cast(ops.sum(position * kept, axis=-1), "int32")  # (..., S)
        choices.append((gate, kept, slot))

    if top_k > 1:
        total = sum(gate for gate, _, _ in choices) + _GATE_EPSILON
        choices = [(gate / total, kept, slot) for gate, kept, slot in choices]

    combine = dispatch = None
    for gate, kept, slot in choices:
        # (..., S, E, C): 1 at (expert, slot) of a routed token, else 0.
        placed = ops.expand_dims(kept, -1) * ops.expand_dims(
            ops.one_hot(slot, capacity, dtype="float32"), -2
        )
        weighted = placed * ops.expand_dims(ops.expand_dims(gate, -1), -1)
        dispatch = placed if dispatch is None else dispatch + placed
        combine = weighted if combine is None else combine + weighted
    return combine, dispatch, aux_loss


def token_shape(shape, group_size, who="reference_moe"):
    """``(T, S, groups per example)`` of an input of ``shape`` ``(B, ..., M)``."""
    if len(shape) < 2:
        raise TfshardError(
            f"{who}: the input must be (batch, ..., features); got shape "
            f"{tuple(shape)}."
        )
    middle = tuple(shape[1:-1])
    if any(d is None for d in middle) or shape[-1] is None:
        raise TfshardError(
            f"{who}: every dimension but the batch must be known to form "
            f"routing groups; got shape {tuple(shape)}."
        )
    tokens = int(math.prod(middle)) if middle else 1
    size = tokens if group_size is None else int(group_size)
    if tokens % size:
        fits = [n for n in range(1, tokens + 1) if tokens % n == 0]
        raise TfshardError(
            f"{who}: group_size={group_size} does not divide the {tokens} "
            f"tokens of each example (input shape {tuple(shape)}); groups are "
            f"cut within an example. Use one of {fits}."
        )
    return tokens, size, tokens // size


def reference_moe(
    x,
    router_kernel,
    expert_in_kernel,
    expert_out_kernel,
    *,
    top_k=2,
    capacity_factor=1.25,
    group_size=None,
    activation="relu",
):
    """The unsharded mixture of experts in plain Keras ops.

    Args:
        x: tokens ``(batch, ..., M)``.
        router_kernel: ``(M, E)``.
        expert_in_kernel: ``(E, M, d_ff)``; expert_out_kernel: ``(E, d_ff, M)``.
        top_k, capacity_factor: see :func:`top_k_gating`, :func:`expert_capacity`.
        group_size: tokens per routing group, cut within each example
            (default: all of an example's tokens).
        activation: the experts' hidden activation.

    Returns ``(y, aux_loss)``: ``y`` like ``x``; ``aux_loss`` the unweighted
    load-balancing loss.
    """
    x = ops.convert_to_tensor(x)
    num_experts = int(router_kernel.shape[-1])
    _, size, _ = token_shape(tuple(x.shape), group_size)
    capacity = expert_capacity(size, num_experts, top_k, capacity_factor)
    act = keras.activations.get(activation)
    model_dim = int(x.shape[-1])

    groups = ops.reshape(x, (-1, size, model_dim))  # (G, S, M)
    logits = ops.einsum("gsm,me->gse", groups, ops.cast(router_kernel, x.dtype))
    combine, dispatch, aux_loss = top_k_gating(logits, top_k, capacity)
    dispatch = ops.cast(dispatch, x.dtype)
    expert_inputs = ops.einsum("gsec,gsm->egcm", dispatch, groups)
    hidden = act(ops.einsum("egcm,emh->egch", expert_inputs, ops.cast(expert_in_kernel, x.dtype)))
    expert_outputs = ops.einsum("egch,ehm->egcm", hidden, ops.cast(expert_out_kernel, x.dtype))
    y = ops.einsum("gsec,egcm->gsm", ops.cast(combine, x.dtype), expert_outputs)
    return ops.reshape(y, ops.shape(x)), aux_loss
