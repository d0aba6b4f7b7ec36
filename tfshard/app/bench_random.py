"""What one device's random numbers cost: ``tfshard bench CONFIG --random-cost RATE``.

Under a mesh, tfshard draws every random tensor (dropout masks, noise,
``keras.random.*``) at its global shape on each device and keeps the local
slice, so that a seeded model draws the numbers one device draws
(``random_streams="global"``, the default). DTensor's own expansion draws
only the local slice, from a stream mixed with the device's coordinates:
cheaper, but other numbers (``random_streams="per_device"``, the opt-out).

This benchmark times, interleaved in one run on the config's mesh, the
config's model with dropout off, with dropout ``RATE`` drawn globally and
with dropout ``RATE`` drawn per device, and plain Keras on one device with
the same dropout; and it reads, from DTensor's SPMD dump of the compiled
train step, how many random numbers each device draws per step in each
mode (:func:`tfshard.comm.random_elements`).
"""

from __future__ import annotations

import json
import os

from tfshard.app.bench import TRAIN_STEP_PROGRAM, dumped_train_step, time_training
from tfshard.app.config import ConfigError


def variant(config, rate, streams):
    """``config`` with dropout ``rate`` drawn as ``streams`` says."""
    return {
        **config,
        "model": {**config["model"], "dropout": rate},
        "layout": {**config["layout"], "random_streams": streams},
    }


def count_random_elements(config):
    """Random numbers each device draws in one compiled train step of
    ``config`` on its mesh, from DTensor's SPMD dump (needs the dump flag:
    run it through :func:`tfshard.comm.run_in_subprocess`)."""
    from tfshard import comm

    with dumped_train_step(config) as directory:
        return comm.random_elements_in_dump(directory, TRAIN_STEP_PROGRAM)


def _random_elements_child():
    request = json.loads(os.environ["TFSHARD_BENCH_REQUEST"])
    return {name: count_random_elements(config) for name, config in request["variants"].items()}


def measure_random_elements(variants, devices):
    """``{name: random numbers drawn per device per train step}``, read from
    the SPMD dumps of one child process (DTensor dumps only when TensorFlow
    starts with its logging flag)."""
    from tfshard import comm

    request = json.dumps({"variants": variants})
    return comm.run_in_subprocess(
        "tfshard.app.bench_random:_random_elements_child",
        devices=devices,
        env={"TFSHARD_BENCH_REQUEST": request},
    )


def random_cost(config, *, rate, steps, rounds=2, elements=True, out=print):
    """Time dropout off / global / per-device on the config's mesh; returns
    ``{"runs": {name: ms_per_step}, "random_elements": {name: count}}``."""
    if not 0.0 < rate < 1.0:
        raise ConfigError(f"--random-cost {rate}: a dropout rate between 0 and 1 (exclusive), e.g. 0.1.")
    shape = (config["mesh"]["batch"], config["mesh"]["model"])
    variants = {
        "dropout off": variant(config, 0.0, "global"),
        f"dropout {rate}, global draws": variant(config, rate, "global"),
        f"dropout {rate}, per-device draws": variant(config, rate, "per_device"),
    }
    plain = "plain keras 1 device, dropout %s" % rate
    samples = {name: [] for name in [plain, *variants]}
    # Interleaved rounds: a slow spell of a shared machine hits every run alike.
    for _ in range(rounds):
        samples[plain].append(time_training(variants[f"dropout {rate}, global draws"], None,
                                            steps=steps)["ms_per_step"])
        for name, settings in variants.items():
            samples[name].append(time_training(settings, shape, steps=steps)["ms_per_step"])
    runs = {name: min(values) for name, values in samples.items()}
    drawn = measure_random_elements(variants, shape[0] * shape[1]) if elements else {}

    off = runs["dropout off"]
    out(f"random-number cost on a {shape[0]}x{shape[1]} mesh, {steps} steps per run, "
        f"best of {rounds} interleaved rounds")
    header = f"{'run':<36}{'ms/step':>9}{'vs off':>9}{'random numbers/device/step':>28}"
    out(header)
    out("-" * len(header))
    for name, ms in runs.items():
        count = drawn.get(name)
        ratio = "" if name == plain else f"{ms / off:.2f}x"
        out(f"{name:<36}{ms:>9.1f}{ratio:>9}{'-' if count is None else f'{count:,}':>28}")
    return {"mesh": "%dx%d" % shape, "rate": rate, "steps": steps, "rounds": rounds,
            "ms_per_step": runs, "random_elements_per_device": drawn}
