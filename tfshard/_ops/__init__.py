"""SPMD-safe replacements for the Keras backend ops DTensor expands wrongly.

Each function here replaces one Keras TensorFlow-backend function (see
``tfshard._keras.backend_op_patches``) while the code being run or traced
computes on a mesh (:func:`tfshard.strategy.mesh_computation`); everywhere
else it calls the Keras original unchanged. They were found by the
op-coverage sweep (``python -m tfshard.app.opsweep``, table in
``docs/op_coverage.md``) and by running keras-io and keras-hub models
unchanged:

* :mod:`~tfshard._ops.draws`: random draws (``keras.random.*``, ``Dropout``
  and every layer built on them) give the numbers one device draws;
* :mod:`~tfshard._ops.gradients`: ``top_k``, ``one_hot``, ``segment_sum``
  and ``clip`` in elementwise or gather forms DTensor expands;
* :mod:`~tfshard._ops.pooling`: max/average pooling on split channels;
* :mod:`~tfshard._ops.cross_entropy`: sparse categorical cross-entropy on
  logits split by class, vocab-parallel;
* :mod:`~tfshard._ops.contraction`: a weight matrix's contracted dim whole;
* :mod:`~tfshard._ops.whole`: ops that need the dims they act on whole, and
  broadcast divisors;
* :mod:`~tfshard._ops.reshape`: a reshape of flattened rows whose dims
  past the batch DTensor cannot split, laid out so;
* :mod:`~tfshard._ops.control`: ``switch`` and ``map`` on a mesh, and clear
  errors for value-dependent shapes.
* :mod:`~tfshard._ops.recurrence`: keras-hub's RWKV-7 recurrence (a
  TensorArray loop) unrolled, split by batch and heads (installed per layer
  at build, by ``tfshard.hooks``).

TensorFlow ops with no DTensor expander at all run replicated
(``REPLICATED_OP_TYPES``, see :func:`tfshard._dtensor.expand_replicated`).
"""

from __future__ import annotations

from tfshard import _dtensor, _keras
from tfshard._ops.contraction import einsum, matmul, tensordot
from tfshard._ops.control import map_fn, nonzero, switch, where
from tfshard._ops.cross_entropy import sparse_categorical_crossentropy
from tfshard._ops.draws import dropout, random_crop_images, random_draw
from tfshard._ops.images import equalization_apply, equalization_histogram
from tfshard._ops.gradients import clip, one_hot, segment_sum, top_k
from tfshard._ops.pooling import average_pool, max_pool
from tfshard._ops.reshape import reshape
from tfshard._ops.whole import WHOLE_INPUT_OPS, divide, elastic_transform, split, whole_inputs

RANDOM_DRAWS = (
    "normal", "uniform", "truncated_normal", "randint", "categorical", "shuffle",
    "gamma", "binomial", "beta",
)
# TensorFlow ops without a DTensor SPMD expander, run replicated (see
# _dtensor.expand_replicated): the categorical, gamma/beta and binomial
# draws (their inputs are made whole above anyway), and ReverseV2 (keras
# AUC's threshold bookkeeping on small replicated metric state, flips).
REPLICATED_OP_TYPES = (
    "StatelessMultinomial", "StatelessRandomGammaV3", "StatelessRandomBinomial", "ReverseV2",
    # no SPMD expander at all (found by the op sweep): each runs whole on
    # every device; split inputs are all-gathered first
    "ArgMin", "Bincount", "DenseBincount", "Bucketize", "MatrixDiagV3", "MatrixDiagPartV3",
    "MatrixBandPart", "MatrixSolve", "MirrorPad", "Roll", "Cumprod", "SegmentSum",
    "XlaDynamicUpdateSlice", "SoftsignGrad", "AvgPoolGrad", "ImageProjectiveTransformV3",
    "RGBToHSV", "HSVToRGB", "DepthwiseConv2dNativeBackpropFilter",
    "DepthwiseConv2dNativeBackpropInput", "EmptyTensorList", "TensorListStack",
    "TensorListFromTensor", "TensorListLength", "TensorListElementShape", "TensorListPushBack",
    "TensorListPopBack", "CaseRegion", "MatrixInverse", "MirrorPadGrad",
)


_RANDOM = "random draw: the numbers one device draws, under any layout"
_WHOLE = "DTensor expands it only with the dimensions it acts on whole: they are made whole first"


