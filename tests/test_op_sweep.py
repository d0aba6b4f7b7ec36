"""The op-coverage sweep (tfshard/app/opsweep), modelled on PyTorch's
test/distributed/tensor/test_dtensor_ops.py: every keras.ops / keras.random
function that Keras's layers and keras-hub's models call runs on DTensor
inputs under every layout config and is compared with the plain op.

No cell may be "different" or a raw error unless it is in EXPECTED_FAILURES
(tfshard/app/opsweep/expected.py), strictly: an expected failure that now
passes fails the test, so the list stays true.

The sweep runs in worker processes (a runtime error in a sharded function
aborts TensorFlow's collectives for the rest of a process), one per shard of
two configs; the tests of a shard share one run per session, also across
xdist workers (a file lock in pytest's shared temp dir, as pytest-xdist's
docs describe).
"""

import fcntl
import json
import time

import pytest

from tfshard.app.opsweep import catalog, compare, expected, runner, sweep, worker
from tfshard.app.opsweep.expected import EXPECTED_FAILURES

SHARDS = sweep.SHARDS


@pytest.fixture(scope="session")
def _shared_dir(tmp_path_factory):
    # The parent of a worker's basetemp is shared by every xdist worker.
    root = tmp_path_factory.getbasetemp()
    return root.parent if root.name.startswith("popen-gw") else root


