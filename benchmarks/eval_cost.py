"""What a per-epoch evaluation costs against the training epoch it follows: the seed's MLP on
MNIST-size data (50,000 training and 10,000 test images, synthetic), batch 128, 1 device.

An evaluation over the test split is timed with evaluation batches of the training batch's size
(as jaxpar did) and of `jaxpar.data.eval_batch_size`'s (as it does now), in alternating rounds in
this process; the training epoch is 391 train steps timed the same way (at most 2 in flight, as
jaxpar's loop). A forward pass over 10,000 images is a fifth of the forward work of 50,000, and a
forward pass is about a third of a training step's work: about 7% of an epoch is the floor.

    python benchmarks/eval_cost.py
    python benchmarks/eval_cost.py --mesh 2x2 --rounds 5
"""

import argparse
import json
import time

import jax
import numpy as np

from jaxpar.core.mesh import parse_mesh, request_devices
from jaxpar.core.sharding import batch_sharding
from jaxpar.data import eval_batch_size, eval_batches
from jaxpar.run.config import Config
from jaxpar.run.evaluation import evaluate
from jaxpar.run.setup import setup

BATCH = 128


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mesh", default="1")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    request_devices(parse_mesh(args.mesh).size)  # CPU devices to emulate, before JAX starts
    cfg = Config.of(model="mlp", dataset="synthetic:28x28x1:10", mesh=args.mesh, batch_size=BATCH)
    run = setup(cfg.validate())
    state = run.init()
    n, train = len(run.ds.test_labels), len(run.ds.train_labels)
    sizes = {"train_batch": BATCH, "eval_batch_size": eval_batch_size(BATCH, n)}
    kept = {k: list(eval_batches(run.ds, b, run.mesh)) for k, b in sizes.items()}
    rows = np.arange(BATCH)
    batch = {
        "image": jax.device_put(run.ds.train_images[rows], batch_sharding(run.mesh, 4)),
        "label": jax.device_put(run.ds.train_labels[rows], batch_sharding(run.mesh)),
    }
    steps = -(-train // BATCH)

    def epoch(state):
        previous = None
        for _ in range(steps):
            state, metrics = run.train_step(state, batch)
            jax.block_until_ready(previous)
            previous = metrics
        jax.block_until_ready(state)
        return state

    times = {"epoch": [], **{k: [] for k in kept}}
    for r in range(args.rounds + 1):  # round 0 compiles
        start = time.perf_counter()
        state = epoch(state)
        elapsed = {"epoch": time.perf_counter() - start}
        for k, batches in kept.items():
            start = time.perf_counter()
            evaluate(run.eval_step, state, batches)
            elapsed[k] = time.perf_counter() - start
        for k, v in elapsed.items():
            if r:
                times[k].append(v)
    med = {k: float(np.median(v)) for k, v in times.items()}
    print(f"training epoch ({steps} steps of {BATCH}): {med['epoch'] * 1e3:.0f} ms")
    for k, b in sizes.items():
        print(f"evaluation of {n} images in batches of {b}: {med[k] * 1e3:.1f} ms, "
              f"{med[k] / med['epoch']:.1%} of the epoch")  # fmt: skip
    result = {"benchmark": "eval_cost", "mesh": args.mesh, "sizes": sizes,
              "median_s": {k: round(v, 4) for k, v in med.items()}}  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
