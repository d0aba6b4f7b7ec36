"""Spatially split images: halo-exchange convolution and pooling
(Mesh-TensorFlow's ``conv2d_with_blocks`` / ``halo_exchange``).

An image ``(B, H, W, C)`` is split into bands of rows over one mesh axis
(and optionally into columns over a second). A convolution needs a few rows
of its neighbours' bands (the *halo*). DTensor's own spatial convolution
works only on TPU and has no backward pass, so tfshard does the exchange
itself, in DTensor's global view:

1. View the image as ``(B, nh, Hb, nw, Wb, C)``; the block dims ``nh``/``nw``
   are sharded, the in-block dims ``Hb``/``Wb`` are local.
2. Cut each block's border strips (the ``T`` last rows and ``Bm`` first rows
   of every band: local slices of an unsharded dim) and all-gather the
   *strips only*, ``(B, nh, T+Bm, ...)``, over the split axis. Shifting the
   gathered strips by one block gives every band its upper neighbour's tail
   and lower neighbour's head; the image borders get zeros. Laying the
   shifted strips out sharded again is a local slice. The full image is never
   gathered: each device receives ``n * (T + Bm)`` rows per exchange instead
   of ``n * Hb`` (see ``tests/test_conv_spatial.py``, which pins this in
   DTensor's SPMD dump). Backward, the all-gather becomes a reduce-scatter
   of the strip gradients.

   Why not a true neighbour exchange (collective-permute)? DTensor's public
   ops emit all-gather / all-reduce / all-to-all / reduce-scatter only; a
   shift along a sharded dim (``tf.roll``, slicing, ``concat``) is expanded
   by gathering that dim. Gathering just the strips keeps the traffic
   proportional to the halo, not the image.
3. Width is exchanged the same way on the height-padded tensor, so the
   corner tiles arrive through the width exchange.
4. Each band picks its window of rows (``(Ob-1)*stride + k`` rows starting
   where its first output row reads). Where that start differs from band to
   band ("valid" padding, stride 2 with odd bands) a per-band 0/1 mask picks
   it: elementwise, local and exact.
5. The window is cut into ``kh*kw`` shifted, strided views (local slices),
   contracted with the kernel in one einsum, and reshaped back to
   ``(B, Ho, Wo, Cout)``, split like the input.

The split dimensions are the logical dimensions ``"height"`` and ``"width"``
(``height_dim``/``width_dim`` arguments); map them with the strategy's rules,
e.g. ``.rules({"height": "model"})``. Outside a strategy the layers are
exactly their Keras bases.

Stock Keras layers that already work on split images (checked in the
tests): ``BatchNormalization`` (its moments reduce over the global tensor,
so DTensor all-reduces across the data axis *and* the spatial shards: it is
synchronized BatchNorm with no extra code), ``GlobalAveragePooling2D``,
elementwise layers (``ReLU``, ``Add``). Stock ``MaxPooling2D`` /
``AveragePooling2D`` fail on split images ("Only replicated or batch
parallel layout is supported in expansion of tf.MaxPool"); use
:class:`SpatialParallelMaxPooling2D` / :class:`SpatialParallelAveragePooling2D`.
"""

from __future__ import annotations

import functools
import math

import keras
import numpy as np
import tensorflow as tf

from tfshard.errors import ShardingError
from tfshard.layers.base import ShardedLayerMixin
from tfshard.layers.conv import _take, keras_pads, patches
from tfshard.layout import KEEP
from tfshard.report import describe_tiling  # noqa: F401  (tfshard.layers.describe_tiling)

__all__ = [
    "SpatialParallelConv2D",
    "SpatialParallelMaxPooling2D",
    "SpatialParallelAveragePooling2D",
    "describe_tiling",
    "plan_split",
]


