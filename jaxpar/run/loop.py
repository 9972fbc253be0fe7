"""The training loop: set up a run from a `Config`, resume it if it has checkpoints, train."""

import contextlib
import dataclasses
import functools
import itertools
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from jaxpar.core.errors import Diverged, Preempted, UserError
from jaxpar.core.mesh import MeshSpec, draw_mesh, make_mesh, parse_mesh
from jaxpar.core.optimizers import ema_view, frozen, head_paths, make_schedule, with_ema
from jaxpar.core.sharding import placed, spec_table, state_shardings
from jaxpar.core.step import (
    abstract_state,
    all_finite,
    compile_steps,
    init_state,
    loss_fn,
    under_mesh,
)
from jaxpar.cost.collectives import collectives
from jaxpar.data import (
    Dataset,
    load_dataset,
    prefetch,
    preprocess,
)
from jaxpar.models import MODELS, revision
from jaxpar.models.vit import check_patch_size
from jaxpar.modes.distill import with_teacher
from jaxpar.modes.pipeline import schedule_for
from jaxpar.modes.prune import check_prune_schedule, magnitude_pruning, prune_end, weight_roles
from jaxpar.modes.quantize import aware
from jaxpar.modes.sync import check_replicas, mode_for, param_mask
from jaxpar.run.checkpoint import (
    FORMAT,
    Checkpoints,
    check_fits,
    load_teacher,
    versions,
)
from jaxpar.run.config import Config
from jaxpar.run.evaluation import evaluation_data, evaluations
from jaxpar.run.init_from import starting_from
from jaxpar.run.observe import Profile, Window, fetch, progress, say
from jaxpar.run.signals import Stop, stop_at_once, stop_on_signals
from jaxpar.run.workdir import MetricsLog, move_aside, resolve, used, write_config


def sync(name: str) -> None:
    """A barrier across the processes of a multi-process job (nothing in a single process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


@dataclasses.dataclass
class Run:
    """Everything fixed for a run: mesh, data, shardings, compiled steps."""

    cfg: Config
    spec: MeshSpec
    mesh: jax.sharding.Mesh
    ds: Dataset
    per_epoch: int
    total: int
    schedule: object  # step -> learning rate
    init: object  # () -> fresh state in its shardings
    abstract: object  # the state's shapes and dtypes, a pure dict (restore target)
    shardings: object
    replicated: list
    train_step: object
    eval_step: object
    train_steps: object  # several steps in one program: batches stacked on a leading axis
    compile: object  # (stacked=, signals=) -> (train_step, eval_step) jitted for this run
    mode: object  # `jaxpar.modes.mode.Mode`: how replicas agree, or federated rounds
    sync: object  # the mode's jitted every-H-steps program, or None
    batches: object  # plan -> the device batch of each dispatch (`jaxpar.modes.mode.Mode.batches`)
    ema_eval_step: object = None  # the eval step on the weights' moving average (--ema)

    def comm_bytes_per_step(self, train_program, steps: int) -> float:
        """Collective bytes per optimizer step and device, from the compiled programs: a
        dispatch of `steps` steps, plus the mode's sync program over its period."""
        train = sum(c["bytes"] for c in collectives(train_program.as_text()).values()) / steps
        return train + self.sync_bytes / (self.mode.period or 1)

    @functools.cached_property
    def sync_bytes(self) -> float:
        """Collective bytes of one run of the mode's sync program (0 without one); compiled
        for this once per run, not once per dispatch length."""
        if self.sync is None:
            return 0.0
        program = self.sync.lower(placed(self.abstract, self.shardings)).compile()
        return sum(c["bytes"] for c in collectives(program.as_text()).values())

    def synced(self, state, done: int):
        """`state` after the mode's periodic sync when step `done` ends a period (local SGD's
        average, DiLoCo's outer step), else as it is."""
        if self.sync is None or done % self.mode.period:
            return state
        return self.sync(state)

    @functools.cached_property
    def about(self) -> dict:
        """The part of every checkpoint manifest that does not change during the run."""
        return {
            **self.identity(),
            "format": FORMAT,
            "precision": self.cfg.precision,
            "normalization": {
                "mean": [float(m) for m in self.ds.mean],
                "std": [float(s) for s in self.ds.std],
                "uint8": np.dtype(self.ds.train_images.dtype) == np.uint8,
            },  # fmt: skip
            "mesh": str(self.spec),
            "devices": jax.device_count(),
            "processes": jax.process_count(),
            "partition_specs": {k: str(v) for k, v in spec_table(self.shardings, "0/").items()},
            "versions": versions(),
            "config": dataclasses.asdict(self.cfg),
            "prune_end": prune_end(self.cfg, self.total),
        }

    def identity(self) -> dict:
        """What a checkpoint must match to resume into this run."""
        return identity(self.cfg, self.ds)

    @property
    def patch_size(self) -> int | None:
        """The ViT's patch size (it shapes the parameters); None for other models."""
        return patch_size(self.cfg, self.ds)


