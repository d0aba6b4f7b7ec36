"""Sample inputs per op (like PyTorch's OpInfo sample inputs).

Small float32 shapes: dim 0 divisible by 2 (the data axis), last dim 8 (the
model axis, 4 or 8 devices). Ops are classified from their signature and a
probe on plain tensors:

* ``unary``: one required argument ``x``; probed with floats in (-0.9, 0.9),
  then (0.1, 1.1) when that gives NaN/inf (log, sqrt, ...), then int32, then
  bool. Ops with an ``axis`` argument also get ``axis=0`` and ``axis=-1``
  (the two dims a layout splits), each kept only if the probe passes.
* ``binary``: required ``(x1, x2)`` or ``(x, y)``; same-shape and bias-broadcast (last dim)
  operands, a quarter of the entries equal (ties for comparisons).
* everything else is hand-written in :mod:`.catalog`, or in its ``SKIP``
  dict with the reason.

Every sample is probed eagerly on plain tensors; the probe's output shapes
fix the gradient cotangents. A hand-written sample that fails its probe is an
error in the catalog, not a skipped op.
"""

from __future__ import annotations

import dataclasses
import inspect
import zlib

import numpy as np

from tfshard.app.opsweep import catalog, oplist

UNARY_DOMAINS = ("signed", "positive", "int", "bool")
X_SHAPE = (4, 3, 8)


@dataclasses.dataclass
class Sample:
    """One call of one op: ``fn(*tensors)`` on ``arrays`` laid out per config."""

    op: str  # canonical op name, "random.<name>" for keras.random
    label: str
    arrays: tuple
    fn: object
    kind: str  # how the sample was made: unary / binary / hand / random
    out_specs: tuple = ()  # ((shape, dtype), ...) of the flat outputs, from the probe
    index: int = -1  # position in the sweep (names its graph scope)

    @property
    def uid(self):
        return f"{self.op}[{self.label}]"


class SampleError(Exception):
    """A hand-written sample fails on plain tensors, or an op has neither
    samples nor a SKIP reason."""


def rng_for(name):
    return np.random.RandomState(zlib.crc32(name.encode()))


def make_array(rng, shape, domain="signed"):
    """A deterministic input: floats without ties, or ints/bools."""
    if domain == "signed":
        return rng.uniform(-0.9, 0.9, shape).astype("float32")
    if domain == "positive":
        return rng.uniform(0.1, 1.1, shape).astype("float32")
    if domain == "prob":
        return rng.uniform(0.05, 0.95, shape).astype("float32")
    if domain == "int":
        return rng.randint(0, 8, shape).astype("int32")
    if domain == "bool":
        return rng.uniform(size=shape) > 0.5
    raise ValueError(domain)


def flatten_outputs(out):
    """The tensors of an op's output (tuples/lists/dicts flattened)."""
    import tensorflow as tf

    flat = tf.nest.flatten(out)
    return [t for t in flat if isinstance(t, (tf.Tensor, tf.Variable))]


def probe(sample):
    """Run ``sample`` eagerly on plain tensors; return its output specs, or
    raise. Non-finite float outputs from finite inputs count as a failure
    (wrong domain)."""
    import tensorflow as tf

    tensors = [tf.constant(a) for a in sample.arrays]
    out = sample.fn(*tensors)
    flat = flatten_outputs(out)
    if not flat:
        raise SampleError(f"{sample.uid}: returns no tensor ({type(out).__name__})")
    specs = []
    for t in flat:
        value = t.numpy()
        if t.dtype.is_floating and not np.all(np.isfinite(value)):
            raise SampleError(f"{sample.uid}: non-finite output on finite input")
        specs.append((tuple(value.shape), t.dtype.name))
    return tuple(specs)


def _required(fn):
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return None
    return [p.name for p in params if p.default is p.empty and p.kind is not p.VAR_KEYWORD]


def _axis_default(fn):
    param = inspect.signature(fn).parameters.get("axis")
    return None if param is None else (param.default,)


