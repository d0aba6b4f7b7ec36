"""Ops that DTensor expands only with the dimensions they act on whole.

:func:`whole_inputs` lays every tensor argument out whole (the batch keeps
its split where the op leaves dimension 0 alone) before the Keras original
runs: image ops and adaptive pools, FFTs, split/tile/pad/roll/slice on the
axes they act on, and ops DTensor expands wrongly under a split
(``WHOLE_INPUT_OPS``)."""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from keras import tree

from tfshard._ops._common import is_tensor, on_mesh, whole

def whole_inputs(keep_batch, pin_outputs=True):
    """A replacement that lays every tensor argument out whole before the
    Keras original runs: for ops whose DTensor expansion needs their
    working dimensions unsplit (image ops and adaptive pools: height, width
    and channels; FFTs: the transformed axis; split/tile/pad/roll/slice:
    the axes they act on) or that DTensor expands wrongly under a split.
    ``keep_batch(args, kwargs)`` says whether the op leaves dimension 0
    alone, so the batch keeps its split; otherwise everything is whole.
    ``pin_outputs`` lays the outputs out whole too, so the gradient reaching
    the op's own gradient ops is whole as well (the colour conversions train
    only without: DTensor rejects the relayout pair around them)."""

    def replacement(original, *args, **kwargs):
        strategy = on_mesh(*tree.flatten((args, kwargs)))
        if strategy is None or tf.executing_eagerly():
            return original(*args, **kwargs)
        keep = keep_batch(*args, **kwargs)
        args, kwargs = tree.map_structure(lambda x: whole(strategy, x, keep), (args, kwargs))
        out = original(*args, **kwargs)
        if not pin_outputs:
            return out
        # The outputs are pinned whole too, so the gradients reaching the
        # op's own gradient ops are whole as well.
        return tree.map_structure(lambda y: whole(strategy, y, keep), out)

    return replacement


def _rank(x):
    return len(getattr(x, "shape", ()))


def _known_rank(x):
    """The rank of ``x``, 0 when unknown."""
    shape = getattr(x, "shape", ())
    return (shape.rank or 0) if isinstance(shape, tf.TensorShape) else len(shape)


def _is_batch_axis(axis, x):
    return axis is not None and int(axis) % max(_rank(x), 1) == 0


def _batch_untouched_by_axis(x, *args, axis=None, **kwargs):
    return axis is not None and not _is_batch_axis(axis, x)


def _static_ints(value):
    try:
        return [int(v) for v in value]
    except (TypeError, ValueError):
        return None


def _split_keeps_batch(x, indices_or_sections, axis=0):
    return not _is_batch_axis(axis, x)


def _glu_keeps_batch(x, axis=-1):
    return not _is_batch_axis(axis, x)


def _roll_keeps_batch(x, shift, axis=None):
    axes = _static_ints(axis if isinstance(axis, (list, tuple)) else [axis]) if axis is not None else None
    return axes is not None and all(a % max(_rank(x), 1) != 0 for a in axes)


def _tile_keeps_batch(x, repeats):
    reps = _static_ints(repeats if isinstance(repeats, (list, tuple)) else [repeats])
    if reps is None:
        return False
    reps = [1] * (_rank(x) - len(reps)) + reps  # numpy: repeats align right
    return reps[0] == 1


def _pad_keeps_batch(x, pad_width, mode="constant", constant_values=None):
    try:
        width = np.broadcast_to(np.asarray(pad_width, dtype="int64"), (_rank(x), 2))
    except ValueError:
        return False
    return bool(np.all(width[0] == 0))


def _slice_keeps_batch(inputs, start_indices, shape):
    start, size = _static_ints(start_indices), _static_ints(shape)
    if start is None or size is None or not start:
        return False
    full = inputs.shape[0]
    return start[0] == 0 and (size[0] == -1 or (full is not None and size[0] == full))


def _keeps_batch(*args, **kwargs):
    return True


def _never(*args, **kwargs):
    return False


# Keras backend functions laid out whole before they run (see whole_inputs).
WHOLE_INPUT_OPS = {
    # images (N, H, W, C) / (N, C, H, W): the batch stays split
    ("image", "resize"): _keeps_batch,
    ("image", "gaussian_blur"): _keeps_batch,
    ("image", "affine_transform"): _keeps_batch,
    ("image", "perspective_transform"): _keeps_batch,
    ("image", "rgb_to_hsv"): (_keeps_batch, False),
    ("image", "hsv_to_rgb"): (_keeps_batch, False),
    ("image", "rgb_to_grayscale"): _keeps_batch,
    ("image", "scale_and_translate"): _keeps_batch,
    ("nn", "adaptive_average_pool"): _keeps_batch,
    ("nn", "adaptive_max_pool"): _keeps_batch,
    # transforms of the last axis
    ("math", "fft"): _keeps_batch,
    ("math", "fft2"): _keeps_batch,
    ("math", "rfft"): _keeps_batch,
    ("math", "irfft"): _keeps_batch,
    ("math", "stft"): _keeps_batch,
    ("math", "istft"): _keeps_batch,
    # structural ops on the axes they act on
    ("nn", "glu"): _glu_keeps_batch,
    ("numpy", "tile"): _tile_keeps_batch,
    ("numpy", "pad"): _pad_keeps_batch,
    ("numpy", "roll"): _roll_keeps_batch,
    ("core", "slice"): _slice_keeps_batch,
    # whole: CTC's batch-split expansion is invalid; sparsemax sorts (a
    # sort's gradient scatters global indices into a batch shard)
    ("nn", "ctc_loss"): _never,
    ("nn", "sparsemax"): _never,
    # segment max: sorted ids run SegmentMax (no expander; its gradient
    # fails split), unsorted ones count segments with tf.unique
    ("math", "segment_max"): _never,
    # two vectors split over one axis: their outer product cannot be
    # split over it twice (vectors: the gather is small)
    ("numpy", "outer"): _never,
}