def patch_size(cfg: Config, ds) -> int | None:
    """A ViT's patch size on `ds` (it shapes the parameters); None for other models."""
    if not cfg.model.startswith("vit-"):
        return None
    return check_patch_size(ds.image_shape, cfg.patch_size)


def identity(cfg: Config, ds) -> dict:
    """What a checkpoint of a run of `cfg` on `ds` must match to resume
    (`jaxpar.run.checkpoint.IDENTITY`: the model's and data's fields, and the modes' pins)."""
    c = cfg
    return {
        "model": c.model,
        "dataset": c.dataset,
        "image_shape": list(ds.image_shape),
        "num_classes": ds.num_classes,
        "batch_size": c.batch_size,
        "optimizer": c.optimizer,
        "seed": c.seed,
        "patch_size": patch_size(c, ds),
        "sync": None if c.sync == "every-step" else c.sync,
        "revision": revision(c.model),
        "freeze": c.freeze,
        "prune_to": c.prune_to,
        "qat": c.qat,
        "teacher": c.teacher,
        "federated": c.federated(),
        "ema": c.ema is not None,  # the average rides in the optimizer state
    }


def setup(cfg: Config) -> Run:
    spec = parse_mesh(cfg.mesh, jax.device_count())
    mesh = make_mesh(spec)
    ds = load_dataset(cfg.dataset, cfg.data_dir, cfg.labels, cfg.resize_sources)
    mode = mode_for(cfg, spec, ds)
    mode.check(cfg, mesh)
    per_epoch = mode.steps_per_epoch(ds, cfg.batch_size)
    total = cfg.steps or cfg.epochs * per_epoch
    if cfg.schedule == "cosine" and cfg.warmup_steps >= total:
        raise UserError(
            f"--warmup-steps {cfg.warmup_steps} leaves no step of the cosine decay in a run of "
            f"{total} steps; use fewer warmup steps or more --steps/--epochs"
        )
    dtype = jnp.bfloat16 if cfg.precision == "bf16" else jnp.float32
    model_fn = partial(MODELS[cfg.model], ds.image_shape, ds.num_classes, dtype=dtype,
                       **model_options(cfg, spec))  # fmt: skip
    if cfg.qat:  # the model computes with int8-rounded weights; float ones are trained, saved
        model_fn = aware(model_fn, ds.image_shape)
    tx = mode.optimizer(cfg, total)
    # What --freeze trains and --prune-to prunes follows the parameters' logical axes.
    params = nnx.state(nnx.eval_shape(lambda: model_fn(rngs=nnx.Rngs(0))), nnx.Param)
    tx = frozen(tx, head_paths(params)) if cfg.freeze else tx  # only the head trains
    if cfg.prune_to is not None:  # masks in the optimizer state, applied after every update
        end, roles = prune_end(cfg, total), weight_roles(params)
        tx = optax.chain(tx, magnitude_pruning(cfg.prune_to, cfg.prune_start, end, roles))
    if cfg.ema is not None:  # outermost: the average of the parameters every update gives
        tx = with_ema(tx, cfg.ema)
    graphdef, abstract = abstract_state(model_fn, tx, cfg.seed)
    base, replicated = state_shardings(abstract, mesh)
    plain, mask = nnx.to_pure_dict(abstract), param_mask(abstract)
    abstract, shardings = mode.layout(plain, base, mesh, mask)
    fresh = partial(init_state, model_fn, tx, base, cfg.seed)
    if cfg.init_from:  # random weights, then those of --init-from (a fresh head if it differs)
        fresh = starting_from(cfg.init_from, cfg.model, ds.image_shape, fresh, plain[0], base[0],
                              say)  # fmt: skip
    laid = jax.jit(mode.init, out_shardings=shardings)
    init, step = (lambda: laid(fresh())), mode.step
    if cfg.teacher:  # its parameters ride in the state, restored onto this mesh
        abstract, shardings, init, step = with_teacher(load_teacher(cfg, ds, mesh), abstract,
                                                       shardings, init, step)  # fmt: skip
    ndim = 1 + len(ds.image_shape)
    loss = partial(loss_fn, smoothing=cfg.label_smoothing) if cfg.label_smoothing else loss_fn
    compile = partial(compile_steps, graphdef, shardings, mesh, cfg.seed, ndim, preprocess(ds),
                      accum=cfg.grad_accum, step=step, view=mode.view,
                      batch_ndims=mode.batch_ndims(ndim), loss=loss)  # fmt: skip
    ema_eval = None
    if cfg.ema is not None:
        ema_eval = compile(view=lambda state: ema_view(mode.view(state)))[1]
    sync = None
    if mode.sync is not None:  # every H steps, its own program: the loop calls it (`synced`)
        sync = jax.jit(under_mesh(mode.sync, mesh), in_shardings=(shardings,),
                       out_shardings=shardings, donate_argnums=0)  # fmt: skip
    schedule = make_schedule(cfg.lr, cfg.schedule, cfg.warmup_steps, total)
    batches = partial(mode.batches, ds, cfg.batch_size, cfg.seed, mesh=mesh,
                      workers=cfg.data_workers)  # fmt: skip
    return Run(
        cfg, spec, mesh, ds, per_epoch, total, schedule, init, abstract, shardings, replicated,
        *compile(), compile(stacked=True)[0], compile, mode, sync, batches, ema_eval,
    )  # fmt: skip


