"""Joining a multi-process job with JAX's own runtime (`jax.distributed`).

A process is part of a job when it is given a coordinator (``--coordinator HOST:PORT
--num-processes N --process-id I``, or the ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
``JAX_PROCESS_ID`` environment variables, as `jaxpar.launch` sets them), or when it runs under
SLURM or Open MPI with more than one task, where JAX finds the coordinator itself. Everything must
happen before the JAX backend starts.
"""

import os

import jax

from jaxpar.errors import UserError

# A dead peer is noticed by the coordination service within this time (JAX's default is 100 s).
HEARTBEAT_TIMEOUT_S = 20
MANAGED = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")  # task counts set by SLURM and Open MPI


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    if not value.strip().lstrip("-").isdigit():
        raise UserError(f"environment variable {name}={value!r} is not an integer")
    return int(value)


def job_size(coordinator=None, num_processes=None, process_id=None) -> tuple:
    """``(coordinator, num_processes, process_id)`` this process was launched with.

    ``num_processes`` is 1 for a single-process run; the coordinator and process id may be None
    under SLURM or Open MPI, where JAX detects them.
    """
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num_processes = num_processes or _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    if coordinator is None:
        managed = [_env_int(v) for v in MANAGED if os.environ.get(v)]
        return None, max(managed, default=1), None
    if not num_processes or num_processes < 1:
        raise UserError(f"--coordinator {coordinator} needs --num-processes N (N >= 1)")
    if process_id is None or not 0 <= process_id < num_processes:
        raise UserError(
            f"--coordinator {coordinator} needs --process-id between 0 and {num_processes - 1}, "
            f"got {process_id}"
        )
    if ":" not in coordinator:
        raise UserError(f"--coordinator {coordinator} must be HOST:PORT")
    return coordinator, num_processes, process_id


def join(coordinator=None, num_processes=None, process_id=None) -> int:
    """Join the job this process belongs to, if any; returns the number of processes."""
    coordinator, num_processes, process_id = job_size(coordinator, num_processes, process_id)
    if num_processes == 1 and coordinator is None:
        return 1
    # CPU processes exchange collectives over gloo (TCP); GPUs keep NCCL, TPUs their ICI.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator,
        num_processes if coordinator else None,
        process_id,
        heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
    )
    return num_processes
