"""ViT on the CPU: compile time against depth, memory with rematerialisation, throughput and MFU.

All on one CPU device, float32 (the CPU's fast path), from jaxpar's own train step
(`jaxpar.core.step.compile_steps`, SGD with momentum). Parts, chosen with ``--parts``:

- ``compile``: the ``vit-base`` train step (224x224x3 images, 1000 classes, patch 16, batch 8),
  traced, lowered and compiled ahead of time on abstract inputs (as ``--dry-run`` does), at
  depth 12 and at depth 24, in alternating order over ``--rounds``. The blocks are one
  ``lax.scan``, so both depths should take about the same time; for contrast, the same step with
  the scan unrolled (every block its own code) is timed in the same rounds.
- ``memory``: XLA's compiled memory analysis of the ``vit-small`` train step at batch 256 (peak =
  arguments + outputs - aliased + temporaries, as ``--dry-run`` reports it), without and with
  ``remat`` (each block's activations recomputed in the backward pass), at 224x224x3 / patch 16
  and 32x32x3 / patch 4, and with gradient accumulation over 4 micro-batches
  (``compile_steps(..., accum=4)``); nothing runs.
- ``throughput``: ``vit-lite`` on CIFAR-size synthetic data (32x32x3, 10 classes, patch 4),
  batch 128: images/s of the train step (median of rounds) and MFU = the step's FLOPs / its time
  / the FLOP/s of a 2048x2048 float32 matrix product timed alongside (as `throughput.py`).

FLOPs: XLA's cost analysis counts a ``while`` loop's body once, so the scanned step's count holds
one block, not ``depth`` of them (vit-lite, batch 8: 1.8 GFLOP at depth 7 and at depth 14). The
FLOPs here are those of the same step lowered with the scan unrolled (`unrolled_scans`): 12.3
and 24.6 GFLOP.

    python benchmarks/vit.py                                 # all parts, about 4 minutes here
    python benchmarks/vit.py --parts compile --rounds 3
    python benchmarks/vit.py --parts memory --memory-images 32
    python benchmarks/vit.py --parts throughput --rounds 5
"""

import argparse
import contextlib
import json
import statistics
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from gpu import unrolled_scans  # benchmarks/gpu.py, beside this script

from jaxpar.core.mesh import make_mesh, parse_mesh
from jaxpar.core.optimizers import make_optimizer
from jaxpar.core.sharding import batch_sharding, placed, state_shardings
from jaxpar.core.step import abstract_state, compile_steps, create_state
from jaxpar.data import load_dataset, preprocess, train_batches
from jaxpar.models import MODELS

PARTS = ("compile", "memory", "throughput")
MEMORY_IMAGES = {224: ("synthetic:224x224x3:1000", 16), 32: ("synthetic:32x32x3:10", 4)}
ACCUM = 4  # micro-batches of the gradient-accumulation contender


def abstract_step(mesh, ds, model, batch, accum=1, **overrides):
    """``(train_step, abstract args)`` for `model` on `ds`'s images: nothing is allocated."""
    model_fn = partial(MODELS[model], ds.image_shape, ds.num_classes, **overrides)
    graphdef, abstract = abstract_state(model_fn, make_optimizer(), 0)
    shardings, _ = state_shardings(abstract, mesh)
    train_step, _ = compile_steps(graphdef, shardings, mesh, 0, 4, preprocess(ds), accum=accum)
    state = placed(nnx.to_pure_dict(abstract), shardings)
    # With `accum` the step takes the same global batch and splits it into micro-batches itself
    # (`jaxpar.core.step.microbatches`); were it to take them stacked, (accum, batch / accum, ...),
    # the shapes here would change accordingly.
    data = {
        "image": jax.ShapeDtypeStruct(
            (batch, *ds.image_shape), ds.train_images.dtype, sharding=batch_sharding(mesh, 4)
        ),
        "label": jax.ShapeDtypeStruct((batch,), np.int32, sharding=batch_sharding(mesh)),
    }
    return train_step, (state, data)


