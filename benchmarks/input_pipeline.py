"""Share of step time spent waiting for input.

Each case trains the same steps twice in this process: once fed by jaxpar's input pipeline
(`prefetch(train_batches(...))`: row gathers, host-to-device copies, two batches ahead) and once
on one batch already on the devices. The input-wait share is ``1 - t_no_input / t_pipeline``
(medians of alternating rounds).

    python benchmarks/input_pipeline.py                 # MLP on MNIST size, ResNet-18 on CIFAR size
    python benchmarks/input_pipeline.py --mesh 2x2 --rounds 5
    python benchmarks/input_pipeline.py --steps-per-dispatch 8 --cases mlp/mnist-size
"""

import argparse
import json
import time
from functools import partial

import jax

jax.config.update("jax_num_cpu_devices", 4)

import numpy as np  # noqa: E402

from jaxpar.data import load_dataset, prefetch, preprocess, train_batches  # noqa: E402
from jaxpar.mesh import make_mesh, parse_mesh  # noqa: E402
from jaxpar.step import compile_steps, create_state, make_optimizer  # noqa: E402
from models import MODELS  # noqa: E402

CASES = {  # model, dataset, global batch, steps per round
    "mlp/mnist-size": ("mlp", "synthetic:28x28x1:10", 128, 200),
    "resnet18/cifar-size": ("resnet18", "synthetic:32x32x3:10", 64, 6),
}


def run_case(model, dataset, batch_size, steps, mesh, rounds, k=1):
    """With `k` > 1, `k` steps per dispatch (stacked batches), as ``--steps-per-dispatch``."""
    steps = -(-steps // k) * k
    ds = load_dataset(dataset)
    model_fn = partial(MODELS[model], ds.image_shape, ds.num_classes)
    graphdef, state, shardings, _ = create_state(model_fn, make_optimizer(), mesh, seed=0)
    step, _ = compile_steps(graphdef, shardings, mesh, 0, 4, preprocess(ds), stacked=k > 1)
    fixed = next(train_batches(ds, batch_size, 0, [range(k)], mesh))
    state, m = step(state, fixed)  # compile
    jax.block_until_ready(m)
    times = {"pipeline": [], "no_input": []}

    def timed(state, batches):
        start, previous = time.perf_counter(), None
        for batch in batches:
            state, m = step(state, batch)
            if previous is not None:
                jax.block_until_ready(previous)  # as the training loop: 2 dispatches in flight
            previous = m
        jax.block_until_ready(previous)
        return state, (time.perf_counter() - start) / steps

    for r in range(rounds):
        for name in sorted(times, reverse=r % 2 == 1):
            first = r * steps
            items = [range(s, s + k) for s in range(first, first + steps, k)]
            batches = (
                prefetch(train_batches(ds, batch_size, 0, items, mesh))
                if name == "pipeline"
                else (fixed for _ in items)
            )
            state, t = timed(state, batches)
            times[name].append(t)
    fed, bare = np.median(times["pipeline"]), np.median(times["no_input"])
    return {"step_ms": round(fed * 1e3, 2), "no_input_ms": round(bare * 1e3, 2),
            "input_wait_share": round(max(0.0, 1 - bare / fed), 3)}  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mesh", default="1")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-per-dispatch", type=int, default=1)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    mesh, k = make_mesh(parse_mesh(args.mesh)), args.steps_per_dispatch
    rows = [{"case": c, **run_case(*CASES[c], mesh, args.rounds, k)} for c in args.cases]
    print(f"{'case':>20} {'step ms':>9} {'no-input ms':>12} {'input wait':>11}")
    for r in rows:
        print(
            f"{r['case']:>20} {r['step_ms']:>9.2f} {r['no_input_ms']:>12.2f} "
            f"{r['input_wait_share']:>11.1%}"
        )
    meta = {"jax": jax.__version__, "mesh": args.mesh, "platform": jax.default_backend(),
            "steps_per_dispatch": k}  # fmt: skip
    print(json.dumps({"benchmark": "input_pipeline", **meta, "rows": rows}))


if __name__ == "__main__":
    main()
