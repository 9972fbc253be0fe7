"""What ``--skip-spikes`` costs a train step: the guarded step against the plain one.

Both steps are built by `jaxpar.run.setup` for the same run (the guarded one with
``--skip-spikes 3``), then timed in alternating rounds of `--steps` steps each on the same
batch, in one process, at most two steps in flight as in the loop; the median round of each is
reported, their ratio, and the compiled steps' temporary memory. The guard adds a few scalar
operations and a `lax.cond` choosing the state given or the state stepped.

    python benchmarks/spikes.py                       # the main job's MLP and ResNet-18
    python benchmarks/spikes.py --models resnet18 --rounds 20
"""

import argparse
import json
import time

import jax

jax.config.update("jax_num_cpu_devices", 4)

import numpy as np  # noqa: E402

from jaxpar.run.config import Config  # noqa: E402
from jaxpar.run.setup import setup  # noqa: E402

RUNS = {
    "mlp": dict(model="mlp", dataset="digits", batch_size=128),
    "resnet18": dict(model="resnet18", dataset="synthetic:32x32x3:10", batch_size=64),
}


def program(flags: dict):
    run = setup(Config.of(**flags, mesh="2x2", steps=1000).validate())
    batch = next(iter(run.batches([range(0, 1)])))
    state = run.init()
    compiled = run.train_step.lower(state, batch).compile()
    memory = compiled.memory_analysis()
    return run, state, batch, compiled, memory


def rounds(step, state, batch, steps: int) -> tuple[float, object]:
    """`steps` steps, at most two in flight as in the loop (CPU-emulated devices deadlock with
    many queued collectives)."""
    start, metrics = time.perf_counter(), None
    for _ in range(steps):
        previous = metrics
        state, metrics = step(state, batch)
        jax.block_until_ready(previous)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - start) / steps, state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    results = []
    for name in args.models:
        built = {k: program({**RUNS[name], **extra})
                 for k, extra in (("plain", {}), ("guarded", {"skip_spikes": "3"}))}  # fmt: skip
        states = {k: b[1] for k, b in built.items()}
        times = {k: [] for k in built}
        for r in range(args.rounds + 1):  # the first round warms up: dropped
            for k, (_, _, batch, compiled, _) in built.items():
                t, states[k] = rounds(compiled, states[k], batch, args.steps)
                if r:
                    times[k].append(t)
        plain, guarded = (float(np.median(times[k])) for k in ("plain", "guarded"))
        temp = {k: b[4].temp_size_in_bytes if b[4] else None for k, b in built.items()}
        results.append({
            "model": name, "mesh": "2x2", "device": jax.devices()[0].device_kind,
            "plain_step_ms": round(plain * 1e3, 3), "guarded_step_ms": round(guarded * 1e3, 3),
            "guarded/plain": round(guarded / plain, 4),
            "temp_bytes_plain": temp["plain"], "temp_bytes_guarded": temp["guarded"],
        })  # fmt: skip
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
