"""What a run shows while it trains: the metrics window that writes ``metrics.jsonl``'s training
lines, the progress line, the profiler's trace, and printing from one process of a job."""

import contextlib
import time

import jax
import numpy as np

from jaxpar.core.errors import Diverged
from jaxpar.run.config import Config
from jaxpar.run.watchdog import Watchdog
from jaxpar.run.workdir import MetricsLog


def say(*args):
    """Print from process 0 only: the other processes of a job stay quiet."""
    if jax.process_index() == 0:
        print(*args, flush=True)


def fetch(x) -> np.ndarray:
    """A replicated result on the host; works when other processes hold the other devices."""
    return np.asarray(x.addressable_data(0))


class Profile:
    """A JAX profiler trace of steps [A, B) (``--profile-steps A:B``), else nothing.

    The range is clamped to the steps this run trains: a resume inside it traces the rest, an
    end past the run stops at its last step, and a trace started is always stopped and written
    (also when training stops early).
    """

    def __init__(self, steps: tuple[int, int] | None, directory, total: int):
        self.first, self.end = steps or (-1, -1)
        self.end = min(self.end, total)
        self.directory, self.active = str(directory), False

    @property
    def marks(self) -> tuple[int, ...]:
        return (self.first, self.end) if self.first < self.end else ()

    def before(self, step: int) -> None:
        if not self.active and self.first <= step < self.end:
            # A folder per trace: the profiler names its own by the second, which a resumed
            # run's trace can share with the stopped run's.
            jax.profiler.start_trace(f"{self.directory}/from-step-{step}")
            self.active = True

    def after(self, done: int, state) -> None:
        if self.active and done >= self.end:
            jax.block_until_ready(state)
            self.stop()

    def stop(self) -> None:
        self.active = False
        jax.profiler.stop_trace()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.active:
            self.stop()


def progress(bar, run, step: int, loss: float, line: dict) -> None:
    shown = run.mode.shown(line)
    bar.set_postfix(loss=f"{loss:.4f}", **{k: f"{v:.4f}" for k, v in shown.items()})
    if bar.disable:
        say(
            f"{run.mode.unit} {step}/{run.total} epoch {step / run.per_epoch:.2f} train_loss "
            f"{loss:.4f} " + " ".join(f"{k} {v:.4f}" for k, v in shown.items())
        )


