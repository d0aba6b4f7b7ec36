"""Run samples on DTensor inputs (or plain tensors, for the reference).

One ``tf.function`` per group of samples computes the forward of every
sample and its gradient (d/d(float inputs) of ``sum(out * cotangent)`` for a
fixed random cotangent, laid out by the config like the inputs) inside
``strategy.scope()``, so tfshard's op hooks apply. The traced function is
shared by the configs of a mesh (``tf.function`` does not retrace for other
layouts; DTensor expands the graph per layout when it is called).

DTensor expands a function when it is first called, so one failing op fails
its whole group; the group is then split: the samples whose graph holds the
op type (or node) the error names run alone and the rest again, or, when the
error names nothing, the group is bisected. A sample that fails alone runs
forward-only to tell a forward failure from a gradient one. Errors raised
while tracing (tfshard's own checks) are caught per sample. A runtime error
that aborts the process's collectives raises :class:`Poisoned` for the
worker (:mod:`.worker`) to continue in a new process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import time
import zlib

import numpy as np

from tfshard.app.opsweep.samples import flatten_outputs


@dataclasses.dataclass(frozen=True)
class Config:
    """A mesh and the input layout rule applied to every array input."""

    name: str
    data: int
    model: int
    split_batch: bool
    split_feature: bool

    def spec(self, shape):
        """dim 0 over "batch" and/or the last dim over "model", where they divide."""
        spec = [None] * len(shape)
        if self.split_batch and shape and shape[0] % self.data == 0 and self.data > 1:
            spec[0] = "batch"
        if self.split_feature and shape and spec[-1] is None and shape[-1] % self.model == 0:
            spec[-1] = "model"
        return tuple(spec)


CONFIGS = (
    Config("2x4:rep", 2, 4, False, False),
    Config("2x4:batch", 2, 4, True, False),
    Config("2x4:feat", 2, 4, False, True),
    Config("2x4:both", 2, 4, True, True),
    Config("1x8:rep", 1, 8, False, False),
    Config("1x8:feat", 1, 8, False, True),
)
CONFIGS_BY_NAME = {c.name: c for c in CONFIGS}


@dataclasses.dataclass
class Run:
    """What a function call gave for one sample: values or an error."""

    fwd: object = None  # list of numpy arrays, or an exception
    grad: object = None  # list (None for unconnected inputs), an exception, or None (not run)


def _float_positions(sample):
    return [i for i, a in enumerate(sample.arrays) if np.asarray(a).dtype.kind == "f"]


def cotangents(sample):
    """Fixed random cotangents for the sample's float outputs."""
    rng = np.random.RandomState(zlib.crc32(sample.uid.encode()))
    return [
        rng.uniform(-1.0, 1.0, shape).astype("float32")
        for shape, dtype in sample.out_specs
        if dtype.startswith(("float", "bfloat"))
    ]


# ------------------------------------------------------------------ building
def _compute(sample, xs, cots, with_grad, trace_errors):
    import tensorflow as tf

    wrt = [xs[i] for i in _float_positions(sample)] if with_grad else []
    try:
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            for x in wrt:
                tape.watch(x)
            flat = flatten_outputs(sample.fn(*xs))
            floats = [y for y in flat if y.dtype.is_floating]
            loss = None
            if wrt and floats and len(floats) == len(cots):
                loss = tf.add_n([
                    tf.reduce_sum(tf.cast(y, "float32") * c) for y, c in zip(floats, cots)
                ])
    except Exception as err:  # noqa: BLE001 - recorded as this sample's forward outcome
        trace_errors[(sample.index, "fwd")] = err
        return [], []
    if loss is None:
        return flat, []
    try:
        grads = tape.gradient(loss, wrt)
    except Exception as err:  # noqa: BLE001 - recorded as this sample's gradient outcome
        trace_errors[(sample.index, "grad")] = err
        return flat, []
    # tf.function cannot return None: unconnected inputs are noted here.
    trace_errors[(sample.index, "unconnected")] = [g is None for g in grads]
    return flat, [tf.convert_to_tensor(g) for g in grads if g is not None]  # IndexedSlices too


def _function(samples, strategy, with_grad, trace_errors):
    import tensorflow as tf

    def run(inputs, cots):
        out = []
        scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
        with scope:
            for sample, xs, cs in zip(samples, inputs, cots):
                with tf.name_scope(f"s{sample.index}"):
                    out.append(_compute(sample, xs, cs, with_grad.get(sample.index, False), trace_errors))
        return out

    return tf.function(run, autograph=False)