# --- compile ---------------------------------------------------------------------------------


def compile_case(mesh, ds, blocks: str, depth: int, batch: int) -> dict:
    """Trace+lower and compile times of the vit-base step, its blocks scanned or unrolled."""
    step, args = abstract_step(mesh, ds, "vit-base", batch, patch_size=16, depth=depth)
    with unrolled_scans() if blocks == "unrolled" else contextlib.nullcontext():
        start = time.perf_counter()
        lowered = step.lower(*args)  # traces, then lowers to StableHLO
        lowered_at = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    return {"blocks": blocks, "depth": depth, "lower_s": lowered_at - start,
            "compile_s": done - lowered_at, "stablehlo_kb": len(lowered.as_text()) / 1e3,
            "compiled_hlo_kb": len(compiled.as_text()) / 1e3}  # fmt: skip


def part_compile(a, mesh) -> dict:
    ds = load_dataset("synthetic:224x224x3:1000")
    warm = load_dataset("synthetic:32x32x3:10")  # JAX's and XLA's one-time start-up, not timed
    step, args = abstract_step(mesh, warm, "vit-lite", 8, depth=1)
    step.lower(*args).compile()
    # The scanned step (jaxpar's) and, for contrast, the same step with the scan unrolled.
    cases = [(b, d) for b in ("scan", "unrolled") for d in (12, 24)]
    rows = []
    for r in range(a.rounds):
        for blocks, depth in cases if r % 2 == 0 else cases[::-1]:  # alternate the order
            rows.append({"round": r + 1, **compile_case(mesh, ds, blocks, depth, a.compile_batch)})
    keys = ("lower_s", "compile_s", "stablehlo_kb", "compiled_hlo_kb")
    med = {c: {k: statistics.median(x[k] for x in rows if (x["blocks"], x["depth"]) == c)
               for k in keys} for c in cases}  # fmt: skip
    print(f"vit-base train step, 224x224x3, patch 16, batch {a.compile_batch}, 1 CPU device")
    print(f"{'round':>5} {'blocks':>8} {'depth':>5} {'lower s':>8} {'compile s':>10} "
          f"{'StableHLO kB':>13} {'compiled HLO kB':>16}")  # fmt: skip
    for x in rows:
        print(f"{x['round']:>5} {x['blocks']:>8} {x['depth']:>5} {x['lower_s']:>8.2f} "
              f"{x['compile_s']:>10.2f} {x['stablehlo_kb']:>13.0f} "
              f"{x['compiled_hlo_kb']:>16.0f}")  # fmt: skip
    ratios = {}
    for blocks in ("scan", "unrolled"):
        m12, m24 = med[(blocks, 12)], med[(blocks, 24)]
        ratios[blocks] = ratio = {k: m24[k] / m12[k] for k in keys}
        # Each round's depth-24 time over the same round's depth-12 one (run next to each other,
        # so a load change between rounds cancels), then their median.
        pairs = [[x for x in rows if x["round"] == r + 1 and x["blocks"] == blocks]
                 for r in range(a.rounds)]  # fmt: skip
        for k in ("lower_s", "compile_s"):
            per_round = [p[1][k] / p[0][k] if p[0]["depth"] == 12 else p[0][k] / p[1][k]
                         for p in pairs]  # fmt: skip
            ratio[f"{k}_per_round"] = statistics.median(per_round)
        print(f"{blocks}: median depth 12 -> 24: lower {m12['lower_s']:.2f} -> "
              f"{m24['lower_s']:.2f} s ({ratio['lower_s']:.2f}x), compile {m12['compile_s']:.2f} "
              f"-> {m24['compile_s']:.2f} s ({ratio['compile_s']:.2f}x), StableHLO "
              f"{ratio['stablehlo_kb']:.2f}x, compiled HLO {ratio['compiled_hlo_kb']:.2f}x; "
              f"median of per-round ratios: lower {ratio['lower_s_per_round']:.2f}x, compile "
              f"{ratio['compile_s_per_round']:.2f}x")  # fmt: skip
    return {"model": "vit-base", "image": "224x224x3", "patch": 16, "batch": a.compile_batch,
            "rounds": rows, "median": {f"{b}/{d}": med[(b, d)] for b, d in cases},
            "ratio_24_over_12": ratios}  # fmt: skip


