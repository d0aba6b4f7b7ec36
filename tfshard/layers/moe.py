"""GShard-style mixture of experts, with the experts split over a mesh axis.

The math (GShard, Lepikhin et al. 2020, Algorithms 1 and 2), per group of
``S`` tokens ``x (S, M)``, ``E`` experts of capacity ``C`` each:

* gates: ``softmax(x @ router)`` ``(S, E)``;
* top-k gating: each token picks its ``k`` best experts in turn. Its place in
  an expert's buffer is the number of tokens of the group routed there before
  it: all first choices (in token order) come before all second choices. A
  token whose place is ``>= C`` is dropped for that expert (it overflows);
  a token dropped by all its experts contributes zero (the residual
  connection around the layer carries it). With ``k > 1`` the ``k`` gate
  values are renormalized to sum to 1 before dropping (GShard); ``k = 1``
  keeps the raw softmax probability (Switch Transformer). Routing is
  deterministic: GShard's random dispatch of second choices is left out.
* ``dispatch (S, E, C)`` is 1 where a token sits in a buffer slot;
  ``combine (S, E, C)`` is the same with the gate value.
* ``expert_inputs (E, C, M) = einsum("sec,sm->ecm", dispatch, x)``; each
  expert's FFN ``act(in @ Wi[e]) @ Wo[e]``; the output
  ``y (S, M) = einsum("sec,ecm->sm", combine, expert_outputs)``.
* the auxiliary load-balancing loss
  ``mean_e(fraction of tokens whose first choice is e * mean gate of e) * E^2``
  (1.0 when perfectly balanced), averaged over groups and added to the model
  loss with ``add_loss`` (times ``aux_loss_weight``).

:func:`reference_moe` is that math in plain Keras ops. Groups are formed
within each example: its token positions (all dims between the batch and the
feature dim) are cut into consecutive groups of ``group_size`` tokens, so the
routing depends on the layer's hyperparameters only, never on the mesh.

On a mesh (``ExpertParallelMoE`` in ``strategy.scope()``) the expert weights
``(E, M, d_ff)`` / ``(E, d_ff, M)`` are split over the mesh axis the logical
dimension ``experts`` maps to (the *expert axis*), and ``d_ff`` over the axis
``d_ff`` maps to when that is another axis (tensor parallelism inside each
expert). Activations are ``(batch, groups, S, M)``; the dispatched tokens are
``(E, batch, groups, C, M)``:

1. The group dim is split over the expert axis (when the batch is not
   already: experts on the data axis). Tokens arrive whole on that axis, so
   this is a local slice: each device gates only its own groups.
2. Dispatch: ``einsum("bgsec,bgsm->ebgcm")`` runs locally on each device's
   groups, then a relayout moves the split from the token side (batch or
   group dim) to the expert dim: one **all-to-all** over the expert axis.
   Each device now holds, for its own experts, the tokens of every group.
3. The experts' FFN runs locally; with ``d_ff`` split too, the second matmul
   contracts it: one all-reduce over that axis (Megatron's row-parallel sum).
4. Combine: the inverse relayout (``relayout_like`` the dispatched tokens):
   the second **all-to-all**; then ``einsum("bgsec,ebgcm->bgsm")`` locally.
5. Experts on the data axis: done, the output is split by batch like the
   input. Experts on another axis (the tensor axis): the output groups are
   all-gathered over it, so the layer returns tokens whole on that axis as
   its Megatron neighbours expect (Megatron-core's all-to-all dispatcher does
   the same). This gathers the ``(batch/dp, T, M)`` *output*; the tokens are
   never gathered to reach the experts.

Backward mirrors it: two all-to-alls, the all-reduce of the expert input
gradient over the ``d_ff`` axis, and (experts off the data axis) the
all-gather of the input gradient in place of the forward's free slice.

A training step adds the weight-gradient sums every data-parallel layer
has: the router's over the axes that split the tokens, the expert kernels'
over the data axis only when the experts are not on it (on it, each
expert's tokens are all on its device). Reporting the loss (as ``fit``
does) also all-reduces the load-balancing loss, a scalar mean over the
routing groups, over the axes that split them. DTensor combines the
gradient sums over the same axes into one launch, and the aux-loss means
of all MoE layers into another (see ``tests/test_bench.py`` and
``tfshard.app.estimate.estimate_collectives``).
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops

from tfshard import _dtensor
from tfshard.errors import ShardingError, TfshardError
from tfshard.layers._moe_routing import expert_capacity, reference_moe, token_shape, top_k_gating
from tfshard.layers.base import ShardedLayerMixin
from tfshard.layout import KEEP

__all__ = ["ExpertParallelMoE", "reference_moe", "top_k_gating", "expert_capacity"]

def _default_expert_initializer(num_experts):
    # Glorot-uniform per expert: Keras counts the leading expert dim of an
    # (E, fan_in, fan_out) kernel into both fans, so scale the variance by E.
    return keras.initializers.VarianceScaling(
        scale=float(num_experts), mode="fan_avg", distribution="uniform"
    )


@keras.saving.register_keras_serializable(package="tfshard")
class ExpertParallelMoE(ShardedLayerMixin, keras.layers.Layer):
    """A GShard mixture-of-experts FFN: ``(batch, ..., M) -> (batch, ..., M)``.

    Each of ``num_experts`` experts is ``act(x @ Wi) @ Wo`` with hidden size
    ``d_ff``; a learned router sends each token to its ``top_k`` experts,
    within the capacity of each (tokens beyond it are dropped). The
    load-balancing loss is added with ``add_loss`` (times
    ``aux_loss_weight``). See the module docstring for the math and the
    collectives.

    Weights: ``router_kernel (M, E)`` whole; ``expert_in_kernel (E, M,
    d_ff)`` with logical axes ``("experts", None, "d_ff")`` and
    ``expert_out_kernel (E, d_ff, M)`` with ``("experts", "d_ff", None)``.
    ``tensor_parallel(axis)`` maps ``experts`` to its axis; a rule such as
    ``{"experts": "batch"}`` puts the experts on the data axis instead (then
    ``d_ff`` may take the tensor axis). Within one weight the first logical
    dim that claims a mesh axis wins, so with experts and ``d_ff`` on the
    same axis each expert is whole on one device.

    Args:
        num_experts: ``E``; must be divisible by the expert axis size.
        d_ff: each expert's hidden size.
        top_k: experts per token (GShard: 2, Switch: 1).
        capacity_factor: expert capacity per group is
            ``ceil(top_k * capacity_factor * group_size / num_experts)``.
        group_size: tokens per routing group, cut within each example
            (default: all its tokens). With the experts on an axis other than
            the data axis, the groups per example must divide by its size.
        activation: the experts' hidden activation.
        aux_loss_weight: factor of the load-balancing loss.
        kernel_initializer: of the expert kernels (default: Glorot-uniform
            per expert); router_initializer: of the router.
        logical_dim: the logical name of the expert dimension.

    Outside a strategy the layer computes :func:`reference_moe`.
    """

    def __init__(
        self,
        num_experts,
        d_ff,
        *,
        top_k=2,
        capacity_factor=1.25,
        group_size=None,
        activation="relu",
        aux_loss_weight=1e-2,
        kernel_initializer=None,
        router_initializer="glorot_uniform",
        logical_dim="experts",
        **kwargs,
    ):
        super().__init__(**kwargs)
        for field, value in (("num_experts", num_experts), ("d_ff", d_ff)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TfshardError(
                    f"ExpertParallelMoE: {field}={value!r}; use a positive int."
                )
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
            raise TfshardError(
                f"ExpertParallelMoE: top_k={top_k!r} with num_experts={num_experts}; "
                f"use an int from 1 to {num_experts} (GShard: 2, Switch: 1)."
            )
        if not isinstance(capacity_factor, (int, float)) or not capacity_factor > 0:
            raise TfshardError(
                f"ExpertParallelMoE: capacity_factor={capacity_factor!r}; use a "
                "positive number (1.0 gives each expert an even share of the "
                "group's top_k * group_size routes)."
            )
        if group_size is not None and (
            isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1
        ):
            raise TfshardError(
                f"ExpertParallelMoE: group_size={group_size!r}; use a positive "
                "int that divides the tokens per example, or None (all of them)."
            )
        self.num_experts = num_experts
        self.d_ff = d_ff
        self.top_k = top_k
        self.capacity_factor = float(capacity_factor)
        self.group_size = group_size
        self.activation = keras.activations.get(activation)
        self.aux_loss_weight = float(aux_loss_weight)
        self.kernel_initializer = keras.initializers.get(
            kernel_initializer or _default_expert_initializer(num_experts)
        )
        self.router_initializer = keras.initializers.get(router_initializer)
        self.logical_dim = logical_dim

    def weight_logical_axes(self):
        return {
            "router_kernel": (None, None),
            "expert_in_kernel": (self.logical_dim, None, "d_ff"),
            "expert_out_kernel": (self.logical_dim, "d_ff", None),
        }

    # ------------------------------------------------------------ planning
    def _axes(self):
        """(expert axis, axis that splits groups, d_ff axis) on the mesh."""
        strategy = self.sharding_strategy
        expert_axis = self._mesh_axis(self.logical_dim)
        group_axis = expert_axis if expert_axis != strategy.data_axis else None
        spec = strategy.logical_rules.spec_for(self.weight_logical_axes()["expert_in_kernel"])
        return expert_axis, group_axis, spec[2]

    def _check_mesh(self, groups_per_example):
        strategy = self.sharding_strategy
        if strategy is None:
            return
        name = f"{type(self).__name__} {self.name!r}"
        expert_axis, group_axis, ff_axis = self._axes()
        if expert_axis is not None:
            size = strategy.mesh.axis_size(expert_axis)
            if self.num_experts % size:
                fits = [n for n in range(1, self.num_experts + 1) if self.num_experts % n == 0]
                raise ShardingError(
                    f"{name}: num_experts={self.num_experts} cannot be split "
                    f"evenly over mesh axis {expert_axis!r} of size {size} "
                    f"(logical dimension {self.logical_dim!r}). Use a multiple "
                    f"of {size} experts, a mesh whose {expert_axis!r} axis size "
                    f"divides {self.num_experts} (one of {fits}), or map "
                    f"{self.logical_dim!r} to another axis (or None) in the rules."
                )
        if group_axis is not None:
            size = strategy.mesh.axis_size(group_axis)
            if groups_per_example % size:
                raise ShardingError(
                    f"{name}: {groups_per_example} routing group(s) per example "
                    f"(group_size={self._resolved_group_size}) cannot be split "
                    f"over the expert axis {group_axis!r} of size {size}: with "
                    f"the experts off the data axis, each device routes its "
                    f"share of every example's groups. Use a group_size that "
                    f"gives a multiple of {size} groups per example (e.g. "
                    f"group_size={self._tokens_per_example // size} when that "
                    f"divides), or put the experts on the data axis "
                    f"(rule {{{self.logical_dim!r}: {strategy.data_axis!r}}})."
                )
        if ff_axis is not None and ff_axis == strategy.data_axis:
            raise ShardingError(
                f"{name}: logical dimension 'd_ff' maps to the data axis "
                f"{ff_axis!r}, which splits the tokens inside the experts. "
                f"Map 'd_ff' to another axis or None."
            )

    def build(self, input_shape):
        if self.built:
            return
        tokens, size, groups = token_shape(
            tuple(input_shape), self.group_size, f"{type(self).__name__} {self.name!r}"
        )
        self._tokens_per_example, self._resolved_group_size = tokens, size
        self._groups_per_example = groups
        self.capacity = expert_capacity(size, self.num_experts, self.top_k, self.capacity_factor)
        self._check_mesh(groups)
        model_dim = int(input_shape[-1])
        self.router_kernel = self.add_weight(
            name="router_kernel",
            shape=(model_dim, self.num_experts),
            initializer=self.router_initializer,
        )
        self.expert_in_kernel = self.add_weight(
            name="expert_in_kernel",
            shape=(self.num_experts, model_dim, self.d_ff),
            initializer=self.kernel_initializer,
        )
        self.expert_out_kernel = self.add_weight(
            name="expert_out_kernel",
            shape=(self.num_experts, self.d_ff, model_dim),
            initializer=self.kernel_initializer,
        )
        self.built = True

    # ---------------------------------------------------------------- call
    def unsplit_call(self, inputs):
        """The plain math (:func:`reference_moe`), when nothing is split."""
        y, aux_loss = reference_moe(
            inputs,
            self.router_kernel,
            self.expert_in_kernel,
            self.expert_out_kernel,
            top_k=self.top_k,
            capacity_factor=self.capacity_factor,
            group_size=self._resolved_group_size,
            activation=self.activation,
        )
        self.add_loss(self.aux_loss_weight * aux_loss)
        return y

    def call(self, inputs):
        y, aux_loss = self._sharded_call(inputs)
        self.add_loss(self.aux_loss_weight * aux_loss)
        return y

    def _sharded_call(self, inputs):
        expert_axis, group_axis, ff_axis = self._axes()
        # The batch keeps its split, except where the experts take its axis.
        batch = None if expert_axis is not None and group_axis is None else KEEP
        dtype = self.compute_dtype
        size, groups = self._resolved_group_size, self._groups_per_example
        model_dim = int(inputs.shape[-1])

        place = self.sharding_strategy.place
        x = ops.cast(inputs, dtype)
        if tf.executing_eagerly() and not _dtensor.is_dtensor(x):
            x = self.sharding_strategy.constrain(x, ())  # host value: split the batch
        # (No relayout of a DTensor input here: a second relayout next to the
        # one below makes DTensor's layout propagation reject the gradient
        # ("output layout of Relayout op ... does not match") when the input
        # also feeds a residual branch.)
        # (B, groups, S, M); the groups split over the expert axis: a local
        # slice, since the tokens arrive whole on it.
        tokens = ops.reshape(x, (-1, groups, size, model_dim))
        tokens = place(tokens, (KEEP, group_axis, None, None))

        # Weights are read as stored (``.value``): an expert split over the
        # data axis is expert parallelism, not a weight to gather for a
        # split batch (which tfshard does for other data-axis-split weights).
        router, expert_in, expert_out = (
            ops.cast(w.value, dtype)
            for w in (self.router_kernel, self.expert_in_kernel, self.expert_out_kernel)
        )
        logits = ops.einsum("bgsm,me->bgse", tokens, router)
        logits = place(logits, (KEEP, group_axis, None, None))
        combine, dispatch, aux_loss = top_k_gating(logits, self.top_k, self.capacity)
        dispatch = place(ops.cast(dispatch, dtype), (KEEP, group_axis, None, None, None))
        combine = place(ops.cast(combine, dtype), (KEEP, group_axis, None, None, None))

        # Dispatch: local on each device's groups, then the split moves from
        # the token side to the experts: all-to-all over the expert axis.
        local = ops.einsum("bgsec,bgsm->ebgcm", dispatch, tokens)
        local = place(local, (None, KEEP, group_axis, None, None))
        routed = local
        if expert_axis is not None:
            routed = place(local, (expert_axis, batch, None, None, None))

        # Each device runs its own experts; a split d_ff is contracted by the
        # second einsum: all-reduce over ff_axis (Megatron's row-parallel sum).
        hidden = ops.einsum("ebgcm,emh->ebgch", routed, expert_in)
        hidden = self.activation(place(hidden, (expert_axis, batch, None, None, ff_axis)))
        out = ops.einsum("ebgch,ehm->ebgcm", hidden, expert_out)
        out = place(out, (expert_axis, batch, None, None, None))

        # Combine: back to the token-side split (the second all-to-all),
        # then a local weighted sum over each token's experts and slots.
        if expert_axis is not None:
            out = _relayout_like(out, local)
        y = ops.einsum("bgsec,ebgcm->bgsm", combine, out)
        if group_axis is not None:
            # Tokens whole on the expert axis again, as they came in: an
            # all-gather of the output groups over it.
            y = place(y, (KEEP, group_axis, None, None))
        y = place(y, (KEEP, None, None, None))
        y = ops.reshape(y, ops.shape(x))
        return y, _gradient_on_mesh(self.sharding_strategy, aux_loss)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_experts=self.num_experts,
            d_ff=self.d_ff,
            top_k=self.top_k,
            capacity_factor=self.capacity_factor,
            group_size=self.group_size,
            activation=keras.activations.serialize(self.activation),
            aux_loss_weight=self.aux_loss_weight,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            router_initializer=keras.initializers.serialize(self.router_initializer),
            logical_dim=self.logical_dim,
        )
        return config


def _gradient_on_mesh(strategy, scalar):
    """Identity; in eager code, a plain upstream gradient (the aux loss summed
    with plain values by a caller's tape) is put on the mesh before it
    broadcasts into DTensor ops, which reject plain non-scalar tensors."""
    if not tf.executing_eagerly() or not _dtensor.is_dtensor(scalar):
        return scalar

    @tf.custom_gradient
    def identity(value):
        def grad(upstream):
            if _dtensor.is_dtensor(upstream):
                return upstream
            return strategy.place(upstream, ())

        return tf.identity(value), grad

    return identity(scalar)


def _relayout_like(x, like):
    if isinstance(x, keras.KerasTensor):
        return x
    return _dtensor.relayout_like(x, like)
