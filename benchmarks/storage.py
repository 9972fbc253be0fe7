"""Saving and restoring a train state on object storage, against a local folder (issue #34).

A model's sharded train state (parameters and Adam's two moments) on a 2x2 CPU mesh, through
what a run does:

- local: `Checkpoints.save` into a folder and wait for it; `Checkpoints.restore` from it.
- s3: the same save into a workdir's mirror, then `Remote.push` (the upload, marker last) to a
  local S3 server (moto's, started by this script on the loopback address as its own process);
  `Remote.pull` (the download of the run and its complete steps) into the mirror, then restore.

Throughput is the state's bytes over the time, the median of `--repeats`, all in one process.
moto is a Python server on the same two cores: its figures are a floor for a real store, and
the ratio says what the mirror's copy costs beside Orbax's own write.

    python benchmarks/storage.py                     # ResNet-50
    python benchmarks/storage.py --model resnet18 --repeats 5
"""

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import jax

jax.config.update("jax_num_cpu_devices", 4)

import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from jaxpar.core.mesh import make_mesh, parse_mesh  # noqa: E402
from jaxpar.core.optimizers import make_optimizer  # noqa: E402
from jaxpar.core.step import abstract_state, create_state  # noqa: E402
from jaxpar.models import MODELS  # noqa: E402
from jaxpar.run.checkpoint import Checkpoints  # noqa: E402
from jaxpar.run.storage import Remote  # noqa: E402

SHAPES = {"resnet50": (224, 224, 3), "resnet18": (32, 32, 3), "mlp": (28, 28, 1)}


def s3_server():
    """moto's S3 server on a free loopback port, and the environment a user would set."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1")  # fmt: skip
    return server


@contextlib.contextmanager
def clock(times: dict, key: str):
    start = time.perf_counter()
    yield
    times.setdefault(key, []).append(time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet50", choices=SHAPES)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    mesh = make_mesh(parse_mesh("2x2"))
    model_fn = partial(MODELS[args.model], SHAPES[args.model], 1000)
    tx = make_optimizer("adamw", 1e-3, weight_decay=1e-4)
    _, state, shardings, _ = create_state(model_fn, tx, mesh, seed=0)
    abstract = nnx.to_pure_dict(abstract_state(model_fn, tx, 0)[1])
    mb = sum(x.nbytes for x in jax.tree.leaves(state)) / 2**20
    root = Path(tempfile.mkdtemp())
    os.environ["JAXPAR_MIRRORS"] = str(root / "mirrors")
    server = s3_server()
    try:
        remote = Remote("s3://bench/run")
        for _ in range(100):  # the server starts
            try:
                remote.fs.mkdir("bench")
                break
            except Exception:  # noqa: BLE001
                time.sleep(0.1)
        remote.pull()  # an empty workdir: the mirror
        times, local = {}, Checkpoints(root / "local", keep=1)
        for step in range(args.repeats + 1):  # the first round warms Orbax's pools: dropped
            with clock(times, "save local"):
                local.save(step, state, {"step": step}, wait=True)
            with clock(times, "save s3"):
                mirrored = Checkpoints(remote.mirror, keep=1)
                mirrored.save(step, state, {"step": step}, wait=True)
                remote.push(keep=1)
            mirrored.close()
            with clock(times, "restore local"):
                jax.block_until_ready(local.restore(step, abstract, shardings))
            with clock(times, "restore s3"):
                remote.pull()
                mirrored = Checkpoints(remote.mirror, keep=1)
                jax.block_until_ready(mirrored.restore(step, abstract, shardings))
            mirrored.close()
        local.close()
    finally:
        server.kill()
        shutil.rmtree(root)
    result = {"model": args.model, "state_MB": round(mb, 1), "device": jax.devices()[0].platform,
              "repeats": args.repeats}  # fmt: skip
    for k, v in times.items():
        v = v[1:]
        result[f"{k} s"] = round(float(np.median(v)), 3)
        result[f"{k} MB/s"] = round(mb / float(np.median(v)), 1)
    for what in ("save", "restore"):
        result[f"{what} s3/local time"] = round(
            result[f"{what} s3 s"] / result[f"{what} local s"], 2
        )
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    sys.exit(main())
