"""Every `--sync` mode on the same data: test accuracy against bytes communicated, and step cost.

Parts, chosen with ``--parts``:

- ``accuracy``: the seed's MLP (or ``--model``, with its recipe) on the digits (30 epochs, batch
  128, SGD lr 0.01 momentum 0.9, seed 0) on ``data=4`` (4 replicas) with every-step, local:H,
  diloco:H (outer Nesterov SGD, lr 0.7, momentum 0.9) and stale:T, through the real loop. Bytes
  communicated = collective bytes per optimizer step and device (from the compiled programs, as
  ``--dry-run`` reports them) x steps.
  Writes a table, ``--png`` (accuracy against bytes) and a JSON line.
- ``step``: the compiled train step of ``local:H`` (replicas step on their own: no gradient
  all-reduce) against every-step's, and local SGD's averaging program, in alternating rounds in
  this process (MLP, batch 128, ``data=4``).

    python benchmarks/sync_modes.py                      # both parts, about 3 minutes here
    python benchmarks/sync_modes.py --parts step --rounds 9
    python benchmarks/sync_modes.py --parts accuracy --model vit-lite --epochs 10 --png vit.png
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import jax

MODES = ("every-step", "local:4", "local:8", "diloco:4", "diloco:8", "stale:1", "stale:4")


def accuracy(a) -> dict:
    import jaxpar
    from jaxpar.models import recipe_for
    from jaxpar.run.config import Config
    from jaxpar.tools.plan import plan

    out = {}
    # The model's recipe (the ViTs: AdamW, warmup, cosine), as train.py applies it.
    recipe = {**recipe_for(a.model), **({"patch_size": 4} if a.model.startswith("vit") else {})}
    for mode in a.modes.split(","):
        cfg = Config.of(model=a.model, mesh="data=4", sync=mode, epochs=a.epochs,
                     workdir=tempfile.mkdtemp(), **recipe)  # fmt: skip
        last = jaxpar.train(cfg)
        per_step = plan(cfg)["sync"]["comm_bytes_per_step"]
        steps = last["step"]
        out[mode] = {"test_accuracy": last["eval_accuracy"], "steps": steps,
                     "comm_bytes_per_step": per_step,
                     "comm_mib": per_step * steps / 2**20}  # fmt: skip
        print(f"[sync] {mode}: {json.dumps(out[mode])}", flush=True)
    return out


def step_cost(a) -> dict:
    from jaxpar.data import train_batches
    from jaxpar.run.config import Config
    from jaxpar.run.setup import setup

    contenders = {}
    for mode in ("every-step", "local:8"):
        run = setup(Config.of(mesh="data=4", sync=mode, steps=100).validate())
        batch = next(train_batches(run.ds, 128, 0, range(1), run.mesh))
        state = run.init()
        contenders[mode] = [run.train_step, state, batch]
        if run.sync is not None:
            averaging = [lambda s, b, f=run.sync: (f(s), None), run.init(), batch]
            contenders["local:8 averaging"] = averaging  # its own state: both donate theirs
    times = {name: [] for name in contenders}
    for _ in range(a.rounds):
        for name, c in contenders.items():
            fn, state, batch = c
            state, _ = fn(state, batch)  # warm
            jax.block_until_ready(state)
            start = time.perf_counter()
            for _ in range(a.steps):  # one at a time: emulated devices deadlock on long queues
                state, _ = fn(state, batch)
                jax.block_until_ready(state)
            times[name].append((time.perf_counter() - start) / a.steps)
            c[1] = state
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="accuracy,step")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--model", default="mlp", help="e.g. vit-lite (patch 4, its recipe)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=50, help="timed steps per round")
    parser.add_argument("--png", default="sync_modes.png")
    a = parser.parse_args()
    jax.config.update("jax_num_cpu_devices", 4)
    results = {}
    if "accuracy" in a.parts:
        results["accuracy"] = r = accuracy(a)
        base = r["every-step"]
        print(f"{'mode':<12} {'test acc':>9} {'MiB sent':>10} {'vs every-step':>14}")
        for mode, x in r.items():
            print(f"{mode:<12} {x['test_accuracy']:9.4f} {x['comm_mib']:10.1f} "
                  f"{base['comm_mib'] / x['comm_mib']:13.1f}x less")  # fmt: skip
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for mode, x in r.items():
            ax.scatter(x["comm_mib"], x["test_accuracy"])
            ax.annotate(mode, (x["comm_mib"], x["test_accuracy"]), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("MiB communicated per device (whole run)")
        ax.set_ylabel("final test accuracy")
        ax.set_title(f"{a.model} on digits, 4 replicas, same examples")
        fig.tight_layout()
        fig.savefig(Path(a.png), dpi=100)
    if "step" in a.parts:
        results["step_ms"] = t = step_cost(a)
        every, local = t["every-step"], t["local:8"]
        print(f"every-step step {every:.3f} ms, local:8 step {local:.3f} ms ({local / every:.2f}x),"
              f" averaging {t['local:8 averaging']:.3f} ms (once per 8 steps)")  # fmt: skip
    print(json.dumps({"benchmark": "sync_modes", **vars(a), "results": results}))


if __name__ == "__main__":
    main()
