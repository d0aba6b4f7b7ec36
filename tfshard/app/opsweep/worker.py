"""Layout configs of the sweep, in their own process.

``python -m tfshard.app.opsweep.worker --plan plan.json --out out.json``

Two things end a process that runs sharded functions: a runtime error inside
a function with collectives aborts TensorFlow's collectives for the rest of
the process (see :class:`.runner.Poisoned`), and DTensor can crash outright
(a segfault). So configs run in worker processes, never in the caller (a
test process must stay usable). After every group a worker writes its
results and the plan for what is left; when it is poisoned it says which
sample did it and exits with :data:`EXIT_CONTINUE`; when it crashes, its
parent reads which call was in flight. Either way :func:`run_configs` starts
the next worker on the rest.

A plan names the configs in order and, per config, which samples to run in
groups (``run``, None for all), forward only because their gradient outcome
is already known (``fwd_only``), or one by one (``isolate``: an unnamed
culprit is among them). The configs of one worker share its samples,
reference and traced functions.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile

EXIT_CONTINUE = 3
MAX_WORKERS = 40  # a guard against workers that make no progress
REFERENCE_CHUNK = 64


def _write(path, data):
    tmp = pathlib.Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _needed_ops(plan):
    """Ops whose samples the plan needs (None: every op)."""
    if any(c.get("run") is None for c in plan["configs"].values()):
        return plan.get("ops")
    uids = set()
    for cplan in plan["configs"].values():
        for key in ("run", "fwd_only", "isolate"):
            uids.update(cplan.get(key) or [])
    return sorted({uid.split("[", 1)[0] for uid in uids})


def _entry(sample, config, **parts):
    from tfshard.app.opsweep import sweep

    return {"op": sample.op, "label": sample.label, "split": sweep.split_note(sample, config), **parts}


def _work(plan, out_path, group_size):
    from tfshard.app.opsweep import runner, sweep

    ops = _needed_ops(plan)
    sset = sweep.sample_set(None if ops is None else tuple(ops))
    stats = {"compiles": 0}
    out = {"results": {}, "partial": {}, "reference_failures": {}, "next": None,
           "skipped": sset.skipped, "kinds": sset.kinds, "stats": stats}
    reference = {}
    failed_before = set()  # samples that failed under an earlier config of this worker
    names = list(plan["configs"])
    for position, name in enumerate(names):
        cplan = plan["configs"][name]
        later = {n: plan["configs"][n] for n in names[position + 1:]}
        wanted = None
        if cplan.get("run") is not None:
            wanted = set(cplan["run"]) | set(cplan.get("fwd_only") or []) | set(cplan.get("isolate") or [])
        samples = [s for s in sset.samples if wanted is None or s.uid in wanted]
        missing = [s for s in samples if s.index not in reference]
        for start in range(0, len(missing), REFERENCE_CHUNK):
            reference.update(runner.evaluate(missing[start:start + REFERENCE_CHUNK], _stats=stats))

        def resume(next_cplan, name=name, later=later):
            return {"ops": plan.get("ops"), "configs": {name: next_cplan, **later}}

        poisoned_plan = _run_config(runner.CONFIGS_BY_NAME[name], cplan, samples, reference,
                                    out, group_size, stats, out_path, resume, failed_before)
        if poisoned_plan is not None:
            out["next"] = poisoned_plan
            break
        out["resume"] = {"ops": plan.get("ops"), "configs": later} if later else None
    _write(out_path, out)
    return EXIT_CONTINUE if out["next"] else 0


def _run_config(config, cplan, samples, reference, out, group_size, stats, out_path, resume,
                failed_before):
    """Run one config; the plan for the rest of it if the process is poisoned.

    Samples that failed under an earlier config run alone, before the groups:
    most failures do not depend on the layout (an op DTensor cannot lay out
    at all), and a failing sample in a group costs the group a recompile."""
    from tfshard.app.opsweep import compare, runner, sweep

    results = out["results"].setdefault(config.name, {})
    partial = out["partial"].setdefault(config.name, {})
    fwd_only = set(cplan.get("fwd_only") or [])
    isolate = set(cplan.get("isolate") or [])
    usable = []
    for sample in samples:
        err = reference[sample.index].fwd
        if isinstance(err, Exception):
            out["reference_failures"][sample.uid] = f"{type(err).__name__}: {err}"
        else:
            usable.append(sample)
    with_grad = {
        s.index: s.uid not in fwd_only and isinstance(reference[s.index].grad, list)
        and any(g is not None for g in reference[s.index].grad)
        for s in usable
    }
    alone = isolate | failed_before
    units = [[s] for s in usable if s.uid in alone]
    units += sweep.groups([s for s in usable if s.uid not in alone], group_size)

    def rest(extra_fwd_only=(), extra_isolate=()):
        left = [s.uid for s in usable if s.uid not in results]
        return {"run": left,
                "fwd_only": sorted((fwd_only | set(extra_fwd_only)) & set(left)),
                "isolate": [u for u in list(isolate) + list(extra_isolate) if u in left]}

    strategy = sweep.strategy_for(config)
    for unit in units:
        out["resume"] = resume(rest())  # if this worker crashes now
        _write(out_path, out)
        try:
            runs = runner.evaluate(unit, config, strategy, dict(with_grad), _stats=stats)
        except runner.Poisoned as poisoned:
            culprit = next((s for s in poisoned.samples if s.index == poisoned.culprit), None)
            if culprit is None:
                return resume(rest(extra_isolate=[s.uid for s in poisoned.samples]))
            error = compare.error_outcome(poisoned.cause).to_json()
            if poisoned.part == "fwd":
                results[culprit.uid] = _entry(culprit, config, fwd=error, grad=_blocked(culprit.uid in fwd_only))
            else:  # the gradient (or an unknown part): the forward runs again, forward only
                partial[culprit.uid] = _entry(culprit, config, grad=error)
            return resume(rest(extra_fwd_only=[culprit.uid]))
        for sample in unit:
            fwd, grad = compare.outcomes(sample, runs[sample.index], reference[sample.index])
            if fwd.kind in compare.FAILING + (compare.TFSHARD,) or grad.kind in compare.FAILING + (compare.TFSHARD,):
                failed_before.add(sample.uid)
            entry = _entry(sample, config, fwd=fwd.to_json())
            if sample.uid not in fwd_only:
                entry["grad"] = grad.to_json()
            results[sample.uid] = entry
    return None


def _blocked(known_already):
    from tfshard.app.opsweep import compare

    if known_already:
        return None
    return compare.Outcome(compare.BLOCKED, "forward fails").to_json()


def _after_crash(out, progress, returncode):
    """The plan after a worker crashed in the call ``progress`` names: a
    single sample gets the crash as its outcome, several run one by one."""
    from tfshard.app.opsweep import compare

    plan = out.get("resume")
    if plan is None or progress.get("config") is None:
        return None  # crashed outside a sharded call: nothing to attribute
    name = progress["config"]
    cplan = plan["configs"][name]
    uids = progress["uids"]
    try:
        signame = signal.Signals(-returncode).name
    except ValueError:
        signame = f"exit code {returncode}"
    crash = compare.Outcome(
        compare.RAW, f"WorkerCrash: the process died ({signame}) while DTensor ran this sample",
        f"WorkerCrash: the process died ({signame}) while DTensor ran this sample",
    ).to_json()
    if len(uids) > 1:
        cplan["isolate"] = sorted(set(cplan.get("isolate") or []) | set(uids))
        return plan, {}
    uid = uids[0]
    op, label = uid.split("[", 1)
    entry = {"op": op, "label": label[:-1], "split": ""}
    if progress["with_grad"][0]:  # forward and gradient: the forward runs again alone
        cplan["fwd_only"] = sorted(set(cplan.get("fwd_only") or []) | {uid})
        return plan, {name: {uid: dict(entry, grad=crash)}}
    cplan["run"] = [u for u in cplan["run"] if u != uid]
    cplan["fwd_only"] = [u for u in cplan.get("fwd_only") or [] if u != uid]
    cplan["isolate"] = [u for u in cplan.get("isolate") or [] if u != uid]
    return plan, {name: {uid: dict(entry, fwd=crash)}}


def run_configs(config_names, ops=None, group_size=None, log=None):
    """Run configs in worker processes until every sample has outcomes.

    Returns the merged worker output: ``results`` (config -> sample uid ->
    entry), reference failures, SKIP reasons, sample kinds, worker count,
    compiles and timings."""
    from tfshard.app.opsweep import sweep

    group_size = group_size or sweep.GROUP_SIZE
    plan = {"ops": sorted(ops) if ops else None, "configs": {name: {"run": None} for name in config_names}}
    merged = {"results": {}, "reference_failures": {}, "skipped": {}, "kinds": {},
              "workers": 0, "compiles": 0, "timings": [], "crashes": 0}
    package_root = str(pathlib.Path(__file__).resolve().parents[3])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [package_root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    label = ",".join(config_names)
    with tempfile.TemporaryDirectory(prefix="tfshard-opsweep-") as tmp:
        for attempt in range(MAX_WORKERS):
            plan_path = pathlib.Path(tmp, f"plan{attempt}.json")
            out_path = pathlib.Path(tmp, f"out{attempt}.json")
            _write(plan_path, plan)
            proc = subprocess.run(
                [sys.executable, "-m", "tfshard.app.opsweep.worker", "--plan", str(plan_path),
                 "--out", str(out_path), "--group-size", str(group_size)],
                env=env, capture_output=True, text=True, check=False,
            )
            merged["workers"] += 1
            out = json.loads(out_path.read_text()) if out_path.exists() else None
            progress_path = pathlib.Path(str(out_path) + ".progress")
            crashed = proc.returncode not in (0, EXIT_CONTINUE)
            after = None
            if crashed and out is not None and progress_path.exists():
                after = _after_crash(out, json.loads(progress_path.read_text()), proc.returncode)
            if out is None or (crashed and after is None):
                log_path = pathlib.Path(str(out_path) + ".log")
                log_text = log_path.read_text(errors="replace") if log_path.exists() else ""
                raise RuntimeError(
                    f"op sweep worker for {label} exited with {proc.returncode}:\n"
                    f"{proc.stderr[-2000:]}\n{log_text[-4000:]}"
                )
            _merge(merged, out)
            if crashed:
                merged["crashes"] += 1
                plan, crash_results = after
                _merge(merged, {"results": crash_results})
            if log:
                ran = sum(len(r) for r in out["results"].values())
                why = " (crashed)" if crashed else " (runtime error)" if out["next"] else ""
                log(f"{label}: worker {attempt + 1} ran {ran} samples{why}")
            if proc.returncode == 0:
                break
            if not crashed:
                plan = out["next"]
        else:
            raise RuntimeError(f"op sweep for {label}: no progress after {MAX_WORKERS} workers")
    return merged


def _merge(merged, out):
    for key in ("partial", "results"):
        for config, entries in out.get(key, {}).items():
            target = merged["results"].setdefault(config, {})
            for uid, entry in entries.items():
                target.setdefault(uid, {}).update({k: v for k, v in entry.items() if v is not None})
    if "stats" not in out:
        return
    merged["reference_failures"].update(out["reference_failures"])
    merged["skipped"].update(out["skipped"])
    merged["kinds"].update(out["kinds"])
    merged["compiles"] += out["stats"].get("compiles", 0)
    merged["timings"] += out["stats"].get("timings", [])


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tfshard.app.opsweep.worker")
    parser.add_argument("--plan", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--group-size", type=int, default=0)
    args = parser.parse_args(argv)
    # TensorFlow's C++ log (kernel failures behind a cancelled call) goes to
    # a file the runner reads; WARNING level keeps those lines.
    log_path = args.out + ".log"
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log_fd, 2)
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "1"
    import tfshard

    tfshard.use_virtual_devices(8)
    from tfshard.app.opsweep import runner, sweep

    runner.LOG["path"] = log_path
    runner.PROGRESS["path"] = args.out + ".progress"
    plan = json.loads(pathlib.Path(args.plan).read_text())
    return _work(plan, args.out, args.group_size or sweep.GROUP_SIZE)


if __name__ == "__main__":
    sys.exit(main())
