"""Throughput and model FLOPs utilisation of jaxpar's train step on this machine's devices.

FLOPs per step are the model's: for the MLP its eight matrix products (below; XLA's count of
the whole step is ~7% higher, counting elementwise work, the dropout hash's integer operations
included), for ResNet-18 XLA's cost analysis of the step (nearly all convolutions). A CPU has
no vendor peak to divide by, so the ceiling is measured in the same process: a large float32
matrix product (the operation the model's layers are made of) on one device, timed like the
steps. MFU here is the step's FLOP/s over that product's FLOP/s, on one device.

For the MLP a second, shape-matched ceiling: the step's own matrix products (three forward, five
backward: the first layer's input gradient is not needed), each compiled and timed alone, at
the shapes of batch 128. ``products alone`` is their total time and FLOP/s: the rate XLA's CPU
dots reach at these shapes (each is its own call, so the total also holds eight dispatches that
the step pays once).

    python benchmarks/throughput.py                  # MLP (MNIST size), ResNet-18 (CIFAR size)
"""

import argparse
import json
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxpar.core.mesh import make_mesh, parse_mesh, set_xla_flags
from jaxpar.core.optimizers import make_optimizer
from jaxpar.core.step import compile_steps, create_state
from jaxpar.data import load_dataset, preprocess, train_batches
from jaxpar.models import MODELS

set_xla_flags()  # as train.py, before JAX starts

CASES = {  # model, dataset, batch, timed steps
    "mlp/mnist-size": ("mlp", "synthetic:28x28x1:10", 128, 200),
    "resnet18/cifar-size": ("resnet18", "synthetic:32x32x3:10", 64, 4),
}


def seconds_per_call(fn, args, calls):
    out = fn(*args)  # compile and warm up
    jax.block_until_ready(out)
    start = time.perf_counter()
    for _ in range(calls):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / calls


def matmul_flops_per_s(n=2048, calls=10) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    return 2 * n**3 / seconds_per_call(jax.jit(jnp.matmul), (a, a), calls)


def mlp_products(batch=128, sizes=(784, 512, 256, 10), calls=200) -> dict:
    """The MLP step's matrix products, each alone: (seconds, FLOPs) summed over them."""
    key, seconds, flops = jax.random.key(0), 0.0, 0.0
    for din, dout in zip(sizes, sizes[1:], strict=False):
        x, w, g = (jax.random.normal(key, s) for s in ((batch, din), (din, dout), (batch, dout)))
        products = [(lambda x, w: x @ w, (x, w)), (lambda x, g: x.T @ g, (x, g))]  # fwd, dW
        if din != sizes[0]:
            products.append((lambda g, w: g @ w.T, (g, w)))  # the input's gradient
        for fn, args in products:
            jitted = jax.jit(fn)
            seconds += min(seconds_per_call(jitted, args, calls) for _ in range(3))
            flops += jitted.lower(*args).compile().cost_analysis()["flops"]
    return {"products_ms": seconds * 1e3, "products_flops": flops,
            "products_flops_per_s": flops / seconds}  # fmt: skip


def step_case(model, dataset, batch, steps, mesh) -> dict:
    ds = load_dataset(dataset)
    model_fn = partial(MODELS[model], ds.image_shape, ds.num_classes)
    graphdef, state, shardings, _ = create_state(model_fn, make_optimizer(), mesh, seed=0)
    train_step, _ = compile_steps(graphdef, shardings, mesh, 0, 4, preprocess(ds))
    data = next(train_batches(ds, batch, 0, [0], mesh))
    compiled = train_step.lower(state, data).compile()
    flops = compiled.cost_analysis()["flops"]
    box = [state]

    def step(data):
        box[0], metrics = compiled(box[0], data)
        return metrics

    seconds = seconds_per_call(step, (data,), steps)
    return {"step_ms": seconds * 1e3, "examples_per_s": batch / seconds,
            "gflop_per_step": flops / 1e9, "flops_per_s": flops / seconds}  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    mesh = make_mesh(parse_mesh("1"))
    rows = []
    for name, spec in CASES.items():
        runs, peaks = [], []
        for _ in range(args.rounds):  # alternate: the ceiling is measured next to each run
            peaks.append(matmul_flops_per_s())
            runs.append(step_case(*spec, mesh))
            if name.startswith("mlp"):  # the model's FLOPs: its matrix products
                runs[-1].update(mlp_products(spec[2]))
                flops, rate = runs[-1]["products_flops"], runs[-1]["examples_per_s"] / spec[2]
                runs[-1].update(xla_gflop_per_step=runs[-1]["gflop_per_step"],  # whole step
                                gflop_per_step=flops / 1e9, flops_per_s=flops * rate)  # fmt: skip
        run = {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
        peak = float(np.median(peaks))
        rows.append({"case": name, **run, "matmul_flops_per_s": peak,
                     "mfu": run["flops_per_s"] / peak})  # fmt: skip
    print(f"{'case':>20} {'step ms':>9} {'examples/s':>11} {'GFLOP/step':>11} {'GFLOP/s':>8} "
          f"{'matmul GFLOP/s':>15} {'MFU':>6}")  # fmt: skip
    for r in rows:
        print(f"{r['case']:>20} {r['step_ms']:>9.2f} {r['examples_per_s']:>11.0f} "
              f"{r['gflop_per_step']:>11.3f} {r['flops_per_s'] / 1e9:>8.1f} "
              f"{r['matmul_flops_per_s'] / 1e9:>15.1f} {r['mfu']:>6.1%}")  # fmt: skip
    for r in rows:
        if "products_ms" in r:
            print(f"{r['case']}: its matrix products alone {r['products_ms']:.2f} ms, "
                  f"{r['products_flops_per_s'] / 1e9:.1f} GFLOP/s = "
                  f"{r['products_flops_per_s'] / r['matmul_flops_per_s']:.1%} of the large one; "
                  f"the step takes {r['step_ms'] / r['products_ms']:.2f}x their time")  # fmt: skip
    meta = {"jax": jax.__version__, "platform": jax.default_backend(), "mesh": "1"}
    print(json.dumps({"benchmark": "throughput", **meta, "rows": rows}))


if __name__ == "__main__":
    main()
