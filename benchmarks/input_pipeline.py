"""Share of step time spent waiting for input.

Each case trains in this process from two sources of batches, in short alternating chunks of
steps: jaxpar's input pipeline (`prefetch(train_batches(...))`: row gathers, host-to-device
arrays, two batches ahead, as the training loop reads them), and batches built before the clock
started (already on the devices, a different one each step, cycled). The input-wait share is
``1 - t_built / t_pipeline``, from the medians of the chunks' step times. Chunks of a fraction
of a second, alternated many times, keep this shared machine's slow swings in load out of the
ratio; a control case (``built`` against a second list of built batches) measures the method's
own error and should read about 0%.

An earlier version fed its baseline a single batch over and over (it stays in the CPU's caches,
which counted as input wait) and compared a few long rounds: its shares swung from 3% to 12%
between runs.

    python benchmarks/input_pipeline.py                 # MLP on MNIST size, ResNet-18 on CIFAR size
    python benchmarks/input_pipeline.py --steps-per-dispatch 8 --cases mlp/mnist-size
    python benchmarks/input_pipeline.py --mesh 2x2 --chunks 40
"""

import argparse
import itertools
import json
import time
from functools import partial

import jax

jax.config.update("jax_num_cpu_devices", 4)

import numpy as np  # noqa: E402

from jaxpar.core.mesh import make_mesh, parse_mesh  # noqa: E402
from jaxpar.core.optimizers import make_optimizer  # noqa: E402
from jaxpar.core.step import compile_steps, create_state  # noqa: E402
from jaxpar.data import load_dataset, prefetch, preprocess, train_batches  # noqa: E402
from jaxpar.models import MODELS  # noqa: E402

# Steps per chunk: a multiple of the input's own runs (`jaxpar.data.CHUNK_STEPS`, 64 MLP steps
# read and put at once), so every chunk holds the same share of that lumpy work.
CASES = {  # model, dataset, global batch, steps per chunk, chunk pairs
    "mlp/mnist-size": ("mlp", "synthetic:28x28x1:10", 128, 64, 30),
    "resnet18/cifar-size": ("resnet18", "synthetic:32x32x3:10", 64, 1, 4),
}


def run_case(model, dataset, batch_size, chunk, pairs, mesh, k=1, control=False):
    """Chunks of `chunk` steps (rounded up to whole dispatches of `k` steps, as
    ``--steps-per-dispatch``), `pairs` of them from each source. With `control`, the
    pipeline's side reads another list of built batches instead."""
    per_chunk = -(-chunk // k)  # dispatches
    ds = load_dataset(dataset)
    model_fn = partial(MODELS[model], ds.image_shape, ds.num_classes)
    graphdef, state, shardings, _ = create_state(model_fn, make_optimizer(), mesh, seed=0)
    step, _ = compile_steps(graphdef, shardings, mesh, 0, 4, preprocess(ds), stacked=k > 1)
    items = lambda first, n: [range(first + k * i, first + k * (i + 1)) for i in range(n)]  # noqa: E731
    built = lambda first: jax.block_until_ready(  # noqa: E731
        list(train_batches(ds, batch_size, 0, items(first, min(per_chunk * pairs, 100)), mesh))
    )
    baseline = itertools.cycle(built(10**6))
    fed = (
        itertools.cycle(built(2 * 10**6))
        if control
        else prefetch(train_batches(ds, batch_size, 0, items(0, per_chunk * pairs + 2), mesh))
    )
    box, previous = [state], [None]

    def seconds_per_step(batches):
        start = time.perf_counter()
        for _ in range(per_chunk):
            box[0], m = step(box[0], next(batches))
            if previous[0] is not None:
                jax.block_until_ready(previous[0])  # as the training loop: 2 dispatches in flight
            previous[0] = m
        jax.block_until_ready(previous[0])
        return (time.perf_counter() - start) / (per_chunk * k)

    seconds_per_step(baseline)  # compile, warm up
    times = {"pipeline": [], "built": []}
    for i in range(pairs):
        for name in sorted(times, reverse=i % 2 == 1):
            times[name].append(seconds_per_step(fed if name == "pipeline" else baseline))
    fed_s, bare_s = np.median(times["pipeline"]), np.median(times["built"])
    return {"step_ms": round(fed_s * 1e3, 3), "built_ms": round(bare_s * 1e3, 3),
            "input_wait_share": round(1 - bare_s / fed_s, 4)}  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mesh", default="1")
    parser.add_argument("--chunks", type=int, help="chunk pairs per case (default: the case's)")
    parser.add_argument("--steps-per-dispatch", type=int, default=1)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--no-control", action="store_true", help="skip the control case")
    args = parser.parse_args()
    mesh, k = make_mesh(parse_mesh(args.mesh)), args.steps_per_dispatch
    rows = []
    for c in args.cases:
        model, dataset, batch, chunk, pairs = CASES[c]
        for control in (False,) if args.no_control or c != args.cases[0] else (False, True):
            run = run_case(model, dataset, batch, chunk, args.chunks or pairs, mesh, k, control)
            rows.append({"case": c + (" (control)" if control else ""), **run})
    print(f"{'case':>30} {'step ms':>9} {'built ms':>9} {'input wait':>11}")
    for r in rows:
        print(f"{r['case']:>30} {r['step_ms']:>9.3f} {r['built_ms']:>9.3f} "
              f"{r['input_wait_share']:>11.1%}")  # fmt: skip
    meta = {"jax": jax.__version__, "mesh": args.mesh, "platform": jax.default_backend(),
            "steps_per_dispatch": k}  # fmt: skip
    print(json.dumps({"benchmark": "input_pipeline", **meta, "rows": rows}))


if __name__ == "__main__":
    main()
