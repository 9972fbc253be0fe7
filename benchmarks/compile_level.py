"""What the test suite's XLA flag buys: a test's run (set-up, compile, 3 steps) at XLA's CPU backend
optimisation level 0 against the default level, for the suite's typical cells (the MLP, a
one-block ResNet, a 2-block ViT, the ViT on 2 pipeline stages).

Each measurement is a fresh process (no compilation cache), the two levels alternating, so the
machine's noise falls on both alike; the figure is the ratio of the medians. The losses of both
levels are printed: they agree to the last bits, not exactly (LLVM's code differs), which is why
no test compares against a number computed at another level.

    python benchmarks/compile_level.py [--rounds 3]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

CELL = """
import contextlib, json, sys, time
from functools import partial
import jax
jax.config.update("jax_num_cpu_devices", 8)
from jaxpar.core.mesh import set_xla_flags
set_xla_flags()
from jaxpar.run.config import Config
from jaxpar.run.setup import setup
from jaxpar.models import MODELS, ResNet, ViT
MODELS["vit-cell"] = partial(ViT, width=32, depth=2, heads=2, mlp_dim=64, patch_size=2)
MODELS["resnet-cell"] = partial(ResNet, stage_sizes=(1,), width=8)
flags = json.loads(sys.argv[1])
start = time.perf_counter()
run = setup(Config.of(steps=3, batch_size=32, log_every=1, **flags).validate())
state, losses = run.init(), []
plan = [range(s, s + 1) for s in range(run.total)]
with contextlib.closing(run.batches(plan)) as batches:
    for _, batch in zip(plan, batches, strict=True):
        state, metrics = run.train_step(state, batch)
        losses.append(float(metrics["train_loss"]))
print(json.dumps({"seconds": time.perf_counter() - start, "losses": losses}))
"""
CELLS = {
    "mlp": {"model": "mlp", "mesh": "data=2"},
    "resnet": {"model": "resnet-cell", "mesh": "data=2"},
    "vit": {"model": "vit-cell", "mesh": "data=2"},
    "vit-stages": {"model": "vit-cell", "mesh": "stage=2,data=2"},
}


def measure(flags: dict, level0: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0" if level0 else ""
    out = subprocess.run([sys.executable, "-c", CELL, json.dumps(flags)], env=env, check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rows = {}
    for name, flags in CELLS.items():
        times = {True: [], False: []}
        for _ in range(args.rounds):
            for level0 in (False, True):
                result = measure(flags, level0)
                times[level0].append(result["seconds"])
                losses = result["losses"]
        default, zero = statistics.median(times[False]), statistics.median(times[True])
        rows[name] = {"default_s": round(default, 2), "level0_s": round(zero, 2),
                      "ratio": round(zero / default, 2), "losses_level0": losses}  # fmt: skip
        ratio = zero / default
        print(f"{name:11s} default {default:5.1f} s  level 0 {zero:5.1f} s  ratio {ratio:.2f}",
              flush=True)  # fmt: skip
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
