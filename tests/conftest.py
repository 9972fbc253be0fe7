"""Every test runs on 8 CPU-emulated devices, set once before the JAX backend starts."""

import atexit
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import jax
import numpy as np
import pytest

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")

# The suite's time is compilation: hundreds of small programs, each run a few steps. XLA's CPU
# backend at optimisation level 0 compiles them in about half the time (`python
# benchmarks/compile_level.py`: the same HLO programs, LLVM left unoptimised). No test compares
# with a number computed at another level; a level set in XLA_FLAGS is kept. Here and in the
# processes the tests start, which inherit the variable.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = " ".join(
        [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]
    ).strip()

# Compile each distinct program once per session: tests build the same steps many times, here,
# in the processes they start and in the other pytest workers (which read these variables). A
# fresh folder each session, made by pytest's first process and removed by it.
if "JAXPAR_TESTS_XLA_CACHE" not in os.environ:
    os.environ["JAXPAR_TESTS_XLA_CACHE"] = tempfile.mkdtemp(prefix="jaxpar-tests-xla-")
    atexit.register(shutil.rmtree, os.environ["JAXPAR_TESTS_XLA_CACHE"], ignore_errors=True)
# A size limit makes JAX lock the cache's files (no worker reads another's half-written entry);
# 16 GiB is never reached.
CACHE = {"JAX_COMPILATION_CACHE_DIR": os.environ["JAXPAR_TESTS_XLA_CACHE"],
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
         "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
         "JAX_COMPILATION_CACHE_MAX_SIZE": str(1 << 34)}  # fmt: skip
os.environ.update(CACHE)
os.environ["JAXPAR_COMPILE_CACHE"] = os.environ["JAXPAR_TESTS_XLA_CACHE"]  # jaxpar's own setting
for name, value in CACHE.items():
    jax.config.update(name.lower(), value if name.endswith("DIR") else int(value))

from jaxpar.core.mesh import make_mesh, parse_mesh, set_xla_flags  # noqa: E402
from jaxpar.core.optimizers import make_optimizer  # noqa: E402
from jaxpar.core.step import compile_steps, create_state  # noqa: E402
from jaxpar.data import device_batch, load_digits, train_indices  # noqa: E402
from jaxpar.models import MODELS  # noqa: E402

set_xla_flags()  # the XLA flags train.py runs with, before the backend starts

STEPS = 6
BATCH = 64


# The modules that import PyTorch, the reference of imported weights. Where it is not installed
# (Python 3.12 in .ci/run: its build here is CUDA's, gigabytes), `-m "not torch"` deselects their
# tests and leaves these files uncollected; without that, a missing torch fails them loudly.
NEED_TORCH = ("test_weights.py", "torch_reference.py")


def pytest_ignore_collect(collection_path, config):
    markexpr = config.getoption("markexpr") or ""
    if collection_path.name in NEED_TORCH and "not torch" in markexpr:
        return True
    return None


@pytest.fixture(scope="session", autouse=True)
def eight_devices():
    """Fail, never skip, when the environment does not give 8 CPU devices."""
    devices = jax.devices()
    assert len(devices) == 8 and devices[0].platform == "cpu", (
        f"tests need 8 CPU devices, got {len(devices)} {devices[0].platform}: another plugin or "
        "XLA_FLAGS started JAX first"
    )


@pytest.fixture
def refuses(tmp_path, capsys):
    """``refuses(flags, message)``: ``train.py FLAGS`` exits 2 with one line holding `message`
    and writes nothing (`flags` a string of flags, split on spaces)."""
    import train as cli

    def check(flags: str, message: str) -> None:
        workdir = tmp_path / "w"
        assert cli.main([*flags.split(), "--workdir", str(workdir)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
        assert not workdir.exists()

    return check


@pytest.fixture
def tiny_vit():
    """A 2-block ViT registered as ``vit-test`` for this test: stacked, scanned layers at a
    fraction of the named ViTs' compile and step time."""
    from jaxpar.models import ViT

    MODELS["vit-test"] = partial(ViT, width=32, depth=2, heads=2, mlp_dim=64, patch_size=2)
    yield "vit-test"
    del MODELS["vit-test"]


@pytest.fixture(scope="session")
def resnet8_run(tmp_path_factory):
    """A workdir of ResNet-8 trained 20 steps on digits, to about 70% test accuracy (a teacher,
    a model to compress)."""
    import train as cli

    workdir = tmp_path_factory.mktemp("resnet8")
    args = ["--model", "resnet8", "--steps", "20", "--batch-size", "64", "--lr", "0.05",
            "--workdir", str(workdir)]  # fmt: skip
    assert cli.main(args) == 0
    return workdir


@functools.cache
def digits():
    return load_digits()


@functools.cache
def trained(model: str, optimizer: str, mesh: str, seed: int = 0, steps: int = STEPS):
    """Train `steps` steps of the digits set; cached so tests share compiled steps.

    Returns ``(losses, state, shardings, train_step, mesh)``.
    """
    ds = digits()
    m = make_mesh(parse_mesh(mesh))
    model_fn = partial(MODELS[model], ds.image_shape, ds.num_classes)
    lr = 0.01 if optimizer == "sgd" else 1e-3
    tx = make_optimizer(optimizer, lr, weight_decay=0.0 if optimizer == "sgd" else 1e-4)
    graphdef, state, shardings, _ = create_state(model_fn, tx, m, seed)
    train_step, _ = compile_steps(graphdef, shardings, m, seed, image_ndim=4)
    losses = []
    data = {"image": ds.train_images, "label": ds.train_labels}
    for step in range(steps):
        state, metrics = train_step(
            state, device_batch(data, train_indices(ds, BATCH, seed, step), m)
        )
        losses.append(float(metrics["train_loss"]))  # blocks each step: no pile-up of steps
    return np.array(losses), state, shardings, train_step, m


# Runs as a user starts them, and the same run compared across a stop.
ROOT = Path(__file__).resolve().parent.parent


def metrics(workdir) -> list[dict]:
    """The lines of `workdir`'s ``metrics.jsonl``."""
    return [json.loads(x) for x in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def values(lines, after=0) -> dict:
    """{(step, kind): value} for the lines past `after`, without timings."""
    out = {}
    for line in lines:
        if line["step"] > after:
            for key in ("train_loss", "eval_loss", "eval_accuracy"):
                if key in line:
                    out[line["step"], key] = line[key]
    return out


def assert_same_run(resumed, reference, after):
    got, want = values(resumed, after), values(reference, after)
    shape = lambda lines: [(x["step"], sorted(x)) for x in lines if x["step"] > after]  # noqa: E731
    assert shape(resumed) == shape(reference)  # the same lines, none repeated
    assert len(got) > 5
    np.testing.assert_allclose([got[k] for k in want], list(want.values()), rtol=1e-5, atol=1e-6)


def cli_run(*args, **kwargs):
    """``train.py ARGS`` in a new process, its output piped."""
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def wait_for_lines(workdir, n, proc, timeout=120):
    deadline = time.time() + timeout
    path = Path(workdir) / "metrics.jsonl"
    while time.time() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"no {n} metrics lines in {timeout}s")


def crash_at(monkeypatch, step: int, signum: int = 0) -> None:
    """The run dies (an exception), or gets `signum`, right after step `step`'s dispatch."""
    from jaxpar.run.observe import Window

    push = Window.push

    def dies(self, done, metrics):
        push(self, done, metrics)
        if done == step:
            if not signum:
                raise RuntimeError("a crash")
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(Window, "push", dies)