def replacements():
    """``{(backend module, function): (replacement, purpose)}``."""
    out = {("random", name): (random_draw, _RANDOM) for name in RANDOM_DRAWS}
    out[("random", "dropout")] = (dropout, _RANDOM)
    out[("math", "top_k")] = (top_k, "TopKV2's gradient scatters global indices into a local shard")
    out[("nn", "sparse_categorical_crossentropy")] = (
        sparse_categorical_crossentropy,
        "logits split by class: Megatron's vocab-parallel cross-entropy, never a gather of the logits")
    out[("nn", "one_hot")] = (one_hot, "OneHot cannot expand an output split on a dim it inherits")
    pooling = "pooling on split channels (DTensor expands only batch splits)"
    out[("nn", "max_pool")] = (max_pool, pooling)
    out[("nn", "average_pool")] = (average_pool, pooling)
    for key, rule in WHOLE_INPUT_OPS.items():
        keep_batch, pin = rule if isinstance(rule, tuple) else (rule, True)
        out[key] = (whole_inputs(keep_batch, pin), _WHOLE)
    contraction = ("a weight matrix's contracted dim whole (DTensor rejects a contracted dim "
                   "split over different axes in the two operands)")
    for name, fn in (("matmul", matmul), ("tensordot", tensordot), ("einsum", einsum)):
        out[("numpy", name)] = (fn, contraction)
    out[("image", "elastic_transform")] = (
        elastic_transform, _WHOLE + "; a sigma known only at run time is a clear error "
        "(a run-time blur kernel size)")
    out[("numpy", "reshape")] = (
        reshape, "rows unflattened into dims DTensor cannot split (the flattened (B*S*H, D) made "
        "(B, S, H*D)): laid out whole but for the batch, so a split a later layer asks for is a "
        "local slice and its gradient expands")
    out[("numpy", "split")] = (split, "the split axis whole (DTensor's Split expander rejects "
                               "a split on it)")
    out[("numpy", "clip")] = (clip, "its gradient (where(mask, dy, 0)) reaches a strided slice's "
                              "gradient with a split dim whole: the mask multiplies dy instead")
    out[("math", "segment_sum")] = (segment_sum, "its gradient fails to expand: a gather by segment id")
    broadcast = "a broadcast divisor whole (its gradient fails when its layout disagrees)"
    out[("numpy", "divide")] = (divide, broadcast)
    out[("numpy", "divide_no_nan")] = (divide, broadcast)
    out[("core", "switch")] = (switch, "DTensor cannot expand a Case region: branches selected with where")
    out[("core", "map")] = (map_fn, "DTensor cannot expand tf.map_fn's TensorLists: unrolled")
    shape = "its output shape depends on the values: a clear error on a mesh"
    out[("numpy", "nonzero")] = (nonzero, shape)
    out[("numpy", "where")] = (where, "a value-dependent shape (one argument) is a clear error; "
                               "a scalar condition is broadcast (DTensor crashes on it)")
    return out


# Keras layer methods whose own code DTensor cannot expand on a mesh.
LAYER_METHODS = {
    ("keras.src.layers.preprocessing.image_preprocessing.random_crop:RandomCrop",
     "transform_images"): (
        random_crop_images,
        "a crop at random offsets is a slice with run-time bounds, which DTensor cannot "
        "expand: rows and columns are gathered instead"),
    ("keras.src.layers.preprocessing.image_preprocessing.equalization:Equalization",
     "_apply_equalization"): (
        equalization_apply,
        "its first nonzero histogram bin is found with nonzero(cdf)[0][0], a value-dependent "
        "shape DTensor cannot lay out: argmax(cdf > 0) instead, as Keras does on JAX"),
    ("keras.src.layers.preprocessing.image_preprocessing.equalization:Equalization",
     "_custom_histogram_fixed_width"): (
        equalization_histogram,
        "bincount's length is known only at run time, which DTensor cannot lay out: "
        "a segment sum with a static number of bins instead"),
}


def install():
    _dtensor.expand_replicated(REPLICATED_OP_TYPES)
    table = replacements()
    for key, (replacement, _) in {**table, **LAYER_METHODS}.items():
        # e.g. matmul: context parallelism's, then this one's
        _keras.hooks.backend_ops[key] = _keras.chained(replacement, _keras.hooks.backend_ops.get(key))
    _keras.install(_keras.backend_op_patches({key: purpose for key, (_, purpose) in table.items()}))
    _keras.install(_keras.layer_method_patches(
        {key: purpose for key, (_, purpose) in LAYER_METHODS.items()}))