_functions = {}


def _cached_function(samples, strategy, with_grad):
    """One traced function per (samples, gradient flags, strategy), shared by
    the configs of a mesh: ``tf.function`` does not retrace for other input
    layouts (DTensor expands the same graph per layout when it is called),
    as in training, where one step function sees every batch."""
    key = (tuple(s.uid for s in samples), tuple(bool(with_grad.get(s.index)) for s in samples), id(strategy))
    if key not in _functions:
        trace_errors = {}
        _functions[key] = (_function(samples, strategy, with_grad, trace_errors), trace_errors)
    return _functions[key]


def _arguments(samples, config, strategy):
    """Inputs and cotangents, laid out per config, per sample."""
    import tensorflow as tf

    inputs, cots = [], []
    for sample in samples:
        if strategy is None:
            inputs.append([tf.constant(a) for a in sample.arrays])
            cots.append([tf.constant(c) for c in cotangents(sample)])
        else:
            inputs.append([strategy.place(np.asarray(a), config.spec(np.shape(a))) for a in sample.arrays])
            # Cotangents are laid out by the config's rule too, as a layer's
            # upstream gradient is (batch split, features split): the backward
            # pass then runs in those layouts, not in replicated ones.
            cots.append([strategy.place(c, config.spec(c.shape)) for c in cotangents(sample)])
    return inputs, cots


def _recover(strategy, err, log_start=0):
    """The error that caused ``err``, with DTensor ready for the next call.

    DTensor runs a function's per-device parts asynchronously and shares one
    cancellation manager: when one device fails (a runtime error), the
    others are cancelled, the call may report the cancellation instead of the
    cause, and every later call is "cancelled before it was started". A copy
    of a replicated tensor off the mesh waits for all devices, reports the
    first real error, and resets the cancellation manager."""
    import tensorflow as tf

    if strategy is None:
        return err
    cause = None
    for _ in range(3):
        try:
            strategy.place(np.zeros((), "float32"), ()).numpy()
            break
        except Exception as pending:  # noqa: BLE001 - the cause of a cancellation
            if cause is None or isinstance(cause, tf.errors.CancelledError):
                cause = pending
    if isinstance(err, tf.errors.CancelledError) and cause is not None \
            and not isinstance(cause, tf.errors.CancelledError):
        return cause
    if isinstance(err, tf.errors.CancelledError):
        return _cause_from_log(log_start) or err
    return err


# A worker's record of the call in flight, read by its parent if the worker
# crashes (DTensor can segfault, e.g. RelayoutLike in a while loop's gradient).
PROGRESS = {"path": None}


def _note_progress(config, samples, with_grad):
    if os.environ.get("TFSHARD_OPSWEEP_DEBUG"):
        print(f"[opsweep] {config.name if config else 'plain'}: {[s.uid for s in samples]}", flush=True)
    if PROGRESS["path"] is None:
        return
    import json

    note = {"config": config.name if config else None, "uids": [s.uid for s in samples],
            "with_grad": [bool(with_grad.get(s.index)) for s in samples]}
    with open(PROGRESS["path"], "w", encoding="utf-8") as f:
        f.write(json.dumps(note))


# Where TensorFlow's C++ log goes (a worker points fd 2 at a file, see
# worker.main): a kernel that fails on one device logs its status and node
# there even when the call itself reports only the cancellation it caused.
LOG = {"path": None}
_LOGGED = re.compile(
    r"(?:OP_REQUIRES failed at \S+ : |Local rendezvous is aborting with status: )"
    r"([A-Z_]+): ([^\n]*)(?:\n\s*\[\[\{\{node ([^}]*)\}\}\]\])?"
)
_CODES = {"INVALID_ARGUMENT": "InvalidArgumentError", "OUT_OF_RANGE": "OutOfRangeError",
          "FAILED_PRECONDITION": "FailedPreconditionError", "UNIMPLEMENTED": "UnimplementedError",
          "INTERNAL": "InternalError", "RESOURCE_EXHAUSTED": "ResourceExhaustedError",
          "NOT_FOUND": "NotFoundError", "UNKNOWN": "UnknownError"}


def log_position():
    path = LOG["path"]
    return os.path.getsize(path) if path and os.path.exists(path) else 0


