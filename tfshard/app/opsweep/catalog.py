"""Hand-written samples, input domains and the SKIP list of the op sweep.

Only ops that :mod:`.samples` cannot classify (or classifies with weak
inputs) are here. Each builder returns ``[(label, arrays, fn), ...]``:
``arrays`` are the numpy inputs (each laid out per config), ``fn(*tensors)``
calls the op. Creation ops (no tensor input) and ``keras.random`` draws are
sampled the way layers use them: the drawn tensor combined with an input
tensor (``x + op(shape)``, as ``GaussianNoise`` does), so DTensor lays the
draw out like that input.
"""

from __future__ import annotations

import numpy as np

# Ops with no sample, and why. Every op of the derived list is sampled or here.
SKIP = {
    "shape": "returns a Python tuple (the static shape): no tensor op to lay out",
    "ndim": "returns a Python int: no tensor op",
    "dtype": "returns a dtype string: no tensor op",
    "is_tensor": "returns a Python bool: no tensor op",
    "convert_to_numpy": "host-only: copies to a numpy array, cannot run inside tf.function",
}

# Input domains tried (in order) for auto-classified ops whose float default
# would make a weak sample.
INPUT_DOMAINS = {
    "all": ("bool",),
    "any": ("bool",),
    "logical_not": ("bool",),
    "logical_and": ("bool",),
    "logical_or": ("bool",),
    "logical_xor": ("bool",),
    "count_nonzero": ("int",),
    "bitwise_left_shift": ("int",),
    "bitwise_right_shift": ("int",),
    "power": ("positive",),
}


def _arrays(rng):
    from tfshard.app.opsweep.samples import make_array

    def a(shape, domain="signed"):
        return make_array(rng, shape, domain)

    return a


def _ints(rng, shape, high, low=0):
    return rng.randint(low, high, shape).astype("int32")


def _op(name):
    from tfshard.app.opsweep import oplist

    if name.startswith("random."):
        return oplist.random_function(name.split(".", 1)[1])
    return oplist.op_function(name)


def hand_samples(name, rng):
    """``[(label, arrays, fn), ...]`` for ``name``, or None if not hand-written."""
    builder = _BUILDERS.get(name)
    if builder is None:
        return None
    return builder(_op(name), _arrays(rng), rng)


