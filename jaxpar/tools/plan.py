"""The plan of a run, without training: where every parameter lives, what each device holds, and
which collectives the compiled step performs (``python train.py --dry-run ...``).

Everything comes from abstract shapes and XLA's compiled program (`memory_analysis`, the HLO
text): no parameter is allocated, so large meshes plan on a CPU by emulation, e.g.
``python train.py --dry-run --model resnet50 --dataset synthetic:224x224x3:1000 --mesh fsdp=64``.
"""

import math

import jax
import numpy as np

from jaxpar.core.mesh import draw_mesh
from jaxpar.core.sharding import path_str, placed
from jaxpar.cost.collectives import collective_ops, collectives
from jaxpar.modes.pipeline import schedule_for
from jaxpar.run.config import Config

# The train state's parts (`jaxpar.run.checkpoint.ITEMS`) as the plan counts them: a DiLoCo run's
# global copy or stale SGD's ring of old models ("held"), DiLoCo's outer momentum, a teacher, a
# game's replay ring and earlier network.
PARTS = {0: "params", 1: "optimizer", 2: "held", 3: "outer_optimizer", 4: "teacher", 5: "replay",
         6: "earlier"}  # fmt: skip
LABELS = {"held": "held models (DiLoCo's global copy, stale SGD's ring)",
          "outer_optimizer": "outer optimizer state", "teacher": "teacher",
          "replay": "replay ring (--game)", "earlier": "earlier network (--game)"}  # fmt: skip


def plan(cfg: Config) -> dict:
    from jaxpar.run.setup import setup  # the same mesh, shardings and step as a real run

    run = setup(cfg.validate())
    sizes = dict(run.mesh.shape)
    abstract = run.abstract
    rows, totals = [], {"params": 0, "optimizer": 0}  # and the other parts a run's state holds
    per_stage = {"params": 0, "layer_stack": 0}  # what one stage holds, over its devices
    for (path, a), (_, s) in zip(
        jax.tree_util.tree_leaves_with_path(abstract),
        jax.tree_util.tree_leaves_with_path(run.shardings),
        strict=True,
    ):
        ways = math.prod(sizes[ax] for entry in s.spec if entry for ax in np.atleast_1d(entry))
        per_device = a.size * a.dtype.itemsize // ways
        key = path_str(path)
        part = PARTS[int(key.split("/")[0])]
        totals[part] = totals.get(part, 0) + per_device
        if key.startswith("0/"):
            staged = "stage" in str(s.spec)
            held = a.size * a.dtype.itemsize // (sizes["stage"] if staged else 1)
            per_stage["params"] += held
            per_stage["layer_stack"] += held if staged else 0
            rows.append({"path": key[2:], "shape": list(a.shape), "spec": str(s.spec),
                         "bytes_per_device": per_device, "sharded_ways": ways})  # fmt: skip
    args = placed(abstract, run.shardings)
    batch = run.mode.abstract_batch(run.ds, cfg.optimization.batch_size, run.mesh)
    lowered = run.train_step.lower(args, batch)
    compiled = lowered.compile()
    comm = run.comm_bytes_per_step(compiled, 1)
    mem = compiled.memory_analysis()
    memory = {
        "arguments": mem.argument_size_in_bytes,
        "outputs": mem.output_size_in_bytes,
        "aliased": mem.alias_size_in_bytes,
        "temporaries": mem.temp_size_in_bytes,
        "peak": mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes,
    }
    return {
        "mesh": str(run.spec),
        "picture": draw_mesh(run.mesh),
        "params": rows,
        "per_device": {**totals, **{f"compiled_{k}": v for k, v in memory.items()}},
        "collectives": collectives(compiled.as_text()),
        "replicated": [str(r) for r in run.replicated],
        "pipeline": pipeline_plan(run, per_stage),
        "sync": {"mode": run.cfg.parallelism.sync, "comm_bytes_per_step": comm},
        "projection": projection(run, lowered, compiled, memory["peak"])
        if cfg.metrics.project
        else None,
    }


def projection(run, lowered, compiled, peak_bytes: int) -> dict:
    """The step projected onto ``--project``'s hardware (`jaxpar.cost.projection`): kernels from the
    program before optimisation, collectives from the compiled one."""
    from jaxpar.cost.projection import kernels, parse_hardware, project

    schedule = schedule_for(run.cfg, run.spec)
    ops = collective_ops(compiled.as_text())
    if run.sync is not None:  # local SGD's or DiLoCo's average, spread over its period
        synced = run.sync.lower(placed(run.abstract, run.shardings)).compile()
        period = run.mode.period
        ops += [{**op, "count": op["count"] / period} for op in collective_ops(synced.as_text())]
    return project(
        kernels(lowered.as_text(dialect="hlo")),
        ops,
        dict(run.mesh.shape),
        parse_hardware(run.cfg.metrics.project),
        run.cfg.optimization.batch_size,
        run.cfg.model.precision,
        schedule.bubble if schedule else 0.0,
        peak_bytes,
        run.cfg.parallelism.steps_per_dispatch,
    )


