"""Channel-parallel convolutions (Megatron's column/row split, for convs).

DTensor's convolution expander refuses sharded filters and sharded channels
("Filter for convolution must have fully replicated layout", "Conv input's
channel dimension must be replicated"), and stock Keras convs under a
strategy therefore run on all-gathered weights (see
``tfshard.hooks._gathered_op``). The layers here compute the sharded
convolution themselves, in DTensor's global view, so the compute and the
weights really are split:

* the input is padded exactly as Keras pads it (``same``/``valid``/
  ``causal``) and cut into ``prod(kernel_size)`` shifted, strided views
  (im2col with plain slices: every slice is along an unsharded spatial
  dimension, so it is local on each device);
* the views are stacked to ``(..., taps, cin)`` and contracted with the
  kernel reshaped to ``(taps, cin, cout)`` in one ``einsum``.

``split="output"``: kernel ``(.., cin, tp)``, bias ``(tp,)``; input channels
whole, output channels sharded. No communication forward; the input
gradient is all-reduced backward (Megatron's *f*).

``split="input"``: kernel ``(.., tp, cout)``, bias replicated; the input is
channel-sharded (a replicated input is split locally, for free), the einsum
contracts the sharded channels, and DTensor all-reduces the partial sums:
one all-reduce forward (Megatron's *g*).

Depthwise convs have independent channels: splitting them needs no
communication at all.

The split dimension is the logical dimension ``logical_dim`` (default
``"channels"``); map it with the strategy's rules, e.g.
``StrategyBuilder(mesh).tensor_parallel("model").rules({"channels": "model"})``.
Outside a strategy the layers are exactly their Keras bases.
"""

from __future__ import annotations

import math
import string

import keras
import tensorflow as tf

from tfshard.errors import ShardingError
from tfshard.layers.base import ShardedLayerMixin
from tfshard.tensors import spec_of

SPLITS = ("output", "input")


