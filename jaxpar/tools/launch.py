"""Start an N-process job on this machine, for development and tests.

    python -m jaxpar.launch -n 2 -- python train.py --mesh 2x2 --steps 50

Each process gets ``JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT``, ``JAX_NUM_PROCESSES`` and
``JAX_PROCESS_ID``, which `train.py` reads to join the job (on the CPU each process then emulates
its share of the mesh's devices). Every output line is prefixed with its process (``[p1] ...``),
except gloo's reports of each connection it opens for the CPU collectives (half of a short job's
output), which are dropped.
When a process fails, the others are stopped and the launcher exits with that process's status.
SIGTERM or SIGINT to the launcher is passed on to every process; a signal to any one of them also
stops the whole job (the processes agree on the step, save one checkpoint together and exit 143 or
130): the launcher then waits for all of them rather than stopping the others mid-save. Every line
a process printed is relayed before the launcher returns.

``--restarts N`` starts the job again, up to N times, when it ended because a process hung
(status 75: ``--step-timeout``'s watchdog, `jaxpar.run.watchdog`) or was killed or crashed (a
signal other than SIGTERM and SIGINT); the same command resumes from the job's last checkpoint.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

GRACE_S = 5  # after a peer failed, survivors get this long to exit before SIGKILL
SAVE_S = 300  # after a peer was preempted, the others get this long to save and exit
PREEMPTED = (128 + signal.SIGTERM, 128 + signal.SIGINT)  # train.py's statuses after saving
HANG = 75  # a process's status when its watchdog found it hung (`jaxpar.run.watchdog.HANG`)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# "[Gloo] Rank 1 is connected to 3 peer ranks. Expected number of connected peer ranks is : 3",
# which gloo writes in these pieces: two threads of one process interleave them, and the line ends
GLOO = (
    "[Gloo] Rank ",
    " is connected to ",
    " peer ranks. ",
    "Expected number of connected peer ranks is : ",
)


def gloo_report(line: str) -> bool:
    """Whether `line` holds nothing but pieces of gloo's connection reports."""
    rest = line
    for piece in GLOO:
        rest = rest.replace(piece, " ")
    return rest != line and not rest.strip(" \n0123456789")


def relay(proc: subprocess.Popen, prefix: str) -> None:
    after = False  # the line before was gloo's: one blank line now ends an interleaved report
    for line in proc.stdout:
        report = gloo_report(line)
        drop, after = report or (after and not line.strip()), report
        if not drop:
            sys.stdout.write(f"{prefix} {line}")
            sys.stdout.flush()


def status(code: int) -> int:
    """A child's exit status as a shell reports it (128 + signal for a killed process)."""
    return 128 - code if code < 0 else code


def launch(n: int, command: list[str], port: int | None = None) -> int:
    port = port or free_port()
    procs, relays = [], []
    for i in range(n):
        env = {
            **os.environ,
            "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
            "JAX_NUM_PROCESSES": str(n),
            "JAX_PROCESS_ID": str(i),
            "PYTHONUNBUFFERED": "1",
        }
        proc = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        relays.append(threading.Thread(target=relay, args=(proc, f"[p{i}]"), daemon=True))
        relays[-1].start()
        procs.append(proc)

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, forward)
    code = supervise(procs)
    for thread in relays:  # a process's last lines ("final test accuracy") are relayed too
        thread.join(timeout=60)  # (unless a process left a child holding its output open)
    return code


def supervise(procs) -> int:
    """Wait for the processes; the job's exit status."""
    while True:
        codes = [p.poll() for p in procs]
        failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            i, code = failed[0]
            if status(code) in PREEMPTED:  # the others are saving the same step: let them
                print(f"[launch] process {i} was stopped by a signal; waiting for the others")
                stop(procs, grace=SAVE_S, signal_first=False)
            else:
                print(f"[launch] process {i} exited with status {status(code)}; stopping the "
                      "others")  # fmt: skip
                stop(procs)
            return status(code)
        if all(c == 0 for c in codes):
            return 0
        time.sleep(0.1)


def stop(procs, grace: float = GRACE_S, signal_first: bool = True) -> None:
    for p in procs:
        if signal_first and p.poll() is None:
            p.terminate()
    deadline = time.time() + grace
    for p in procs:
        try:
            p.wait(max(deadline - time.time(), 0.1))
        except subprocess.TimeoutExpired:
            p.kill()  # blocked in a collective with the dead process: it cannot finish a step
            p.wait()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jaxpar.launch", description="Run COMMAND as an N-process JAX job."
    )
    parser.add_argument("-n", "--num-processes", type=int, required=True)
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: free)")
    parser.add_argument(
        "--restarts", type=int, default=0, help="start the job again, up to this many times, "
        "when a process hung (status 75) or died by a signal; it resumes from its checkpoint"
    )  # fmt: skip
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ...")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or args.num_processes < 1:
        parser.error("give -n N >= 1 and a command after --")
    if args.restarts < 0:
        print(f"error: --restarts must be >= 0, got {args.restarts}", file=sys.stderr)
        return 2
    code = launch(args.num_processes, command, args.port)
    for attempt in range(1, args.restarts + 1):
        if not restartable(code):
            break
        print(f"[launch] the job ended with status {code}; restarting it ({attempt} of "
              f"{args.restarts})", flush=True)  # fmt: skip
        code = launch(args.num_processes, command, args.port)
    return code


def restartable(code: int) -> bool:
    """Whether a job that ended with `code` is started again by ``--restarts``: a hang, or a
    process killed or crashed (not a preemption, which asked to stop, nor a user error).

    >>> [restartable(c) for c in (75, 137, 134, 143, 2, 1, 0)]
    [True, True, True, False, False, False, False]
    """
    return code == HANG or (code > 128 and code not in PREEMPTED)


if __name__ == "__main__":
    sys.exit(main())