def model_options(cfg: Config, spec: MeshSpec) -> dict:
    """The model arguments that flags and mesh set: the ViT's patch size, rematerialisation and
    how its layer stack runs (a pipeline schedule over the ``stage`` axis, or one scan)."""
    stack = schedule_for(cfg, spec)  # also refuses a pipeline for the models that cannot
    if not cfg.model.startswith("vit-"):
        return {}
    return {"patch_size": cfg.patch_size, "remat": cfg.remat == "block", "stack": stack}


def manifest(run: Run, step: int, window: "Window") -> dict:
    position = {
        "step": step,
        "epoch": step // run.per_epoch,
        "batch_in_epoch": step % run.per_epoch,
    }
    # A copy: the save is asynchronous, and the window's list goes on growing with later steps.
    return {**position, **run.about, "window_losses": list(window.losses)}


def open_workdir(run: Run, start: float):
    """Resume from the latest checkpoint, or start fresh in an unused workdir.

    Returns ``(workdir, checkpoints, log, state, step, window_losses)``.
    """
    cfg = run.cfg
    workdir = resolve(cfg)
    ckpts = Checkpoints(workdir, cfg.keep) if (workdir / "checkpoints").is_dir() else None
    step = ckpts.latest() if ckpts else None
    # A run that saved nothing (killed while starting, compiling or before its first save)
    # starts over in place, as a scheduler's requeue of the same command expects; its files
    # are kept, moved aside as --restart does.
    unsaved = step is None and bool(used(workdir))
    sync("jaxpar:workdir-read")  # every process decided on the same files; now write
    if cfg.restart or unsaved:
        if ckpts:
            ckpts.close()
        ckpts, step = None, None
        if moved := move_aside(workdir):
            say(f"--restart: moved the previous run to {moved}" if cfg.restart else
                f"the previous run in {workdir} saved no checkpoint: its files moved to "
                f"{moved}; starting over")  # fmt: skip
        sync("jaxpar:workdir-moved")
    log = MetricsLog(workdir / "metrics.jsonl", start, run.mode.stamp)
    if step is None:
        write_config(workdir, cfg, 0)
        return workdir, Checkpoints(workdir, cfg.keep), log, run.init(), 0, []
    try:
        saved = ckpts.manifest(step)
        check_fits(saved, run.identity(), step, ckpts.directory)
        check_optimizer_flags(saved, cfg, step, ckpts.directory)
        check_prune_schedule(saved, cfg, run.total, step, ckpts.directory)
        check_replicas(saved, run.mode, run.spec, cfg.sync, step, ckpts.directory)
        state = ckpts.restore(step, run.abstract, run.shardings)
    except UserError:
        ckpts.close()  # stops Orbax's threads now, not noisily at interpreter exit
        raise
    if step < run.total:  # a run with nothing left to train leaves its files as they are
        # Lines the stopped run wrote only because it ended at `step` (a partial logging window,
        # a final evaluation) are not in an uninterrupted run: they move aside with later ones.
        log.rewind(step, keep=lambda line: scheduled(run, line))
        write_config(workdir, cfg, step)
    say(f"resumed from step {step} (saved on mesh {saved['mesh']}) in {ckpts.directory}")
    return workdir, ckpts, log, state, step, saved["window_losses"]