def _samples():
    from keras import ops

    f32 = "float32"
    X = (4, 3, 8)
    IMG = (2, 8, 8, 8)
    RGB = (2, 8, 8, 3)

    def creation(call):
        """A creation op consumed by an input, as layers use them."""
        return lambda op, a, rng: [(f"x{X} + op", [a(X)], lambda x: x + call(op))]

    def random_draw(call):
        return lambda op, a, rng: [
            (f"x{X} + op(shape) seed=7", [a(X)], lambda x: x + ops.cast(call(op), f32))
        ]

    def pooling(op, a, rng):
        return [
            (f"x{IMG} pool=2", [a(IMG)], lambda x: op(x, 2, strides=2)),
            ("x(4,6,8) pool=2 (1-D)", [a((4, 6, 8))], lambda x: op(x, 2, strides=2)),
            ("x(2,4,4,4,8) pool=2 (3-D)", [a((2, 4, 4, 4, 8))], lambda x: op(x, 2, strides=2)),
            (f"x{IMG} pool=3 same", [a(IMG)], lambda x: op(x, 3, strides=1, padding="same")),
        ]

    def adaptive(op, a, rng):
        return [(f"x{IMG} output=(4,4)", [a(IMG)], lambda x: op(x, (4, 4)))]

    def crossentropy(target_domain, sparse=False):
        def build(op, a, rng):
            target = _ints(rng, (4, 3), 8) if sparse else a(X, target_domain)
            return [
                ("probs", [target, a(X, "prob")], lambda t, p: op(t, p)),
                ("logits", [target, a(X)], lambda t, p: op(t, p, from_logits=True)),
            ]

        return build

    def rgb(op, a, rng):
        return [(f"images{RGB}", [a(RGB, "prob")], op)]

    def pick(*variants):
        """Same input x(4,3,8), one sample per keyword set."""
        def build(op, a, rng):
            return [(f"x{X} {label}", [a(X)], lambda x, _c=call: _c(op, x)) for label, call in variants]

        return build

    return {
        # --- creation ops (no tensor input): consumed by a laid-out input
        "arange": creation(lambda op: ops.cast(op(8), f32)),
        "zeros": creation(lambda op: op(X)),
        "ones": creation(lambda op: op(X)),
        "empty": lambda op, a, rng: [(f"x{X} + 0*op", [a(X)], lambda x: x + 0.0 * op(X))],
        "full": creation(lambda op: op(X, 2.0)),
        "eye": lambda op, a, rng: [("x(4,8,8) + eye(8)", [a((4, 8, 8))], lambda x: x + op(8))],
        "linspace": creation(lambda op: op(0.0, 1.0, 8)),
        "full_like": lambda op, a, rng: [(f"x{X}", [a(X)], lambda x: op(x, 3.0))],
        "meshgrid": lambda op, a, rng: [
            ("a(4,),b(8,) ij", [a((4,)), a((8,))], lambda u, v: op(u, v, indexing="ij")),
            ("a(4,),b(8,) xy", [a((4,)), a((8,))], lambda u, v: op(u, v, indexing="xy")),
        ],
        # --- shape and indexing
        "broadcast_to": lambda op, a, rng: [("x(4,1,8)->(4,3,8)", [a((4, 1, 8))], lambda x: op(x, X))],
        "cast": lambda op, a, rng: [
            (f"x{X} float->int32", [a(X) * 8], lambda x: op(x, "int32")),
            (f"x{X} int->float32", [_ints(rng, X, 8)], lambda x: op(x, f32)),
        ],
        "concatenate": lambda op, a, rng: [
            (f"[x{X},y{X}] axis={axis}", [a(X), a(X)], lambda x, y, _a=axis: op([x, y], axis=_a))
            for axis in (0, -1)
        ],
        "stack": lambda op, a, rng: [
            (f"[x{X},y{X}] axis={axis}", [a(X), a(X)], lambda x, y, _a=axis: op([x, y], axis=_a))
            for axis in (0, -1)
        ],
        "split": pick(("2 axis=0", lambda op, x: op(x, 2, axis=0)),
                      ("2 axis=-1", lambda op, x: op(x, 2, axis=-1)),
                      ("[1] axis=1", lambda op, x: op(x, [1], axis=1))),
        "expand_dims": pick(("axis=1", lambda op, x: op(x, 1)), ("axis=-1", lambda op, x: op(x, -1))),
        "squeeze": lambda op, a, rng: [
            ("x(4,1,8) axis=1", [a((4, 1, 8))], lambda x: op(x, axis=1)),
            ("x(4,1,8)", [a((4, 1, 8))], lambda x: op(x)),
        ],
        "reshape": pick(("->(4,24)", lambda op, x: op(x, (4, 24))),
                        ("->(12,8)", lambda op, x: op(x, (12, 8))),
                        ("->(4,3,2,4)", lambda op, x: op(x, (4, 3, 2, 4)))),
        "transpose": pick(("default", lambda op, x: op(x)), ("axes=(0,2,1)", lambda op, x: op(x, (0, 2, 1)))),
        "swapaxes": pick(("0,2", lambda op, x: op(x, 0, 2)), ("1,2", lambda op, x: op(x, 1, 2))),
        "moveaxis": pick(("0->-1", lambda op, x: op(x, 0, -1)), ("-1->0", lambda op, x: op(x, -1, 0))),
        "repeat": pick(("2 axis=0", lambda op, x: op(x, 2, axis=0)),
                       ("2 axis=1", lambda op, x: op(x, 2, axis=1)),
                       ("2 axis=-1", lambda op, x: op(x, 2, axis=-1))),
        "tile": pick(("(2,1,1)", lambda op, x: op(x, (2, 1, 1))),
                     ("(1,2,1)", lambda op, x: op(x, (1, 2, 1))),
                     ("(1,1,2)", lambda op, x: op(x, (1, 1, 2)))),
        "roll": pick(("1 axis=0", lambda op, x: op(x, 1, axis=0)),
                     ("2 axis=-1", lambda op, x: op(x, 2, axis=-1))),
        "pad": pick(("middle dim", lambda op, x: op(x, ((0, 0), (1, 1), (0, 0)))),
                    ("last dim", lambda op, x: op(x, ((0, 0), (0, 0), (2, 2)))),
                    ("first dim reflect", lambda op, x: op(x, ((1, 1), (0, 0), (0, 0)), mode="reflect"))),
        "slice": pick(("start=(0,1,0) shape=(4,2,8)", lambda op, x: op(x, (0, 1, 0), (4, 2, 8))),
                      ("start=(2,0,2) shape=(2,3,4)", lambda op, x: op(x, (2, 0, 2), (2, 3, 4)))),
        "slice_update": lambda op, a, rng: [
            ("x(4,3,8) at (0,1,0) with (4,1,8)", [a(X), a((4, 1, 8))], lambda x, u: op(x, (0, 1, 0), u)),
            ("x(4,3,8) at (2,0,4) with (2,3,4)", [a(X), a((2, 3, 4))], lambda x, u: op(x, (2, 0, 4), u)),
        ],
        "take": lambda op, a, rng: [
            ("x(4,3,8) ids(5,) axis=-1", [a(X), _ints(rng, (5,), 8)], lambda x, i: op(x, i, axis=-1)),
            ("x(4,3,8) ids(6,) axis=0", [a(X), _ints(rng, (6,), 4)], lambda x, i: op(x, i, axis=0)),
            ("table(16,8) ids(4,3) axis=0", [a((16, 8)), _ints(rng, (4, 3), 16)], lambda x, i: op(x, i, axis=0)),
        ],
        "take_along_axis": lambda op, a, rng: [
            ("x(4,3,8) idx(4,3,2) axis=-1", [a(X), _ints(rng, (4, 3, 2), 8)], lambda x, i: op(x, i, axis=-1)),
            ("x(4,3,8) idx(2,3,8) axis=0", [a(X), _ints(rng, (2, 3, 8), 4)], lambda x, i: op(x, i, axis=0)),
        ],
        "scatter": lambda op, a, rng: [
            ("ids(4,2) values(4,) -> (8,8)",
             [np.array([[0, 1], [3, 7], [5, 2], [7, 7]], "int32"), a((4,))],
             lambda i, v: op(i, v, (8, 8))),
        ],
        "scatter_update": lambda op, a, rng: [
            ("x(8,8) ids(4,2) updates(4,)",
             [a((8, 8)), np.array([[0, 1], [3, 7], [5, 2], [6, 6]], "int32"), a((4,))], op),
        ],
        "segment_sum": lambda op, a, rng: [
            ("data(8,8) ids(8,) num=4", [a((8, 8)), np.array([0, 0, 1, 1, 1, 2, 3, 3], "int32")],
             lambda d, i: op(d, i, num_segments=4)),
            ("data(8,8) ids(8,) sorted", [a((8, 8)), np.array([0, 0, 1, 1, 1, 2, 3, 3], "int32")],
             lambda d, i: op(d, i, sorted=True)),
        ],
        "where": lambda op, a, rng: [
            (f"cond{X},x1,x2", [a(X, "bool"), a(X), a(X)], op),
            (f"cond{X} only", [a(X, "bool")], lambda c: op(c)),
        ],
        "one_hot": lambda op, a, rng: [
            ("ids(4,8) classes=8", [_ints(rng, (4, 8), 8)], lambda i: op(i, 8)),
            ("ids(4,3) classes=8 axis=1", [_ints(rng, (4, 3), 8)], lambda i: op(i, 8, axis=1)),
        ],
        "bincount": lambda op, a, rng: [
            ("x(4,8) minlength=8", [_ints(rng, (4, 8), 8)], lambda i: op(i, minlength=8)),
        ],
        "digitize": lambda op, a, rng: [
            ("x(4,8) bins=[-0.5,-0.2,0,0.3,0.6]", [a((4, 8))], lambda x: op(x, [-0.5, -0.2, 0.0, 0.3, 0.6])),
        ],
        "diag": lambda op, a, rng: [("x(8,)", [a((8,))], op), ("x(8,8)", [a((8, 8))], op)],
        "diagonal": lambda op, a, rng: [
            ("x(8,8)", [a((8, 8))], op),
            ("x(4,8,8) axes 1,2", [a((4, 8, 8))], lambda x: op(x, axis1=1, axis2=2)),
        ],
        "tril": pick(("k=0", lambda op, x: op(x)), ("k=1", lambda op, x: op(x, 1))),
        "triu": pick(("k=0", lambda op, x: op(x)), ("k=-1", lambda op, x: op(x, -1))),
        "extract_sequences": lambda op, a, rng: [("x(4,32) len=8 stride=4", [a((4, 32))], lambda x: op(x, 8, 4))],
        # --- linear algebra, reductions with structure
        "matmul": lambda op, a, rng: [
            ("x(4,3,8)@w(8,8)", [a(X), a((8, 8))], op),
            ("x(4,3,8)@y(4,8,8)", [a(X), a((4, 8, 8))], op),
        ],
        "tensordot": lambda op, a, rng: [
            ("x(4,3,8).w(8,8) axes=1", [a(X), a((8, 8))], lambda x, w: op(x, w, axes=1)),
            ("x(4,3,8).w(3,8,8) axes=2", [a(X), a((3, 8, 8))], lambda x, w: op(x, w, axes=2)),
        ],
        "einsum": lambda op, a, rng: [
            ("btd,de->bte", [a(X), a((8, 8))], lambda x, w: op("btd,de->bte", x, w)),
            ("bid,bjd->bij", [a(X), a(X)], lambda x, y: op("bid,bjd->bij", x, y)),
        ],
        "outer": lambda op, a, rng: [("a(4,),b(8,)", [a((4,)), a((8,))], op)],
        "norm": pick(("axis=-1", lambda op, x: op(x, axis=-1)),
                     ("axis=0", lambda op, x: op(x, axis=0)),
                     ("fro axis=(1,2)", lambda op, x: op(x, ord="fro", axis=(1, 2)))),
        "moments": pick(("axes=[0,1]", lambda op, x: op(x, [0, 1])), ("axes=[-1]", lambda op, x: op(x, [-1]))),
        "in_top_k": lambda op, a, rng: [("targets(4,) preds(4,8) k=3", [_ints(rng, (4,), 8), a((4, 8))],
                                         lambda t, p: op(t, p, 3))],
        "top_k": lambda op, a, rng: [
            ("x(4,8) k=3", [a((4, 8))], lambda x: op(x, 3)),
            ("x(4,3,8) k=2", [a(X)], lambda x: op(x, 2)),
        ],
        "threshold": pick(("0.1 -> 0", lambda op, x: op(x, 0.1, 0.0))),
        "clip": pick(("[-0.5,0.5]", lambda op, x: op(x, -0.5, 0.5))),
        "fft": lambda op, a, rng: [("(real,imag)(4,8)", [a((4, 8)), a((4, 8))], lambda r, i: op((r, i)))],
        "fft2": lambda op, a, rng: [("(real,imag)(4,8,8)", [a((4, 8, 8)), a((4, 8, 8))], lambda r, i: op((r, i)))],
        "stft": lambda op, a, rng: [("x(4,32) len=8 stride=4 fft=8", [a((4, 32))], lambda x: op(x, 8, 4, 8))],
        # --- normalization and losses
        "batch_normalization": lambda op, a, rng: [
            ("x(4,3,8) stats(8,) axis=-1", [a(X), a((8,)), a((8,), "positive"), a((8,)), a((8,), "positive")],
             lambda x, m, v, o, s: op(x, m, v, axis=-1, offset=o, scale=s)),
        ],
        "layer_normalization": lambda op, a, rng: [
            ("x(4,3,8) gamma,beta(8,)", [a(X), a((8,), "positive"), a((8,))],
             lambda x, g, b: op(x, g, b, epsilon=1e-5)),
        ],
        "rms_normalization": lambda op, a, rng: [
            ("x(4,3,8) scale(8,)", [a(X), a((8,), "positive")], lambda x, s: op(x, s, epsilon=1e-5)),
        ],
        "binary_crossentropy": crossentropy("prob"),
        "categorical_crossentropy": crossentropy("prob"),
        "sparse_categorical_crossentropy": crossentropy(None, sparse=True),
        "ctc_loss": lambda op, a, rng: [
            ("labels(4,4) logits(4,8,8)", [_ints(rng, (4, 4), 8, low=1), a((4, 8, 8)),
                                           np.array([4, 3, 2, 4], "int32"), np.full((4,), 8, "int32")], op),
        ],
        "dot_product_attention": lambda op, a, rng: [
            ("q,k,v(4,6,2,8)", [a((4, 6, 2, 8)), a((4, 6, 2, 8)), a((4, 6, 2, 8))], op),
            ("q,k,v(4,6,2,8) causal", [a((4, 6, 2, 8)), a((4, 6, 2, 8)), a((4, 6, 2, 8))],
             lambda q, k, v: op(q, k, v, is_causal=True)),
        ],
        # --- convolution and pooling (NHWC)
        "conv": lambda op, a, rng: [
            ("x(2,8,8,8) k(3,3,8,8) same", [a(IMG), a((3, 3, 8, 8))], lambda x, k: op(x, k, padding="same")),
            ("x(4,6,8) k(3,8,8) 1-D", [a((4, 6, 8)), a((3, 8, 8))], op),
        ],
        "conv_transpose": lambda op, a, rng: [
            ("x(2,4,4,8) k(3,3,8,8) s=2", [a((2, 4, 4, 8)), a((3, 3, 8, 8))],
             lambda x, k: op(x, k, strides=2, padding="same")),
        ],
        "depthwise_conv": lambda op, a, rng: [
            ("x(2,8,8,8) k(3,3,8,1) same", [a(IMG), a((3, 3, 8, 1))], lambda x, k: op(x, k, padding="same")),
        ],
        "separable_conv": lambda op, a, rng: [
            ("x(2,8,8,8) dk(3,3,8,1) pk(1,1,8,8)", [a(IMG), a((3, 3, 8, 1)), a((1, 1, 8, 8))],
             lambda x, d, p: op(x, d, p, padding="same")),
        ],
        "max_pool": pooling,
        "average_pool": pooling,
        "adaptive_max_pool": adaptive,
        "adaptive_average_pool": adaptive,
        # --- images (channels last)
        "image.resize": lambda op, a, rng: [
            (f"x{IMG} ->(4,4) bilinear", [a(IMG)], lambda x: op(x, (4, 4))),
            (f"x{IMG} ->(16,16) nearest", [a(IMG)], lambda x: op(x, (16, 16), interpolation="nearest")),
        ],
        "image.affine_transform": lambda op, a, rng: [
            (f"x{IMG} transform(2,8)", [a(IMG), np.tile(np.array([[1, 0.1, 0.5, 0.05, 1, -0.5, 0, 0]], f32), (2, 1))],
             op),
        ],
        "image.perspective_transform": lambda op, a, rng: [
            (f"x{IMG} 4 points", [a(IMG),
                                  np.tile(np.array([[[0, 0], [7, 0], [0, 7], [7, 7]]], f32), (2, 1, 1)),
                                  np.tile(np.array([[[1, 0], [6, 1], [0, 6], [7, 7]]], f32), (2, 1, 1))], op),
        ],
        "image.elastic_transform": lambda op, a, rng: [
            (f"x{IMG} seed=3", [a(IMG, "prob")], lambda x: op(x, alpha=2.0, sigma=1.0, seed=3)),
        ],
        "image.gaussian_blur": lambda op, a, rng: [(f"x{IMG}", [a(IMG)], op)],
        "image.rgb_to_grayscale": rgb,
        "image.rgb_to_hsv": rgb,
        "image.hsv_to_rgb": rgb,
        # --- control flow and gradients
        "cond": lambda op, a, rng: [
            (f"x{X} pred=sum(x)>0", [a(X)],
             lambda x: op(ops.sum(x) > 0, lambda: x * 2.0, lambda: x - 1.0)),
        ],
        "switch": lambda op, a, rng: [
            (f"x{X} index=sum(x)>0", [a(X)],
             lambda x: op(ops.cast(ops.sum(x) > 0, "int32"), [lambda y: y * 2.0, lambda y: y - 1.0], x)),
        ],
        "while_loop": lambda op, a, rng: [
            (f"x{X} 3 steps", [a(X)],
             lambda x: op(lambda i, v: i < 3, lambda i, v: (i + 1, v * 1.5 + 0.1), (0, x))[1]),
        ],
        "fori_loop": lambda op, a, rng: [
            (f"x{X} 3 steps", [a(X)], lambda x: op(0, 3, lambda i, v: v * 1.5 + 0.1, x)),
        ],
        "map": lambda op, a, rng: [(f"x{X} rows", [a(X)], lambda x: op(lambda r: r * 2.0 + ops.sum(r), x))],
        "custom_gradient": lambda op, a, rng: [(f"x{X} square, grad*3x", [a(X)], lambda x: _cubic_grad(op)(x))],
        # --- keras.random, with a fixed int seed, as layers use them
        "random.dropout": lambda op, a, rng: [
            (f"x{X} rate=0.5 seed=7", [a(X)], lambda x: op(x, 0.5, seed=7)),
            (f"x{X} rate=0.5 noise_shape=(4,1,8) seed=7", [a(X)],
             lambda x: op(x, 0.5, noise_shape=(4, 1, 8), seed=7)),
        ],
        "random.normal": random_draw(lambda op: op(X, seed=7)),
        "random.uniform": random_draw(lambda op: op(X, seed=7)),
        "random.randint": random_draw(lambda op: op(X, 0, 10, seed=7)),
        "random.gamma": random_draw(lambda op: op(X, 2.0, seed=7)),
        "random.beta": random_draw(lambda op: op(X, 2.0, 3.0, seed=7)),
        "random.truncated_normal": random_draw(lambda op: op(X, seed=7)),
        "random.categorical": lambda op, a, rng: [
            ("logits(4,8) 6 draws seed=7", [a((4, 8))], lambda x: op(x, 6, seed=7)),
        ],
        "random.shuffle": lambda op, a, rng: [
            (f"x{X} axis=0 seed=7", [a(X)], lambda x: op(x, axis=0, seed=7)),
            (f"x{X} axis=-1 seed=7", [a(X)], lambda x: op(x, axis=-1, seed=7)),
        ],
    }


def _cubic_grad(custom_gradient):
    @custom_gradient
    def square(x):
        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            return upstream * 3.0 * x

        return x * x, grad

    return square


class _LazyBuilders(dict):
    """The builder table, made on first use (it imports Keras)."""

    def get(self, key, default=None):
        if not self:
            self.update(_samples())
        return super().get(key, default)


_BUILDERS = _LazyBuilders()
