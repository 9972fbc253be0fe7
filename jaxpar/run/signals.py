"""Stopping on SIGTERM/SIGINT after the same step in every process of a job.

A signal may reach one process only (one evicted pod). Each process then passes its pending
signal number into the train step (`jaxpar.core.step.with_signals`), which returns the job's
maximum; every process reads that value for the same dispatch, so all of them save the same
checkpoint and stop together. A single process needs no agreement and stops on its own flag.
"""

import contextlib
import functools
import signal

import jax
import numpy as np

from jaxpar.core.errors import Preempted
from jaxpar.core.step import signal_sharding


class Stop:
    """Where a SIGTERM/SIGINT stops the run. One process stops after the step it arrives in.
    Several processes must agree, whichever of them got it: each step then takes this process's
    pending signal number and returns the job's maximum (`jaxpar.core.step.with_signals`), which
    every process reads for the same dispatch (`Window.stop`). That costs one tiny all-reduce per
    dispatch (+0.45 ms on the MLP's 2.1 ms step on a 2x2 CPU mesh), so a single process skips it.
    """

    def __init__(self, mesh):
        self.mesh, self.signum, self.shared = mesh, 0, jax.process_count() > 1

    def args(self) -> tuple:
        """The train step's arguments after the state and batch."""
        return (pending(self.mesh, self.signum),) if self.shared else ()

    def agreed(self, window) -> int:
        """The signal to stop on now: the job's, as `window` read it from the steps, or this
        process's own."""
        return window.stop if self.shared else self.signum


@contextlib.contextmanager
def stop_on_signals(mesh):
    """SIGTERM/SIGINT set ``stop.signum``; see `Stop` for the step that the run stops after."""
    stop = Stop(mesh)
    handled = (signal.SIGTERM, signal.SIGINT)
    try:
        previous = {s: signal.signal(s, lambda s, _: setattr(stop, "signum", s)) for s in handled}
    except ValueError:  # not the main thread: leave signals alone
        previous = {}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def stop_at_once():
    """Before training starts (loading data, compiling, opening the workdir) SIGTERM/SIGINT end
    the run at once with `Preempted`: there is nothing to save yet, and the same command then
    starts over (`jaxpar.run.resume.open_workdir`)."""

    def stop(signum, _):
        raise Preempted(signum, f"stopped by signal {signum} before the first step; nothing was "
                        "saved; rerun the same command to start over")  # fmt: skip

    handled = (signal.SIGTERM, signal.SIGINT)
    try:
        previous = {s: signal.signal(s, stop) for s in handled}
    except ValueError:  # not the main thread: leave signals alone
        previous = {}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@functools.cache
def pending(mesh, signum: int) -> jax.Array:
    """This process's pending signal number on each of its devices (the steps' third argument)."""
    return jax.make_array_from_callback(
        (mesh.size,), signal_sharding(mesh), lambda _: np.full((1,), signum, np.int32)
    )