def scheduled(run: Run, line: dict) -> bool:
    """Whether this run writes `line` at its step (an evaluation or training line on schedule)."""
    step, every = line["step"], run.cfg.log_every
    if "eval_loss" in line:
        every = run.cfg.eval_every or run.per_epoch
    return step % every == 0 or step == run.total


def check_optimizer_flags(saved: dict, cfg: Config, step: int, directory) -> None:
    """Name the flag when a change gives the optimizer state another structure (SGD's momentum
    buffer exists only with momentum > 0); other optimizer flags may change on resume."""
    before = saved.get("config", {}).get("momentum", cfg.momentum)
    if cfg.optimizer == "sgd" and (before > 0) != (cfg.momentum > 0):
        raise UserError(
            f"checkpoint step {step} in {directory} was trained with --momentum {before}, which "
            f"{'keeps' if before > 0 else 'has no'} a momentum buffer; --momentum {cfg.momentum} "
            f"cannot resume it: use a momentum {'> 0' if before > 0 else 'of 0'}, or --restart"
        )


def train(cfg: Config) -> dict:
    """Train as `cfg` says; returns the last evaluation line (also in ``metrics.jsonl``)."""
    start = time.time()
    with stop_at_once():  # until the loop's handlers save a checkpoint on a signal
        run = setup(cfg.validate())
        workdir, ckpts, log, state, first, losses = open_workdir(run, start)
    say(draw_mesh(run.mesh))
    for r in run.replicated:
        say(f"note: {r}")
    for line in cfg.notes(run.total):
        say(line)
    if cfg.freeze and not cfg.init_from and first == 0:
        say("note: --freeze backbone without --init-from: the head trains on a random backbone")
    for line in run.mode.announce(workdir):
        say(line)
    if run.mode.period and run.total % run.mode.period:
        say(
            f"note: --sync {cfg.sync}: the run ends {run.total % run.mode.period} steps after its "
            "last sync; its evaluation sees the model a sync then gives"
        )
    try:
        window = Window(log, cfg, run.total, losses, run.schedule,
                        run.mode.examples_per_step(cfg.batch_size))  # fmt: skip
        model_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(run.abstract[0]))
        window.extra.update(run.mode.traffic(model_bytes))
        last_eval = loop(run, state, first, ckpts, window, workdir / "profile")
    except Diverged as e:
        saved = ckpts.latest()
        raise Diverged(
            f"{e}; resume from the last checkpoint (step {saved}) with a lower --lr"
            if saved is not None
            else f"{e}; no checkpoint was saved yet: rerun with --restart and a lower --lr"
        ) from None
    finally:
        ckpts.wait()  # let an asynchronous save finish, also when training failed
        ckpts.close()
        log.close()
    if first >= run.total:
        say(f"already at step {first} of {run.total}: pass a larger --steps or --epochs to go on")
    if cfg.eval_examples == 0:
        say(f"trained to step {run.total} without evaluating (--eval-examples 0), "
            f"{time.time() - start:.1f}s; workdir {workdir}")  # fmt: skip
    elif last_eval:
        ema = (f"; its weights' moving average {last_eval['ema_eval_accuracy']:.2%}"
               if "ema_eval_accuracy" in last_eval else "")  # fmt: skip
        say(f"final test accuracy {last_eval['eval_accuracy']:.2%} (eval_loss "
            f"{last_eval['eval_loss']:.4f}) at step {last_eval['step']}{ema}, "
            f"{time.time() - start:.1f}s; workdir {workdir}")  # fmt: skip
    return last_eval


