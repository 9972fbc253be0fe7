"""The MLP's CPU step with its matrix products on OpenBLAS instead of XLA's own CPU dots.

Timed alone at the step's shapes, OpenBLAS (numpy's, or scipy-openblas32's) computes the three
weight gradients ``x^T g`` 1.4-8x faster than XLA, which runs them on Eigen's transposed path
(`benchmarks/dense_backward.py`). This asks what that is worth inside the step. An XLA FFI
custom call (`benchmarks/ffi/openblas_gemm.cc`, built here with g++ against jaxlib's FFI
headers and scipy-openblas32) computes the products; dense layers with a custom VJP route
either the weight gradients alone or all eight products (forward, input and weight gradients)
to it. The programs are the real jaxpar step (`jaxpar.core.step`, `jaxpar.models.mlp`, dropout,
SGD with momentum) on one device, batch 128, MNIST-size:

- ``XLA dots``: as jaxpar trains (the baseline);
- ``OpenBLAS weight gradients``: ``x^T g`` by the custom call, the rest by XLA;
- ``OpenBLAS all products``: all eight by the custom call (XLA can then fuse no bias or
  activation into a product, nor run two products at once).

Windows of 50 steps over the programs in an order rotated every round, each round also timing a
2048x2048 float32 product (10 calls) as `benchmarks/throughput.py` does; "MFU" is a program's
FLOP/s (the eight products' FLOPs) over the median of that product's. "paired" and "of medians"
as in `benchmarks/cpu_step.py`. Needs g++ and ``pip install scipy-openblas32``.

    python benchmarks/cpu_blas.py                    # 30 rounds
"""

import argparse
import ctypes
import json
import pathlib
import shutil
import subprocess
import tempfile
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

import jaxpar.models.mlp as mlp_module
from jaxpar.core.mesh import make_mesh, parse_mesh, set_xla_flags
from jaxpar.core.optimizers import make_optimizer
from jaxpar.core.step import compile_steps, create_state
from jaxpar.data import load_dataset, preprocess, train_batches

set_xla_flags()  # as train.py, before JAX starts

SOURCE = pathlib.Path(__file__).parent / "ffi" / "openblas_gemm.cc"
B, SIZES = 128, (784, 512, 256, 10)
# The step's eight products: three forward, three weight gradients, two input gradients (the
# first layer's is not needed).
FLOPS = 2 * B * sum(i * o * (2 + (i != SIZES[0])) for i, o in zip(SIZES, SIZES[1:], strict=False))


def register() -> None:
    """Build the handler into a temporary folder and register it as XLA's ``openblas_gemm``."""
    try:
        import scipy_openblas32 as blas
    except ImportError:
        raise SystemExit("needs scipy-openblas32: pip install scipy-openblas32") from None
    if shutil.which("g++") is None:
        raise SystemExit("needs g++ to build benchmarks/ffi/openblas_gemm.cc")
    with tempfile.TemporaryDirectory() as folder:  # loaded, the library outlives its file
        lib = pathlib.Path(folder) / "openblas_gemm.so"
        subprocess.run(
            ["g++", "-O2", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{jax.ffi.include_dir()}",
             f"-I{blas.get_include_dir()}", str(SOURCE), f"-L{blas.get_lib_dir()}",
             f"-l{blas.get_library()}", f"-Wl,-rpath,{blas.get_lib_dir()}", "-o", str(lib)],
            check=True,
        )  # fmt: skip
        handler = jax.ffi.pycapsule(ctypes.cdll.LoadLibrary(str(lib)).OpenblasGemm)
    jax.ffi.register_ffi_target("openblas_gemm", handler, platform="cpu")


def gemm(a, b, trans_a=False, trans_b=False):
    m, n = a.shape[1 if trans_a else 0], b.shape[0 if trans_b else 1]
    out = jax.ShapeDtypeStruct((m, n), jnp.float32)
    return jax.ffi.ffi_call("openblas_gemm", out)(a, b, trans_a=trans_a, trans_b=trans_b)


