"""Two checkpoint tiers (issue #34): the persistent one in ``WORKDIR/checkpoints`` and a fast
one on node-local storage (``--local-checkpoint-dir DIR``, ``/dev/shm`` or a local disk),
written every ``--local-checkpoint-every`` steps, which a preemption need not wait for.

The local tier of a run lives in ``DIR/<workdir's name>-<hash of its absolute path>/`` and keeps
its last two steps. A restart resumes from the newest complete step of either tier (the local
one where both hold it); a signal saves the local tier first, then the persistent one. One tier
writes at a time: a save waits for the other tier's save in flight. The local
tier belongs to the run in the workdir: ``--restart`` moves it aside with the run, and a local
tier beside a workdir that holds no run (its files moved or deleted) is moved aside unread.
One process for now: in a job of several, each process's local files would be its own shards,
which Orbax's emergency checkpointing restores and this does not yet.
"""

import hashlib
import time
from pathlib import Path

import jax

from jaxpar.core.errors import UserError
from jaxpar.run.checkpoint import Checkpoints
from jaxpar.run.config import Config
from jaxpar.run.storage import Remote
from jaxpar.run.workdir import free_name

LOCAL_KEEP = 2


def local_folder(cfg: Config, workdir: Path) -> Path | None:
    """This run's folder in ``--local-checkpoint-dir`` (None without one)."""
    c = cfg.checkpoint
    if c.local_checkpoint_dir is None:
        return None
    if jax.process_count() > 1:
        raise UserError(
            "--local-checkpoint-dir in a job of several processes is not supported "
            "yet: each process would keep its own shards; use --checkpoint-every"
        )
    path = str(workdir.resolve())
    key = f"{workdir.resolve().name}-{hashlib.sha256(path.encode()).hexdigest()[:12]}"
    return Path(c.local_checkpoint_dir).resolve() / key


def move_local_aside(folder: Path | None) -> Path | None:
    """Move a run's local tier to ``<folder>.previous-<date-time>`` (nothing is deleted)."""
    if folder is None or not folder.exists():
        return None
    dest = free_name(folder.parent, f"{folder.name}.previous-{time.strftime('%Y%m%d-%H%M%S')}", "")
    folder.rename(dest)
    return dest


class Tiers:
    """The persistent `Checkpoints` and, with ``--local-checkpoint-dir``, the local one, behind
    `Checkpoints`' own interface: `latest` and `restore` read the newer tier, `save` writes the
    tiers that are due."""

    def __init__(self, workdir: Path, cfg: Config, local: Path | None, remote: Remote | None):
        c = cfg.checkpoint
        self.remote, self.keep = remote, c.keep  # a workdir on object storage, and its mirror
        self.persistent = Checkpoints(workdir, c.keep)
        self.local = Checkpoints(local, LOCAL_KEEP) if local is not None else None
        self.every, self.local_every = c.checkpoint_every, c.local_checkpoint_every
        self.directory = self.persistent.directory

    def _all(self) -> list[Checkpoints]:
        return [t for t in (self.local, self.persistent) if t is not None]

    def latest(self) -> int | None:
        steps = [s for s in (t.latest() for t in self._all()) if s is not None]
        return max(steps, default=None)

    def holding(self, step: int) -> Checkpoints:
        """The tier that holds `step`: the local one where both do."""
        return next(t for t in self._all() if t.latest() == step)

    def where(self, step: int) -> str:
        """Where `step` is saved, for messages: the store's URL for a workdir on one."""
        tier = self.holding(step)
        if tier is self.persistent and self.remote is not None:
            return f"{self.remote.url}/checkpoints/{step}"
        return str(tier.directory / str(step))

    def manifest(self, step: int) -> dict:
        return self.holding(step).manifest(step)

    def restore(self, step: int, abstract, shardings):
        return self.holding(step).restore(step, abstract, shardings)

    def due(self, step: int) -> bool:
        """Whether a tier saves after `step` on schedule."""
        return any(every and step % every == 0 for every in (self.every, self.local_every))

    def save(self, step: int, state, manifest: dict, final: bool = False, signal=False) -> None:
        """Save `step` to the tiers due: the local one on its schedule and on a signal, first;
        the persistent one on its schedule and at the end. `final`: wait for both."""
        # One tier writes at a time: Orbax's asynchronous saves share process-wide state (0.12:
        # the current operation id), and two in flight at once failed to create their folders.
        local_due = self.local_every and step % self.local_every == 0
        if self.local is not None and (signal or local_due):
            self.persistent.wait()
            self.local.save(step, state, manifest, wait=final)
        if final or (self.every and step % self.every == 0):
            if self.local is not None:
                self.local.wait()
            # On object storage the step is uploaded once complete: training waits for both. In
            # a job of several processes training waits too: saving in the background, two CPU
            # processes hung for good in a step's all-reduce after a periodic save (likely
            # Orbax's cross-process work in its threads meeting the steps' collectives in
            # another order in each process; waiting removed the hang).
            wait = final or self.remote is not None or jax.process_count() > 1
            self.persistent.save(step, state, manifest, wait=wait)
            if self.remote is not None:
                self.remote.push(self.keep)

    def wait(self) -> None:
        for tier in self._all():
            tier.wait()

    def close(self) -> None:
        """Finish the saves in flight; on object storage, upload the run files last."""
        try:
            if self.local is not None:
                self.local.close()
        finally:
            self.persistent.close()
            if self.remote is not None:
                self.remote.push(self.keep)