def dispatches(first: int, total: int, most: int, every=(), marks=()) -> list[range]:
    """Steps ``[first, total)`` grouped into dispatches of at most `most` steps each.

    A dispatch ends after each multiple of a period in `every` (evaluation, checkpoints) and
    before each step in `marks` (profiling), so those happen after the same steps whatever
    `most` is; each distinct length compiles once.

    >>> dispatches(3, 14, 4, every=[5])
    [range(3, 5), range(5, 9), range(9, 10), range(10, 14)]
    """
    plan, step = [], first
    while step < total:
        ends = [total, step + most, *((step // e + 1) * e for e in every if e)]
        end = min(ends + [m for m in marks if m > step])
        plan.append(range(step, end))
        step = end
    return plan


class Steps:
    """The run's train step for each dispatch length, compiled on first use (off the clock)."""

    def __init__(self, run: Run, window: "Window", stop: Stop):
        self.run, self.window, self.stop, self.compiled = run, window, stop, {}

    def __call__(self, state, batch, steps: range):
        n = len(steps)
        if n not in self.compiled:
            with self.window.paused():
                jitted = self.run.compile(stacked=n > 1, signals=self.stop.shared)[0]
                self.compiled[n] = jitted.lower(state, batch, *self.stop.args()).compile()
                if self.run.cfg.sync != "every-step":  # a mode that changes communication
                    self.window.extra["comm_bytes_per_step"] = self.run.comm_bytes_per_step(
                        self.compiled[n], n
                    )
        return self.compiled[n]


def loop(run: Run, state, first: int, ckpts: Checkpoints, window: "Window", profile_dir) -> dict:
    cfg, log = run.cfg, window.log
    eval_every = cfg.eval_every or run.per_epoch
    eval_data = evaluation_data(run)
    profile = Profile(cfg.profile_range(), profile_dir, run.total)
    # Performance is decided here for tiny models: one dispatch per step costs more host time
    # than their step computes; --steps-per-dispatch K runs K steps as one program.
    every = (eval_every, cfg.checkpoint_every, run.mode.period)
    plan = dispatches(first, run.total, cfg.steps_per_dispatch, every, profile.marks)
    batches = prefetch(run.batches(plan))
    bar = tqdm(initial=first, total=run.total, unit="step",
               disable=not sys.stderr.isatty() or jax.process_index())  # fmt: skip
    last_eval = log.last("eval_accuracy", upto=first)  # not lines past the checkpoint
    window.start()
    # Closing the batches on the way out (a signal, an error) stops the input thread and workers.
    with stop_on_signals(run.mesh) as stop, profile, contextlib.closing(batches):
        compiled = Steps(run, window, stop)
        with window.paused():  # start-up: the first read, and compiling the batch cutter
            head = list(itertools.islice(batches, 1))
        for steps, batch in zip(plan, itertools.chain(head, batches), strict=True):
            train = compiled(state, batch, steps)
            profile.before(steps.start)
            state, metrics = train(state, batch, *stop.args())
            done = steps.stop
            state = run.synced(state, done)
            profile.after(done, state)
            window.push(done, metrics)  # Sync point: reads the previous dispatch's metrics.
            bar.update(len(steps))
            if (done % eval_every == 0 or done == run.total) and cfg.eval_examples != 0:
                window.flush()
                with window.paused():
                    last_eval = log.write(done, **evaluations(run, state, eval_data()))
                progress(bar, run, done, window.shown(), last_eval)
            signum = stop.agreed(window)  # in a job, the same in every process
            final = done == run.total or bool(signum)
            if final or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0):
                window.flush()
                with window.paused():
                    if not fetch(all_finite(state)):  # never save a broken state
                        raise Diverged(f"the parameters are not finite after step {done}; not "
                                       "saved")  # fmt: skip
                    # Asynchronous: training goes on while Orbax writes. The final save waits.
                    ckpts.save(done, state, manifest(run, done, window), wait=final)
            if signum:
                raise Preempted(signum, f"stopped by signal {signum} at step {done}; checkpoint "
                                f"saved in {ckpts.directory / str(done)}; rerun the same command "
                                "to continue")  # fmt: skip
    bar.close()
    return last_eval
