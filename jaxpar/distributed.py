"""Joining a multi-process job with JAX's own runtime (`jax.distributed`).

A process is part of a job when it is given a coordinator (``--coordinator HOST:PORT
--num-processes N --process-id I``, or the ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
``JAX_PROCESS_ID`` environment variables, as `jaxpar.launch` sets them), or when it runs under
SLURM or Open MPI with more than one task, where JAX finds the coordinator itself. Everything must
happen before the JAX backend starts.
"""

import os
import re

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


REHEARSE = "python -m jaxpar.launch -n {n} -- python train.py ..."


def job_size(coordinator=None, num_processes=None, process_id=None) -> tuple:
    """``(coordinator, num_processes, process_id)`` this process was launched with.

    ``num_processes`` is 1 for a single-process run; the coordinator and process id may be None
    under SLURM or Open MPI, where JAX detects them. A process count above 1 or a process id with
    no coordinator to join (and no SLURM or Open MPI job) is refused: it would silently train
    alone.
    """
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    # How the user gave each value, for the messages: "--num-processes 2" or "JAX_NUM_PROCESSES=2"
    n_given = "--num-processes {}" if num_processes is not None else "JAX_NUM_PROCESSES={}"
    id_given = "--process-id {}" if process_id is not None else "JAX_PROCESS_ID={}"
    num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    if num_processes is not None and num_processes < 1:
        raise UserError(f"{n_given.format(num_processes)}: the process count must be at least 1")
    if coordinator is None:
        managed = max((_env_int(v) for v in MANAGED if os.environ.get(v)), default=1)
        if managed > 1:
            return None, managed, None
        if (num_processes or 1) > 1:
            raise UserError(
                f"{n_given.format(num_processes)} needs --coordinator HOST:PORT of process 0 (or "
                "JAX_COORDINATOR_ADDRESS) in every process; to rehearse on one machine run "
                + REHEARSE.format(n=num_processes)
            )
        if process_id is not None and num_processes is None:
            raise UserError(
                f"{id_given.format(process_id)} needs --num-processes N and --coordinator "
                "HOST:PORT (or JAX_NUM_PROCESSES and JAX_COORDINATOR_ADDRESS); to rehearse on one "
                "machine run " + REHEARSE.format(n="N")
            )
        if process_id not in (None, 0):
            raise UserError(f"{id_given.format(process_id)} must be 0 in a single-process run")
        return None, 1, None
    if not num_processes:
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


# What a collective or the coordination service reports when a peer process died or cannot be
# reached (gloo's messages as seen when a peer of a 2-process CPU job was killed with SIGKILL:
# "Gloo all-reduce failed: [...pair.cc:538] Read error [127.0.0.1]:4785: Connection reset by
# peer", "Gloo AllGather failed: [...pair.cc:547] Connection closed by peer [127.0.0.1]:37586").
PEER_LOST = re.compile(
    r"Gloo [\w -]+ failed:"  # any gloo collective, e.g. all-reduce, AllGather, ReduceScatter
    r"|NCCL operation \w+.* failed|ncclRemoteError|ncclSystemError"
    r"|remote process exited or there was a network error"
    r"|heartbeat timeout|stopped sending heartbeats|Barrier timed out|Shutdown barrier"
    r"|Failed to send RPC to coordination service"
    r"|coordination service.*(UNAVAILABLE|Socket closed)",
    re.IGNORECASE | re.DOTALL,
)


def peer_lost(error: BaseException) -> bool:
    """Whether `error` (or an exception it was raised from) is a failed collective or a lost
    connection to another process of the job, rather than an error of this process."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if PEER_LOST.search(str(error)):
            return True
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return False