# ----------------------------------------------------------------- helpers
def keras_pads(size, kernel, stride, dilation, padding):
    """(output size, pad before, pad after) of one spatial dim, as Keras /
    TensorFlow compute them."""
    eff = (kernel - 1) * dilation + 1
    if padding == "same":
        out = -(-size // stride)
        total = max((out - 1) * stride + eff - size, 0)
        return out, total // 2, total - total // 2
    if padding == "causal":
        return (size - 1) // stride + 1, eff - 1, 0
    if padding == "valid":
        return (size - eff) // stride + 1, 0, 0
    raise ValueError(f"unknown padding {padding!r}")


def _take(x, axis, start, stop, step=1):
    index = [slice(None)] * len(x.shape)
    index[axis] = slice(start, stop, step)
    return x[tuple(index)]


def patches(x, dims, *, stack=True):
    """Stack the shifted, strided views of ``x`` that a convolution reads.

    ``dims``: one ``(axis, kernel, stride, dilation, out)`` per spatial dim,
    in kernel order. ``x`` must already be padded so that tap ``i`` of
    ``axis`` reads ``x[i*dilation + stride*o]`` for ``o < out``. Returns
    ``x``'s shape with each ``axis`` resized to ``out`` and a new
    second-to-last dimension of ``prod(kernel)`` taps, in row-major kernel
    order (so the kernel reshapes to ``(taps, cin, cout)``). With
    ``stack=False``, the list of views instead.
    """
    views = [x]
    for axis, kernel, stride, dilation, out in dims:
        views = [
            _take(v, axis, i * dilation, i * dilation + stride * (out - 1) + 1, stride)
            for v in views
            for i in range(kernel)
        ]
    return tf.stack(views, axis=-2) if stack else views


def letters(n):
    return string.ascii_lowercase[:n]


# -------------------------------------------------------------------- layers
class _ChannelParallelConvMixin(ShardedLayerMixin):
    """The sharded ``convolution_op`` shared by the channel-parallel convs."""

    _depthwise = False

    def _init_split(self, split, logical_dim):
        if split not in SPLITS:
            raise ShardingError(
                f"{type(self).__name__}(split={split!r}): split must be one of "
                f"{SPLITS} ('output': output channels sharded, column-like; "
                "'input': input channels sharded, outputs all-reduced, row-like)."
            )
        if self._depthwise and split != "input":
            split = "input"  # depthwise: input and output channels split together
        self.split = split
        self.logical_dim = logical_dim

    def weight_logical_axes(self):
        spatial = (None,) * self.rank
        if self._depthwise:
            return {"kernel": spatial + (self.logical_dim, None), "bias": (self.logical_dim,)}
        if self.split == "output":
            return {"kernel": spatial + (None, self.logical_dim), "bias": (self.logical_dim,)}
        return {"kernel": spatial + (self.logical_dim, None), "bias": (None,)}

    def _pin_grad_layout(self, variable):
        """Read ``variable``; its gradient takes the variable's layout.

        Without the pin DTensor may return the kernel gradient of
        ``split="input"`` replicated (its all-reduced einsum picks that
        layout), which the optimizer then has to slice."""
        spec = spec_of(variable)
        place = self.sharding_strategy.place

        @tf.custom_gradient
        def read(v):
            def grad(dy):
                return place(dy, spec)

            return tf.identity(v), grad

        return read(tf.convert_to_tensor(variable))

    def _check_sharded_call(self, inputs):
        name = f"{type(self).__name__} {self.name!r}"
        if self.data_format != "channels_last":
            raise ShardingError(
                f"{name}: data_format={self.data_format!r} is not supported on a "
                "mesh; use data_format='channels_last'."
            )
        if getattr(self, "groups", 1) != 1:
            raise ShardingError(
                f"{name}: groups={self.groups} is not supported on a mesh; use "
                "groups=1."
            )
        for d, size in enumerate(inputs.shape[1:-1]):
            if size is None:
                raise ShardingError(
                    f"{name}: spatial dimension {d + 1} of the input is unknown "
                    f"(shape {tuple(inputs.shape)}); sharded convs need static "
                    "spatial sizes. Give keras.Input a full shape."
                )

    def _sharded_conv(self, inputs, kernel):
        constrain, split = self.sharding_strategy.constrain, (self.logical_dim,)
        rank = self.rank
        x = constrain(inputs, () if self.split == "output" and not self._depthwise else split)
        pads, dims = [[0, 0]], []
        for d in range(rank):
            out, before, after = keras_pads(
                int(x.shape[1 + d]),
                self.kernel_size[d],
                self.strides[d],
                self.dilation_rate[d],
                self.padding,
            )
            pads.append([before, after])
            dims.append((1 + d, self.kernel_size[d], self.strides[d], self.dilation_rate[d], out))
        pads.append([0, 0])
        if any(p != [0, 0] for p in pads):
            x = tf.pad(x, pads)  # pads unsharded spatial dims only: local
        cols = patches(x, dims)  # (B, *out, taps, cin)
        taps = math.prod(self.kernel_size)
        kernel = tf.cast(self._pin_grad_layout(kernel), cols.dtype)
        s = letters(rank)
        if self._depthwise:
            # (taps, cin, m): channels independent, everything stays local
            k = tf.reshape(kernel, (taps,) + tuple(kernel.shape[-2:]))
            y = tf.einsum(f"z{s}tc,tcm->z{s}cm", cols, k)
            y = tf.reshape(y, tuple(y.shape[:-2]) + (y.shape[-2] * y.shape[-1],))
            return constrain(y, split)
        k = tf.reshape(kernel, (taps,) + tuple(kernel.shape[-2:]))
        # split="input": contracts the sharded cin -> partial sums, one all-reduce
        y = tf.einsum(f"z{s}tc,tco->z{s}o", cols, k)
        return constrain(y, split if self.split == "output" else ())

    def call(self, inputs):
        self._check_sharded_call(inputs)
        outputs = self._sharded_conv(inputs, self.kernel)
        if self.use_bias:
            outputs = outputs + tf.reshape(
                tf.cast(self.bias, outputs.dtype), (1,) * (self.rank + 1) + (-1,)
            )
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs

    def get_config(self):
        config = super().get_config()
        config.update(split=self.split, logical_dim=self.logical_dim)
        return config


@keras.saving.register_keras_serializable(package="tfshard")
class ChannelParallelConv2D(_ChannelParallelConvMixin, keras.layers.Conv2D):
    """``keras.layers.Conv2D`` with its channels split over a mesh axis.

    Args:
        filters, kernel_size, strides, padding, dilation_rate, ...: as
            ``keras.layers.Conv2D`` (``groups`` must be 1 and
            ``data_format`` ``channels_last`` on a mesh).
        split: ``"output"`` (kernel ``(kh, kw, cin, tp)``, output
            channel-sharded, no forward communication) or ``"input"``
            (kernel ``(kh, kw, tp, cout)``, output all-reduced).
        logical_dim: the logical name of the split channels (default
            ``"channels"``; map it with ``.rules({"channels": "model"})``).
    """

    def __init__(self, filters, kernel_size, *, split="output", logical_dim="channels", **kwargs):
        super().__init__(filters, kernel_size, **kwargs)
        self._init_split(split, logical_dim)


@keras.saving.register_keras_serializable(package="tfshard")
class ChannelParallelConv1D(_ChannelParallelConvMixin, keras.layers.Conv1D):
    """``keras.layers.Conv1D`` with its channels split; see
    :class:`ChannelParallelConv2D`. ``padding="causal"`` is supported."""

    def __init__(self, filters, kernel_size, *, split="output", logical_dim="channels", **kwargs):
        super().__init__(filters, kernel_size, **kwargs)
        self._init_split(split, logical_dim)


@keras.saving.register_keras_serializable(package="tfshard")
class ChannelParallelDepthwiseConv2D(_ChannelParallelConvMixin, keras.layers.DepthwiseConv2D):
    """``keras.layers.DepthwiseConv2D`` with its channels split.

    kernel ``(kh, kw, tp, depth_multiplier)``, bias ``(tp,)`` (the output
    channel ``c * depth_multiplier + m`` lives with input channel ``c``).
    Channels are independent, so no communication is needed in either pass.
    """

    _depthwise = True

    def __init__(self, kernel_size, *, logical_dim="channels", **kwargs):
        super().__init__(kernel_size, **kwargs)
        self._init_split("input", logical_dim)

    def get_config(self):
        config = super().get_config()
        config.pop("split", None)
        return config
