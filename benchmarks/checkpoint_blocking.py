"""How long an asynchronous Orbax save blocks training, against the time the save takes in all.

For each model the sharded train state (parameters + optimizer state) is saved a few times through
jaxpar's `Checkpoints`: `blocked` is the time until `save` returns (the device-to-host copy;
training continues after it), `total` until the files are complete. The first save, which starts
Orbax's thread pools, is reported apart. Both are timed in the same process; the ratio matters.

`--training` also measures what a save costs a training loop: the time of some train steps (more
than a save lasts) with a save started after the first one, minus their time without one, in
alternating rounds, for
jaxpar's save and for Orbax's own `save` called directly (which copies to the host before it
returns). On a CPU the background work competes with training for the same cores; on a GPU host
it runs on CPU cores the training step does not use.

    python benchmarks/checkpoint_blocking.py            # MLP and ResNet-18, 2x2 mesh
    python benchmarks/checkpoint_blocking.py --saves 8 --mesh 4
    python benchmarks/checkpoint_blocking.py --training --models resnet18
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

from jaxpar.core.mesh import make_mesh, parse_mesh  # noqa: E402
from jaxpar.core.optimizers import make_optimizer  # noqa: E402
from jaxpar.core.step import create_state  # noqa: E402
from jaxpar.models import MODELS  # noqa: E402
from jaxpar.run.checkpoint import Checkpoints  # noqa: E402

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


TRAINING = {"mlp": (64, 60), "resnet18": (16, 8)}  # batch, steps: longer than a save lasts


def training_cost(model: str, mesh_text: str, rounds: int) -> dict:
    """Milliseconds a save adds to `steps` train steps, jaxpar's and Orbax's direct save."""
    import orbax.checkpoint as ocp

    from jaxpar.core.sharding import batch_sharding
    from jaxpar.run.checkpoint import _items
    from jaxpar.run.config import Config
    from jaxpar.run.setup import setup

    h, w, c = SHAPES[model]
    b, steps = TRAINING[model]
    cfg = Config.of(model=model, dataset=f"synthetic:{h}x{w}x{c}:10", mesh=mesh_text, batch_size=b)
    run = setup(cfg.validate())
    state = run.init()
    batch = {
        "image": jax.device_put(run.ds.train_images[np.arange(b)], batch_sharding(run.mesh, 4)),
        "label": jax.device_put(run.ds.train_labels[np.arange(b)], batch_sharding(run.mesh)),
    }
    directory = Path(tempfile.mkdtemp())
    ckpts = Checkpoints(directory, keep=2)

    def orbax_save(step, state, manifest):  # what jaxpar's save did before: Orbax's own
        args = ocp.args.Composite(state=ocp.args.PyTreeSave(_items(state)),
                                  manifest=ocp.args.JsonSave(manifest))  # fmt: skip
        ckpts.manager.save(step, args=args, force=True)

    savers = {"none": None, "jaxpar": ckpts.save, "orbax": orbax_save}
    times, saved = {k: [] for k in savers}, 0
    try:
        for r in range(rounds + 1):
            for name, save in savers.items():
                start, previous = time.perf_counter(), None
                for i in range(steps):
                    state, metrics = run.train_step(state, batch)
                    if save is not None and i == 0:
                        saved += 1
                        save(saved, state, {"step": saved})
                    # As jaxpar's loop: at most 2 steps in flight (CPU collectives deadlock
                    # with many queued; DESIGN.md).
                    jax.block_until_ready(previous)
                    previous = metrics
                jax.block_until_ready(state)
                if r:  # round 0 compiles and warms Orbax up
                    times[name].append(time.perf_counter() - start)
                ckpts.wait()
    finally:
        ckpts.close()
        shutil.rmtree(directory)
    base = np.median(times["none"])
    return {
        "model": model,
        "steps": steps,
        "batch": b,
        "steps_ms": round(base * 1e3, 1),
        **{f"{k}_save_adds_ms": round((np.median(times[k]) - base) * 1e3, 1)
           for k in ("jaxpar", "orbax")},
    }  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--saves", type=int, default=5)
    parser.add_argument("--mesh", default="2x2")
    parser.add_argument("--models", nargs="+", default=list(SHAPES))
    parser.add_argument("--training", action="store_true", help="also time train steps")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of --training")
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
    if args.training:
        meta["training"] = [training_cost(m, args.mesh, args.rounds) for m in args.models]
        for t in meta["training"]:
            print(f"{t['model']}: {t['steps']} train steps of {t['batch']} take "
                  f"{t['steps_ms']} ms; a save adds {t['jaxpar_save_adds_ms']} ms (jaxpar), "
                  f"{t['orbax_save_adds_ms']} ms (Orbax's save called directly)")  # fmt: skip
    print(json.dumps({"benchmark": "checkpoint_blocking", **meta, "rows": rows}))


if __name__ == "__main__":
    main()
