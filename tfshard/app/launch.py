"""Start a DTensor multi-client job on this machine: N processes, loopback only.

    tfshard launch --processes 2 --devices-per-process 4 -- python train.py
    tfshard launch --processes 2 -- tfshard train configs/transformer_2x4.yaml

Each process gets the environment ``tfshard.initialize_multi_client()`` reads
(``DTENSOR_CLIENT_ID``, ``DTENSOR_NUM_CLIENTS``, ``DTENSOR_JOB_NAME``,
``DTENSOR_JOBS`` listing ``127.0.0.1:<port>`` for every process, and
``TFSHARD_DEVICES_PER_PROCESS``). Ports are free loopback ports picked at
start. Output is streamed line by line, prefixed with the process's rank; a
``tfshard: error: ...`` line that several processes print alike is shown once.

If a process fails (non-zero exit or a signal), the others are sent SIGTERM,
then SIGKILL after ``grace`` seconds; the launcher returns the failed
process's exit code. Each process runs in its own process group, so its
children are stopped with it. On Ctrl-C or SIGTERM the launcher stops every
process the same way. Nothing is left running when it returns.

On a cluster, do not use the launcher: start one process per host yourself
(or with your scheduler) with the same variables; see docs/multi-process.md.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from tfshard.errors import MultiClientError

__all__ = ["launch", "free_loopback_ports", "process_environment"]

LOOPBACK = "127.0.0.1"
# A process's own error report (``tfshard.app.cli``): shown once when every
# process reports the same error, not once per process.
ERROR_LINE = "tfshard: error: "


def free_loopback_ports(count):
    """``count`` distinct TCP ports that are free on 127.0.0.1 right now.

    The sockets are held open together, so the ports differ, then closed
    for the processes to bind. (Another program could take one in between;
    the job then fails at start-up and can be re-run.)
    """
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((LOOPBACK, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def process_environment(rank, ports, devices_per_process=None, device_type=None,
                        job_name="worker", base=None):
    """The environment of process ``rank`` of a loopback job on ``ports``."""
    env = dict(os.environ if base is None else base)
    env.update(
        DTENSOR_CLIENT_ID=str(rank),
        DTENSOR_NUM_CLIENTS=str(len(ports)),
        DTENSOR_JOB_NAME=job_name,
        DTENSOR_JOBS=",".join(f"{LOOPBACK}:{port}" for port in ports),
        PYTHONUNBUFFERED="1",
    )
    if devices_per_process is not None:
        env["TFSHARD_DEVICES_PER_PROCESS"] = str(devices_per_process)
    if device_type is not None:
        env["TFSHARD_DEVICE_TYPE"] = str(device_type).upper()
    return env


def _describe(code):
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


class _Job:
    def __init__(self, command, processes, devices_per_process, device_type, grace, out, err):
        self.command = list(command)
        self.grace = float(grace)
        self.out = out
        self.err = err
        self.lock = threading.Lock()
        self.procs = []
        self.readers = []
        self.errors_shown = set()
        ports = free_loopback_ports(processes)
        self.envs = [
            process_environment(rank, ports, devices_per_process, device_type)
            for rank in range(processes)
        ]

    def log(self, text):
        with self.lock:
            print(f"[launch] {text}", file=self.err, flush=True)

    def _pump(self, rank, stream):
        prefix = f"[{rank}] "
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            with self.lock:
                if line.startswith(ERROR_LINE):
                    if line in self.errors_shown:
                        continue  # another process reported the same error
                    self.errors_shown.add(line)
                self.out.write(prefix + line + "\n")
                self.out.flush()
        stream.close()

    def start(self):
        for rank, env in enumerate(self.envs):
            proc = subprocess.Popen(
                self.command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: killpg stops its children too
            )
            self.procs.append(proc)
            reader = threading.Thread(target=self._pump, args=(rank, proc.stdout), daemon=True)
            reader.start()
            self.readers.append(reader)

    def _signal_all(self, sig):
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, sig)

    def stop(self, reason):
        """SIGTERM every live process group, SIGKILL after the grace period."""
        if all(proc.poll() is not None for proc in self.procs):
            return
        self.log(f"{reason}; stopping the other processes")
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
            time.sleep(0.05)
        if any(p.poll() is None for p in self.procs):
            self.log(f"processes still running after {self.grace:g}s; sending SIGKILL")
            self._signal_all(signal.SIGKILL)
        for proc in self.procs:
            proc.wait()

    def reap_groups(self):
        """Kill whatever a finished process left behind in its group."""
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)

    def wait(self, timeout=None):
        start = time.monotonic()
        failed = None
        while True:
            codes = [proc.poll() for proc in self.procs]
            for rank, code in enumerate(codes):
                if code not in (None, 0) and failed is None:
                    failed = (rank, code)
                    self.stop(f"process {rank} {_describe(code)}")
            if all(code is not None for code in codes):
                break
            if timeout is not None and time.monotonic() - start > timeout:
                failed = failed or (None, 124)
                self.stop(f"time limit of {timeout:g}s reached")
                break
            time.sleep(0.05)
        self.reap_groups()
        for reader in self.readers:
            reader.join(timeout=5)
        if failed is None:
            return 0
        rank, code = failed
        states = ", ".join(
            f"process {r} {_describe(p.returncode)}" for r, p in enumerate(self.procs)
        )
        if rank is not None:
            self.log(f"job failed: process {rank} {_describe(code)} first ({states})")
        return code if code > 0 else 128 - code


def launch(command, processes, devices_per_process=None, *, device_type=None, grace=10.0,
           timeout=None, stdout=None, stderr=None):
    """Run ``command`` as ``processes`` local processes of one multi-client
    job; return 0 if all succeed, else the exit code of the first to fail
    (128 + signal number for a signal, 124 for ``timeout``).

    Args:
        command: the program and its arguments (a list), run by every process.
        processes: the number of processes (>= 1).
        devices_per_process: virtual CPUs (or GPUs) per process; sets
            ``TFSHARD_DEVICES_PER_PROCESS``.
        device_type: sets ``TFSHARD_DEVICE_TYPE`` (default: detected).
        grace: seconds between SIGTERM and SIGKILL when stopping processes.
        timeout: seconds before the whole job is stopped (``None``: no limit).
        stdout, stderr: where prefixed output and launcher messages go
            (default: ``sys.stdout`` / ``sys.stderr``).
    """
    if not command:
        raise MultiClientError(
            "tfshard launch: no command given; write it after '--', e.g. "
            "tfshard launch --processes 2 -- python train.py"
        )
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise MultiClientError(f"--processes={processes!r} must be a positive integer.")
    if devices_per_process is not None and (
        isinstance(devices_per_process, bool)
        or not isinstance(devices_per_process, int)
        or devices_per_process < 1
    ):
        raise MultiClientError(
            f"--devices-per-process={devices_per_process!r} must be a positive integer."
        )
    if grace < 0:
        raise MultiClientError(f"--grace={grace!r} must be >= 0 seconds.")
    if timeout is not None and timeout <= 0:
        raise MultiClientError(
            f"--timeout={timeout!r} must be > 0 seconds; leave it out for no time limit."
        )
    job = _Job(
        command, processes, devices_per_process, device_type, grace,
        stdout or sys.stdout, stderr or sys.stderr,
    )

    def on_signal(signum, frame):
        raise KeyboardInterrupt

    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_signal) if in_main else None
    try:
        try:
            job.start()
        except OSError as err:
            job.stop(f"could not start {command[0]!r}: {err}")
            raise MultiClientError(f"tfshard launch: cannot run {command!r}: {err}") from err
        return job.wait(timeout)
    except KeyboardInterrupt:
        job.stop("interrupted")
        job.reap_groups()
        return 130
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
