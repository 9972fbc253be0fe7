"""Two choices in the MLP's CPU step, each on and off, timed in one process (paired windows).

- dropout masks from `jaxpar.models.dropout`'s unrolled threefry (fused into the dropout's
  elementwise pass) against ``jax.random.bernoulli`` (JAX lowers threefry on the CPU as a
  five-iteration loop); the masks are the same bits, so are the losses (checked here too);
- `jaxpar.core.mesh.CPU_XLA_FLAGS` (copy insertion with region analysis: no copy of the donated
  parameters before their update) against XLA's default, by compiler options per program.

Windows of 50 steps alternate over the four programs, in an order rotated every round; "paired"
is the median over rounds of a window's time over the first program's window of the same round,
"of medians" the ratio of the median times (this machine is shared and noisy: trust a ratio only
where both agree).

    python benchmarks/cpu_step.py                    # 40 rounds, MNIST-size MLP, batch 128
"""

import argparse
import json
import time
from functools import partial

import jax
import numpy as np

import jaxpar.models.mlp as mlp_module
from jaxpar.core.mesh import CPU_XLA_FLAGS, make_mesh, parse_mesh
from jaxpar.core.optimizers import make_optimizer
from jaxpar.core.step import compile_steps, create_state
from jaxpar.data import load_dataset, preprocess, train_batches
from jaxpar.models.dropout import dropout, jax_random_dropout


class Program:
    """A compiled MLP step with its own state, stepped on one fixed batch."""

    def __init__(self, drop, flags: bool, ds, mesh, batch=128):
        mlp_module.dropout = drop  # the MLP reads it when the step is traced, below
        model_fn = partial(mlp_module.MLP, ds.image_shape, ds.num_classes)
        graphdef, self.state, shardings, _ = create_state(model_fn, make_optimizer(), mesh, 0)
        train_step, _ = compile_steps(graphdef, shardings, mesh, 0, 4, preprocess(ds))
        self.batch = next(train_batches(ds, batch, 0, [0], mesh))
        options = {f.split("=")[0].lstrip("-"): flags for f in CPU_XLA_FLAGS}
        self.step = train_step.lower(self.state, self.batch).compile(compiler_options=options)
        mlp_module.dropout = dropout

    def run(self, steps: int):
        for _ in range(steps):
            self.state, metrics = self.step(self.state, self.batch)
        return metrics


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--steps", type=int, default=50, help="steps per window")
    args = parser.parse_args()
    ds, mesh = load_dataset("synthetic:28x28x1:10"), make_mesh(parse_mesh("1"))
    cases = {
        "jax.random, XLA default": (jax_random_dropout, False),
        "jax.random, CPU_XLA_FLAGS": (jax_random_dropout, True),
        "fused hash, XLA default": (dropout, False),
        "fused hash, CPU_XLA_FLAGS": (dropout, True),
    }
    programs = {name: Program(*case, ds, mesh) for name, case in cases.items()}
    losses = {
        name: [float(p.run(1)["train_loss"]) for _ in range(3)] for name, p in programs.items()
    }
    times = {name: [] for name in programs}
    names = list(programs)
    for r in range(args.rounds):
        for name in names[r % 4 :] + names[: r % 4]:  # each program first as often as the others
            start = time.perf_counter()
            jax.block_until_ready(programs[name].run(args.steps))
            times[name].append((time.perf_counter() - start) / args.steps * 1e3)
    base = np.array(times[names[0]])
    rows = [
        {"case": name, "median_ms": float(np.median(t)), "paired": float(np.median(t / base)),
         "of_medians": float(np.median(t) / np.median(base))}
        for name, t in ((name, np.array(t)) for name, t in times.items())
    ]  # fmt: skip
    print(f"{'case':>26} {'median ms':>10} {'paired':>7} {'of medians':>11}")
    for r in rows:
        print(
            f"{r['case']:>26} {r['median_ms']:>10.3f} {r['paired']:>7.3f} {r['of_medians']:>11.3f}"
        )
    same = all(v == losses[names[0]] for v in losses.values())
    print(f"losses of 3 steps identical in all four: {same}")
    meta = {"jax": jax.__version__, "platform": jax.default_backend(), "mesh": "1"}
    print(json.dumps({"benchmark": "cpu_step", **meta, "same_losses": same, "rows": rows}))


if __name__ == "__main__":
    main()
