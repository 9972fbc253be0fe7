"""How long an asynchronous Orbax save blocks training, against the time the save takes in all.

For each model the sharded train state (parameters + optimizer state) is saved a few times through
jaxpar's `Checkpoints`: `blocked` is the time until `save` returns (the device-to-host copy;
training continues after it), `total` until the files are complete. The first save, which starts
Orbax's thread pools, is reported apart. Both are timed in the same process; the ratio matters.

    python benchmarks/checkpoint_blocking.py            # MLP and ResNet-18, 2x2 mesh
    python benchmarks/checkpoint_blocking.py --saves 8 --mesh 4
"""

import argparse
import json
import shutil
import tempfile
import time
from functools import partial
from pathlib import Path

import jax

jax.config.update("jax_num_cpu_devices", 4)

import numpy as np  # noqa: E402

from jaxpar.checkpoint import Checkpoints  # noqa: E402
from jaxpar.mesh import make_mesh, parse_mesh  # noqa: E402
from jaxpar.step import create_state, make_optimizer  # noqa: E402
from models import MODELS  # noqa: E402

SHAPES = {"mlp": (28, 28, 1), "resnet18": (32, 32, 3)}  # MNIST-size MLP, CIFAR-size ResNet-18


def measure(model: str, mesh, saves: int) -> dict:
    model_fn = partial(MODELS[model], SHAPES[model], 10)
    _, state, _, _ = create_state(model_fn, make_optimizer(), mesh, seed=0)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
    directory = Path(tempfile.mkdtemp())
    ckpts = Checkpoints(directory, keep=2)
    blocked, total = [], []
    try:
        for step in range(saves + 1):
            start = time.perf_counter()
            ckpts.save(step, state, {"step": step})
            blocked.append(time.perf_counter() - start)
            ckpts.wait()
            total.append(time.perf_counter() - start)
    finally:
        ckpts.close()
        shutil.rmtree(directory)
    b, t = np.median(blocked[1:]), np.median(total[1:])
    return {
        "model": model,
        "state_mb": round(nbytes / 2**20, 2),
        "first_blocked_ms": round(blocked[0] * 1e3, 1),
        "blocked_ms": round(b * 1e3, 1),
        "total_ms": round(t * 1e3, 1),
        "blocked_share": round(b / t, 3),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--saves", type=int, default=5)
    parser.add_argument("--mesh", default="2x2")
    parser.add_argument("--models", nargs="+", default=list(SHAPES))
    args = parser.parse_args()
    mesh = make_mesh(parse_mesh(args.mesh))
    rows = [measure(m, mesh, args.saves) for m in args.models]
    print(f"{'model':>9} {'state MB':>9} {'blocked ms':>11} {'total ms':>9} {'blocked/total':>14}")
    for r in rows:
        print(
            f"{r['model']:>9} {r['state_mb']:>9.2f} {r['blocked_ms']:>11.1f} "
            f"{r['total_ms']:>9.1f} {r['blocked_share']:>14.3f}"
        )
    meta = {"jax": jax.__version__, "mesh": args.mesh, "platform": jax.default_backend()}
    print(json.dumps({"benchmark": "checkpoint_blocking", **meta, "rows": rows}))


if __name__ == "__main__":
    main()
