"""The training loop: set up a run (`jaxpar.run.setup`), resume it where its workdir says
(`jaxpar.run.resume`), then train it in dispatches of steps, evaluating, checkpointing and
stopping on a signal on schedule.
"""

import contextlib
import itertools
import sys
import time

import jax
from tqdm import tqdm

from jaxpar.core.errors import Diverged, Preempted
from jaxpar.core.mesh import draw_mesh
from jaxpar.core.step import all_finite
from jaxpar.data import corrupted, prefetch, train_indices
from jaxpar.run.compile_cache import Cache
from jaxpar.run.config import Config
from jaxpar.run.evaluation import evaluator
from jaxpar.run.observe import Profile, Window, fetch, progress, say
from jaxpar.run.pretrain import pretrain
from jaxpar.run.resume import manifest, open_workdir
from jaxpar.run.setup import Run, setup
from jaxpar.run.signals import Stop, stop_at_once, stop_on_signals
from jaxpar.run.storage import is_url
from jaxpar.run.tiers import Tiers
from jaxpar.run.watchdog import Watchdog


def train(cfg: Config) -> dict:
    """Train as `cfg` says; returns the last evaluation line (also in ``metrics.jsonl``)."""
    cfg = cfg.validate()
    Cache.use(cfg.job.compile_cache)  # before anything compiles
    if cfg.model.pretrain_epochs:  # a DBN: its layers one by one, then fine-tuned from them
        with stop_at_once():
            cfg, ds, weights = pretrain(cfg, train_run)
        return train_run(cfg, ds, weights)
    return train_run(cfg)


def train_run(cfg: Config, ds=None, weights=None) -> dict:
    """One run of `cfg` in its workdir (`jaxpar.run.setup.setup`: `ds` and `weights`)."""
    start = time.time()
    with stop_at_once():  # until the loop's handlers save a checkpoint on a signal
        run = setup(cfg.validate(), ds, weights)
        workdir, ckpts, log, state, first, losses = open_workdir(run, start)
    say(draw_mesh(run.mesh))
    for r in run.replicated:
        say(f"note: {r}")
    for line in cfg.notes(run.total):
        say(line)
    if cfg.model.freeze and not cfg.model.init_from and first == 0:
        say("note: --freeze backbone without --init-from: the head trains on a random backbone")
    for line in run.mode.announce(workdir):
        say(line)
    if run.mode.period and run.total % run.mode.period:
        say(
            f"note: --sync {cfg.parallelism.sync}: the run ends {run.total % run.mode.period} "
            "steps after its last sync; its evaluation sees the model a sync then gives"
        )
    if first < run.total:  # off the training clock; a run with nothing to train writes nothing
        log.open()
    watchdog = Watchdog(workdir, cfg.job.step_timeout)  # --step-timeout: a hang exits 75
    try:
        window = Window(log, cfg, run.total, losses, run.schedule,
                        run.mode.examples_per_step(cfg.optimization.batch_size),
                        run.mode.rate)  # fmt: skip
        window.watchdog = watchdog
        model_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(run.abstract[0]))
        window.extra.update(run.mode.traffic(model_bytes))
        o = cfg.optimization  # a skipped step's examples (--skip-spikes): seed and step's
        window.examples = lambda step: train_indices(
            run.ds, o.batch_size, o.seed, step - 1
        ).tolist()
        last_eval = loop(run, state, first, ckpts, window, workdir / "profile")
    except Diverged as e:
        saved = ckpts.latest()
        raise Diverged(
            f"{e}; resume from the last checkpoint (step {saved}) with a lower --lr"
            if saved is not None
            else f"{e}; no checkpoint was saved yet: rerun with --restart and a lower --lr"
        ) from None
    finally:
        with watchdog.phase("checkpoint"):
            ckpts.wait()  # let an asynchronous save finish, also when training failed
        watchdog.close()
        log.close()
        ckpts.close()  # after the log: a workdir on object storage uploads the run files
    if is_url(cfg.checkpoint.workdir):  # object storage: the run files are uploaded
        workdir = cfg.checkpoint.workdir
    if first >= run.total:
        say(f"already at step {first} of {run.total}: pass a larger --steps or --epochs to go on")
    if cfg.metrics.eval_examples == 0:
        say(f"trained to step {run.total} without evaluating (--eval-examples 0), "
            f"{time.time() - start:.1f}s; workdir {workdir}")  # fmt: skip
    elif last_eval:
        say(f"{run.mode.summary(last_eval)}, {time.time() - start:.1f}s; workdir {workdir}")
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
            self.window.flush()  # the dispatch in flight computes on the clock, not in the pause
            with self.window.paused("compile"):
                counts, began = Cache.counts(), time.time()
                jitted = self.run.compile(stacked=n > 1, signals=self.stop.shared)[0]
                self.compiled[n] = jitted.lower(state, batch, *self.stop.args()).compile()
                if len(self.compiled) == 1:  # said once: the first program of the run
                    say(f"{Cache.report(counts, 'the train step')} ({time.time() - began:.1f}s)")
                if self.run.cfg.parallelism.sync != "every-step":  # it changes communication
                    self.window.extra["comm_bytes_per_step"] = self.run.comm_bytes_per_step(
                        self.compiled[n], n
                    )
        return self.compiled[n]


