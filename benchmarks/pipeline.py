"""Pipeline parallelism on CPU-emulated devices: the bubble, and FSDP weights inside a pipeline.

Parts, chosen with ``--parts``:

- ``bubble``: train-step time of ``vit-small`` (digits: 8x8 images, patch 2; batch 128) on
  ``stage=4`` with M = 4, 8, 16, 32 microbatches against the same model on ``data=4``, in
  alternating rounds in this one process. The emulated devices share this machine's cores, so a
  pipeline cannot run its stages at the same time here: what the ratio shows is the work of the
  schedule, ``(M + S - 1) / M`` stage-ticks per useful one (bubble slots compute on zeros), i.e.
  ``1 / (1 - bubble)``. The trend must follow ``bubble = (S - 1) / (M + S - 1)``.
- ``fsdp``: the collective bytes and compiled peak memory per device of the ``vit-small`` step on
  ``stage=2,fsdp=4`` with the layer weights all-gathered once per step before the ticks
  (``Schedule(gather=True)``, the default) and inside every tick (``gather=False``), read from
  the compiled program (`jaxpar.cost.collectives.collectives` counts loop bodies once per
  iteration).
  Nothing runs.

    python benchmarks/pipeline.py                       # both parts, about 5 minutes here
    python benchmarks/pipeline.py --parts fsdp
    python benchmarks/pipeline.py --parts bubble --rounds 2 --steps 1
    python benchmarks/pipeline.py --parts bubble --dataset synthetic:32x32x3:10 --batch 64
"""

import argparse
import json
import statistics
import time
from functools import partial

import jax

MICROBATCHES = (4, 8, 16, 32)
STAGES = 4


def step_for(mesh_text: str, schedule, batch: int, dataset: str = "digits"):
    """``(compiled train step, state, batch)`` for vit-small on `dataset` under `mesh_text`."""
    from jaxpar.core.mesh import make_mesh, parse_mesh
    from jaxpar.core.optimizers import make_optimizer
    from jaxpar.core.step import compile_steps, create_state
    from jaxpar.data import load_dataset, preprocess, train_batches
    from jaxpar.models import MODELS

    ds = load_dataset(dataset)
    mesh = make_mesh(parse_mesh(mesh_text))
    model_fn = partial(MODELS["vit-small"], ds.image_shape, ds.num_classes, stack=schedule)
    graphdef, state, shardings, _ = create_state(model_fn, make_optimizer(), mesh, seed=0)
    train_step, _ = compile_steps(graphdef, shardings, mesh, 0, 4, preprocess(ds))
    data = next(train_batches(ds, batch, 0, range(1), mesh))
    return train_step.lower(state, data).compile(), state, data


def bubble(a) -> dict:
    from jaxpar.modes.pipeline import Schedule

    contenders = {"data=4": step_for("data=4", None, a.batch, a.dataset)}
    for m in MICROBATCHES:
        contenders[f"M={m}"] = step_for(f"stage={STAGES}", Schedule(STAGES, m), a.batch, a.dataset)
    times = {name: [] for name in contenders}
    for _ in range(a.rounds):  # alternate, so the machine's noise falls on every contender
        for name, (step, state, data) in contenders.items():
            state, metrics = step(state, data)  # warm
            jax.block_until_ready(metrics)
            start = time.perf_counter()
            for _ in range(a.steps):
                state, metrics = step(state, data)
            jax.block_until_ready(metrics)
            times[name].append((time.perf_counter() - start) / a.steps)
            contenders[name] = (step, state, data)
    base = statistics.median(times["data=4"])
    rows = {"data=4": {"step_s": base}}
    for m in MICROBATCHES:
        t = statistics.median(times[f"M={m}"])
        b = Schedule(STAGES, m).bubble
        rows[f"M={m}"] = {"step_s": t, "ratio": t / base, "bubble": b, "expected": 1 / (1 - b)}
    return rows


def fsdp(a) -> dict:
    from jaxpar.cost.collectives import collectives
    from jaxpar.modes.pipeline import Schedule

    out = {}
    for gather in (True, False):
        step, _, _ = step_for("stage=2,fsdp=4", Schedule(2, 4, gather=gather), a.batch)
        mem = step.memory_analysis()
        peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                - mem.alias_size_in_bytes + mem.temp_size_in_bytes)  # fmt: skip
        coll = collectives(step.as_text())
        out[f"gather={gather}"] = {
            "collective_mib": sum(c["bytes"] for c in coll.values()) / 2**20,
            "by_kind_mib": {k: round(c["bytes"] / 2**20, 2) for k, c in coll.items()},
            "peak_mib": peak / 2**20,
        }
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="bubble,fsdp")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dataset", default="digits", help="of the bubble part (patch: default)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per round")
    a = parser.parse_args()
    jax.config.update("jax_num_cpu_devices", 8)
    results = {"jax": jax.__version__, "cpu_devices": jax.device_count()}
    for part in a.parts.split(","):
        results[part] = {"bubble": bubble, "fsdp": fsdp}[part](a)
        if part == "bubble":
            for name, r in results[part].items():
                extra = ""
                if "ratio" in r:
                    extra = (f"  x{r['ratio']:.2f} of data=4 (bubble {r['bubble']:.1%}, "
                             f"1/(1-bubble) = {r['expected']:.2f})")  # fmt: skip
                print(f"{name:>8}: {r['step_s'] * 1e3:8.1f} ms/step{extra}", flush=True)
        else:
            for name, r in results[part].items():
                print(f"stage=2,fsdp=4 {name}: collectives {r['collective_mib']:.1f} MiB "
                      f"{r['by_kind_mib']}, peak {r['peak_mib']:.1f} MiB", flush=True)  # fmt: skip
    print(json.dumps({"benchmark": "pipeline", **vars(a), "results": results}))


if __name__ == "__main__":
    main()