# --- memory ----------------------------------------------------------------------------------


def peak_bytes(compiled) -> dict:
    m = compiled.memory_analysis()
    peak = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            + m.temp_size_in_bytes)  # fmt: skip
    return {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
            "aliased": m.alias_size_in_bytes, "temporaries": m.temp_size_in_bytes,
            "peak": peak}  # fmt: skip


def memory_contenders():
    """``{name: (compile_steps accum, model overrides)}``."""
    return {"no remat": (1, {"remat": False}), "remat": (1, {"remat": True}),
            f"grad-accum {ACCUM}": (ACCUM, {"remat": False})}  # fmt: skip


def part_memory(a, mesh) -> dict:
    rows = []
    for side in a.memory_images:
        name, patch = MEMORY_IMAGES[side]
        ds = load_dataset(name)
        for contender, (accum, overrides) in memory_contenders().items():
            row = {"image": name.split(":")[1], "patch": patch, "contender": contender}
            step, args = abstract_step(
                mesh, ds, "vit-small", a.memory_batch, accum, patch_size=patch, **overrides
            )
            start = time.perf_counter()
            compiled = step.lower(*args).compile()
            rows.append({**row, **peak_bytes(compiled), "compile_s": time.perf_counter() - start})
    print(f"vit-small train step, batch {a.memory_batch}, 1 CPU device, float32 (XLA's analysis)")
    print(f"{'image':>9} {'patch':>5} {'contender':>14} {'peak MiB':>9} {'temp MiB':>9} "
          f"{'args MiB':>9} {'vs no remat':>12}")  # fmt: skip
    for r in rows:
        head = f"{r['image']:>9} {r['patch']:>5} {r['contender']:>14}"
        base = next(x for x in rows if x["image"] == r["image"] and x["contender"] == "no remat")
        r["vs_no_remat"] = r["peak"] / base["peak"]
        print(f"{head} {r['peak'] / 2**20:>9.1f} {r['temporaries'] / 2**20:>9.1f} "
              f"{r['arguments'] / 2**20:>9.1f} {r['vs_no_remat']:>12.3f}")  # fmt: skip
    return {"model": "vit-small", "batch": a.memory_batch, "rows": rows}


# --- throughput ------------------------------------------------------------------------------


def matmul_flops_per_s(n=2048, calls=10) -> float:
    """FLOP/s of an n x n float32 matrix product on the default device (as throughput.py)."""
    x = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(jnp.matmul)
    jax.block_until_ready(f(x, x))
    start = time.perf_counter()
    for _ in range(calls):
        out = f(x, x)
    jax.block_until_ready(out)
    return 2 * n**3 * calls / (time.perf_counter() - start)


