"""DTensor multi-client: one mesh over several processes.

* End to end, in fresh Python processes started by ``tfshard launch`` on
  loopback (2 processes x 4 virtual CPUs = a 2x4 mesh): training equals the
  single-process 2x4 run, with global and with per-process input;
  checkpoints move 2 -> 1 and 1 -> 2 processes; a killed worker stops the
  job and leaves no process behind.
* In this process: the launcher on tiny commands, settings validation, the
  GPU/TPU initialization path and multi-client meshes with the runtime
  mocked, per-process input contexts, and the coordination helpers.
"""

import fcntl
import io
import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
import tfshard
from tfshard import _dtensor, multi_client
from tfshard import mesh as mesh_lib
from tfshard.app import cli
from tfshard.app import launch as launch_lib
from tfshard.checkpoint import CheckpointError, list_checkpoints, read_manifest
from tfshard.errors import MeshError, MultiClientError, ProcessLostError

from conftest import make_strategy

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "_multi_client_worker.py")
# Guards against hangs (a job that never ends fails the test); not timings.
JOB_TIMEOUT = 420
STOP_TIMEOUT = 120

CLUSTER_ENV = (
    "DTENSOR_CLIENT_ID", "DTENSOR_NUM_CLIENTS", "DTENSOR_JOB_NAME", "DTENSOR_JOBS",
    "TFSHARD_DEVICES_PER_PROCESS", "TFSHARD_DEVICE_TYPE", "DTENSOR_GPU_USE_NCCL_COMMUNICATION",
)


# ----------------------------------------------------------------- helpers
def subprocess_env():
    env = {k: v for k, v in os.environ.items() if k not in CLUSTER_ENV}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, HERE, env.get("PYTHONPATH")) if p)
    return env


def launch_command(*worker_args, processes=2):
    return [
        sys.executable, "-m", "tfshard.app.cli", "launch",
        "--processes", str(processes), "--devices-per-process", "4",
        "--timeout", str(JOB_TIMEOUT), "--grace", "5",
        "--", sys.executable, WORKER, *map(str, worker_args),
    ]


