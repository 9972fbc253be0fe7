"""Joining a multi-process job with JAX's own runtime (`jax.distributed`).

A process is part of a job when it is given a coordinator (``--coordinator HOST:PORT
--num-processes N --process-id I``, or the ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
``JAX_PROCESS_ID`` environment variables, as `jaxpar.tools.launch` sets them), or when it runs under
SLURM or Open MPI with more than one task, where JAX's cluster detection finds the coordinator.
Everything must happen before the JAX backend starts.

Before JAX's runtime starts, every process checks in with process 0 (`roll_call`), within
``--init-timeout`` seconds: JAX itself aborts a process whose peer never connects, with a C++
stack trace and no word of which peer it was.
"""

import os
import re
import socket
import time

import jax

from jaxpar.core.errors import UserError

# A silent peer is noticed by the coordination service within this time (JAX's default is 100 s).
# A crashed peer is noticed at once (its collectives break); this bound is for hung hosts, and
# must outlast stalls of a loaded machine: at 20 s, one CI run saw both processes of a healthy
# 2-process job declared silent at once (by the wall clock, it seems: 18 s after the test began).
HEARTBEAT_TIMEOUT_S = 60
INIT_TIMEOUT_S = 120  # --init-timeout's default: how long processes wait for each other to start
# The variables JAX's cluster detection reads (jax/_src/clusters/slurm_cluster.py and
# ompi_cluster.py), the task count first: SLURM's srun and Open MPI's mpirun set them per task.
CLUSTERS = {
    "SLURM": ("SLURM_NTASKS", "SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID",
              "SLURM_LOCALID"),
    "Open MPI": ("OMPI_COMM_WORLD_SIZE", "OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_RANK",
                 "OMPI_COMM_WORLD_LOCAL_RANK"),
}  # fmt: skip
STARTER = {"SLURM": "srun", "Open MPI": "mpirun"}


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
        if managed := managed_job():
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


def managed_job() -> int | None:
    """The task count of a SLURM or Open MPI job of several tasks this process is one of, else
    None; a `UserError` naming what is missing when the environment says so only in part (e.g.
    ``SLURM_NTASKS`` in an allocation, outside ``srun``)."""
    for name, (count, *rest) in CLUSTERS.items():
        tasks = _env_int(count)
        if tasks is None or tasks <= 1:
            continue
        if missing := [v for v in rest if v not in os.environ]:
            raise UserError(
                f"{count}={tasks} makes this one of {tasks} {name} tasks, but {', '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not set, so the job's coordinator cannot "
                f"be found: start every task with {STARTER[name]}, pass --coordinator HOST:PORT "
                f"--num-processes N --process-id I, or unset {count} to train in one process"
            )
        return tasks
    return None


def detect_cluster() -> tuple[str, int, int, list | None]:
    """``(coordinator, num_processes, process_id, local_device_ids)`` of this SLURM or Open MPI
    task, by JAX's own cluster detection (what ``jax.distributed.initialize()`` would use)."""
    from jax._src.clusters import ClusterEnv

    found = ClusterEnv.auto_detect_unset_distributed_params(None, None, None, None, None, None)
    if found[0] is None:
        raise UserError("this looks like a SLURM or Open MPI job, but JAX does not detect it")
    return found


def roll_call(coordinator: str, num_processes: int, process_id: int, timeout: float) -> None:
    """Wait until every process of the job has checked in with process 0 at `coordinator`, at
    most `timeout` seconds; else a `UserError` naming who never arrived. Process 0 listens on the
    coordinator's port before JAX's coordination service takes it over."""
    host, port = coordinator.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    flag = f"--init-timeout {timeout:g}"
    if process_id == 0:
        waiting, arrived = set(range(1, num_processes)), []
        with socket.create_server(("", int(port))) as server:
            server.settimeout(0.2)
            while waiting:
                if time.monotonic() > deadline:
                    names = ", ".join(map(str, sorted(waiting)))
                    raise UserError(
                        f"process{'es' if len(waiting) > 1 else ''} {names} of {num_processes} "
                        f"never arrived at {coordinator} within {flag} s: check that "
                        f"{'they were' if len(waiting) > 1 else 'it was'} started with the same "
                        "job settings and can reach this host"
                    )
                try:
                    conn, _ = server.accept()
                    conn.settimeout(5)
                    said = conn.recv(64).decode(errors="replace").split()
                except OSError:  # nobody yet (timeout), or a connection that broke
                    continue
                if len(said) == 2 and said[0] == "jaxpar" and said[1].isdigit():
                    waiting.discard(int(said[1]))
                    arrived.append(conn)
            for conn in arrived:  # everyone is here: start
                conn.sendall(b"go\n")
                conn.close()
        return
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise UserError(
                f"process 0 of the job was not reachable at {coordinator} within {flag} s "
                f"(this is process {process_id}): start it, or check the coordinator address"
            )
        try:
            with socket.create_connection((host, int(port)), timeout=min(left, 2)) as conn:
                conn.sendall(f"jaxpar {process_id}\n".encode())
                conn.settimeout(max(left, 0.1))
                answer = conn.recv(16)
        except OSError:
            time.sleep(0.2)
            continue
        if answer.startswith(b"go"):
            return
        raise UserError(
            f"process 0 at {coordinator} gave up before the job formed (this is process "
            f"{process_id}): another process never arrived; process 0's error names it"
        )


def join(coordinator=None, num_processes=None, process_id=None, timeout=INIT_TIMEOUT_S) -> int:
    """Join the job this process belongs to, if any; returns the number of processes. Every
    process must arrive within `timeout` seconds (`roll_call`)."""
    coordinator, num_processes, process_id = job_size(coordinator, num_processes, process_id)
    if num_processes == 1 and coordinator is None:
        return 1
    local = None
    if coordinator is None:  # SLURM or Open MPI: JAX's detection, done here to know the address
        coordinator, num_processes, process_id, local = detect_cluster()
    roll_call(coordinator, num_processes, process_id, timeout)
    # CPU processes exchange collectives over gloo (TCP); GPUs keep NCCL, TPUs their ICI.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator,
        num_processes,
        process_id,
        local_device_ids=local,
        heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
        initialization_timeout=int(timeout) + 1,
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
