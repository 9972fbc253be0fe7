"""The training loop: set up a run from a `Config`, train, evaluate, write the workdir."""

import json
import sys
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxpar.config import Config
from jaxpar.data import device_batch, eval_batches, load_dataset, steps_per_epoch, train_indices
from jaxpar.errors import UserError
from jaxpar.mesh import draw_mesh, make_mesh, parse_mesh
from jaxpar.sharding import check_batch
from jaxpar.step import compile_steps, create_state, make_optimizer


def say(*args):
    """Print from process 0 only: the other processes of a job stay quiet."""
    if jax.process_index() == 0:
        print(*args, flush=True)


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line with ``step`` and ``time`` (s since start)."""

    def __init__(self, path: Path, start: float):
        self.file = open(path, "a") if jax.process_index() == 0 else None  # noqa: SIM115
        self.start = start

    def write(self, step: int, **values) -> dict:
        line = {"step": step, "time": round(time.time() - self.start, 3), **values}
        if self.file:
            self.file.write(json.dumps(line) + "\n")
            self.file.flush()
        return line


def prepare_workdir(cfg: Config) -> Path:
    workdir = Path(cfg.workdir or time.strftime("runs/%Y%m%d-%H%M%S"))
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"--workdir {workdir} is a file; name a directory")
    used = [n for n in ("config.json", "metrics.jsonl") if (workdir / n).exists()]
    if used:
        raise UserError(
            f"workdir {workdir} already holds a run ({', '.join(used)}); choose a new --workdir"
        )
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(cfg.to_json() + "\n")
    return workdir


def fetch(x) -> np.ndarray:
    """A replicated result on the host; works when other processes hold the other devices."""
    return np.asarray(x.addressable_data(0))


def evaluate(eval_step, state, batches) -> dict:
    sums = [eval_step(state, b) for b in batches]
    total = jax.tree.map(lambda *x: sum(fetch(v) for v in x), *sums)
    return {
        "eval_loss": float(total["loss_sum"] / total["count"]),
        "eval_accuracy": float(total["correct"] / total["count"]),
    }


def setup(cfg: Config):
    """Mesh, data, sharded state and compiled steps for a run."""
    mesh = make_mesh(parse_mesh(cfg.mesh, jax.device_count()))
    check_batch(cfg.batch_size, mesh)
    ds = load_dataset(cfg.dataset, cfg.data_dir)
    per_epoch = steps_per_epoch(ds, cfg.batch_size)
    total = cfg.steps or cfg.epochs * per_epoch
    from models import MODELS

    dtype = jnp.bfloat16 if cfg.precision == "bf16" else jnp.float32
    model_fn = partial(MODELS[cfg.model], ds.image_shape, ds.num_classes, dtype=dtype)
    tx = make_optimizer(
        cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.schedule, cfg.warmup_steps, total
    )
    graphdef, state, shardings, replicated = create_state(model_fn, tx, mesh, cfg.seed)
    steps = compile_steps(graphdef, shardings, mesh, cfg.seed, 1 + len(ds.image_shape))
    return mesh, ds, per_epoch, total, state, replicated, steps


def train(cfg: Config) -> dict:
    """Train as `cfg` says; returns the last evaluation line (also in ``metrics.jsonl``)."""
    start = time.time()
    cfg.validate()
    mesh, ds, per_epoch, total, state, replicated, (train_step, eval_step) = setup(cfg)
    workdir = prepare_workdir(cfg)
    say(draw_mesh(mesh))
    for r in replicated:
        say(f"note: {r}")
    eval_every = cfg.eval_every or per_epoch
    eval_data = list(eval_batches(ds, cfg.batch_size, mesh))  # small: lives on the devices
    train_data = {"image": ds.train_images, "label": ds.train_labels}
    log = MetricsLog(workdir / "metrics.jsonl", start)
    window = Window(log, cfg.log_every, cfg.batch_size, total)
    bar = tqdm(total=total, disable=not sys.stderr.isatty() or jax.process_index() != 0)
    pending, last_eval = None, {}
    for step in range(total):
        rows = train_indices(ds, cfg.batch_size, cfg.seed, step)
        state, metrics = train_step(state, device_batch(train_data, rows, mesh))
        if pending:  # Sync point: reading step-1's loss keeps at most 2 steps in flight.
            window.add(*pending)
        pending = (step + 1, metrics)
        bar.update()
        if (step + 1) % eval_every == 0 or step + 1 == total:
            window.add(*pending)
            pending = None
            last_eval = log.write(step + 1, **evaluate(eval_step, state, eval_data))
            bar.set_postfix(loss=f"{window.last:.4f}", acc=f"{last_eval['eval_accuracy']:.4f}")
            if bar.disable:
                say(
                    f"step {step + 1}/{total} epoch {(step + 1) / per_epoch:.2f} "
                    f"train_loss {window.last:.4f} eval_loss {last_eval['eval_loss']:.4f} "
                    f"eval_accuracy {last_eval['eval_accuracy']:.4f}"
                )
    bar.close()
    say(
        f"final test accuracy {last_eval['eval_accuracy']:.2%} (eval_loss "
        f"{last_eval['eval_loss']:.4f}) after {total} steps in {time.time() - start:.1f}s; "
        f"workdir {workdir}"
    )
    return last_eval


class Window:
    """Averages train losses over ``log_every`` steps and writes one line per window."""

    def __init__(self, log: MetricsLog, every: int, batch_size: int, total: int):
        self.log, self.every, self.batch_size, self.total = log, every, batch_size, total
        self.losses, self.since, self.last = [], time.time(), float("nan")

    def add(self, step: int, metrics) -> None:
        self.last = float(fetch(metrics["train_loss"]))  # blocks until that step is done
        self.losses.append(self.last)
        if step % self.every == 0 or step == self.total:
            now = time.time()
            rate = len(self.losses) * self.batch_size / (now - self.since)
            self.log.write(step, train_loss=float(np.mean(self.losses)), examples_per_s=rate)
            self.losses, self.since = [], now
