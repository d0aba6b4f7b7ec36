"""The ``tfshard`` command line: train, inspect and bench a YAML config.

    tfshard train configs/transformer_2x4.yaml [--steps N] [--set key=value ...]
    tfshard inspect configs/transformer_2x4.yaml
    tfshard inspect --auto configs/transformer_2x4.yaml   # tfshard.auto_plan's plan, explained
    tfshard bench configs/transformer_2x4.yaml [--meshes 1x1,1x8,2x4,8x1] [--jax]
    tfshard bench configs/transformer_2x4.yaml --memory [--zero-stages 0,3]
    tfshard bench --llama [--small] [--meshes 2x4] [--breakdown]
    tfshard launch --processes 2 --devices-per-process 4 -- tfshard train CONFIG

On a machine without accelerators the mesh runs on virtual CPU devices
(8, or the mesh size if larger), created before TensorFlow starts.

The output is tfshard's and Keras's: TensorFlow's C++ log lines (DTensor's
cache notes, Grappler's cost-estimator complaints about per-device shapes)
are hidden unless ``-v`` is given or ``TF_CPP_MIN_LOG_LEVEL`` is set; see
``tfshard._native_logs``, which ``import tfshard`` runs before TensorFlow
starts.
"""

from __future__ import annotations

import argparse
import sys


_DEFAULT_MESHES = "1x1,1x8,2x4,8x1"


def _positive(kind):
    """An argparse type: a number > 0 (``--rounds 0`` is an error, not 1)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an {kind.__name__}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    parse.__name__ = f"positive {kind.__name__}"
    return parse


def _add_debug(parser, default):
    parser.add_argument(
        "-v", "--debug", action="store_true", default=default,
        help="show the full traceback of an error and TensorFlow's C++ log lines, "
             "hidden by default (also: TFSHARD_DEBUG=1)",
    )


def _parser():
    parser = argparse.ArgumentParser(prog="tfshard", description=__doc__.splitlines()[0])
    _add_debug(parser, False)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("train", "train a config, print layouts and memory, write metrics.json"),
        ("inspect", "build a config's model and print every variable's layout, per-device "
                    "totals and the estimated communication per step"),
        ("bench", "step time, throughput, memory and collectives per step on several "
                  "meshes, against plain Keras on one device in the same run"),
    ):
        cmd = sub.add_parser(name, help=text, description=text)
        _add_debug(cmd, argparse.SUPPRESS)
        cmd.add_argument("config", nargs="?" if name == "bench" else None,
                         help="a YAML file, e.g. configs/transformer_2x4.yaml")
        cmd.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                         help="override a config key (repeatable), e.g. --set train.steps=50")
        if name in ("train", "bench"):
            cmd.add_argument("--steps", type=_positive(int), help="shortcut for --set train.steps=N")
        if name == "inspect":
            cmd.add_argument("--auto", action="store_true",
                             help="plan with tfshard.auto_plan and explain it (--set layout.auto=true)")
        if name == "bench":
            cmd.add_argument("--meshes", default=_DEFAULT_MESHES,
                             help="DATAxMODEL mesh shapes to time (default: 1x1,1x8,2x4,8x1)")
            cmd.add_argument("--rounds", type=_positive(int), default=2,
                             help="interleaved timing rounds; the best of each run is shown")
            cmd.add_argument("--jax", action="store_true",
                             help="also time Keras's JAX backend with ModelParallel (needs jax)")
            cmd.add_argument("--no-collectives", action="store_true",
                             help="skip counting collectives (saves one compile per mesh)")
            cmd.add_argument("--json", metavar="PATH", help="also write the results as JSON")
            cmd.add_argument("--random-cost", type=float, metavar="RATE",
                             help="instead: time dropout RATE drawn as one device draws it "
                                  "(layout.random_streams=global) against per-device draws and "
                                  "dropout off, on the config's mesh")
            cmd.add_argument("--memory", action="store_true",
                             help="print per-device bytes of one training step by kind "
                                  "(parameters, gradients, optimizer, activations) instead of timing")
            cmd.add_argument("--zero-stages", default="0", metavar="STAGES",
                             help="with --memory: ZeRO stages to show per mesh, e.g. 0,3 (default 0)")
            cmd.add_argument("--llama", action="store_true",
                             help="bench keras-hub's Llama (no config): TF on one device, tfshard "
                                  "(--meshes, default 2x4) and Keras-JAX ModelParallel 2x4, "
                                  "interleaved; --set KEY=INT changes the case (e.g. hidden_dim=128)")
            cmd.add_argument("--small", action="store_true",
                             help="with --llama: a small Llama for a quick check")
            cmd.add_argument("--breakdown", action="store_true",
                             help="with --llama: profile steps on one device and on the first "
                                  "of --meshes (default 2x4) and print where the time goes")
    _add_launch(sub)
    return parser


def _add_launch(sub):
    text = ("run a command as N local processes of one DTensor multi-client job "
            "(loopback only), output prefixed by rank")
    cmd = sub.add_parser("launch", help=text, description=text,
                         usage="tfshard launch --processes N [--devices-per-process K] -- COMMAND ...")
    _add_debug(cmd, argparse.SUPPRESS)
    cmd.add_argument("--processes", type=int, required=True, help="number of processes")
    cmd.add_argument("--devices-per-process", type=int, metavar="K",
                     help="virtual CPUs (or GPUs) each process brings")
    cmd.add_argument("--device-type", choices=["CPU", "GPU", "TPU"], help="default: detected")
    cmd.add_argument("--grace", type=float, default=10.0,
                     help="seconds between SIGTERM and SIGKILL when a process fails (default 10)")
    cmd.add_argument("--timeout", type=float, help="stop the whole job after this many seconds")
    cmd.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND ...")


def _launch(args):
    from tfshard.app.launch import launch

    command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    return launch(command, args.processes, args.devices_per_process,
                  device_type=args.device_type, grace=args.grace, timeout=args.timeout)


def one_line(error):
    """An error's message on one line (``tfshard: error: ...`` is one line
    whatever the message: a list of mismatched variables, a YAML error)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = ""
    for line in lines:
        text += line if not text else (" " if text.endswith(":") else "; ") + line
    return text or type(error).__name__