def _cause_from_log(start):
    """The first non-cancellation kernel status logged since ``start``, as
    the TensorFlow error it would have raised (its node, if logged, on the
    next line, as TensorFlow's own messages put it)."""
    import tensorflow as tf

    path = LOG["path"]
    if not path or not os.path.exists(path):
        return None
    with open(path, encoding="utf-8", errors="replace") as f:
        f.seek(start)
        text = f.read()
    for code, message, node in _LOGGED.findall(text):
        if code in ("CANCELLED", "ABORTED"):
            continue
        cls = getattr(tf.errors, _CODES.get(code, "UnknownError"))
        if node:
            message += f"\n\t [[{{{{node {node}}}}}]]"
        return cls(None, None, message)
    return None


def _to_numpy(values):
    import tfshard

    return [np.asarray(tfshard.to_numpy(v)) for v in values]


class Poisoned(Exception):
    """A runtime error inside a function with collectives aborted TensorFlow's
    collectives for the rest of the process ("Collective ops is aborted ...
    Restart your program to reset"). The process cannot run another sharded
    function; the caller records ``cause`` and continues in a new process.

    ``culprit``: the sample index the error's node names (None if none),
    ``part``: "fwd" or "grad" (the node is under ``gradient_tape/``), or None.
    """

    def __init__(self, cause, samples, with_grad):
        super().__init__(str(cause))
        self.cause = cause
        self.samples = list(samples)
        self.with_grad = {s.index: with_grad.get(s.index, False) for s in samples}
        import tensorflow as tf

        text = str(cause)
        indices = {s.index for s in samples}
        named = [int(i) for i in _NODE.findall(text) if int(i) in indices]
        if isinstance(cause, tf.errors.CancelledError):
            named = []  # a cancelled collective names its own node, not the failing one
        self.culprit = named[0] if named else (samples[0].index if len(samples) == 1 else None)
        self.part = None
        if named:
            grad = re.search(rf"gradient_tape/(?:\S*/)?s{self.culprit}/", text)
            self.part = "grad" if grad else "fwd"
        elif len(samples) == 1 and not self.with_grad[samples[0].index]:
            self.part = "fwd"


_health_checks = {}
_COMPILE_TIME = ("dtensor_graph_to_mlir_pass", "dtensor/mlir/", "While computing SPMD expansion")