def run(command):
    proc = subprocess.run(
        command, env=subprocess_env(), capture_output=True, text=True,
        timeout=JOB_TIMEOUT + 60, cwd=REPO,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{command} failed ({proc.returncode}):\n{output[-6000:]}"
    return output


def results(directory, rank):
    with np.load(os.path.join(directory, f"results-{rank}.npz")) as npz:
        arrays = {k: npz[k] for k in npz.files}
    logs_path = os.path.join(directory, f"logs-{rank}.json")
    logs = json.load(open(logs_path)) if os.path.exists(logs_path) else {}
    return arrays, logs


def group(arrays, prefix):
    keys = sorted((k for k in arrays if k.startswith(prefix + "/")), key=lambda k: int(k.split("/")[1]))
    assert keys, prefix
    return [arrays[k] for k in keys]


def assert_states_close(got, want, exact=False):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        if exact:
            np.testing.assert_array_equal(g, w)
        else:
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead
    except OSError:
        return False


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def read_int(path):
    try:
        with open(path) as f:
            return int(f.read().strip() or -1)
    except (OSError, ValueError):
        return -1


# ------------------------------------------- end to end: 2 processes x 4 CPUs
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """1. The single-process 2x4 reference (and its checkpoint).
    2. The same on 2 processes x 4 CPUs, restoring checkpoint 1 (1 -> 2).
    3. One process restoring the 2-process checkpoint (2 -> 1)."""
    uid = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if uid:  # shared by this run's xdist workers: the jobs run once
        base = tmp_path_factory.getbasetemp().parent / f"multi_client-{uid}"
        base.mkdir(exist_ok=True)
    else:
        base = tmp_path_factory.mktemp("multi_client")
    one, two, back = base / "one", base / "two", base / "back"
    with open(base / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another worker may be running them
        if not (base / "done").exists():
            run([sys.executable, WORKER, "suite", one])
            output = run(launch_command("suite", two, "--checkpoint", one / "ckpts"))
            (base / "launch_output.txt").write_text(output)
            run([sys.executable, WORKER, "restore", back, "--checkpoint", two / "ckpts"])
            (base / "done").write_text("")
    launch_output = (base / "launch_output.txt").read_text()
    return {
        "one": results(one, 0),
        "two": [results(two, 0), results(two, 1)],
        "back": results(back, 0),
        "two_dir": str(two),
        "launch_output": launch_output,
    }


def test_one_mesh_spans_both_processes(runs):
    for rank, (_, logs) in enumerate(runs["two"]):
        devices = logs["devices"]
        assert devices == [
            f"/job:worker/replica:0/task:{task}/device:CPU:{i}" for task in (0, 1) for i in range(4)
        ]
        assert logs["local_devices"] == devices[4 * rank: 4 * rank + 4]
        # Process r holds batch row r of the 2x4 mesh: half of every batch.
        assert logs["input_context"] == [2, rank]
    assert runs["one"][1]["input_context"] == [1, 0]


@pytest.mark.parametrize("run_name", ["mlp-global", "mlp-process", "transformer-process"])
def test_training_matches_single_process(runs, run_name):
    (want, want_logs), two = runs["one"], runs["two"]
    for arrays, logs in two:
        np.testing.assert_allclose(logs[run_name], want_logs[run_name], rtol=1e-5, atol=1e-6)
        assert_states_close(group(arrays, run_name), group(want, run_name))
    # Both processes see the same global model (weights and optimizer slots).
    assert_states_close(group(two[0][0], run_name), group(two[1][0], run_name), exact=True)


def test_global_input_is_bit_exact(runs):
    """Global batches packed per process are the very same computation."""
    (want, want_logs), (got, got_logs) = runs["one"], runs["two"][0]
    assert got_logs["mlp-global"] == want_logs["mlp-global"]
    assert_states_close(group(got, "mlp-global"), group(want, "mlp-global"), exact=True)


def test_evaluate_and_predict_match_single_process(runs):
    want = runs["one"][1]
    for _, logs in runs["two"]:
        np.testing.assert_allclose(logs["evaluate"], want["evaluate"], rtol=1e-5)
        np.testing.assert_allclose(logs["predict"], want["predict"], rtol=1e-5, atol=1e-6)


def test_checkpoint_saved_by_two_processes_restores_in_one(runs):
    saved = group(runs["two"][0][0], "mlp-process")
    assert_states_close(group(runs["back"][0], "restored"), saved, exact=True)


def test_checkpoint_saved_by_one_process_restores_in_two(runs):
    saved = group(runs["one"][0], "mlp-process")
    for arrays, _ in runs["two"]:
        assert_states_close(group(arrays, "restored"), saved, exact=True)


def test_two_process_checkpoint_is_committed_once(runs):
    directory = os.path.join(runs["two_dir"], "ckpts")
    assert [os.path.basename(p) for p in list_checkpoints(directory)] == ["ckpt-4"]
    assert sorted(os.listdir(directory)) == ["ckpt-4"]  # no temp dirs left
    manifest = read_manifest(os.path.join(directory, "ckpt-4"))
    assert manifest["mesh"]["axes"] == {"batch": 2, "model": 4}
    for rank in (0, 1):
        assert runs["two"][rank][1]["saved"] == os.path.join(directory, "ckpt-4")


def test_progress_bars_from_process_zero_only(runs):
    lines = runs["launch_output"].splitlines()
    assert any(line.startswith("[0] 4/4") for line in lines)
    assert not any(line.startswith("[1] 4/4") for line in lines)


def test_cli_train_on_two_processes(tmp_path):
    """`tfshard launch -- tfshard train`: the config's 2x4 mesh over 2
    processes; process 0 alone prints and writes metrics.json."""
    out = tmp_path / "run"
    output = run([
        sys.executable, "-m", "tfshard.app.cli", "launch", "--processes", "2",
        "--timeout", str(JOB_TIMEOUT), "--", sys.executable, "-m", "tfshard.app.cli", "train",
        os.path.join(REPO, "configs", "transformer_2x4.yaml"), "--steps", "2",
        "--set", "model.layers=1", "--set", "model.seq_len=16", "--set", "data.eval_batches=1",
        "--set", "data.max_bytes=100000", "--set", f"output.dir={out}",
    ])
    summaries = [line for line in output.splitlines() if "held-out loss" in line]
    assert len(summaries) == 1 and summaries[0].startswith("[0] "), output[-3000:]
    metrics = json.load(open(out / "metrics.json"))
    assert metrics["mesh"] == {"batch": 2, "model": 4}
    assert metrics["train_steps"] == [1, 2]
    assert [os.path.basename(p) for p in metrics["checkpoints"]] == ["ckpt-2"]


def test_processes_wait_for_each_other_at_exit(tmp_path):
    """Process 0 finishes first; process 1's later collective still works
    (process 0 waits at the exit barrier instead of taking the collective
    group service away)."""
    run(launch_command("late", tmp_path))
    assert json.load(open(tmp_path / "late-1.json")) == list(range(8))


# ------------------------------------------------------------- failures
def test_killed_worker_stops_the_job(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    log = open(tmp_path / "launch.log", "w+")
    launcher = subprocess.Popen(
        launch_command("crash", out), env=subprocess_env(), stdout=log,
        stderr=subprocess.STDOUT, cwd=REPO,
    )
    try:
        wait_for(
            lambda: all(read_int(out / f"step-{r}.txt") >= 2 for r in (0, 1))
            or launcher.poll() is not None,
            JOB_TIMEOUT, "both processes to train a few steps",
        )
        assert launcher.poll() is None, "the job ended before a process was killed"
        pids = [read_int(out / f"pid-{r}.txt") for r in (0, 1)]
        os.kill(pids[1], signal.SIGKILL)
        code = launcher.wait(timeout=STOP_TIMEOUT)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    log.seek(0)
    output = log.read()
    assert code != 0
    assert "process 1 killed by SIGKILL" in output
    wait_for(lambda: not any(alive(pid) for pid in pids), 10, "no worker left")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
def test_process_started_by_hand_fails_with_clear_error(tmp_path, sig):
    """Without the launcher, the surviving process raises ProcessLostError
    and exits on its own: at once for a dead peer (its connections are
    refused), after heartbeat_timeout for a hung one."""
    out = tmp_path / "out"
    out.mkdir()
    ports = launch_lib.free_loopback_ports(2)
    procs, logs = [], []
    try:
        for rank in (0, 1):
            env = launch_lib.process_environment(rank, ports, 4, base=subprocess_env())
            logs.append(open(tmp_path / f"worker-{rank}.log", "w+"))
            procs.append(subprocess.Popen(
                [sys.executable, WORKER, "crash", str(out), "--heartbeat", "3"], env=env, cwd=REPO,
                stdout=logs[-1], stderr=subprocess.STDOUT,
            ))
        wait_for(
            lambda: all(read_int(out / f"step-{r}.txt") >= 2 for r in (0, 1))
            or any(p.poll() is not None for p in procs),
            JOB_TIMEOUT, "both processes to train a few steps",
        )
        assert all(p.poll() is None for p in procs), "a process ended before it was killed"
        procs[1].send_signal(sig)
        code = procs[0].wait(timeout=STOP_TIMEOUT)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    logs[0].seek(0)
    output = logs[0].read()
    assert code != 0
    assert "tfshard.errors.ProcessLostError" in output
    assert "another process of the job died" in output


# ------------------------------------------- the launcher on tiny commands
def python(code):
    return [sys.executable, "-c", code]


def test_launch_streams_output_by_rank_with_the_cluster_environment():
    out, err = io.StringIO(), io.StringIO()
    code = launch_lib.launch(
        python(
            "import os; e = os.environ; print(e['DTENSOR_CLIENT_ID'], e['DTENSOR_NUM_CLIENTS'], "
            "e['DTENSOR_JOB_NAME'], e['DTENSOR_JOBS'], e['TFSHARD_DEVICES_PER_PROCESS'])"
        ),
        3, 2, stdout=out, stderr=err,
    )
    assert code == 0, err.getvalue()
    lines = sorted(out.getvalue().splitlines())
    assert [line.split()[:4] for line in lines] == [
        [f"[{r}]", str(r), "3", "worker"] for r in range(3)
    ]
    jobs = {line.split()[4] for line in lines}
    assert len(jobs) == 1  # every process gets the same list
    addresses = jobs.pop().split(",")
    assert len(addresses) == 3 and len(set(addresses)) == 3
    assert all(a.startswith("127.0.0.1:") for a in addresses)
    assert {line.split()[5] for line in lines} == {"2"}


SLEEPER = """
import os, subprocess, sys, time
out, rank = sys.argv[1], os.environ["DTENSOR_CLIENT_ID"]
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
with open(os.path.join(out, "pids-" + rank), "w") as f:
    f.write(f"{os.getpid()} {child.pid}")
if rank == "1":
    while len([n for n in os.listdir(out) if n.startswith("pids-")]) < 3:
        time.sleep(0.05)
    sys.exit(3)
if rank == "0" and len(sys.argv) > 2:
    import signal
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
time.sleep(600)
"""


@pytest.mark.parametrize("ignore_sigterm", [False, True], ids=["sigterm", "sigkill"])
def test_launch_stops_every_process_when_one_fails(tmp_path, ignore_sigterm):
    """Process 1 exits 3: the others (and their children) are stopped, by
    SIGTERM, or SIGKILL after the grace period for one that ignores it."""
    script = tmp_path / "sleeper.py"
    script.write_text(SLEEPER)
    command = [sys.executable, str(script), str(tmp_path)] + (["ignore"] if ignore_sigterm else [])
    err = io.StringIO()
    code = launch_lib.launch(command, 3, grace=1.0, timeout=STOP_TIMEOUT, stdout=io.StringIO(), stderr=err)
    assert code == 3
    assert "process 1 exited with code 3" in err.getvalue()
    assert ("SIGKILL" in err.getvalue()) == ignore_sigterm
    pids = [int(p) for r in range(3) for p in (tmp_path / f"pids-{r}").read_text().split()]
    assert len(pids) == 6
    wait_for(lambda: not any(alive(pid) for pid in pids), 10, "no process left")


def test_launch_time_limit_stops_the_job():
    err = io.StringIO()
    code = launch_lib.launch(python("import time; time.sleep(600)"), 2, grace=1.0, timeout=1.0,
                             stdout=io.StringIO(), stderr=err)
    assert code == 124
    assert "time limit" in err.getvalue()


def test_launch_success_and_failure_codes():
    assert launch_lib.launch(python("pass"), 2, stdout=io.StringIO(), stderr=io.StringIO()) == 0
    code = launch_lib.launch(
        python("import os, sys; sys.exit(5 if os.environ['DTENSOR_CLIENT_ID'] == '0' else 0)"),
        2, stdout=io.StringIO(), stderr=io.StringIO(),
    )
    assert code == 5


def test_cli_launch_errors(capsys):
    assert cli.main(["launch", "--processes", "2"]) == 2
    assert "no command given" in capsys.readouterr().err
    assert cli.main(["launch", "--processes", "0", "--", "true"]) == 2
    assert "--processes=0" in capsys.readouterr().err
    assert cli.main(["launch", "--processes", "1", "--devices-per-process", "0", "--", "true"]) == 2
    capsys.readouterr()
    assert cli.main(["launch", "--processes", "1", "--timeout", "0", "--", "true"]) == 2
    assert "--timeout=0.0 must be > 0" in capsys.readouterr().err
    with pytest.raises(MultiClientError, match="cannot run"):
        launch_lib.launch(["/nonexistent/program"], 2, stdout=io.StringIO(), stderr=io.StringIO())


def test_free_loopback_ports_are_distinct():
    ports = launch_lib.free_loopback_ports(8)
    assert len(set(ports)) == 8 and all(0 < p < 65536 for p in ports)


# ------------------------------------------------- settings validation
@pytest.fixture
def clean_env(monkeypatch):
    """No cluster variables; whatever a test sets is removed afterwards."""
    for name in CLUSTER_ENV:
        monkeypatch.setenv(name, "")  # records the variable's state to restore
        monkeypatch.delenv(name)
    monkeypatch.setattr(multi_client, "_CLUSTER", None)
    monkeypatch.setattr(multi_client, "_COUNTERS", {})
    return monkeypatch


TWO = ["127.0.0.1:5000", "127.0.0.1:5001"]


@pytest.mark.parametrize(
    "kwargs, env, message",
    [
        ({"num_clients": 2}, {}, "no jobs are given"),
        ({"jobs": TWO}, {}, "does not know which"),
        ({"jobs": TWO, "client_id": 2}, {}, "client_id=2 is out of range"),
        ({"jobs": TWO, "client_id": -1}, {}, "out of range"),
        ({"jobs": TWO, "num_clients": 3, "client_id": 0}, {}, "jobs lists 2 processes"),
        ({"jobs": ["localhost"], "client_id": 0}, {}, "is not 'host:port'"),
        ({"jobs": ["h:0"], "client_id": 0}, {}, "is not 'host:port'"),
        ({"jobs": ["h:1", "h:1"], "client_id": 0}, {}, "more than once"),
        ({"jobs": TWO, "client_id": 1}, {"DTENSOR_CLIENT_ID": "0"}, "contradicts the environment variable DTENSOR_CLIENT_ID"),
        ({}, {"DTENSOR_JOBS": ",".join(TWO), "DTENSOR_CLIENT_ID": "one"}, "not an integer"),
        ({"devices_per_process": 0}, {}, "devices_per_process=0 must be at least 1"),
        ({}, {"TFSHARD_DEVICES_PER_PROCESS": "-2"}, "must be at least 1"),
        ({"device_type": "FPGA"}, {}, "is not one of"),
        ({"job_name": "1job"}, {}, "job_name='1job'"),
        ({"heartbeat_timeout": -1}, {}, "heartbeat_timeout=-1"),
        ({"timeout": 0}, {}, "timeout=0"),
        ({"jobs": TWO, "client_id": 0}, {}, "before TensorFlow starts"),  # it has, here
        ({}, {}, "before TensorFlow starts"),
    ],
)
def test_bad_settings_raise_clear_errors(clean_env, kwargs, env, message):
    tf.constant(0)  # TensorFlow has started in this process (as in any test run)
    for name, value in env.items():
        clean_env.setenv(name, value)
    before = dict(os.environ)
    with pytest.raises(MultiClientError, match=message.replace("(", r"\(")):
        tfshard.initialize_multi_client(**kwargs)
    assert dict(os.environ) == before  # nothing was changed
    assert multi_client.cluster() is None


# ------------------------------ accelerators and the runtime, mocked
@pytest.fixture
def fake_runtime(clean_env):
    """The TensorFlow runtime replaced by recorders: what tfshard asks of it."""
    calls = {"start": [], "gpus": [], "seeds": [], "barriers": []}
    store = {}
    devices = {"GPU": 0, "TPU": 0}
    clean_env.setattr(_dtensor, "runtime_started", lambda: False)
    clean_env.setattr(_dtensor, "physical_device_count", lambda kind: devices.get(kind.upper(), 1))
    clean_env.setattr(
        _dtensor, "preferred_device_type",
        lambda: "TPU" if devices["TPU"] else "GPU" if devices["GPU"] else "CPU",
    )
    clean_env.setattr(_dtensor, "start_runtime", lambda kind, **kw: calls["start"].append((kind, kw)))
    clean_env.setattr(_dtensor, "use_first_gpus", lambda n: calls["gpus"].append(n))
    clean_env.setattr(_dtensor, "publish", store.__setitem__)
    clean_env.setattr(_dtensor, "fetch", lambda key, timeout_ms: store[key])
    clean_env.setattr(_dtensor, "wait_at_barrier", lambda key, timeout_ms: calls["barriers"].append(key))
    clean_env.setattr(keras.utils, "set_random_seed", lambda seed: calls["seeds"].append(seed))
    return calls, store, devices


def test_gpu_multi_client_initialization(fake_runtime):
    calls, store, devices = fake_runtime
    devices["GPU"] = 4
    spec = tfshard.initialize_multi_client(
        client_id=1, jobs=["hosta:7000", "hostb:7000"], devices_per_process=2,
        gpu_use_nccl=True, seed=11, heartbeat_timeout=30, connect_timeout=60, shutdown_timeout=5,
    )
    assert spec.device_type == "GPU" and spec.devices_per_process == 2
    assert (spec.client_id, spec.num_clients, spec.job_name) == (1, 2, "worker")
    assert not spec.is_chief and multi_client.is_multi_client()
    assert calls["start"] == [("GPU", {
        "num_cpu_devices": None, "multi_client": True, "heartbeat_timeout_ms": 30000,
        "shutdown_timeout_ms": 5000, "register_timeout_ms": 60000,
    })]
    assert calls["gpus"] == [2]  # only the first 2 of the 4 GPUs
    assert calls["seeds"] == [11]
    assert calls["barriers"] == ["tfshard/barrier/initialized/0"]
    assert os.environ["DTENSOR_JOBS"] == "hosta:7000,hostb:7000"
    assert os.environ["DTENSOR_CLIENT_ID"] == "1"
    assert os.environ["DTENSOR_JOB_NAME"] == "worker"
    assert os.environ["DTENSOR_GPU_USE_NCCL_COMMUNICATION"] == "1"
    # Called again: the same job; with other settings: an error.
    assert tfshard.initialize_multi_client() is spec
    assert tfshard.initialize_multi_client(client_id=1, jobs=["hosta:7000", "hostb:7000"],
                                           devices_per_process=2, seed=11) == spec
    with pytest.raises(MultiClientError, match="already called"):
        tfshard.initialize_multi_client(devices_per_process=4)


def test_gpu_uses_every_gpu_by_default_and_checks_counts(fake_runtime):
    calls, _, devices = fake_runtime
    devices["GPU"] = 4
    with pytest.raises(MultiClientError, match="sees only 4 GPU"):
        tfshard.initialize_multi_client(devices_per_process=8)
    spec = tfshard.initialize_multi_client()
    assert (spec.device_type, spec.devices_per_process, spec.num_clients) == ("GPU", 4, 1)
    assert calls["start"][0][0] == "GPU" and calls["gpus"] == []
    assert calls["start"][0][1]["multi_client"] is False


def test_gpu_requested_without_gpus(fake_runtime):
    with pytest.raises(MultiClientError, match="sees no GPU"):
        tfshard.initialize_multi_client(device_type="gpu")


def test_tpu_initialization_uses_every_core(fake_runtime):
    calls, _, devices = fake_runtime
    devices["TPU"] = 8
    with pytest.raises(MultiClientError, match="use every core"):
        tfshard.initialize_multi_client(devices_per_process=4)
    spec = tfshard.initialize_multi_client()
    assert (spec.device_type, spec.devices_per_process) == ("TPU", 8)
    assert calls["start"][0] == ("TPU", {
        "num_cpu_devices": None, "multi_client": False, "heartbeat_timeout_ms": 0,
        "shutdown_timeout_ms": 0, "register_timeout_ms": 600000,
    })


def test_cpu_processes_bring_virtual_devices_from_the_environment(fake_runtime):
    calls, _, _ = fake_runtime
    for name, value in {
        "DTENSOR_JOBS": ",".join(TWO), "DTENSOR_CLIENT_ID": "0", "DTENSOR_NUM_CLIENTS": "2",
        "TFSHARD_DEVICES_PER_PROCESS": "4",
    }.items():
        os.environ[name] = value  # restored by clean_env
    spec = tfshard.initialize_multi_client()
    assert (spec.device_type, spec.devices_per_process, spec.jobs) == ("CPU", 4, tuple(TWO))
    assert calls["start"][0][1]["num_cpu_devices"] == 4
    assert calls["start"][0][1]["multi_client"] is True


def test_seed_is_drawn_by_process_zero_and_shared(fake_runtime):
    calls, store, _ = fake_runtime
    chief = tfshard.initialize_multi_client(client_id=0, jobs=TWO)
    assert calls["seeds"] == [chief.seed] and store["tfshard/broadcast/seed/0"] == str(chief.seed)
    # The other process (this process again, pretending), reads it.
    multi_client._CLUSTER, multi_client._COUNTERS = None, {}
    for name in CLUSTER_ENV:
        os.environ.pop(name, None)
    other = tfshard.initialize_multi_client(client_id=1, jobs=TWO)
    assert other.seed == chief.seed and calls["seeds"] == [chief.seed, chief.seed]


def test_runtime_start_failure_is_explained(fake_runtime, clean_env):
    def fail(kind, **kwargs):
        raise RuntimeError("Could not start gRPC server")

    clean_env.setattr(_dtensor, "start_runtime", fail)
    with pytest.raises(MultiClientError, match=r"127.0.0.1:5001 is free on this host"):
        tfshard.initialize_multi_client(client_id=1, jobs=TWO)


def test_detect_device_type_prefers_tpu_then_gpu(monkeypatch):
    present = {"CPU": ["cpu"]}
    monkeypatch.setattr(tf.config, "list_logical_devices", lambda kind=None: present.get(kind, []))
    assert mesh_lib.detect_device_type() == "CPU"
    present["GPU"] = ["gpu"]
    assert mesh_lib.detect_device_type() == "GPU"
    present["TPU"] = ["tpu"]
    assert mesh_lib.detect_device_type() == "TPU"


# ----------------------------------------- meshes over several processes
@pytest.fixture
def as_client_one_of_two(monkeypatch):
    """This process posing as client 1 of a 2-process job."""
    monkeypatch.setattr(mesh_lib, "_num_clients", lambda: 2)
    monkeypatch.setattr(_dtensor, "job_name", lambda: "worker")
    monkeypatch.setattr(
        _dtensor, "task_name",
        lambda task=None: f"/job:worker/replica:0/task:{1 if task is None else task}",
    )
    monkeypatch.setattr(
        _dtensor, "device_names",
        lambda kind, count, task: [f"/job:worker/replica:0/task:{task}/device:{kind}:{i}" for i in range(count)],
    )


@pytest.mark.parametrize("kind", ["CPU", "GPU"])
def test_mesh_spans_every_process(as_client_one_of_two, monkeypatch, kind):
    monkeypatch.setattr(_dtensor, "logical_devices", lambda k: [f"{k}:{i}" for i in range(4)])
    mesh = tfshard.Mesh({"batch": 2, "model": 4}, device_type=kind)
    assert mesh.devices == tuple(
        f"/job:worker/replica:0/task:{t}/device:{kind}:{i}" for t in (0, 1) for i in range(4)
    )
    assert mesh.local_devices == mesh.devices[4:]
    assert mesh._dtensor_mesh.local_device_ids() == [4, 5, 6, 7]
    assert mesh._dtensor_mesh.size == 8
    with pytest.raises(MeshError, match="cannot be spread evenly over the 2 processes"):
        tfshard.Mesh({"batch": 3}, device_type=kind)
    with pytest.raises(MeshError, match="needs 8 .* devices in each of the 2 processes"):
        tfshard.Mesh({"batch": 2, "model": 8}, device_type=kind)


def test_mesh_with_explicit_devices_across_processes(as_client_one_of_two):
    names = [f"/job:worker/task:{t}/device:CPU:{i}" for i in range(2) for t in (0, 1)]
    mesh = tfshard.Mesh({"batch": 4}, devices=names)
    assert mesh.local_devices == (
        "/job:worker/replica:0/task:1/device:CPU:0", "/job:worker/replica:0/task:1/device:CPU:1",
    )
    with pytest.raises(MeshError, match="must name its process"):
        tfshard.Mesh({"batch": 2}, devices=["CPU:0", "CPU:1"])
    with pytest.raises(MeshError, match="holds 2 of its 2 devices; .* each must hold 1"):
        tfshard.Mesh({"batch": 2}, devices=[f"/job:worker/task:1/device:CPU:{i}" for i in range(2)])


# ------------------------------------------------- per-process input
class _FakeMesh:
    def __init__(self, axes, devices):
        self.axis_names, self.shape = tuple(axes), tuple(axes.values())
        self.devices = tuple(devices)


class _FakeStrategy:
    def __init__(self, axes, devices, data_axis="batch"):
        self.mesh = _FakeMesh(axes, devices)
        self.data_axis = data_axis
        self.data_parallel_size = axes[data_axis]


def _devices(clients, per_client):
    return [f"/job:worker/replica:0/task:{t}/device:CPU:{i}" for t in range(clients) for i in range(per_client)]


@pytest.mark.parametrize(
    "axes, clients, expected",
    [
        ({"batch": 2, "model": 4}, 2, [(2, 0, 1), (2, 1, 1)]),
        ({"batch": 4, "model": 2}, 4, [(4, r, 1) for r in range(4)]),
        ({"batch": 4, "model": 2}, 2, [(2, 0, 2), (2, 1, 2)]),
        # The model axis spans the processes: both feed the whole batch.
        ({"model": 2, "batch": 4}, 2, [(1, 0, 4), (1, 0, 4)]),
        ({"batch": 8}, 2, [(2, 0, 4), (2, 1, 4)]),
    ],
)
def test_input_context_follows_the_data_axis(monkeypatch, axes, clients, expected):
    size = int(np.prod(list(axes.values())))
    strategy = _FakeStrategy(axes, _devices(clients, size // clients))
    monkeypatch.setattr(multi_client, "is_multi_client", lambda: True)
    got = []
    for rank in range(clients):
        monkeypatch.setattr(multi_client, "client_id", lambda rank=rank: rank)
        multi_client._CONTEXTS.pop(strategy, None)
        context = multi_client.input_context(strategy)
        got.append((context.num_input_shards, context.input_shard_index, context.local_data_parallel))
    assert got == expected


def test_input_context_rejects_interleaved_devices(monkeypatch):
    devices = [f"/job:worker/replica:0/task:{i % 2}/device:CPU:{i // 2}" for i in range(4)]
    strategy = _FakeStrategy({"batch": 4}, devices)
    monkeypatch.setattr(multi_client, "is_multi_client", lambda: True)
    monkeypatch.setattr(multi_client, "client_id", lambda: 0)
    with pytest.raises(MultiClientError, match="contiguous block of data axis 'batch'"):
        multi_client.input_context(strategy)


def test_shard_dataset_splits_every_global_batch():
    """Process shards of each batch together are the global batch."""
    examples = tf.data.Dataset.range(10)
    for name, dataset in (("known length", examples), ("unknown length", examples.filter(lambda x: True))):
        shards = []
        for index in range(2):
            context = multi_client.InputContext(2, index, 1)
            shard = context.shard_dataset(dataset, 4)
            assert multi_client.is_process_local(shard)
            shards.append([b.numpy().tolist() for b in shard])
        assert [len(s) for s in shards] == [2, 2], name  # a final partial batch is dropped
        for batch in range(2):
            assert sorted(shards[0][batch] + shards[1][batch]) == list(range(4 * batch, 4 * batch + 4)), name
    with pytest.raises(MultiClientError, match="use a multiple of 4"):
        multi_client.InputContext(2, 0, 2).local_batch_size(6)


def test_distribute_local_places_this_processes_rows():
    strategy = make_strategy(2, 4)
    layout = strategy.dtensor_layout(("batch", None))
    value = np.arange(24, dtype="float32").reshape(8, 3)
    placed = _dtensor.distribute_local(value, layout, origin=0, global_rows=8)
    np.testing.assert_array_equal(tfshard.to_numpy(placed), value)
    with pytest.raises(ValueError, match="not among this process's rows"):
        _dtensor.distribute_local(value[:4], layout, origin=4, global_rows=8)


def test_fit_on_process_local_data_matches_global(monkeypatch):
    """The per-process path through fit (one process posing as a
    multi-client job that holds every device) trains like global input."""
    from tfshard import training

    rng = np.random.RandomState(0)
    x, y = rng.randn(32, 8).astype("float32"), rng.randn(32, 4).astype("float32")

    def train(per_process):
        strategy = make_strategy(2, 4)
        with strategy.scope():
            keras.utils.set_random_seed(0)
            model = keras.Sequential([keras.Input((8,)), tfshard.layers.ColumnParallelDense(16),
                                      tfshard.layers.RowParallelDense(4)])
            model.compile(optimizer="adam", loss="mse")
        if per_process:
            context = multi_client.input_context(strategy)
            data = context.shard_dataset(tf.data.Dataset.from_tensor_slices((x, y)), 8)
            history = model.fit(data, epochs=1, shuffle=False, verbose=0)
        else:
            history = model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        return history.history["loss"], [w.numpy() for w in model.weights]

    want = train(False)
    monkeypatch.setattr(multi_client, "is_multi_client", lambda: True)
    calls = []
    original = training._shard_process_batch
    monkeypatch.setattr(training, "_shard_process_batch",
                        lambda s, d: calls.append(1) or original(s, d))
    got = train(True)
    assert calls  # the per-process path ran
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    for g, w in zip(got[1], want[1]):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_other_processes_show_no_progress_bar(monkeypatch, capsys):
    strategy = make_strategy(2, 4)
    with strategy.scope():
        model = keras.Sequential([keras.Input((8,)), tfshard.layers.ColumnParallelDense(16)])
        model.compile(optimizer="sgd", loss="mse")
    x, y = np.ones((16, 8), "float32"), np.ones((16, 16), "float32")
    model.fit(x, y, batch_size=8, verbose=2)
    assert "2/2" in capsys.readouterr().out
    monkeypatch.setattr(multi_client, "client_id", lambda: 1)
    model.fit(x, y, batch_size=8, verbose=2)
    model.evaluate(x, y, batch_size=8, verbose=1)
    assert capsys.readouterr().out == ""


# ------------------------------------------------- coordination helpers
@pytest.fixture
def as_worker(fake_runtime):
    calls, store, _ = fake_runtime
    multi_client._CLUSTER = multi_client.ClusterSpec(1, 2, "worker", tuple(TWO), "CPU", 4, 1, 5.0)
    return calls, store


def test_run_on_chief_relays_the_chiefs_result_or_error(as_worker):
    _, store = as_worker
    store["tfshard/chief/prepare/0"] = json.dumps({"result": ["a", 1]})
    store["tfshard/chief/prepare/1"] = json.dumps({"error": "OSError: disk full"})
    ran = []
    assert multi_client.run_on_chief("prepare", lambda: ran.append(1)) == ["a", 1]
    with pytest.raises(CheckpointError, match="prepare failed on process 0: OSError: disk full"):
        multi_client.run_on_chief("prepare", lambda: ran.append(1), error=CheckpointError)
    assert ran == []  # only process 0 runs it


def test_all_succeeded_raises_everywhere_if_one_failed(as_worker):
    calls, store = as_worker
    store["tfshard/status/write/0/0"] = "OSError: no space left"
    with pytest.raises(CheckpointError, match="process 0: OSError: no space left"):
        multi_client.all_succeeded("write", None, error=CheckpointError)
    assert store["tfshard/status/write/0/1"] == "ok"
    assert calls["barriers"][-1] == "tfshard/barrier/write/0"
    store["tfshard/status/write/1/0"] = "ok"
    with pytest.raises(KeyError, match="mine"):
        multi_client.all_succeeded("write", KeyError("mine"))
    assert store["tfshard/status/write/1/1"].startswith("KeyError")


def test_lost_peer_becomes_process_lost_error(as_worker, clean_env):
    def refuse(*args):
        raise tf.errors.UnavailableError(None, None, "failed to connect to all addresses")

    clean_env.setattr(_dtensor, "wait_at_barrier", refuse)
    with pytest.raises(ProcessLostError, match="another process of the job died"):
        multi_client.barrier("exit")
