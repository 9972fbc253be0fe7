"""Two choices in the MLP's CPU step, each on and off, timed in one process (paired windows).

- dropout masks from `models.dropout`'s unrolled threefry (fused into the dropout's elementwise
  pass) against ``jax.random.bernoulli`` (JAX lowers threefry on the CPU as a five-iteration
  loop); the masks are the same bits, so are the losses (checked here too);
- `jaxpar.mesh.CPU_XLA_FLAGS` (copy insertion with region analysis: no copy of the donated
  parameters before their update) against XLA's default, by compiler options per program.

Windows of 50 steps alternate over the four programs; each ratio is the median over rounds of a
window's time over the baseline's window of the same round (this machine is shared and noisy).

    python benchmarks/cpu_step.py                    # 40 rounds, MNIST-size MLP, batch 128
"""

import argparse
import json
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

import models.mlp
from jaxpar.data import load_dataset, preprocess, train_batches
from jaxpar.mesh import CPU_XLA_FLAGS, make_mesh, parse_mesh
from jaxpar.step import compile_steps, create_state, make_optimizer

FUSED = models.mlp.dropout


def jax_random_dropout(x, rate, keys, *salt):
    """The masks from ``jax.random`` per example: what `models.dropout` computed before."""
    if keys is None or rate == 0.0:
        return x

    def one(key, row):
        for s in salt:
            key = jax.random.fold_in(key, s)
        keep = jax.random.bernoulli(key, 1.0 - rate, row.shape)
        return jnp.where(keep, row / (1.0 - rate), jnp.zeros_like(row))

    return jax.vmap(one)(keys, x)


def program(dropout, flags: bool, ds, mesh, batch):
    models.mlp.dropout = dropout  # read when the step is traced, below
    model_fn = partial(models.mlp.MLP, ds.image_shape, ds.num_classes)
    graphdef, state, shardings, _ = create_state(model_fn, make_optimizer(), mesh, seed=0)
    train_step, _ = compile_steps(graphdef, shardings, mesh, 0, 4, preprocess(ds))
    data = next(train_batches(ds, batch, 0, [0], mesh))
    options = {f.split("=")[0].lstrip("-"): flags for f in CPU_XLA_FLAGS}
    return [train_step.lower(state, data).compile(compiler_options=options), state, data]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--steps", type=int, default=50, help="steps per window")
    args = parser.parse_args()
    ds, mesh = load_dataset("synthetic:28x28x1:10"), make_mesh(parse_mesh("1"))
    cases = {
        "jax.random, XLA default": (jax_random_dropout, False),
        "jax.random, CPU_XLA_FLAGS": (jax_random_dropout, True),
        "fused hash, XLA default": (FUSED, False),
        "fused hash, CPU_XLA_FLAGS": (FUSED, True),
    }
    programs = {name: program(*case, ds, mesh, 128) for name, case in cases.items()}
    models.mlp.dropout = FUSED
    losses = {}
    for name, p in programs.items():  # three steps each: the same losses, bit for bit
        for _ in range(3):
            p[1], metrics = p[0](p[1], p[2])
            losses.setdefault(name, []).append(float(metrics["train_loss"]))
    times = {name: [] for name in programs}
    for _ in range(args.rounds):
        for name, p in programs.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                p[1], metrics = p[0](p[1], p[2])
            jax.block_until_ready(metrics)
            times[name].append((time.perf_counter() - start) / args.steps * 1e3)
    base = np.array(times["jax.random, XLA default"])
    rows = [
        {"case": name, "median_ms": float(np.median(t)), "ratio": float(np.median(t / base))}
        for name, t in ((name, np.array(t)) for name, t in times.items())
    ]
    print(f"{'case':>26} {'median ms':>10} {'vs first':>9}")
    for r in rows:
        print(f"{r['case']:>26} {r['median_ms']:>10.3f} {r['ratio']:>9.3f}")
    same = all(v == losses["jax.random, XLA default"] for v in losses.values())
    print(f"losses of 3 steps identical in all four: {same}")
    meta = {"jax": jax.__version__, "platform": jax.default_backend(), "mesh": "1"}
    print(json.dumps({"benchmark": "cpu_step", **meta, "same_losses": same, "rows": rows}))


if __name__ == "__main__":
    main()