def _compute_shard(shard, shared_dir, wait):
    """Run ``shard`` unless it is done or (``wait`` False) another worker runs it."""
    path = shared_dir / f"opsweep-{shard}.json"
    with open(shared_dir / f"opsweep-{shard}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            return
        if not path.exists():
            start = time.perf_counter()
            out = worker.run_configs(SHARDS[shard])
            out["seconds"] = time.perf_counter() - start
            path.write_text(json.dumps(out))


def _sweep_of(shard, shared_dir):
    """One run of each shard per session, shared by xdist workers: a worker
    that needs a shard another worker is running runs the shards nobody has
    started meanwhile, then waits."""
    for other in [shard] + [s for s in SHARDS if s != shard]:
        _compute_shard(other, shared_dir, wait=False)
    _compute_shard(shard, shared_dir, wait=True)
    out = json.loads((shared_dir / f"opsweep-{shard}.json").read_text())
    return sweep.result_of([out], SHARDS[shard], out["seconds"])


# Module scope: pytest orders a shard's tests together (so xdist tends to send
# them to one worker) and runs each shard once per worker at most.
@pytest.fixture(scope="module", params=list(SHARDS))
def mesh_sweep(request, _shared_dir):
    return _sweep_of(request.param, _shared_dir)


def test_op_list_is_derived_from_keras_and_keras_hub():
    op_list = sweep.derived_op_list()
    assert len(op_list.ops) > 150, sorted(op_list.ops)
    tags = {scan.tag: scan for scan in op_list.scans}
    assert tags["keras.layers"].files > 100 and tags["keras_hub.models"].files > 300
    # Ops only keras-hub calls prove the keras-hub scan feeds the list.
    only_hub = op_list.only_in("keras_hub")
    assert {"argsort", "tril", "slice_update", "erfinv"} <= set(only_hub), only_hub
    assert op_list.ops["top_k"] and "one_hot" in op_list.ops and "max_pool" in op_list.ops
    assert {"dropout", "normal", "uniform"} <= set(op_list.random_ops)


def test_every_op_has_samples_or_a_reasoned_skip():
    op_list = sweep.derived_op_list()
    sset = sweep.sample_set()
    sampled = {s.op for s in sset.samples}
    names = set(op_list.ops) | {f"random.{n}" for n in op_list.random_ops}
    assert names == sampled | set(sset.skipped), names ^ (sampled | set(sset.skipped))
    assert set(catalog.SKIP) <= names, set(catalog.SKIP) - names  # no stale SKIP entries
    assert all(len(reason) > 20 for reason in catalog.SKIP.values())
    for sample in sset.samples:  # the main input: batch dim divisible by 2, 8-friendly last dim
        if sample.arrays and sample.arrays[0].ndim >= 2 and sample.arrays[0].shape[-1] == 8:
            assert sample.arrays[0].shape[0] % 2 == 0, sample.uid


def test_expected_failures_name_real_cells():
    names = set(sweep.derived_op_list().ops) | {f"random.{n}" for n in sweep.derived_op_list().random_ops}
    for (op, config, part), reason in EXPECTED_FAILURES.items():
        assert op in names and config in runner.CONFIGS_BY_NAME and part in ("fwd", "grad"), (op, config, part)
        assert reason.strip(), (op, config, part)


def test_sweep_cells_are_exact_or_clear_errors(mesh_sweep):
    result = mesh_sweep
    assert not result.reference_failures, result.reference_failures
    unexpected, stale = expected.check(result, complete=True)
    lines = [f"({op!r}, {config!r}, {part!r}): {cell.kind}: {cell.detail[:200]} [{cell.sample}]"
             for (op, config, part), cell in sorted(unexpected.items())]
    assert not unexpected, "failing cells not in EXPECTED_FAILURES:\n" + "\n".join(lines)
    assert not stale, (
        "EXPECTED_FAILURES entries that now pass (remove them from tfshard/app/opsweep/expected.py):\n"
        + "\n".join(f"{key!r}: now {result.cells[key].kind}" for key in sorted(stale))
    )


def test_sweep_error_messages_name_no_mlir(mesh_sweep):
    """Every error cell a user could meet (tfshard errors, and raw errors not
    already tracked as expected failures) is free of DTensor's raw text."""
    bad = []
    for key, cell in sorted(mesh_sweep.errors().items()):
        if cell.kind == compare.RAW and key in EXPECTED_FAILURES:
            continue
        if "UnknownError" in cell.message or "MLIR" in cell.message:
            bad.append(f"{key!r}: {cell.detail[:200]}")
    assert not bad, "\n".join(bad)


def test_sweep_covers_every_sampled_op_and_config(mesh_sweep):
    sset = sweep.sample_set()
    ops = {s.op for s in sset.samples}
    for config in mesh_sweep.configs:
        for op in ops:
            for part in ("fwd", "grad"):
                assert (op, config.name, part) in mesh_sweep.cells, (op, config.name, part)


def test_cells_compare_values_not_just_shapes():
    import numpy as np

    a = np.linspace(-2, 2, 24, dtype="float32").reshape(4, 6)
    assert compare.compare([a.copy()], [a]).kind == compare.EXACT
    assert compare.compare([a + 1e-7], [a]).kind == compare.EXACT  # within 1e-6 * max|a|
    different = compare.compare([a + 1e-4], [a])
    assert different.kind == compare.DIFFERENT and "rel diff" in different.detail
    assert compare.compare([a[:2]], [a]).kind == compare.DIFFERENT
    ints = np.arange(6, dtype="int32")
    assert compare.compare([ints], [ints]).kind == compare.EXACT
    assert compare.compare([ints + (ints == 3)], [ints]).kind == compare.DIFFERENT
    nan = a.copy()
    nan[0, 0] = np.nan
    assert compare.compare([nan], [a]).kind == compare.DIFFERENT
    assert compare.compare([nan], [nan]).kind == compare.EXACT


def test_layout_configs_split_only_dims_that_divide():
    both = runner.CONFIGS_BY_NAME["2x4:both"]
    assert both.spec((4, 3, 8)) == ("batch", None, "model")
    assert both.spec((3, 8)) == (None, "model")
    assert both.spec((4, 3)) == ("batch", None)
    assert both.spec((8,)) == ("batch",)  # one dim: the batch split comes first
    assert both.spec(()) == ()
    assert runner.CONFIGS_BY_NAME["1x8:feat"].spec((2, 4)) == (None, None)
    assert runner.CONFIGS_BY_NAME["1x8:rep"].spec((4, 8)) == (None, None)