# ------------------------------------------------------------------- planning
class DimPlan:
    """How one spatial dimension of size ``size`` split into ``n`` blocks is
    read by a window op (conv or pool) of ``kernel``/``stride``/``dilation``.

    Attributes: ``out`` (global output size), ``block`` (input rows per
    block), ``out_block`` (output rows per block), ``before``/``after`` (halo
    rows taken from the previous/next block), ``window`` (rows each block's
    op reads), ``offsets`` (per block: where its window starts in the
    halo-padded block), ``pad_before`` (Keras's padding before the image).
    """

    def __init__(self, size, n, kernel, stride, dilation, padding, *, what, layer, axis):
        self.size, self.n = int(size), int(n)
        self.kernel, self.stride, self.dilation = kernel, stride, dilation
        out, pad_before, _ = keras_pads(self.size, kernel, stride, dilation, padding)
        self.out, self.pad_before = out, pad_before
        eff = (kernel - 1) * dilation + 1
        fix = (
            f"Use a {what} divisible by {n} whose output is also divisible by "
            f"{n}, fewer blocks (a smaller mesh axis), or map {what!r} to no "
            "mesh axis."
        )
        if out <= 0:
            raise ShardingError(
                f"{layer}: {what} {size} is smaller than the kernel "
                f"({kernel}, dilation {dilation}) with padding {padding!r}."
            )
        if self.size % n:
            raise ShardingError(
                f"{layer}: the input {what} {size} cannot be split into {n} "
                f"equal blocks over mesh axis {axis!r}. {fix}"
            )
        if out % n:
            raise ShardingError(
                f"{layer}: the output {what} {out} (input {what} {size}, "
                f"kernel {kernel}, stride {stride}, padding {padding!r}) cannot "
                f"be split into {n} equal blocks over mesh axis {axis!r}. {fix}"
            )
        self.block = self.size // n
        self.out_block = out // n
        self.window = (self.out_block - 1) * stride + eff
        # where block j's window starts, relative to the start of block j
        starts = [j * self.out_block * stride - pad_before - j * self.block for j in range(n)]
        self.before = max(0, -min(starts))
        self.after = max(0, max(s + self.window for s in starts) - self.block)
        if n > 1 and max(self.before, self.after) > self.block:
            raise ShardingError(
                f"{layer}: each device's block of the {what} has {self.block} "
                f"rows ({what} {size} over {n} devices on mesh axis {axis!r}), "
                f"but the kernel (size {kernel}, stride {stride}, padding "
                f"{padding!r}) needs a halo of {max(self.before, self.after)} "
                "rows from a neighbour; halos may come only from adjacent "
                f"blocks. Use a larger {what}, a smaller kernel, or fewer "
                "blocks (a smaller mesh axis)."
            )
        self.offsets = [s + self.before for s in starts]
        self.padded = self.before + self.block + self.after

    def valid_mask(self):
        """(n, padded) 1.0 where a halo-padded row is inside the image."""
        rows = (
            np.arange(self.n)[:, None] * self.block
            - self.before
            + np.arange(self.padded)[None, :]
        )
        return ((rows >= 0) & (rows < self.size)).astype("float32")

    def window_counts(self):
        """(n, out_block): how many taps of each output read the image."""
        j = np.arange(self.n)[:, None, None]
        o = np.arange(self.out_block)[None, :, None]
        i = np.arange(self.kernel)[None, None, :]
        rows = (j * self.out_block + o) * self.stride - self.pad_before + i * self.dilation
        return ((rows >= 0) & (rows < self.size)).sum(-1).astype("float32")

    @property
    def halo_rows(self):
        return self.before + self.after


def plan_split(shape, axes_sizes, kernel_size, strides, dilation_rate, padding, *, layer="layer", axis_names=(None, None)):
    """The :class:`DimPlan` of the height and width of an NHWC ``shape``."""
    return tuple(
        DimPlan(
            shape[1 + d], axes_sizes[d], kernel_size[d], strides[d], dilation_rate[d],
            padding, what=("height", "width")[d], layer=layer, axis=axis_names[d],
        )
        for d in range(2)
    )


