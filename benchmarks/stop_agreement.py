"""What the multi-process stop agreement costs: the train step with and without the pending-signal
argument (`jaxpar.core.step.with_signals`, one tiny max all-reduce per dispatch), same model,
mesh and batch, interleaved in rounds in this process; the ratio is the figure (the machine is
noisy).

    python benchmarks/stop_agreement.py             # prints a table, then one JSON line
    python benchmarks/stop_agreement.py --meshes 1 2x2 --steps 300 --rounds 4
"""

import argparse
import json
import time
from functools import partial

import jax

jax.config.update("jax_num_cpu_devices", 4)

import numpy as np  # noqa: E402

from jaxpar.core.mesh import make_mesh, parse_mesh  # noqa: E402
from jaxpar.core.optimizers import make_optimizer  # noqa: E402
from jaxpar.core.step import compile_steps, create_state  # noqa: E402
from jaxpar.data import device_batch, load_digits, train_indices  # noqa: E402
from jaxpar.models import MODELS  # noqa: E402
from jaxpar.run.signals import pending  # noqa: E402


def ms_per_step(step, state, steps: int):
    """Time `steps` steps, reading each loss after dispatching the next step (as the loop does)."""
    state, metrics = step(state)
    jax.block_until_ready(metrics)
    start, previous = time.perf_counter(), None
    for _ in range(steps):
        state, metrics = step(state)
        if previous is not None:
            float(previous["train_loss"])
        previous = metrics
    jax.block_until_ready(metrics)
    return state, (time.perf_counter() - start) / steps * 1e3


def measure(mesh_text: str, steps: int, rounds: int) -> dict:
    mesh = make_mesh(parse_mesh(mesh_text))
    ds = load_digits()
    model_fn = partial(MODELS["mlp"], ds.image_shape, ds.num_classes)
    graphdef, state, shardings, _ = create_state(model_fn, make_optimizer(), mesh, 0)
    plain, _ = compile_steps(graphdef, shardings, mesh, 0, 4)
    agreed, _ = compile_steps(graphdef, shardings, mesh, 0, 4, signals=True)
    data = {"image": ds.train_images, "label": ds.train_labels}
    batch = device_batch(data, train_indices(ds, 128, 0, 0), mesh)
    contenders = {
        "plain": lambda s: plain(s, batch),
        "signals": lambda s: agreed(s, batch, pending(mesh, 0)),
    }
    times = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, step in contenders.items():
            state, ms = ms_per_step(step, state, steps)
            times[name].append(ms)
    median = {k: float(np.median(v)) for k, v in times.items()}
    return {"mesh": mesh_text, "ms_per_step": median, "ratio": median["signals"] / median["plain"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meshes", nargs="+", default=["1", "2x2"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    rows = [measure(m, args.steps, args.rounds) for m in args.meshes]
    print(f"{'mesh':>6} {'plain ms':>9} {'signals ms':>11} {'ratio':>6}")
    for r in rows:
        t = r["ms_per_step"]
        print(f"{r['mesh']:>6} {t['plain']:>9.3f} {t['signals']:>11.3f} {r['ratio']:>6.2f}")
    print(json.dumps({"benchmark": "stop_agreement", "results": rows}))


if __name__ == "__main__":
    main()