def _poisoned(strategy, err, log_start):
    """Whether the failed call aborted the process's collectives. DTensor's
    expansion errors come before anything runs; a runtime error aborts the
    collectives a little later (the collective executor logs StartAbort)."""
    text = str(err)
    if any(marker in text for marker in _COMPILE_TIME):
        return False
    time.sleep(1.0)  # the abort follows the failing kernel by a few hundred ms
    path = LOG["path"]
    if path and os.path.exists(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            f.seek(log_start)
            if "BaseCollectiveExecutor::StartAbort" in f.read():
                return True
    return not _collectives_work(strategy)



def _collectives_work(strategy):
    """Whether functions with all-reduces over each device group of the mesh
    (the data axis, the model axis, all devices) still run. A group that a
    failed call cancelled aborts the process's collectives on its next use,
    so every group is used here."""
    import tensorflow as tf

    check = _health_checks.get(id(strategy))
    if check is None:
        def sums(x):
            return tf.reduce_sum(x, axis=0), tf.reduce_sum(x, axis=1), tf.reduce_sum(x)

        check = tf.function(sums, autograph=False)
        _health_checks[id(strategy)] = check
    data, model = strategy.mesh.axis_size("batch"), strategy.mesh.axis_size("model")
    value = np.ones((2 * data, 2 * model), "float32")
    try:
        by_batch, by_model, total = check(strategy.place(value, ("batch", "model")))
        return (float(total.numpy()) == value.size
                and np.all(strategy.place(by_batch, (None,)).numpy() == 2 * data)
                and np.all(strategy.place(by_model, (None,)).numpy() == 2 * model))
    except Exception:  # noqa: BLE001 - any failure means the runtime is unusable
        return False


# --------------------------------------------------------------- attribution
_NODE = re.compile(r"\bs(\d+)/")
_SCOPE = re.compile(r"(?:^|/)s(\d+)/")
_OP_TYPE = re.compile(r"\btf\.([A-Z]\w+)")


def _op_types_by_sample(function, args):
    """sample index -> op types in its name scope (function bodies included)."""
    graph = function.get_concrete_function(*args).graph
    library = {}
    for name, fn in getattr(graph, "_functions", {}).items():
        definition = getattr(fn, "definition", None)  # best effort: only narrows the search
        if definition is not None:
            library[name] = {node.op for node in definition.node_def}
    types = {}
    for op in graph.get_operations():
        match = _SCOPE.search(op.name)  # "s3/..." or "gradient_tape/s3/..."
        if not match:
            continue
        found = types.setdefault(int(match.group(1)), set())
        found.add(op.type)
        for value in op.node_def.attr.values():
            if value.HasField("func"):
                found |= library.get(value.func.name, set())
    return types


def _suspects(err, function, args, samples):
    text = str(err)
    indices = {s.index for s in samples}
    named = {int(i) for i in _NODE.findall(text)} & indices
    if named:
        return named
    op_types = set(_OP_TYPE.findall(text))
    if not op_types:
        return set()
    try:
        by_sample = _op_types_by_sample(function, args)
    except Exception:  # noqa: BLE001 - tracing failed: no attribution, bisect instead
        return set()
    return {i for i, types in by_sample.items() if types & op_types} & indices


# ----------------------------------------------------------------- evaluation
def evaluate(samples, config=None, strategy=None, with_grad=None, _stats=None):
    """index -> Run for ``samples`` under ``config`` (None: plain tensors).

    ``with_grad``: index -> bool (default: every sample with a float input)."""
    stats = _stats if _stats is not None else {"compiles": 0}
    if with_grad is None:
        with_grad = {s.index: bool(_float_positions(s)) for s in samples}
    if not samples:
        return {}
    function, trace_errors = _cached_function(samples, strategy, with_grad)
    args = _arguments(samples, config, strategy)
    stats["compiles"] += 1
    started = time.perf_counter()
    log_start = log_position()
    _note_progress(config, samples, with_grad)
    try:
        out = function(*args)
        values = [(_to_numpy(fwd), _to_numpy(grads)) for fwd, grads in out]
    except Exception as err:
        err = _recover(strategy, err, log_start)
        stats.setdefault("timings", []).append((len(samples), time.perf_counter() - started, False))
        if os.environ.get("TFSHARD_OPSWEEP_DEBUG"):
            print(f"[opsweep] {len(samples)} samples failed: {type(err).__name__}: "
                  f"{str(err).strip().splitlines()[0][:160]}", flush=True)
        if strategy is not None and _poisoned(strategy, err, log_start):
            raise Poisoned(err, samples, with_grad) from err
        return _split(samples, config, strategy, with_grad, err, function, args, stats)
    stats.setdefault("timings", []).append((len(samples), time.perf_counter() - started, True))
    runs = {}
    for sample, (fwd, grads) in zip(samples, values):
        run = Run()
        run.fwd = trace_errors.get((sample.index, "fwd")) or fwd
        if isinstance(run.fwd, Exception):
            run.grad = None
        elif (sample.index, "grad") in trace_errors:
            run.grad = trace_errors[(sample.index, "grad")]
        elif (sample.index, "unconnected") in trace_errors:
            grads = iter(grads)
            unconnected = trace_errors[(sample.index, "unconnected")]
            run.grad = [None if missing else next(grads) for missing in unconnected]
        runs[sample.index] = run
    return runs


def _split(samples, config, strategy, with_grad, err, function, args, stats):
    if len(samples) == 1:
        sample = samples[0]
        if with_grad.get(sample.index):
            alone = evaluate(samples, config, strategy, {sample.index: False}, stats)[sample.index]
            if not isinstance(alone.fwd, Exception):
                alone.grad = err
            return {sample.index: alone}
        return {sample.index: Run(fwd=err, grad=None)}
    suspects = _suspects(err, function, args, samples)
    if suspects and len(suspects) < len(samples):
        first = [s for s in samples if s.index in suspects]
        rest = [s for s in samples if s.index not in suspects]
    else:
        half = len(samples) // 2
        first, rest = samples[:half], samples[half:]
    if suspects and len(first) > 1:
        runs = {}
        for sample in first:
            runs.update(evaluate([sample], config, strategy, with_grad, stats))
    else:
        runs = evaluate(first, config, strategy, with_grad, stats)
    runs.update(evaluate(rest, config, strategy, with_grad, stats))
    return runs