def loop(run: Run, state, first: int, ckpts: Tiers, window: "Window", profile_dir) -> dict:
    cfg, log = run.cfg, window.log
    eval_every = cfg.metrics.eval_every or run.per_epoch
    evaluate = run.evaluate or evaluator(run)
    profile = Profile(cfg.metrics.profile_range(), profile_dir, run.total)
    # Performance is decided here for tiny models: one dispatch per step costs more host time
    # than their step computes; --steps-per-dispatch K runs K steps as one program.
    c = cfg.checkpoint
    every = (eval_every, c.checkpoint_every, c.local_checkpoint_every, run.mode.period)
    plan = dispatches(first, run.total, cfg.parallelism.steps_per_dispatch, every, profile.marks)
    batches = prefetch(corrupted(run.batches(plan), plan, cfg.data.corrupted))
    bar = tqdm(initial=first, total=run.total, unit="step",
               disable=not sys.stderr.isatty() or jax.process_index())  # fmt: skip
    last_eval = log.last(run.mode.eval_key, upto=first)  # not lines past the checkpoint
    window.start()
    # Closing the batches on the way out (a signal, an error) stops the input thread and workers.
    with stop_on_signals(run.mesh) as stop, profile, contextlib.closing(batches):
        compiled = Steps(run, window, stop)
        with window.paused("compile"):  # start-up: the first read, compiling the batch cutter
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
            if (done % eval_every == 0 or done == run.total) and cfg.metrics.eval_examples != 0:
                window.flush()
                with window.paused("evaluation"):
                    last_eval = log.write(done, **evaluate(state, done))
                progress(bar, run, done, window.shown(), last_eval)
            signum = stop.agreed(window)  # in a job, the same in every process
            final = done == run.total or bool(signum)
            if final or ckpts.due(done):  # a tier's schedule (`jaxpar.run.tiers`)
                window.flush()
                with window.paused("checkpoint"):
                    if not fetch(all_finite(state)):  # never save a broken state
                        raise Diverged(f"the parameters are not finite after step {done}; not "
                                       "saved")  # fmt: skip
                    # Asynchronous: training goes on while Orbax writes. The final save waits.
                    ckpts.save(done, state, manifest(run, done, window), final, bool(signum))
            if signum:
                raise Preempted(signum, f"stopped by signal {signum} at step {done}; checkpoint "
                                f"saved in {ckpts.where(done)}; rerun the same command "
                                "to continue")  # fmt: skip
    bar.close()
    return last_eval
