"""Count the collectives DTensor puts into a computation.

DTensor decides the communication of a program when it compiles it: its SPMD
expansion pass rewrites the global-view program into per-device code and
inserts ``tf.DTensorAllReduce``, ``DTensorAllGather``, ``DTensorAllScatter``,
``DTensorAllToAll`` and ``DTensorReduceScatter`` ops where layouts require
them. With DTensor's pass logging on, every compiled program is written out
after each pass, and this module reads those files::

    counts = tfshard.comm.count_collectives(step, x)   # step: your function
    counts[("all_reduce", "model")]                    # -> 1

What is measured
----------------
* One *compilation* of ``fn``: the function is traced afresh as a
  ``tf.function``, run once, and every DTensor program compiled during that
  call is read. A count is per execution of that program; collectives inside
  a loop body count once.
* ``stage="expanded"`` (default): the collectives as SPMD expansion emitted
  them (``after_DTensorSPMDExpansion``), i.e. what the layouts demand, in
  Megatron terms. This is the stage to pin in tests.
* ``stage="optimized"``: the last program text before DTensor lowers its
  collectives to device ops. By then DTensor has lowered all-gathers (on CPU
  and GPU an all-gather becomes an all-reduce of a zero-padded buffer), fused
  all-reduce + all-scatter into reduce-scatter, moved all-reduces past adds
  and combined independent all-reduces. This is the number of collective
  launches that actually run.
* Keys are ``(kind, axis)``. ``kind`` is ``"all_reduce"``, ``"all_gather"``,
  ``"all_scatter"``, ``"all_to_all"``, ``"reduce_scatter"`` or
  ``"collective_permute"``. ``axis`` is the mesh axis the collective runs
  over: for all-reduce and reduce-scatter it is read from the group
  assignment (on a ``batch=2, model=4`` mesh the groups ``[[0,1,2,3],
  [4,5,6,7]]``, a ``tensor<2x4xi32>``, run over ``"model"``); for gathers,
  scatters and all-to-all it is the axis whose sharding the op removes, adds
  or moves. Several axes give a tuple; a group of one device (and a
  collective permute, whose pairs name no axis) gives ``None``; ``"?"``
  means the text could not be read (please report it).
  ``all_scatter`` only slices locally and moves no data, but it is counted.
* Eager ops run one at a time are compiled and cached per op; measure a
  function, not an eager sequence.

Requirements
------------
DTensor writes the files only when TensorFlow's C++ logging was started with
``TF_CPP_VMODULE=dtensor_mlir_passes=1`` (read once, when TensorFlow
starts). ``TF_DUMP_GRAPH_PREFIX`` is read on every dump, so this module points
it at a fresh directory for each measurement. In a process started without
the logging setting, :func:`count_collectives` raises
:class:`CollectiveCountError`; use :func:`run_in_subprocess`, which starts a
fresh interpreter with the right environment and virtual devices and runs
your ``main()`` there.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import threading

from tfshard._spmd_dumps import (  # noqa: F401  (re-exported: reading the dumps)
    DUMPED_PASSES,
    PASS_FILTER_VARIABLE,
    KINDS,
    STAGES,
    CollectiveCountError,
    CollectiveCounts,
    parse_dump_dir,
    parse_module_text,
    random_elements,
    random_elements_in_dump,
)

__all__ = [
    "CollectiveCounts",
    "CollectiveCountError",
    "KINDS",
    "STAGES",
    "count_collectives",
    "dump_dir",
    "dump_logging_enabled",
    "parse_dump_dir",
    "parse_module_text",
    "random_elements",
    "random_elements_in_dump",
    "run_in_subprocess",
]


# -------------------------------------------------------------- in process
_lock = threading.Lock()


def dump_logging_enabled():
    """Whether this process's environment asks DTensor to dump its passes.

    TensorFlow reads the setting once, when it starts; this checks the
    environment variables that decide it.
    """
    vmodule = os.environ.get("TF_CPP_VMODULE", "")
    for item in vmodule.split(","):
        name, _, level = item.partition("=")
        if name.strip() == "dtensor_mlir_passes" and level.strip().isdigit():
            if int(level) >= 1:
                return True
    level = os.environ.get("TF_CPP_MAX_VLOG_LEVEL", "0").strip()
    return level.isdigit() and int(level) >= 1


@contextlib.contextmanager
def dump_dir():
    """Point DTensor's pass dumps at a fresh temporary directory for the
    duration of the ``with`` block, and yield its path::

        with tfshard.comm.dump_dir() as directory:
            model.fit(x, y, batch_size=8, epochs=1)       # compiles the step
            counts, n = tfshard.comm.parse_dump_dir(directory, program="run")

    Use it to measure what :func:`count_collectives` cannot reach, such as
    the train step ``fit`` compiles. The directory (and every dump in it) is
    deleted when the block exits, and ``TF_DUMP_GRAPH_PREFIX`` is restored.
    The files are only written in a process started with DTensor's pass
    logging (see :func:`dump_logging_enabled`, :func:`run_in_subprocess`).
    """
    with tempfile.TemporaryDirectory(prefix="tfshard_comm_") as directory:
        previous = os.environ.get("TF_DUMP_GRAPH_PREFIX")
        os.environ["TF_DUMP_GRAPH_PREFIX"] = directory
        try:
            yield directory
        finally:
            if previous is None:
                os.environ.pop("TF_DUMP_GRAPH_PREFIX", None)
            else:
                os.environ["TF_DUMP_GRAPH_PREFIX"] = previous


_dump_dir = dump_dir  # the former private name, kept for existing callers


def count_collectives(fn, *args, stage="expanded", **kwargs):
    """Run ``fn(*args, **kwargs)`` once as a fresh ``tf.function`` and count
    the collectives of the DTensor program(s) it compiles.

    Pass DTensor inputs (e.g. ``strategy.place(x, spec)``); a plain numpy
    argument would become a constant of the traced program. ``fn`` may build
    a ``GradientTape`` to count a backward pass as well. Returns a
    :class:`CollectiveCounts`.

    Raises :class:`CollectiveCountError` when this process was not started
    with DTensor's pass logging (see :func:`run_in_subprocess`) or when no
    DTensor program was compiled.
    """
    import tensorflow as tf

    if not dump_logging_enabled():
        raise CollectiveCountError(
            "count_collectives needs DTensor's pass dumps, which TensorFlow "
            "writes only when the process starts with "
            "TF_CPP_VMODULE=dtensor_mlir_passes=1. Start Python with that "
            "variable set, or measure in a fresh interpreter with "
            "tfshard.comm.run_in_subprocess(...)."
        )
    traced = tf.function(fn, autograph=False)
    with _lock, dump_dir() as directory:
        traced(*args, **kwargs)
        counts, programs = parse_dump_dir(directory, stage)
    if programs == 0:
        raise CollectiveCountError(
            "count_collectives: running the function compiled no DTensor "
            "program, so nothing was measured. Pass DTensor inputs or use "
            "variables created in strategy.scope(); if TensorFlow started "
            "before TF_CPP_VMODULE=dtensor_mlir_passes=1 was set, use "
            "tfshard.comm.run_in_subprocess(...)."
        )
    return counts


# ------------------------------------------------------------- subprocess
_BOOTSTRAP = textwrap.dedent(
    """
    import json, os, sys
    sys.path[:0] = json.loads(os.environ.pop("TFSHARD_COMM_SYSPATH"))
    import tfshard
    tfshard.use_virtual_devices(int(os.environ.pop("TFSHARD_COMM_DEVICES")))
    from tfshard import comm
    comm._subprocess_main(os.environ.pop("TFSHARD_COMM_TARGET"),
                          os.environ.pop("TFSHARD_COMM_RESULT"))
    """
)


def _encode(value):
    if isinstance(value, CollectiveCounts):
        return {"__collective_counts__": value.as_list()}
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    return value


def _decode(value):
    if isinstance(value, dict):
        if set(value) == {"__collective_counts__"}:
            return CollectiveCounts.from_list(value["__collective_counts__"])
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def _resolve_target(target):
    kind, _, rest = target.partition(":")
    if kind == "source":
        namespace = {"__name__": "__tfshard_comm__"}
        exec(compile(rest, "<tfshard.comm script>", "exec"), namespace)
        main = namespace.get("main")
        if not callable(main):
            raise CollectiveCountError(
                "run_in_subprocess: the script defines no main() function; "
                "define main() and return the counts from it."
            )
        return main
    module_name, _, qualname = rest.partition(":")
    import importlib

    obj = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _subprocess_main(target, result_path):
    result = _resolve_target(target)()
    with open(result_path, "w", encoding="utf-8") as handle:
        json.dump(_encode(result), handle)


def run_in_subprocess(target, *, devices=8, timeout=600, env=None):
    """Run ``target`` in a fresh Python with DTensor pass dumps enabled and
    ``devices`` virtual CPUs, and return what it returns.

    ``target`` is Python source defining ``main()``, a ``"module:function"``
    string, or a module-level function (imported by name in the child, with
    this process's ``sys.path``). Inside it, call :func:`count_collectives`;
    ``main()`` may return a :class:`CollectiveCounts` or JSON-able data
    containing them (dicts, lists), which come back as such.
    """
    if callable(target):
        module = getattr(target, "__module__", None)
        qualname = getattr(target, "__qualname__", "")
        if not module or module == "__main__" or "<locals>" in qualname:
            raise CollectiveCountError(
                f"run_in_subprocess({target!r}): a function must be defined at "
                "module level of an importable module; pass its source "
                "(defining main()) instead."
            )
        spec = f"import:{module}:{qualname}"
    elif isinstance(target, str) and ("\n" in target or "def main" in target):
        spec = "source:" + textwrap.dedent(target)
    elif isinstance(target, str) and target.count(":") == 1:
        spec = "import:" + target
    else:
        raise CollectiveCountError(
            f"run_in_subprocess: target {target!r} is neither a function, "
            "'module:function', nor Python source defining main()."
        )
    with tempfile.TemporaryDirectory(prefix="tfshard_comm_run_") as workdir:
        result_path = os.path.join(workdir, "result.json")
        child_env = dict(os.environ)
        child_env.update(env or {})
        vmodule = child_env.get("TF_CPP_VMODULE", "")
        child_env["TF_CPP_VMODULE"] = ",".join(
            [v for v in vmodule.split(",") if v and not v.startswith("dtensor_mlir_passes")]
            + ["dtensor_mlir_passes=1"]
        )
        child_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        child_env.setdefault("KERAS_BACKEND", "tensorflow")
        child_env.setdefault(PASS_FILTER_VARIABLE, ";".join(DUMPED_PASSES))
        child_env["TF_DUMP_GRAPH_PREFIX"] = os.path.join(workdir, "unmeasured")
        child_env["TFSHARD_COMM_SYSPATH"] = json.dumps([p for p in sys.path if p])
        child_env["TFSHARD_COMM_DEVICES"] = str(int(devices))
        child_env["TFSHARD_COMM_TARGET"] = spec
        child_env["TFSHARD_COMM_RESULT"] = result_path
        proc = subprocess.run(
            [sys.executable, "-c", _BOOTSTRAP],
            env=child_env,
            cwd=os.getcwd(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0 or not os.path.exists(result_path):
            tail = "\n".join(
                line
                for line in proc.stderr.splitlines()
                if not line.startswith(("I0000", "WARNING: All log"))
            )[-4000:]
            raise CollectiveCountError(
                f"run_in_subprocess: the child process failed (exit code "
                f"{proc.returncode}):\n{tail}"
            )
        with open(result_path, encoding="utf-8") as handle:
            return _decode(json.load(handle))