def _unary_candidates(name, fn, rng):
    domains = catalog.INPUT_DOMAINS.get(name, UNARY_DOMAINS)
    axis_default = _axis_default(fn)
    for domain in domains:
        x = make_array(rng, X_SHAPE, domain)
        variants = [("", {})]
        if axis_default is not None:
            for axis in (0, -1):
                if axis != axis_default[0]:
                    variants.append((f" axis={axis}", {"axis": axis}))
        yield domain, [
            Sample(name, f"x{X_SHAPE}:{domain}{suffix}", (x,),
                   lambda x, _kw=kw: fn(x, **_kw), "unary")
            for suffix, kw in variants
        ]


def _binary_candidates(name, fn, rng):
    domains = catalog.INPUT_DOMAINS.get(name, UNARY_DOMAINS)
    for domain in domains:
        x1 = make_array(rng, X_SHAPE, domain)
        x2 = make_array(rng, X_SHAPE, domain)
        tie = rng.uniform(size=X_SHAPE) < 0.25
        x2 = np.where(tie, x1, x2).astype(x1.dtype)
        bias = make_array(rng, X_SHAPE[-1:], domain)
        yield domain, [
            Sample(name, f"x1{X_SHAPE},x2{X_SHAPE}:{domain}", (x1, x2), fn, "binary"),
            Sample(name, f"x1{X_SHAPE},x2{bias.shape}:{domain}", (x1, bias), fn, "binary"),
        ]


def _probe_first_domain(name, candidates):
    """The samples of the first domain whose first (default) sample passes
    its probe; of those, the variants that pass too."""
    failures = []
    for domain, samples in candidates:
        try:
            samples[0].out_specs = probe(samples[0])
        except Exception as err:  # noqa: BLE001 - a probe classifies, any failure means "not this domain"
            failures.append(f"{domain}: {type(err).__name__}: {str(err).splitlines()[0][:120]}")
            continue
        kept = [samples[0]]
        for sample in samples[1:]:
            try:
                sample.out_specs = probe(sample)
            except Exception as err:  # noqa: BLE001 - an axis variant the op does not take
                sample.out_specs = err
            if not isinstance(sample.out_specs, Exception):
                kept.append(sample)
        return kept
    raise SampleError(f"{name}: no input domain works ({'; '.join(failures)})")


@dataclasses.dataclass
class SampleSet:
    samples: list
    skipped: dict  # op -> reason
    kinds: dict  # op -> how its samples were made


def build_samples(op_list=None, ops=None):
    """Samples for every op of the derived list (and its keras.random ops).

    ``ops``: an optional subset of names (``"random.normal"`` for random ops)."""
    op_list = op_list or oplist.derive_op_list()
    names = list(op_list.ops) + [f"random.{n}" for n in op_list.random_ops]
    if ops is not None:
        unknown = set(ops) - set(names)
        if unknown:
            raise SampleError(f"not in the derived op list: {sorted(unknown)}")
        names = [n for n in names if n in ops]
    samples, skipped, kinds = [], {}, {}
    for name in names:
        if name in catalog.SKIP:
            skipped[name] = catalog.SKIP[name]
            continue
        rng = rng_for(name)
        hand = catalog.hand_samples(name, rng)
        if hand is not None:
            kind = "random" if name.startswith("random.") else "hand"
            made = []
            for label, arrays, fn in hand:
                sample = Sample(name, label, tuple(arrays), fn, kind)
                try:
                    sample.out_specs = probe(sample)
                except Exception as err:
                    raise SampleError(f"hand-written sample {sample.uid} fails on plain tensors: "
                                      f"{type(err).__name__}: {err}") from err
                made.append(sample)
        else:
            fn = oplist.op_function(name)
            required = _required(fn)
            if required is not None and len(required) == 1:
                kind, made = "unary", _probe_first_domain(name, _unary_candidates(name, fn, rng))
            elif required in (["x1", "x2"], ["x", "y"]):
                kind, made = "binary", _probe_first_domain(name, _binary_candidates(name, fn, rng))
            else:
                raise SampleError(
                    f"{name}{inspect.signature(fn)}: not unary or binary; add hand-written "
                    "samples or a SKIP reason in tfshard/app/opsweep/catalog.py"
                )
        kinds[name] = kind
        samples.extend(made)
    for index, sample in enumerate(samples):
        sample.index = index
        sample.label = sample.label.replace(", ", ",")
    return SampleSet(samples, skipped, kinds)