class Window:
    """Averages train losses over ``log_every`` steps and writes one line per window.

    The partial window travels in checkpoints, so a resumed run writes the same lines; a run's
    last step writes its partial window but keeps it, so a continued run does too. It also reads
    the job's agreed stop signal (`stop`) and times training alone (`paused` leaves out
    compilation, evaluation and checkpoints).
    """

    def __init__(self, log: MetricsLog, cfg: Config, total: int, losses: list, schedule,
                 examples_per_step: float | None = None, rate: str = "examples_per_s"):  # fmt: skip
        self.log, self.cfg, self.total, self.schedule = log, cfg, total, schedule
        self.rate = rate  # the speed's key in training lines
        self.per_step = examples_per_step or cfg.optimization.batch_size
        self.losses, self.logged, self.pending = list(losses), float("nan"), None
        self.extra = {}  # keys a mode adds to training lines (comm_bytes_per_step)
        self.latest = {}  # the last dispatch's other metrics (secure_agg_error)
        self.stop = 0  # the largest signal number pending in any process, as the steps saw it
        self.examples = lambda step: []  # a step's example indices (the loop's: its data's)
        self.watchdog = Watchdog(None, None)  # --step-timeout's (the loop's), else none
        self.start()

    def start(self) -> None:
        """Start the training clock: examples/s counts the steps timed from here on."""
        self.since, self.timed, self.idle, self.seconds = time.time(), 0, 0.0, 0.0

    @contextlib.contextmanager
    def paused(self, phase: str):
        """Leave what runs inside out of the training time; the watchdog gives it `phase`'s
        deadline (``compile``, ``evaluation``, ``checkpoint``: `jaxpar.run.watchdog`)."""
        began = time.time()
        try:
            with self.watchdog.phase(phase):
                yield
        finally:
            self.idle += time.time() - began

    def push(self, step: int, metrics) -> None:
        """Hold this dispatch's metrics and record the previous one's: reading them waits for
        that dispatch only, so at most 2 are in flight (CPU-emulated devices deadlock with 100+
        queued steps) and logging never stalls the devices. The step's deadline starts anew."""
        self.flush()
        self.pending = (step, metrics)
        self.watchdog.kick()

    def shown(self) -> float:
        """The train loss to print: the last logged window's, or before the first window is
        logged, the mean of the steps since (not the nan of no window yet)."""
        if np.isnan(self.logged) and self.losses:
            return float(np.mean(self.losses))
        return self.logged

    def flush(self) -> None:
        if self.pending:
            self.add(*self.pending)
            self.pending = None

    def add(self, done: int, metrics) -> None:
        """Record the steps that end at step `done` (one, or several of one dispatch)."""
        losses = np.atleast_1d(fetch(metrics["train_loss"]))  # blocks until those steps are done
        # The time since the previous dispatch was read, less pauses, is this one's: its steps
        # share it (a line inside a dispatch gets its steps' share, not the time of its write).
        now = time.time()
        per_step = (now - self.since - self.idle) / len(losses)
        self.since, self.idle = now, 0.0
        norms = np.atleast_1d(fetch(metrics["grad_norm"]))
        if "stop" in metrics:
            self.stop = max(self.stop, int(fetch(metrics["stop"])))
        skips = [
            np.atleast_1d(fetch(metrics[k])) if k in metrics else np.zeros(len(losses), int)
            for k in ("skipped", "skips_in_a_row")
        ]  # --skip-spikes (`jaxpar.core.spikes`)
        self.latest = {
            k: float(np.atleast_1d(fetch(v))[-1])
            for k, v in metrics.items()
            if k not in ("train_loss", "grad_norm", "stop", "skipped", "skips_in_a_row")
        }  # a mode's own metrics
        steps = range(done - len(losses) + 1, done + 1)
        for step, loss, norm, skipped, row in zip(steps, losses, norms, *skips, strict=True):
            self.record(step, float(loss), float(norm), per_step, bool(skipped), int(row))

    def record(self, step: int, loss: float, grad_norm: float, seconds: float = 0.0,
               skipped: bool = False, in_a_row: int = 0) -> None:  # fmt: skip
        """Record one step that took `seconds` of training time (`skipped`: not applied, the
        `in_a_row`-th such step in a row)."""
        stopped = (f"the loss is {loss} and the gradient norm {grad_norm} at step {step}; "
                   "stopped, nothing of it saved")  # fmt: skip
        if skipped:
            self.log.write(step, skipped_loss=loss, skips_in_a_row=in_a_row,
                           skipped_examples=self.examples(step))  # fmt: skip
            say(f"step {step} skipped: loss {loss:.4g} ({in_a_row} in a row; skipped.jsonl)")
            limit, _ = self.cfg.optimization.spikes
            if in_a_row >= limit:
                raise Diverged(f"{stopped} ({in_a_row} steps skipped in a row, --skip-spikes "
                               f"{self.cfg.optimization.skip_spikes})")  # fmt: skip
        elif not (np.isfinite(loss) and np.isfinite(grad_norm)):
            raise Diverged(stopped)
        else:
            self.losses.append(loss)
        self.timed, self.seconds = self.timed + 1, self.seconds + seconds
        if (step % self.cfg.metrics.log_every == 0 or step == self.total) and self.losses:
            self.logged = float(np.mean(self.losses))
            self.log.write(
                step,
                train_loss=self.logged,
                grad_norm=grad_norm,
                lr=float(self.schedule(step - 1)),  # the rate this step applied
                **{self.rate: self.timed * self.per_step / self.seconds},
                **self.extra,
                **self.latest,
            )
            # Writing counts in the next dispatch's time: its steps compute meanwhile
            # (TensorBoard's writer, seconds to start, was opened before: `MetricsLog.open`).
            self.timed, self.seconds = 0, 0.0
            if step % self.cfg.metrics.log_every == 0:  # a run's last, partial window stays open
                self.losses = []
