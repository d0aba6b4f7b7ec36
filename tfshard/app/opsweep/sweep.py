"""The sweep as a whole: each config in worker processes (see
:mod:`.worker`), one cell per (op, config, "fwd"|"grad") holding the worst
outcome over the op's samples."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import time

from tfshard.app.opsweep import compare, oplist, runner
from tfshard.app.opsweep import samples as samples_module

GROUP_SIZE = 8  # samples per compiled function (small: a failure recompiles its group)


@dataclasses.dataclass
class Cell:
    kind: str
    detail: str = ""
    message: str = ""
    sample: str = ""  # the sample that decided the cell
    split: str = ""  # how that sample's inputs were laid out


@dataclasses.dataclass
class SweepResult:
    op_list: object
    configs: list
    cells: dict  # (op, config name, "fwd"|"grad") -> Cell
    skipped: dict  # op -> reason
    kinds: dict  # op -> how its samples were made
    sample_counts: dict  # op -> number of samples
    reference_failures: dict  # sample uid -> error (fails unsharded: a broken sample)
    seconds: float
    workers: int
    compiles: int

    @property
    def ops(self):
        return sorted({op for op, _, _ in self.cells})

    def counts(self, part=None):
        counts = {}
        for (_, _, p), cell in self.cells.items():
            if part is None or p == part:
                counts[cell.kind] = counts.get(cell.kind, 0) + 1
        return counts

    def failing(self):
        return {key: cell for key, cell in self.cells.items() if cell.kind in compare.FAILING}

    def errors(self):
        return {key: cell for key, cell in self.cells.items()
                if cell.kind in (compare.RAW, compare.TFSHARD)}


def groups(samples, size=GROUP_SIZE):
    """Consecutive samples, an op's samples kept together."""
    out, current = [], []
    for sample in samples:
        if current and len(current) >= size and current[-1].op != sample.op:
            out.append(current)
            current = []
        current.append(sample)
    if current:
        out.append(current)
    return out


@functools.cache
def derived_op_list():
    return oplist.derive_op_list()


@functools.cache
def sample_set(ops=None):
    return samples_module.build_samples(derived_op_list(), ops=None if ops is None else set(ops))


@functools.cache
def _strategy(data, model):
    import tfshard

    mesh = tfshard.Mesh({"batch": data, "model": model})
    return tfshard.StrategyBuilder(mesh).data_parallel("batch").tensor_parallel("model").build()


def strategy_for(config):
    return _strategy(config.data, config.model)


def split_note(sample, config):
    """How the config lays out each input: "(batch,-,model)" or "rep"."""
    import numpy as np

    notes = []
    for array in sample.arrays:
        spec = config.spec(np.shape(array))
        notes.append("(" + ",".join(a or "-" for a in spec) + ")" if any(spec) else "rep")
    return " ".join(notes)


def cells_of(config_name, results):
    """Worst outcome per (op, config, part) over the op's samples."""
    cells = {}
    for entry in results.values():
        fwd = compare.Outcome.from_json(entry["fwd"])
        grad = compare.Outcome.from_json(entry.get("grad", [compare.NOT_APPLICABLE, "", ""]))
        if fwd.kind in (compare.RAW, compare.TFSHARD) and grad.kind not in (compare.NOT_APPLICABLE,):
            grad = compare.Outcome(compare.BLOCKED, "forward fails")
        for part, outcome in (("fwd", fwd), ("grad", grad)):
            key = (entry["op"], config_name, part)
            old = cells.get(key)
            if old is None or compare.SEVERITY[outcome.kind] > compare.SEVERITY[old.kind]:
                cells[key] = Cell(outcome.kind, outcome.detail, outcome.message,
                                  entry["label"], entry["split"])
    return cells


# Configs per worker process: one mesh's configs share traced functions, and
# three workers of two configs each balance over two cores (and xdist workers).
SHARDS = {
    "2x4-rep-batch": ("2x4:rep", "2x4:batch"),
    "2x4-feat-both": ("2x4:feat", "2x4:both"),
    "1x8": ("1x8:rep", "1x8:feat"),
}


def shards(config_names):
    """The configs of ``config_names`` grouped by :data:`SHARDS`."""
    out = {}
    for shard, names in SHARDS.items():
        chosen = [n for n in names if n in config_names]
        if chosen:
            out[shard] = chosen
    return out


def run_sweep(configs=None, ops=None, group_size=GROUP_SIZE, jobs=1, progress=None):
    """Run the sweep; ``configs``/``ops`` filter by name; ``jobs`` worker processes at once."""
    from tfshard.app.opsweep import worker

    start = time.perf_counter()
    names = list(configs) if configs else [c.name for c in runner.CONFIGS]
    unknown = [n for n in names if n not in runner.CONFIGS_BY_NAME]
    if unknown:
        raise ValueError(f"unknown configs {unknown}; known: {list(runner.CONFIGS_BY_NAME)}")
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [pool.submit(worker.run_configs, group, ops, group_size, progress)
                   for group in shards(names).values()]
        outputs = [future.result() for future in futures]
    return result_of(outputs, names, time.perf_counter() - start)


def result_of(outputs, names, seconds):
    """A SweepResult from merged worker outputs."""
    cells, reference_failures, skipped, kinds, counts = {}, {}, {}, {}, {}
    workers = compiles = 0
    for out in outputs:
        for name, results in out["results"].items():
            cells.update(cells_of(name, results))
            per_op = {}
            for entry in results.values():
                per_op[entry["op"]] = per_op.get(entry["op"], 0) + 1
            for op, n in per_op.items():
                counts[op] = max(counts.get(op, 0), n)
        reference_failures.update(out["reference_failures"])
        skipped.update(out["skipped"])
        kinds.update(out["kinds"])
        workers += out["workers"]
        compiles += out["compiles"]
    return SweepResult(
        op_list=derived_op_list(), configs=[runner.CONFIGS_BY_NAME[n] for n in names],
        cells=cells, skipped=skipped, kinds=kinds, sample_counts=counts,
        reference_failures=reference_failures, seconds=seconds,
        workers=workers, compiles=compiles,
    )