def _report(error, debug):
    """Print ``tfshard: error: <message>`` (one line; the traceback too with
    --debug) and return the exit code: 2 for bad input (a TfshardError), 1
    for a failure met while running (a lost process, an OSError)."""
    import traceback

    from tfshard import multi_client
    from tfshard.errors import TfshardError

    if debug:
        traceback.print_exception(error, file=sys.stderr)
    print(f"tfshard: error: {one_line(error)}", file=sys.stderr, flush=True)
    multi_client.exiting_on_error()  # no exit barrier: the job cannot go on
    return 2 if isinstance(error, TfshardError) else 1


def main(argv=None):
    """The ``tfshard`` command. Every error a user can cause or meet (a
    TfshardError: config, mesh, layout, checkpoint...; a lost process; an
    OSError) ends in one ``tfshard: error: ...`` line and exit code 2 (1 for
    failures that are not bad input); ``-v``/``--debug`` adds the traceback."""
    import os

    from tfshard.errors import ProcessLostError, TfshardError

    args = _parser().parse_args(argv)
    debug = getattr(args, "debug", False) or os.environ.get("TFSHARD_DEBUG", "") not in ("", "0")
    try:
        if args.command == "launch":
            return _launch(args)
        from tfshard.app import config as config_lib

        if args.command == "bench" and (args.llama or args.config is None):
            return _bench_llama(args)
        if args.command == "bench" and (args.breakdown or args.small):
            raise config_lib.ConfigError(
                "tfshard bench: --breakdown and --small go with --llama (keras-hub's Llama), "
                f"not with a config ({args.config}).")
        overrides = list(args.set)
        if getattr(args, "steps", None) is not None:
            overrides.append(f"train.steps={args.steps}")
        if getattr(args, "auto", False):
            overrides.append("layout.auto=true")
        return _run(args, config_lib.load(args.config, overrides))
    except (TfshardError, ProcessLostError, OSError) as error:
        return _report(error, debug)


def _run(args, config):
    from tfshard.app import jobs

    devices_for = config
    if args.command == "bench":
        from tfshard.app import bench

        args.meshes = bench.parse_meshes(args.meshes)
        args.zero_stages = _zero_stages(args.zero_stages)
        if args.random_cost is None:
            devices_for = bench.with_mesh(config, max(args.meshes, key=lambda m: m[0] * m[1]))
    jobs.prepare_devices(devices_for)  # before TensorFlow starts
    if args.command == "train":
        jobs.train(config)
    elif args.command == "inspect":
        jobs.inspect(config)
    else:
        return _bench(args, config)
    return 0


def _zero_stages(text):
    from tfshard.app.config import ConfigError

    try:
        stages = tuple(int(part) for part in text.split(","))
    except ValueError:
        stages = ()
    if not stages or any(stage not in (0, 1, 2, 3) for stage in stages):
        raise ConfigError(
            f"--zero-stages {text!r}: give ZeRO stages from 0 (none) to 3, comma-separated, e.g. 0,3."
        )
    return stages


def _bench_llama(args):
    import json

    from tfshard.app import bench, bench_llama
    from tfshard.app.config import ConfigError
    from tfshard.mesh import use_virtual_devices

    if not args.llama:
        raise ConfigError("tfshard bench: give a config (e.g. configs/transformer_2x4.yaml) or --llama.")
    config = bench_llama.case_config("small" if args.small else "full", args.set)
    meshes = bench.parse_meshes(args.meshes if args.meshes != _DEFAULT_MESHES else "2x4")
    use_virtual_devices(max(8, *(a * b for a, b in meshes)))  # before TensorFlow starts
    if args.breakdown:
        from tfshard.app import breakdown

        results = breakdown.breakdown_llama(config, meshes[0], steps=args.steps or 5)
    else:
        results = bench_llama.bench_llama(
            config, meshes=meshes, jax_meshes=[(2, 4)],
            steps=args.steps or 5, rounds=args.rounds)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    return 0


def _bench(args, config):
    import json

    from tfshard.app import bench

    if args.random_cost is not None:
        from tfshard.app import bench_random

        results = bench_random.random_cost(config, rate=args.random_cost,
                                           steps=max(args.steps or 10, 3), rounds=args.rounds)
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(results, handle, indent=2)
        return 0
    if args.memory:
        bench.memory_by_mesh(config, args.meshes, zero_stages=args.zero_stages)
        return 0
    results = bench.bench(config, meshes=args.meshes, steps=args.steps, rounds=args.rounds,
                          collectives=not args.no_collectives, jax=args.jax)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(bench.to_json(results), handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
