"""The plan of a run, without training: where every parameter lives, what each device holds, and
which collectives the compiled step performs (``python train.py --dry-run ...``).

Everything comes from abstract shapes and XLA's compiled program (`memory_analysis`, the HLO
text): no parameter is allocated, so large meshes plan on a CPU by emulation, e.g.
``python train.py --dry-run --model resnet50 --dataset synthetic:224x224x3:1000 --mesh fsdp=64``.
"""

import math
import re

import jax
import numpy as np
from flax import nnx

from jaxpar.config import Config
from jaxpar.mesh import draw_mesh
from jaxpar.sharding import batch_sharding, path_str, placed

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_OP = re.compile(r"= (\(.*?\)|\S+) (" + "|".join(COLLECTIVES) + r")(-start)?\(")
_SHAPE = re.compile(r"(pred|[a-z]+\d+)\[([\d,]*)\]")


def _nbytes(hlo_type: str, started: bool = False) -> int:
    """Bytes of an HLO result type such as ``f32[512,256]`` or a tuple of them (a combined
    collective): the sum, or for an async ``-start`` op, whose tuple also holds its operands, the
    largest element."""
    sizes = [  # f32 -> 4 bytes, bf16 -> 2, pred -> 1
        max(int(re.sub(r"\D", "", t) or 8) // 8, 1)
        * math.prod(int(d) for d in dims.split(",") if d)
        for t, dims in _SHAPE.findall(hlo_type)
    ]
    return max(sizes, default=0) if started else sum(sizes)


def collectives(hlo_text: str) -> dict:
    """``{kind: {"count", "bytes"}}`` of the collectives in a compiled HLO module (per device)."""
    out = {}
    for hlo_type, kind, started in _OP.findall(hlo_text):
        entry = out.setdefault(kind, {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += _nbytes(hlo_type, bool(started))
    return out


def plan(cfg: Config) -> dict:
    from jaxpar.loop import setup  # the same mesh, shardings and step as a real run

    run = setup(cfg.validate())
    sizes = dict(run.mesh.shape)
    abstract = nnx.to_pure_dict(run.abstract)
    rows, totals = [], {"params": 0, "optimizer": 0}
    for (path, a), (_, s) in zip(
        jax.tree_util.tree_leaves_with_path(abstract),
        jax.tree_util.tree_leaves_with_path(run.shardings),
        strict=True,
    ):
        ways = math.prod(sizes[ax] for entry in s.spec if entry for ax in np.atleast_1d(entry))
        per_device = a.size * a.dtype.itemsize // ways
        key = path_str(path)
        totals["params" if key.startswith("0/") else "optimizer"] += per_device
        if key.startswith("0/"):
            rows.append({"path": key[2:], "shape": list(a.shape), "spec": str(s.spec),
                         "bytes_per_device": per_device, "sharded_ways": ways})  # fmt: skip
    args = placed(abstract, run.shardings)
    b, shape = cfg.batch_size, run.ds.image_shape
    batch = {
        "image": jax.ShapeDtypeStruct((b, *shape), run.ds.train_images.dtype,
                                      sharding=batch_sharding(run.mesh, 1 + len(shape))),
        "label": jax.ShapeDtypeStruct((b,), np.int32, sharding=batch_sharding(run.mesh)),
    }  # fmt: skip
    compiled = run.train_step.lower(args, batch).compile()
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
        + _mib(d["optimizer"]) + ", compiled step peak " + _mib(d["compiled_peak"])
        + f" (temporaries {_mib(d['compiled_temporaries'])})",
        "collectives per step (per device): "
        + (", ".join(f"{k} x{v['count']} ({_mib(v['bytes'])})" for k, v in
                     p["collectives"].items()) or "none"),
    ]  # fmt: skip
    lines += [f"note: {r}" for r in p["replicated"]]
    return "\n".join(lines)
