"""Where a run starts: the latest checkpoint of its workdir, checked against the run, or a fresh
state in an unused workdir (a rerun after an early death starts over, its files moved aside).
"""

import jax
from jax.experimental import multihost_utils

from jaxpar.core.errors import UserError
from jaxpar.modes.prune import check_prune_schedule
from jaxpar.modes.sync import check_replicas
from jaxpar.run.checkpoint import check_fits
from jaxpar.run.config import Config
from jaxpar.run.observe import Window, say
from jaxpar.run.setup import Run
from jaxpar.run.storage import Remote, is_url
from jaxpar.run.tiers import Tiers, local_folder, move_local_aside
from jaxpar.run.workdir import MetricsLog, move_aside, resolve, used, write_config


def sync(name: str) -> None:
    """A barrier across the processes of a multi-process job (nothing in a single process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


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
    # --workdir s3://... or gs://...: the run works in a local mirror (`jaxpar.run.storage`).
    remote = Remote(cfg.checkpoint.workdir) if is_url(cfg.checkpoint.workdir) else None
    workdir = remote.pull() if remote else resolve(cfg)
    local = local_folder(cfg, workdir)  # --local-checkpoint-dir: this run's fast tier
    if local is not None and not used(workdir) and (moved := move_local_aside(local)):
        say(f"{local} holds checkpoints of a run no longer in {workdir}: moved to {moved}")
    saved_any = [p for p in (workdir, local) if p is not None and (p / "checkpoints").is_dir()]
    ckpts = Tiers(workdir, cfg, local, remote) if saved_any else None
    step = ckpts.latest() if ckpts else None
    # A run that saved nothing (killed while starting, compiling or before its first save)
    # starts over in place, as a scheduler's requeue of the same command expects; its files
    # are kept, moved aside as --restart does.
    unsaved = step is None and bool(used(workdir))
    sync("jaxpar:workdir-read")  # every process decided on the same files; now write
    if cfg.checkpoint.restart or unsaved:
        if ckpts:
            ckpts.close()
        ckpts, step = None, None
        if moved := move_aside(workdir):
            if remote:
                remote.move_aside(moved)
            say(f"--restart: moved the previous run to {moved}" if cfg.checkpoint.restart else
                f"the previous run in {workdir} saved no checkpoint: its files moved to "
                f"{moved}; starting over")  # fmt: skip
        if moved := move_local_aside(local):
            say(f"--restart: moved the previous run's local checkpoints to {moved}")
        sync("jaxpar:workdir-moved")
    log = MetricsLog(workdir / "metrics.jsonl", start, run.mode.stamp)
    if step is None:
        write_config(workdir, cfg, 0)
        return workdir, Tiers(workdir, cfg, local, remote), log, run.init(), 0, []
    where = ckpts.holding(step).directory  # the local tier where both hold the step
    try:
        saved = ckpts.manifest(step)
        check_fits(saved, run.identity(), step, where)
        check_optimizer_flags(saved, cfg, step, where)
        check_prune_schedule(saved, cfg, run.total, step, where)
        check_replicas(saved, run.mode, run.spec, cfg.parallelism.sync, step, where)
        state = ckpts.restore(step, run.abstract, run.shardings)
    except UserError:
        ckpts.close()  # stops Orbax's threads now, not noisily at interpreter exit
        raise
    if step < run.total:  # a run with nothing left to train leaves its files as they are
        # Lines the stopped run wrote only because it ended at `step` (a partial logging window,
        # a final evaluation) are not in an uninterrupted run: they move aside with later ones.
        log.rewind(step, keep=lambda line: scheduled(run, line))
        write_config(workdir, cfg, step)
    say(f"resumed from step {step} (saved on mesh {saved['mesh']}) in {ckpts.where(step)}")
    return workdir, ckpts, log, state, step, saved["window_losses"]


def scheduled(run: Run, line: dict) -> bool:
    """Whether this run writes `line` at its step (an evaluation or training line on schedule)."""
    step, every = line["step"], run.cfg.metrics.log_every
    if "skipped_loss" in line:  # a skipped step's line (--skip-spikes): written as it comes
        return True
    if run.mode.eval_key in line:
        every = run.cfg.metrics.eval_every or run.per_epoch
    return step % every == 0 or step == run.total


def check_optimizer_flags(saved: dict, cfg: Config, step: int, directory) -> None:
    """Name the flag when a change gives the optimizer state another structure (SGD's momentum
    buffer exists only with momentum > 0); other optimizer flags may change on resume."""
    now = cfg.optimization.momentum
    before = Config.from_json(saved["config"]).optimization.momentum if "config" in saved else now
    if cfg.optimization.optimizer == "sgd" and (before > 0) != (now > 0):
        raise UserError(
            f"checkpoint step {step} in {directory} was trained with --momentum {before}, which "
            f"{'keeps' if before > 0 else 'has no'} a momentum buffer; --momentum {now} "
            f"cannot resume it: use a momentum {'> 0' if before > 0 else 'of 0'}, or --restart"
        )