def blas_matmul(everything: bool):
    """``x @ w`` whose weight gradient (and, with `everything`, all of it) is OpenBLAS's."""
    dot = gemm if everything else jnp.matmul

    @jax.custom_vjp
    def matmul(x, w):
        return dot(x, w)

    def forward(x, w):
        return dot(x, w), (x, w)

    def backward(residuals, g):
        x, w = residuals
        dx = gemm(g, w, trans_b=True) if everything else g @ w.T
        return dx, gemm(x, g, trans_a=True)

    matmul.defvjp(forward, backward)

    def dot_general(lhs, rhs, dimension_numbers, **_):  # precision, out_sharding: defaults
        assert dimension_numbers == (((1,), (0,)), ((), ())), dimension_numbers  # nnx.Linear's
        return matmul(lhs, rhs)

    return dot_general


class Program:
    """A compiled MLP step with its own state, stepped on one fixed batch."""

    def __init__(self, dot_general, ds, mesh):
        dense = mlp_module._dense

        def routed(*args):
            layer = dense(*args)
            if dot_general is not None:
                layer.dot_general = dot_general
            return layer

        mlp_module._dense = routed  # the MLP reads it when it is built, below
        try:
            model_fn = partial(mlp_module.MLP, ds.image_shape, ds.num_classes)
            graphdef, self.state, shardings, _ = create_state(model_fn, make_optimizer(), mesh, 0)
        finally:
            mlp_module._dense = dense
        train_step, _ = compile_steps(graphdef, shardings, mesh, 0, 4, preprocess(ds))
        self.batch = next(train_batches(ds, B, 0, [0], mesh))
        self.step = train_step.lower(self.state, self.batch).compile()

    def run(self, steps: int):
        for _ in range(steps):
            self.state, metrics = self.step(self.state, self.batch)
        return metrics


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--steps", type=int, default=50, help="steps per window")
    args = parser.parse_args()
    register()
    ds, mesh = load_dataset("synthetic:28x28x1:10"), make_mesh(parse_mesh("1"))
    cases = {
        "XLA dots": None,
        "OpenBLAS weight gradients": blas_matmul(everything=False),
        "OpenBLAS all products": blas_matmul(everything=True),
    }
    programs = {name: Program(case, ds, mesh) for name, case in cases.items()}
    losses = {n: [float(p.run(1)["train_loss"]) for _ in range(3)] for n, p in programs.items()}
    a = jnp.ones((2048, 2048), jnp.float32)
    product = jax.jit(jnp.matmul)
    product(a, a).block_until_ready()
    times, peaks, names = {name: [] for name in programs}, [], list(programs)
    for r in range(args.rounds):
        start = time.perf_counter()
        for _ in range(10):
            out = product(a, a)
        out.block_until_ready()
        peaks.append(2 * 2048**3 * 10 / (time.perf_counter() - start))
        for name in names[r % 3 :] + names[: r % 3]:  # each program first as often as the others
            start = time.perf_counter()
            jax.block_until_ready(programs[name].run(args.steps))
            times[name].append((time.perf_counter() - start) / args.steps)
    peak, base = float(np.median(peaks)), np.array(times[names[0]])
    rows = [
        {"case": name, "median_ms": float(np.median(t)) * 1e3, "paired": float(np.median(t / base)),
         "of_medians": float(np.median(t) / np.median(base)), "mfu": FLOPS / np.median(t) / peak,
         "loss_diff": float(np.max(np.abs(np.subtract(losses[name], losses[names[0]]))))}
        for name, t in ((name, np.array(t)) for name, t in times.items())
    ]  # fmt: skip
    print(f"2048x2048 product: {peak / 1e9:.1f} GFLOP/s (median of {args.rounds}); the step's "
          f"products {FLOPS / 1e9:.4f} GFLOP")  # fmt: skip
    print(f"{'case':>26} {'median ms':>10} {'paired':>7} {'of medians':>11} {'MFU':>6} "
          f"{'loss diff':>10}")  # fmt: skip
    for r in rows:
        print(f"{r['case']:>26} {r['median_ms']:>10.3f} {r['paired']:>7.3f} "
              f"{r['of_medians']:>11.3f} {r['mfu']:>6.1%} {r['loss_diff']:>10.1e}")  # fmt: skip
    meta = {"jax": jax.__version__, "platform": jax.default_backend(), "mesh": "1"}
    print(json.dumps({"benchmark": "cpu_blas", **meta, "matmul_flops_per_s": peak, "rows": rows}))


if __name__ == "__main__":
    main()