# ------------------------------------------------------------- the exchange
class _SpatialMixin(ShardedLayerMixin):
    """Split-image machinery shared by the spatial conv and pooling layers."""

    def _init_spatial(self, height_dim, width_dim):
        self.height_dim = height_dim
        self.width_dim = width_dim

    def _spatial_axes(self):
        return self._mesh_axis(self.height_dim), self._mesh_axis(self.width_dim)

    def _layer_name(self):
        return f"{type(self).__name__} {self.name!r}"

    def _check_input(self, inputs):
        name = self._layer_name()
        if self.data_format != "channels_last":
            raise ShardingError(
                f"{name}: data_format={self.data_format!r} is not supported on a "
                "mesh; use data_format='channels_last'."
            )
        if len(inputs.shape) != 4 or any(d is None for d in inputs.shape[1:]):
            raise ShardingError(
                f"{name}: needs a 4-D NHWC input with static height, width and "
                f"channels; got shape {tuple(inputs.shape)}."
            )
        ha, wa = self._spatial_axes()
        strategy = self.sharding_strategy
        data = strategy.data_axis
        for axis, dim in ((ha, self.height_dim), (wa, self.width_dim)):
            if axis is not None and axis == data:
                raise ShardingError(
                    f"{name}: logical dim {dim!r} maps to mesh axis {axis!r}, "
                    "which is also the data axis; split the image over another "
                    "axis (e.g. .rules({'height': 'model'}))."
                )
        if ha is not None and ha == wa:
            raise ShardingError(
                f"{name}: height and width both map to mesh axis {ha!r}; give "
                "each its own axis or map width to None."
            )
        return ha, wa

    def _exchange(self, x, dim, plan, spec, gathered):
        """Halo-pad blocks along block dim ``dim`` (rows at ``dim + 1``)."""
        if plan.halo_rows == 0:
            return x
        place = self.sharding_strategy.place
        if plan.n == 1:
            pads = [[0, 0]] * len(x.shape)
            pads[dim + 1] = [plan.before, plan.after]
            return tf.pad(x, pads)
        block, row = plan.block, dim + 1
        strips = []
        if plan.after:
            strips.append(_take(x, row, 0, plan.after))  # my head -> previous block
        if plan.before:
            strips.append(_take(x, row, block - plan.before, block))  # my tail -> next
        strips = strips[0] if len(strips) == 1 else tf.concat(strips, row)
        # The one collective: all-gather of the border strips over the split axis.
        strips = place(strips, gathered)
        parts = []
        rank = len(x.shape)
        if plan.before:
            tails = _take(_take(strips, row, plan.after, plan.after + plan.before), dim, 0, plan.n - 1)
            tails = place(tails, gathered)  # pinned: n-1 blocks cannot be sharded
            pads = [[0, 0]] * rank
            pads[dim] = [1, 0]  # the top block gets zeros (Keras's zero padding)
            # shifted by one block; laying it out sharded again is a local slice
            parts.append(place(place(tf.pad(tails, pads), gathered), spec))
        parts.append(x)
        if plan.after:
            heads = place(_take(_take(strips, row, 0, plan.after), dim, 1, plan.n), gathered)
            pads = [[0, 0]] * rank
            pads[dim] = [0, 1]  # the bottom block gets zeros
            parts.append(place(place(tf.pad(heads, pads), gathered), spec))
        return tf.concat(parts, row)

    def _window(self, x, dim, plan, mask_spec):
        """Each block's window of ``plan.window`` rows (local)."""
        offsets = plan.offsets
        if len(set(offsets)) == 1:
            o = offsets[0]
            if o == 0 and plan.window == x.shape[dim + 1]:
                return x
            return _take(x, dim + 1, o, o + plan.window)
        out = None
        for o in sorted(set(offsets)):
            mask = np.array([1.0 if off == o else 0.0 for off in offsets], "float32")
            shape = [1] * len(x.shape)
            shape[dim] = plan.n
            spec = [None] * len(x.shape)
            spec[dim] = mask_spec[dim]  # only the block dim is split
            m = tf.cast(self.sharding_strategy.place(mask.reshape(shape), tuple(spec)), x.dtype)
            term = _take(x, dim + 1, o, o + plan.window) * m
            out = term if out is None else out + term
        return out

    def _blocks(self, inputs, kernel_size, strides, dilation_rate, padding, *, mask_invalid=False):
        """Split, halo-exchange and window the image.

        Returns ``(windows, plans, specs)``: windows ``(B, nh, Lh, nw, Lw,
        C)``, the two :class:`DimPlan`, and the 6-D block specs.
        """
        ha, wa = self._check_input(inputs)
        mesh = self.sharding_strategy.mesh
        sizes = tuple(mesh.axis_size(a) if a else 1 for a in (ha, wa))
        ph, pw = plan_split(
            tuple(inputs.shape), sizes, kernel_size, strides, dilation_rate, padding,
            layer=self._layer_name(), axis_names=(ha, wa),
        )
        b, h, w, c = inputs.shape
        x = self.sharding_strategy.place(inputs, (KEEP, ha, wa, None))
        x = tf.reshape(x, (-1, ph.n, ph.block, pw.n, pw.block, c))
        spec = (KEEP, ha, None, wa, None, None)
        x = self.sharding_strategy.place(x, spec)
        if mask_invalid:
            # max pooling: rows outside the image must never win
            x_dtype = x.dtype
        x = self._exchange(x, 1, ph, spec, (KEEP, None, None, wa, None, None))
        x = self._exchange(x, 3, pw, spec, (KEEP, ha, None, None, None, None))
        if mask_invalid and (ph.halo_rows or pw.halo_rows):
            valid = ph.valid_mask()[:, :, None, None] * pw.valid_mask()[None, None, :, :]
            valid = valid.reshape((1, ph.n, ph.padded, pw.n, pw.padded, 1))
            big = np.finfo(x_dtype.as_numpy_dtype).max
            penalty = self.sharding_strategy.place((valid - 1.0) * big, (None, ha, None, wa, None, None))
            x = x + tf.cast(penalty, x.dtype)
        const_spec = (None, ha, None, wa, None, None)
        x = self._window(x, 1, ph, const_spec)
        x = self._window(x, 3, pw, const_spec)
        return x, (ph, pw), spec

    def _unblock(self, y, plans, ha, wa):
        ph, pw = plans
        y = tf.reshape(y, (-1, ph.out, pw.out, y.shape[-1]))
        out = self.sharding_strategy.place(y, (KEEP, ha, wa, None))
        if tf.executing_eagerly():
            return out
        # Forward: the relayout (exactly: y - y == 0). Backward: the identity,
        # not DTensor's relayout gradient (RelayoutLike), which fails layout
        # propagation when BatchNormalization follows a bias-free
        # convolution. (A tf.custom_gradient would do the same but its
        # IdentityN makes DTensor gather the image.)
        return tf.stop_gradient(out) + (y - tf.stop_gradient(y))

    def get_config(self):
        config = super().get_config()
        config.update(height_dim=self.height_dim, width_dim=self.width_dim)
        return config