def pipeline_plan(run, per_stage: dict) -> dict | None:
    """The pipeline schedule of a run, its bubble fraction and what each stage holds."""
    schedule = schedule_for(run.cfg, run.spec)
    if schedule is None:
        return None
    return {
        "schedule": run.cfg.parallelism.pipeline,
        "stages": schedule.stages,
        "microbatches": schedule.microbatches,
        "repeats": schedule.repeats,
        "ticks": schedule.ticks,
        "bubble": schedule.bubble,
        "per_stage_bytes": per_stage,
    }


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


def format_plan(p: dict) -> str:
    lines = [p["picture"], ""]
    width = max(len(r["path"]) for r in p["params"])
    lines.append(
        f"{'parameter':<{width}}  {'shape':<18} {'spec':<28} {'per device':>12}  placement"
    )
    for r in p["params"]:
        where = f"sharded {r['sharded_ways']}-way" if r["sharded_ways"] > 1 else "replicated"
        lines.append(
            f"{r['path']:<{width}}  {str(tuple(r['shape'])):<18} {r['spec']:<28} "
            f"{r['bytes_per_device']:>12,}  {where}"
        )
    d = p["per_device"]
    lines += [
        "",
        "per device: parameters " + _mib(d["params"]) + ", optimizer state "
        + _mib(d["optimizer"])
        + "".join(f", {label} {_mib(d[k])}" for k, label in LABELS.items() if k in d)
        + ", compiled step peak " + _mib(d["compiled_peak"])
        + f" (temporaries {_mib(d['compiled_temporaries'])})",
        "collectives per step (per device): "
        + (", ".join(f"{k} x{v['count']} ({_mib(v['bytes'])})" for k, v in
                     p["collectives"].items()) or "none"),
    ]  # fmt: skip
    if pp := p["pipeline"]:
        trips = f" x {pp['repeats']} trips" if pp["repeats"] > 1 else ""
        lines.append(
            f"pipeline {pp['schedule']}: {pp['stages']} stages x {pp['microbatches']} "
            f"microbatches{trips}, {pp['ticks']} ticks, bubble {pp['bubble']:.1%} of stage time; "
            f"per stage: parameters {_mib(pp['per_stage_bytes']['params'])} (layer stack "
            f"{_mib(pp['per_stage_bytes']['layer_stack'])})"
        )
    sync = p["sync"]
    lines.append(f"--sync {sync['mode']}: {_mib(sync['comm_bytes_per_step'])} of collectives per "
                 "optimizer step and device (periodic syncs spread over their period)")  # fmt: skip
    lines += [f"note: {r}" for r in p["replicated"]]
    if p["projection"]:
        lines += ["", format_projection(p["projection"])]
    return "\n".join(lines)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.2f} ms"


def format_projection(q: dict) -> str:
    e, mem, floor = q["efficiency"], q["memory_per_chip"], q["floors"]
    lines = [
        f"projection on {q['hardware']}: {q['chips']} x {q['chip']} ({q['source']})",
        f"  assumed: matrix products at {e['matmul']:.0%} of peak FLOP/s, memory at "
        f"{e['memory']:.0%} of its bandwidth, links at {e['link']:.0%}; collectives hidden "
        f"behind up to {e['overlap']:.0%} of the computation; at least "
        f"{floor['kernel_s'] * 1e6:g} us a kernel, {floor['dispatch_s'] * 1e3:.2f} ms a step "
        "(the host's dispatch, shared by --steps-per-dispatch), a collective NCCL's latency "
        f"({floor['collective_s'] * 1e6:g} us "
        f"+ {floor['hop_s'] * 1e6:g} us a ring step, {floor['hop_between_nodes_s'] * 1e6:g} us "
        "between nodes; or its tree's for an all-reduce)",
        f"  per chip: {q['flops_per_chip'] / 1e12:,.3f} TFLOP and {q['bytes_per_chip'] / 1e9:,.2f}"
        f" GB of memory traffic in {q['kernels']:,} kernels",
        f"  computation: {_ms(q['compute_s'])} in compute-bound kernels + {_ms(q['memory_s'])} "
        f"in memory-bound ones + {_ms(q['launch_s'])} in kernels at the launch floor"
        + (f" (a pipeline bubble of {q['bubble']:.0%} included)" if q["bubble"] else ""),
    ]  # fmt: skip
    for c in q["collectives"]:
        lines.append(
            f"  {c['kind']} over {c['axes'] or '-'} ({c['devices']} devices, {c['link']}): "
            f"x{c['count']:g}, {_mib(c['bytes'])}, {_ms(c['seconds'])}"
        )
    lines += [
        f"  communication: {_ms(q['communication_s'])}, of which {_ms(q['hidden_s'])} hidden "
        "behind computation",
        f"  step: {_ms(q['step_s'])}, {q['images_per_s']:,.0f} images/s "
        f"({q['images_per_s_per_chip']:,.0f} per chip), MFU {q['mfu']:.1%}, "
        f"{q['bound']}-bound",
        f"  memory per chip: compiled peak {mem['peak_bytes'] / 2**30:,.2f} GiB (this CPU's "
        "compile"
        + (": bf16 convolutions in float32" if q["convolutions"] else "")
        + f") of {mem['hbm_bytes'] / 2**30:,.1f} GiB"
        + ("" if mem["fits"] else " - DOES NOT FIT: shard more (fsdp, model) or use --grad-accum"),
    ]
    return "\n".join(lines)
