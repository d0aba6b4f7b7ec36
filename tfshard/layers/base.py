"""What every tfshard layer shares: declared logical axes and activation
layout constraints."""

from __future__ import annotations

import tensorflow as tf

from tfshard import _dtensor
from tfshard import strategy as _strategy
from tfshard.layout import KEEP


class ShardedLayerMixin:
    """Mixed into a Keras layer class *before* the Keras base class.

    Subclasses declare each weight's logical dimensions in
    :meth:`weight_logical_axes`; the active strategy's rules turn them into
    mesh axes. Outside any strategy the layer is exactly its Keras base.
    """

    def weight_logical_axes(self) -> dict:
        """Weight name -> tuple of logical dimension names (or None)."""
        return {}

    @property
    def logical_axes(self) -> dict:
        """The logical dimension names of each weight, e.g.
        ``{"kernel": (None, "d_ff"), "bias": ("d_ff",)}``."""
        return dict(self.weight_logical_axes())

    def add_weight(self, *args, **kwargs):
        name = kwargs.get("name")
        if name is None and len(args) > 8:
            name = args[8]
        with _strategy.declare_logical_axes(self.weight_logical_axes().get(name)):
            return super().add_weight(*args, **kwargs)

    @property
    def sharding_strategy(self):
        """The strategy this layer was created under, or None."""
        return getattr(self, "_tfshard_strategy", None)

    @property
    def _computes_unsplit(self):
        """True outside a strategy or on a one-device mesh: nothing is split,
        so the Keras base layer's own call is the same math in fewer ops
        (on a 1x1 mesh the sharded paths cost a transformer step ~30%)."""
        strategy = self.sharding_strategy
        return strategy is None or strategy.mesh.size == 1

    def _mesh_axis(self, logical):
        strategy = self.sharding_strategy
        return strategy.logical_rules.axis_for(logical) if strategy else None

    def _constrain(self, x, feature_spec):
        """Lay out ``x``: dim 0 (the batch) keeps its sharding, the trailing
        ``len(feature_spec)`` dims take ``feature_spec`` (mesh axes) and the
        dims between are whole. (DTensor allows "keep this dim's sharding"
        on one dim only: "Attempted to shard two or more tensor dimensions
        over mesh dimension match".) Eager host values get the batch split."""
        rank = len(x.shape)
        feature_spec = tuple(feature_spec)
        if rank == 0:
            return x
        strategy = self.sharding_strategy
        if len(feature_spec) >= rank:  # no batch dim left to keep
            return strategy.place(x, feature_spec[len(feature_spec) - rank:])
        first = KEEP
        if tf.executing_eagerly() and not _dtensor.is_dtensor(x):
            first = strategy.batch_spec(tuple(x.shape))[0]
        spec = (first,) + (None,) * (rank - 1 - len(feature_spec)) + feature_spec
        return strategy.place(x, spec)