# -------------------------------------------------------------------- layers
@keras.saving.register_keras_serializable(package="tfshard")
class SpatialParallelConv2D(_SpatialMixin, keras.layers.Conv2D):
    """``keras.layers.Conv2D`` on images split into bands (and tiles) over
    mesh axes, with halo exchange; weights replicated.

    Input and output are ``(B, H, W, C)`` split as ``(batch, height, width,
    None)`` where ``height``/``width`` are the mesh axes the logical dims
    ``height_dim``/``width_dim`` map to (``.rules({"height": "model"})``).
    The input and output heights (widths) must divide by their axis sizes
    and a block must be at least as tall as the halo; otherwise a
    ``tfshard.ShardingError`` says which size to change.

    Collectives per call: forward one all-gather of the border strips per
    split axis; backward the matching reduce-scatter, plus the all-reduce
    of the kernel (and bias) gradient over the data and spatial axes.
    """

    def __init__(self, filters, kernel_size, *, height_dim="height", width_dim="width", **kwargs):
        super().__init__(filters, kernel_size, **kwargs)
        self._init_spatial(height_dim, width_dim)

    def call(self, inputs):
        if self.groups != 1:
            raise ShardingError(f"{self._layer_name()}: groups={self.groups} is not supported on a mesh; use groups=1.")
        ha, wa = self._spatial_axes()
        win, plans, _ = self._blocks(inputs, self.kernel_size, self.strides, self.dilation_rate, self.padding)
        ph, pw = plans
        cols = patches(
            win,
            [
                (2, ph.kernel, ph.stride, ph.dilation, ph.out_block),
                (4, pw.kernel, pw.stride, pw.dilation, pw.out_block),
            ],
        )  # (B, nh, Obh, nw, Obw, taps, C)
        kernel = tf.cast(self.kernel, cols.dtype)
        k = tf.reshape(kernel, (math.prod(self.kernel_size),) + tuple(kernel.shape[-2:]))
        y = tf.einsum("zhawbtc,tco->zhawbo", cols, k)
        if self.use_bias:
            y = y + tf.cast(self.bias, y.dtype)
        y = self._unblock(y, plans, ha, wa)
        if self.activation is not None:
            y = self.activation(y)
        return y