def part_throughput(a, mesh) -> dict:
    ds = load_dataset("synthetic:32x32x3:10")
    model_fn = partial(MODELS["vit-lite"], ds.image_shape, ds.num_classes, patch_size=a.patch)
    graphdef, state, shardings, _ = create_state(model_fn, make_optimizer(), mesh, seed=0)
    train_step, _ = compile_steps(graphdef, shardings, mesh, 0, 4, preprocess(ds))
    data = next(train_batches(ds, a.batch, 0, [0], mesh))
    start = time.perf_counter()
    lowered = train_step.lower(state, data)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    scanned_flops = lowered.cost_analysis()["flops"]  # one block's worth: the loop body once
    with unrolled_scans():  # a fresh step: `train_step` would reuse its cached (scanned) trace
        count_step, _ = compile_steps(graphdef, shardings, mesh, 0, 4, preprocess(ds))
        flops = count_step.lower(state, data).cost_analysis()["flops"]
    box = {"state": state}

    def step():
        box["state"], box["metrics"] = compiled(box["state"], data)

    step()  # warm up
    jax.block_until_ready(box)
    step_s, peaks = [], []
    for _ in range(a.rounds):  # alternate: the ceiling is measured next to each round
        peaks.append(matmul_flops_per_s())
        start = time.perf_counter()
        for _ in range(a.steps):
            step()
        jax.block_until_ready(box)
        step_s.append((time.perf_counter() - start) / a.steps)
    seconds, peak = statistics.median(step_s), statistics.median(peaks)
    out = {"model": "vit-lite", "dataset": ds.name, "patch": a.patch, "batch": a.batch,
           "steps_per_round": a.steps, "step_ms_rounds": [s * 1e3 for s in step_s],
           "step_ms": seconds * 1e3, "images_per_s": a.batch / seconds,
           "gflop_per_step": flops / 1e9, "gflop_per_step_xla_scanned": scanned_flops / 1e9,
           "flops_per_s": flops / seconds, "matmul_flops_per_s": peak,
           "mfu": flops / seconds / peak, "compile_s": compile_s,
           "loss": float(box["metrics"]["train_loss"])}  # fmt: skip
    print(f"vit-lite, {ds.name}, patch {a.patch}, batch {a.batch}, 1 CPU device, float32")
    print(f"{'step ms':>9} {'images/s':>9} {'GFLOP/step':>11} {'GFLOP/s':>8} "
          f"{'matmul GFLOP/s':>15} {'MFU':>6} {'compile s':>10}")  # fmt: skip
    print(f"{out['step_ms']:>9.1f} {out['images_per_s']:>9.1f} {out['gflop_per_step']:>11.2f} "
          f"{out['flops_per_s'] / 1e9:>8.1f} {peak / 1e9:>15.1f} {out['mfu']:>6.1%} "
          f"{compile_s:>10.1f}")  # fmt: skip
    print("step ms by round: " + ", ".join(f"{s * 1e3:.0f}" for s in step_s)
          + f"; XLA's count of the scanned step: {scanned_flops / 1e9:.2f} GFLOP")  # fmt: skip
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"any of {', '.join(PARTS)}")
    parser.add_argument("--rounds", type=int, default=3, help="compile and throughput rounds")
    parser.add_argument("--compile-batch", type=int, default=8)
    parser.add_argument("--memory-batch", type=int, default=256)
    parser.add_argument("--memory-images", default="224,32", help="image sides: 224 and/or 32")
    parser.add_argument("--batch", type=int, default=128, help="throughput batch")
    parser.add_argument("--patch", type=int, default=4, help="throughput patch size")
    parser.add_argument("--steps", type=int, default=3, help="timed throughput steps per round")
    a = parser.parse_args()
    parts = a.parts.split(",")
    if unknown := set(parts) - set(PARTS):
        parser.error(f"unknown parts {sorted(unknown)}; known: {', '.join(PARTS)}")
    a.memory_images = [int(s) for s in a.memory_images.split(",")]
    if unknown := set(a.memory_images) - set(MEMORY_IMAGES):
        parser.error(f"--memory-images: unknown {sorted(unknown)}; known: 224, 32")
    mesh = make_mesh(parse_mesh("1"))
    run = {"compile": part_compile, "memory": part_memory, "throughput": part_throughput}
    results = {}
    for part in PARTS:  # in this order, whatever the order given
        if part in parts:
            results[part] = run[part](a, mesh)
            print(flush=True)
    meta = {"jax": jax.__version__, "platform": jax.default_backend(), "mesh": "1"}
    print(json.dumps({"benchmark": "vit", **meta, "results": results}))


if __name__ == "__main__":
    main()
