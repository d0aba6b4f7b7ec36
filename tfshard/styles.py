"""Parallel styles and plans: how layers are split, written as data.

A **style** says how one layer is split: which *logical dimension* each
dimension of each weight carries, and which logical dimensions the layer's
input and output activations carry (the strategy's rules map logical
dimensions to mesh axes). Styles are small, immutable and keyword-only::

    ColumnParallel()              # Dense/EinsumDense: output units split (Megatron's column)
    RowParallel()                 # Dense/EinsumDense: input features split, partial sums all-reduced
    HeadParallel()                # MultiHeadAttention/GroupQueryAttention (and keras-hub's
                                  # attention): query/key/value column-parallel by heads,
                                  # the output projection row-parallel
    VocabParallel()               # Embedding: table rows split, masked local lookup
    HiddenParallel()              # LayerNormalization/RMSNormalization over a split hidden dim
    Replicate()                   # every weight and activation whole

A **plan** (:mod:`tfshard.plans`) says which layers get which style.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import keras

from tfshard.errors import StrategyError

__all__ = [
    "Declaration",
    "Style",
    "ColumnParallel",
    "RowParallel",
    "HeadParallel",
    "VocabParallel",
    "HiddenParallel",
    "Replicate",
    "DeclaredByLayer",
    "style_from_config",
]


@dataclasses.dataclass(frozen=True)
class Declaration:
    """What a style declares for one layer.

    ``weights``: weight name -> logical axes (one entry per dimension).
    ``inputs`` / ``outputs``: the logical axes of the *trailing* dimensions
    of the first input / every output; the batch dimension keeps its own
    split and the dimensions between are whole. ``()`` means "every
    dimension but the batch whole"; ``None`` leaves the activation alone.
    ``sublayers``: sublayer name -> its style (a composite style, such as
    attention, splits a layer through its sublayers).
    ``sequence``: sequence parallelism (:mod:`tfshard.sequence_parallel`):
    ``"gather"``, the input arrives split over the sequence (dimension 1) on
    the tensor axis and is all-gathered for the layer; ``"scatter"``, the
    output leaves reduce-scattered over it. None: no sequence split.
    """

    weights: Mapping = dataclasses.field(default_factory=dict)
    inputs: tuple | None = None
    outputs: tuple | None = None
    sublayers: Mapping = dataclasses.field(default_factory=dict)
    sequence: str | None = None


class Style:
    """Base class: one method, :meth:`declare`."""

    def declare(self, layer) -> Declaration:  # pragma: no cover - abstract
        raise NotImplementedError

    def to_config(self):
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {"style": type(self).__name__, **fields}

    def __str__(self):
        fields = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != f.default
        )
        return f"{type(self).__name__}({fields})"


# ------------------------------------------------------- projections
def _einsum_parts(layer):
    """``(input, kernel, output, bias)`` letters of a Dense (as the einsum
    ``...i,io->...o``) or an EinsumDense; ``bias`` is None without a bias."""
    if isinstance(layer, keras.layers.EinsumDense):
        inputs, rest = layer.equation.split(",")
        kernel, output = rest.split("->")
        return inputs, kernel, output, layer.bias_axes
    if isinstance(layer, keras.layers.Dense):
        return "...i", "io", "...o", "o"  # (a bias-free Dense declares it anyway)
    raise StrategyError(
        f"{type(layer).__name__} {layer.name!r}: ColumnParallel/RowParallel split a "
        "Dense or EinsumDense projection; use another style for this layer (e.g. "
        "Replicate()), or a tfshard layer made for it."
    )


def _trailing(letters, split_letter, dim):
    """Trailing logical axes of an activation, from the split letter on."""
    letters = letters.replace("...", "")
    start = letters.index(split_letter)
    return tuple(dim if letter == split_letter else None for letter in letters[start:])


def _kernel_axes(inputs, kernel, output, split, dim, hidden):
    """One logical name per kernel letter: ``dim`` for the split letter,
    ``hidden`` for the first letter on the model side (contracted for a
    column split, produced for a row split), None elsewhere."""
    contracted = [letter for letter in kernel if letter in inputs and letter not in output]
    produced = [letter for letter in kernel if letter in output]
    model_side = produced if split in contracted else contracted
    first = next((letter for letter in model_side), None)
    return tuple(
        dim if letter == split else hidden if letter == first else None for letter in kernel
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class ColumnParallel(Style):
    """Megatron's column-parallel projection: the kernel's first output
    dimension (``Dense``: the units; attention's query/key/value
    ``EinsumDense``: the heads) is split, the input is used whole and the
    output stays split on that dimension (``gather_output=True`` gathers it
    whole). Collectives: none forward; the input gradient is all-reduced
    backward (Megatron's *f*). ``hidden`` names the contracted (model)
    dimension of the kernel (None: no name). ``sequence_parallel=True``:
    the input arrives split over the sequence and is all-gathered (backward:
    the input gradient is reduce-scattered instead of all-reduced)."""

    dim: str = "d_ff"
    gather_output: bool = False
    hidden: str | None = None
    sequence_parallel: bool = False

    def declare(self, layer):
        return self.declare_einsum(*_einsum_parts(layer))

    def declare_einsum(self, inputs, kernel, output, bias):
        split = next(letter for letter in kernel if letter in output)
        weights = {"kernel": _kernel_axes(inputs, kernel, output, split, self.dim, self.hidden)}
        if bias is not None:
            weights["bias"] = tuple(self.dim if letter == split else None for letter in bias)
        outputs = () if self.gather_output else _trailing(output, split, self.dim)
        if self.sequence_parallel:
            return Declaration(weights=weights, outputs=outputs, sequence="gather")
        return Declaration(weights=weights, inputs=(), outputs=outputs)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RowParallel(Style):
    """Megatron's row-parallel projection: the kernel's first contracted
    dimension (``Dense``: the input features; attention's output
    ``EinsumDense``: the heads) is split, the input arrives split on it and
    the contraction's partial sums are all-reduced: one all-reduce forward
    (Megatron's *g*). The bias and the output are whole. ``hidden`` names
    the kernel's output (model) dimension (None: no name).
    ``sequence_parallel=True``: the partial sums are reduce-scattered over
    the sequence instead (the output leaves split over it; backward: one
    all-gather)."""

    dim: str = "d_ff"
    hidden: str | None = None
    sequence_parallel: bool = False

    def declare(self, layer):
        return self.declare_einsum(*_einsum_parts(layer))

    def declare_einsum(self, inputs, kernel, output, bias):
        split = next(letter for letter in kernel if letter in inputs and letter not in output)
        weights = {"kernel": _kernel_axes(inputs, kernel, output, split, self.dim, self.hidden)}
        if bias is not None:
            first = next((letter for letter in bias if letter in output), None)
            weights["bias"] = tuple(self.hidden if letter == first else None for letter in bias)
        inputs = _trailing(inputs, split, self.dim)
        if self.sequence_parallel:
            return Declaration(weights=weights, inputs=inputs, sequence="scatter")
        return Declaration(weights=weights, inputs=inputs, outputs=())


@dataclasses.dataclass(frozen=True, kw_only=True)
class HeadParallel(Style):
    """Attention split by heads (Megatron-LM), applied through the layer's
    projection sublayers, whatever the attention layer: Keras's
    ``MultiHeadAttention`` and ``GroupQueryAttention`` and keras-hub's
    attention layers name them ``query``/``key``/``value`` (and ``gate``)
    and ``attention_output``. The projections are column-parallel by heads
    (key and value by ``kv_heads`` when the layer has fewer key/value heads
    than query heads), the attention core runs on each device's heads, and
    the output projection is row-parallel: one all-reduce forward, one
    backward. Key/value heads that ``kv_heads``'s mesh axis cannot divide
    are computed whole (map ``kv_heads`` to ``None``)."""

    heads: str = "heads"
    kv_heads: str = "kv_heads"
    hidden: str = "d_model"

    def sublayer_styles(self, layer):
        kv = self.kv_heads if _grouped_query(layer) else self.heads
        return {
            "query": ColumnParallel(dim=self.heads, hidden=self.hidden),
            "key": ColumnParallel(dim=kv, hidden=self.hidden),
            "value": ColumnParallel(dim=kv, hidden=self.hidden),
            "gate": ColumnParallel(dim=self.heads, hidden=self.hidden),
            "attention_output": RowParallel(dim=self.heads, hidden=self.hidden),
        }

    def declare(self, layer):
        return Declaration(sublayers=self.sublayer_styles(layer))


def _grouped_query(layer):
    heads = getattr(layer, "num_query_heads", None) or getattr(layer, "num_heads", None)
    kv = getattr(layer, "num_key_value_heads", None)
    return kv is not None and heads is not None and kv != heads


@dataclasses.dataclass(frozen=True, kw_only=True)
class VocabParallel(Style):
    """An embedding table split by rows (the vocabulary): each device looks
    the ids up in its rows (Megatron's masked local lookup) and one
    all-reduce sums the rows; the table is never gathered. Tied logits
    (keras-hub's ``ReversibleEmbedding``) come out split by vocabulary."""

    dim: str = "vocab"

    def declare(self, layer):
        return Declaration(weights={"embeddings": (self.dim, None)}, inputs=(), outputs=())


@dataclasses.dataclass(frozen=True, kw_only=True)
class HiddenParallel(Style):
    """A normalization over the last axis with that (hidden) axis split:
    each device normalizes its slice and the row statistics are all-reduced
    (LayerNormalization: two small all-reduces, RMSNormalization: one).
    Every 1-D weight (gamma, beta, scale) is split like the hidden axis."""

    dim: str = "d_model"

    def declare(self, layer):
        axes = getattr(layer, "axis", -1)
        axes = list(axes) if isinstance(axes, (list, tuple)) else [axes]
        last = (-1, getattr(layer, "_rank", 0) - 1)
        if len(axes) != 1 or axes[0] not in last:
            return Declaration()  # several (or not the last) axes: weights whole
        if isinstance(layer, keras.layers.LayerNormalization):
            names = ("gamma", "beta")
        elif isinstance(layer, keras.layers.RMSNormalization):
            names = ("scale",)
        else:
            names = tuple(w.name for w in getattr(layer, "weights", ()) if len(w.shape) == 1)
        weights = {name: (self.dim,) for name in names}
        # The output keeps the input's split by itself (a second relayout
        # right after the first trips DTensor's layout propagation of the
        # gradient: "output layout of Relayout op ... does not match").
        return Declaration(weights=weights, inputs=(self.dim,), outputs=None)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Replicate(Style):
    """Every weight and activation of the layer whole on every device."""

    def declare(self, layer):
        return Declaration(inputs=(), outputs=())


class DeclaredByLayer(Style):
    """The style of a tfshard layer whose computation is its own (channel
    and spatial convolutions, MoE, the vocabulary-parallel embedding): the
    layer declares its weights' logical axes (``weight_logical_axes``) and
    lays out its activations itself."""

    def declare(self, layer):
        return Declaration(weights=dict(layer.weight_logical_axes()))

    def to_config(self):
        return {"style": "DeclaredByLayer"}

    def __str__(self):
        return "DeclaredByLayer()"

    def __eq__(self, other):
        return isinstance(other, DeclaredByLayer)

    def __hash__(self):
        return hash(DeclaredByLayer)


STYLES = {
    cls.__name__: cls
    for cls in (ColumnParallel, RowParallel, HeadParallel, VocabParallel, HiddenParallel, Replicate)
}


def style_from_config(config):
    """The style :meth:`Style.to_config` describes."""
    if isinstance(config, Style):
        return config
    config = dict(config)
    name = config.pop("style", None)
    if name not in STYLES:
        raise StrategyError(
            f"plan: unknown style {name!r}; use one of {sorted(STYLES)}."
        )
    try:
        return STYLES[name](**config)
    except TypeError as err:
        raise StrategyError(f"plan: {name}{config}: {err}") from None