class _SpatialPoolMixin(_SpatialMixin):
    _max = True

    def call(self, inputs):
        ha, wa = self._spatial_axes()
        win, plans, _ = self._blocks(
            inputs, self.pool_size, self.strides, (1, 1), self.padding, mask_invalid=self._max
        )
        ph, pw = plans
        views = patches(
            win,
            [
                (2, ph.kernel, ph.stride, 1, ph.out_block),
                (4, pw.kernel, pw.stride, 1, pw.out_block),
            ],
            stack=False,
        )
        # a running max / sum of the shifted views (no stacked copy)
        if self._max:
            y = functools.reduce(tf.maximum, views)
        else:
            y = tf.add_n(views) if len(views) > 1 else views[0]
            counts = ph.window_counts()[:, :, None, None] * pw.window_counts()[None, None, :, :]
            counts = counts.reshape((1, ph.n, ph.out_block, pw.n, pw.out_block, 1))
            if np.all(counts == ph.kernel * pw.kernel):
                y = y / float(ph.kernel * pw.kernel)
            else:  # "same": padding is not counted (as in TensorFlow)
                y = y / tf.cast(self.sharding_strategy.place(counts, (None, ha, None, wa, None, None)), y.dtype)
        return self._unblock(y, plans, ha, wa)


@keras.saving.register_keras_serializable(package="tfshard")
class SpatialParallelMaxPooling2D(_SpatialPoolMixin, keras.layers.MaxPooling2D):
    """``keras.layers.MaxPooling2D`` on split images (stock MaxPool fails on
    them in DTensor). Windows that cross a band border get their rows by
    halo exchange; rows outside the image never win."""

    _max = True

    def __init__(self, pool_size=(2, 2), strides=None, padding="valid", *, height_dim="height", width_dim="width", **kwargs):
        super().__init__(pool_size=pool_size, strides=strides, padding=padding, **kwargs)
        self._init_spatial(height_dim, width_dim)


@keras.saving.register_keras_serializable(package="tfshard")
class SpatialParallelAveragePooling2D(_SpatialPoolMixin, keras.layers.AveragePooling2D):
    """``keras.layers.AveragePooling2D`` on split images; with
    ``padding="same"`` the padding is left out of the average, as in Keras."""

    _max = False

    def __init__(self, pool_size=(2, 2), strides=None, padding="valid", *, height_dim="height", width_dim="width", **kwargs):
        super().__init__(pool_size=pool_size, strides=strides, padding=padding, **kwargs)
        self._init_spatial(height_dim, width_dim)
