"""What a compiled train step does on this accelerator: for `--project`'s checks (issue #17).

For each case (model, batch) it measures images/s as `gpu.py` does (median of rounds after
warm-up), and writes to ``--out DIR``: the compiled program's HLO text (``CASE.hlo.txt``), XLA's
cost and memory analyses and the timings (``CASE.json``), and for the cases named in
``--trace`` a profiler trace of a few steps in Perfetto's JSON format (``CASE.trace.json.gz``:
every kernel, its duration and the HLO op it runs). Each case runs in its own process.

    PYTHONPATH=. python benchmarks/gpu_profile.py --out /tmp/profile
    python benchmarks/gpu_profile.py --smoke --out /tmp/profile   # tiny sizes, any machine
    python benchmarks/gpu_profile.py --summarize benchmarks/gpu-runs/2026-11-27-h200-profile

``--summarize DIR`` reads the traces in DIR (any machine) and prints the GPU time of a step by
kind of kernel (library convolutions and matrix products, XLA's fusions, copies) and the
longest kernels.
"""

import argparse
import glob
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

CASES = {  # name: (model, batch, model options)
    "resnet50-b256": ("resnet50", 256, {}),
    "resnet50-b128": ("resnet50", 128, {}),
    "resnet18-b256": ("resnet18", 256, {}),
    "vit-base-b128": ("vit-base", 128, {"patch_size": 16}),
}


def run_case(a, name: str) -> dict:
    from jaxpar.core.mesh import set_xla_flags

    set_xla_flags()
    import jax
    import jax.numpy as jnp

    from jaxpar.core.mesh import make_mesh, parse_mesh
    from jaxpar.core.optimizers import make_optimizer
    from jaxpar.core.step import compile_steps, create_state
    from jaxpar.data import load_dataset, preprocess, train_batches
    from jaxpar.models import MODELS

    model, batch, options = CASES[name]
    if a.smoke:
        batch = 8
    ds = load_dataset(f"synthetic:{a.image}x{a.image}x3:{a.classes}")
    mesh = make_mesh(parse_mesh("1"))
    model_fn = partial(MODELS[model], ds.image_shape, ds.num_classes, dtype=jnp.bfloat16,
                       **options)  # fmt: skip
    graphdef, state, shardings, _ = create_state(model_fn, make_optimizer(lr=0.1), mesh, seed=0)
    train_step, _ = compile_steps(graphdef, shardings, mesh, 0, 4, preprocess(ds))
    data = next(train_batches(ds, batch, 0, range(1), mesh))
    start = time.perf_counter()
    compiled = train_step.lower(state, data).compile()
    compile_s = time.perf_counter() - start
    out = Path(a.out)
    (out / f"{name}.hlo.txt").write_text(compiled.as_text())
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    mem = compiled.memory_analysis()
    box = {"state": state}

    def step():
        box["state"], box["metrics"] = compiled(box["state"], data)

    for _ in range(3):
        step()
    jax.block_until_ready(box)
    times = []
    for _ in range(a.rounds):
        start = time.perf_counter()
        for _ in range(a.steps):
            step()
        jax.block_until_ready(box)
        times.append((time.perf_counter() - start) / a.steps)
    if name in a.trace.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            try:
                with jax.profiler.trace(tmp, create_perfetto_trace=True):
                    for _ in range(3):
                        step()
                    jax.block_until_ready(box)
                for f in glob.glob(f"{tmp}/**/perfetto_trace.json.gz", recursive=True):
                    shutil.copy(f, out / f"{name}.trace.json.gz")
            except Exception as e:  # a trace is a bonus: the timings stand without it
                print(f"trace failed: {e!r}", file=sys.stderr)
    seconds = statistics.median(times)
    result = {
        "case": name,
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "batch": batch,
        "images_per_s": batch / seconds,
        "step_ms": seconds * 1e3,
        "round_ms": [t * 1e3 for t in times],
        "compile_s": compile_s,
        "cost_analysis": {k: float(v) for k, v in cost.items()},
        "memory": {k: getattr(mem, k) for k in dir(mem) if k.endswith("_in_bytes")},
    }
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    return result


def kind_of(name: str) -> str:
    """A kernel's kind from its name in the trace."""
    if name.startswith(("loop_", "input_", "wrapped_")):
        return "XLA fusion"
    if "memcpy" in name or name.startswith("Memset"):
        return "copy"
    if any(s in name for s in ("cudnn", "xmma", "implicit", "Conv", "conv")):
        return "cuDNN (convolutions, attention)"
    if any(s in name for s in ("nvjet", "gemm", "cutlass", "cublas")):
        return "cuBLAS (matrix products)"
    return "other"


def summarize(folder: str) -> None:
    import collections
    import gzip

    for path in sorted(Path(folder).glob("*.trace.json.gz")):
        with gzip.open(path) as f:
            events = json.load(f)["traceEvents"]
        gpu = {e["pid"] for e in events if e.get("name") == "process_name"
               and "GPU" in e["args"]["name"]}  # fmt: skip
        kernels = [e for e in events if e.get("ph") == "X" and e["pid"] in gpu]
        steps = 3  # gpu_profile traces 3 steps
        by_kind, by_op = collections.Counter(), collections.Counter()
        for e in kernels:
            op = e["args"].get("hlo_op", "")
            name = e["name"] if op.startswith("command_buffer") or not op else op
            by_kind[kind_of(e["name"])] += e["dur"] / 1e3 / steps
            by_op[name.split("(")[0][:60]] += e["dur"] / 1e3 / steps
        print(f"{path.name}: {sum(by_kind.values()):.2f} ms of kernels per step")
        for kind, ms in by_kind.most_common():
            print(f"  {kind:34} {ms:7.2f} ms")
        print("  longest:", ", ".join(f"{n} {ms:.2f} ms" for n, ms in by_op.most_common(6)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out")
    parser.add_argument("--summarize", metavar="DIR", help="print what the traces in DIR hold")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--trace", default="resnet50-b256,vit-base-b128")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--deadline", type=float, default=360)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.summarize:
        return summarize(a.summarize)
    if not a.out:
        parser.error("--out DIR is needed to measure")
    a.image, a.classes = (32, 10) if a.smoke else (224, 1000)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    if a.case:
        r = run_case(a, a.case)
        print(f"{a.case}: {r['images_per_s']:.0f} images/s, step {r['step_ms']:.2f} ms, "
              f"rounds {[round(t, 2) for t in r['round_ms']]}, compile {r['compile_s']:.0f} s",
              flush=True)  # fmt: skip
        return
    end = time.monotonic() + a.deadline
    for name in a.cases.split(","):
        left = end - time.monotonic()
        if left < 20:
            print(f"{name}: skipped, no time left")
            continue
        cmd = [sys.executable, __file__, *sys.argv[1:], "--case", name]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=left)
            print(p.stdout.strip() or f"{name}: exit {p.returncode}: {p.stderr[-2000:]}",
                  flush=True)  # fmt: skip
        except subprocess.TimeoutExpired:
            print(f"{name}: still running at the deadline", flush=True)


if __name__ == "__main__":
    main()