# -------------------------------------------------- broadcast divisors
def divide(original, x1, x2):
    """``divide``/``divide_no_nan`` on a mesh, for a divisor of lower rank
    than the dividend (broadcast over its leading dims): the divisor is laid
    out whole first. Its layout cannot then disagree with the dividend's on
    the dims they share (DTensor's gradient of a broadcast division fails
    to expand when it does); a whole divisor is sliced locally, and the
    gradient of the relayout returns the divisor's gradient to its own
    layout, so nothing moves where the layouts already agree."""
    strategy = on_mesh(x1, x2)
    if strategy is None or tf.executing_eagerly():
        return original(x1, x2)
    if 0 < _known_rank(x2) < _known_rank(x1):
        x2 = whole(strategy, x2, False)
    return original(x1, x2)


# ------------------------------------------------------------------ split
def _section_bounds(n, indices_or_sections):
    """Start and length of each piece of a length-``n`` axis, as numpy's
    (and Keras's) split defines them, or None when they are not static."""
    if isinstance(indices_or_sections, int):
        if n is None or n % indices_or_sections:
            return None
        size = n // indices_or_sections
        return [(i * size, size) for i in range(indices_or_sections)]
    cuts = _static_ints(indices_or_sections)
    if cuts is None or n is None:
        return None
    edges = [0] + [min(max(c, 0), n) for c in cuts] + [n]
    return [(a, max(b - a, 0)) for a, b in zip(edges[:-1], edges[1:])]


def split(original, x, indices_or_sections, axis=0):
    """``keras.ops.split`` on a mesh as one slice per piece.

    DTensor's Split/SplitV expanders reject an input split on the axis being
    split ("Spliting over sharded dimension is not supported") and give the
    pieces the input's layout (a piece too short for that split fails).
    Layouts are not known when a step is traced, and a relayout cannot make
    only that axis whole while keeping the others' splits (DTensor allows
    one "match" dim per layout). Slice's expander lays out what it needs by
    itself; its TensorFlow gradient (a Pad of the split dim) does not expand,
    so the gradient is Split's own: the pieces' gradients concatenated.
    Exact, and no data moves where the axis is whole. (Laying the input out
    whole with pinned outputs broke keras-hub QwenMoe/Qwen3Moe training:
    DTensor rejects that relayout pair in the gradient.)"""
    strategy = on_mesh(x)
    if strategy is None or not is_tensor(x) or isinstance(x, tf.SparseTensor):
        return original(x, indices_or_sections, axis=axis)
    x = tf.convert_to_tensor(x)
    rank = x.shape.rank
    if not rank:
        return original(x, indices_or_sections, axis=axis)
    dim = int(axis) % rank
    bounds = _section_bounds(x.shape[dim], indices_or_sections)
    if bounds is None:
        return original(x, indices_or_sections, axis=axis)
    if not x.dtype.is_floating:
        return [_piece(x, dim, start, size) for start, size in bounds]

    @tf.custom_gradient
    def sliced(x):
        def grad(*upstream):
            return tf.concat([tf.zeros_like(p) if g is None else g
                              for g, p in zip(upstream, pieces)], axis=dim)

        pieces = [_piece(x, dim, start, size) for start, size in bounds]
        return pieces, grad

    return list(sliced(x))


def _piece(x, dim, start, size):
    begin, sizes = [0] * x.shape.rank, [-1] * x.shape.rank
    begin[dim], sizes[dim] = start, size
    return tf.slice(x, begin, sizes)


# ------------------------------------------------------- elastic transform
_elastic_whole = whole_inputs(_keeps_batch)


def elastic_transform(original, images, *args, **kwargs):
    """``keras.ops.image.elastic_transform`` on a mesh: laid out whole but
    for the batch (see :func:`whole_inputs`); a ``sigma`` known only at run
    time is a clear error. Its Gaussian blur's kernel is ``6 * int(sigma) | 1``
    wide, a run-time shape DTensor cannot lay out ("value shape is not
    static"), and the raw error's MLIR text is so long that TensorFlow takes
    many minutes to format it."""
    sigma = kwargs.get("sigma", args[1] if len(args) > 1 else None)
    if (
        on_mesh(images) is not None
        and not tf.executing_eagerly()
        and tf.is_tensor(sigma)
        and tf.get_static_value(sigma) is None
    ):
        raise _run_time_sigma_error()
    return _elastic_whole(original, images, *args, **kwargs)


def _run_time_sigma_error():
    from tfshard.errors import UnsupportedFeatureError

    return UnsupportedFeatureError(
        "keras.ops.image.elastic_transform on a mesh with a sigma known only at run time "
        "(keras.layers.RandomElasticTransform draws it from its scale): the Gaussian blur's "
        "kernel size, 6 * int(sigma) | 1, is then a run-time shape, which DTensor cannot lay "
        "out. Apply RandomElasticTransform in the input pipeline (e.g. dataset.map(layer) "
        "before batches reach the sharded model), or call elastic_transform with a Python "
        "float sigma."
    )
