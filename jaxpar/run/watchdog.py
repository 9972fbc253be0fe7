"""A hang watchdog (``--step-timeout SECONDS``, issue #36): deadlines on the phases of a run, and
a clean exit when one passes.

A thread of each process watches one deadline at a time. The loop renews the step's deadline
after every dispatch (`Watchdog.kick`); a compilation, an evaluation and a checkpoint save get
longer ones while they last (`Watchdog.phase`), derived from the step's: ``max(COMPILE_S, 10 x
SECONDS)`` for compiling, ``max(SLOW_S, 10 x SECONDS)`` for the others. The step's deadline
also covers waiting for the next batch and the first dispatch's wait for a peer that never
computes. When a deadline passes, every Python thread's stack goes to
``WORKDIR/hang-p<PROCESS>-<DATE-TIME>.txt`` and to stderr, one line says which phase hung and
for how long, and the process exits with status `HANG` (75, ``EX_TEMPFAIL``: try again), which
``python -m jaxpar.launch --restarts N`` and schedulers can restart on; the rerun resumes from
its last checkpoint. In a job, a process frozen by ``SIGSTOP`` leaves its peers waiting in a
collective: their watchdogs end them the same way, before JAX's own heartbeat aborts them.
"""

import contextlib
import faulthandler
import os
import sys
import threading
import time
from pathlib import Path

import jax

HANG = 75  # the exit status of a hung process (EX_TEMPFAIL)
COMPILE_S = 600.0  # the least a compilation is given
SLOW_S = 120.0  # the least an evaluation or a checkpoint save is given


class Watchdog:
    """Deadlines for one run's phases; `None` seconds: no watchdog (every method does nothing)."""

    def __init__(self, workdir: Path, seconds: float | None):
        self.workdir, self.seconds = workdir, seconds
        self.phase_name, self.deadline, self.began = "start", None, time.monotonic()
        self.lock, self.done = threading.Lock(), threading.Event()
        if seconds is not None:
            threading.Thread(target=self._watch, name="jaxpar-watchdog", daemon=True).start()

    def allowance(self, name: str) -> float:
        """The seconds phase `name` is given."""
        least = COMPILE_S if name == "compile" else SLOW_S
        return self.seconds if name == "step" else max(least, 10 * self.seconds)

    def kick(self, name: str = "step") -> None:
        """Start (or renew) phase `name`'s deadline."""
        if self.seconds is not None:
            with self.lock:
                now = time.monotonic()
                self.phase_name, self.began = name, now
                self.deadline = now + self.allowance(name)

    @contextlib.contextmanager
    def phase(self, name: str):
        """Phase `name` while the block runs; the step's deadline, renewed, after it."""
        self.kick(name)
        try:
            yield
        finally:
            self.kick("step")

    def close(self) -> None:
        self.done.set()

    def _watch(self) -> None:
        while not self.done.wait(0.5):
            with self.lock:
                late = self.deadline is not None and time.monotonic() > self.deadline
                name, lasted = self.phase_name, time.monotonic() - self.began
            if late:
                self._fire(name, lasted)

    def _fire(self, name: str, lasted: float) -> None:
        process = jax.process_index()
        path = self.workdir / f"hang-p{process}-{time.strftime('%Y%m%d-%H%M%S')}.txt"
        line = (f"error: process {process} hung in {name} for {lasted:.0f}s (--step-timeout "
                f"{self.seconds:g}: {self.allowance(name):g}s allowed); every thread's stack "
                f"is in {path}; exiting with status {HANG}")  # fmt: skip
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            with open(path, "w") as f:
                f.write(line.removeprefix("error: ") + "\n\n")
                f.flush()
                faulthandler.dump_traceback(f, all_threads=True)
        except OSError:
            pass  # the stacks still go to stderr
        faulthandler.dump_traceback(sys.stderr, all_threads=True)
        print(line, file=sys.stderr, flush=True)
        os._exit(HANG)
