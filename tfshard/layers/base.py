"""What tfshard layers share.

* :class:`StyledLayer`: a stock Keras layer that carries a style
  (:mod:`tfshard.styles`) as ``tfshard_style``: ``ColumnParallelDense`` is
  ``keras.layers.Dense`` + ``ColumnParallel()``. Its ``call`` is the Keras
  layer's own; the strategy lays out its weights and activations as the
  style declares (``tfshard.hooks``).
* :class:`ShardedLayerMixin`: for the few layers whose computation under a
  split really differs from their Keras base (channel and spatial
  convolutions, MoE, the vocabulary-parallel embedding). They declare their
  weights' logical axes, write the split computation in ``call``, and get
  one template: on a one-device mesh or outside a strategy, ``call`` is the
  Keras base's own.
"""

from __future__ import annotations

import functools

from tfshard.styles import DeclaredByLayer


class StyledLayer:
    """Mixed in *before* a Keras layer class; subclasses define
    ``tfshard_style``. Outside any strategy the layer is its Keras base."""

    tfshard_style = None

    @property
    def sharding_strategy(self):
        """The strategy this layer was created under, or None."""
        return self.__dict__.get("_tfshard_strategy")

    @property
    def logical_axes(self) -> dict:
        """The logical dimension names of each weight, e.g.
        ``{"kernel": (None, "d_ff"), "bias": ("d_ff",)}``."""
        return dict(self.tfshard_style.declare(self).weights)

    def _mesh_axis(self, logical):
        strategy = self.sharding_strategy
        return strategy.logical_rules.axis_for(logical) if strategy else None

    @property
    def _computes_unsplit(self):
        """True outside a strategy or on a one-device mesh: nothing is split,
        so the Keras base layer's own call is the same math in fewer ops
        (on a 1x1 mesh the sharded paths cost a transformer step ~30%)."""
        strategy = self.sharding_strategy
        return strategy is None or strategy.mesh.size == 1


class ShardedLayerMixin(StyledLayer):
    """Mixed in *before* a Keras layer class by layers with their own split
    computation. Subclasses declare each weight's logical dimensions in
    :meth:`weight_logical_axes` and write the split computation as their
    ``call``; the template runs the Keras base's ``call`` (or the layer's
    ``unsplit_call``, for a layer with no Keras base computation) instead
    whenever nothing is split (:attr:`_computes_unsplit`)."""

    tfshard_style = DeclaredByLayer()

    def weight_logical_axes(self) -> dict:
        """Weight name -> tuple of logical dimension names (or None)."""
        return {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        call = cls.__dict__.get("call")
        inherited = any(
            getattr(base.__dict__.get("call"), "_tfshard_template", False) for base in cls.__mro__[1:]
        )
        if call is None or getattr(call, "_tfshard_template", False) or inherited:
            return  # (a subclass of a templated layer extends its call)

        @functools.wraps(call)  # keeps the signature Keras inspects (training, mask)
        def template(self, *args, **kwargs):
            if self._computes_unsplit:
                unsplit = getattr(self, "unsplit_call", None) or super(cls, self).call
                return unsplit(*args, **kwargs)
            return call(self, *args, **kwargs)

        template._tfshard_template = True
        cls.call = template
