"""Several real processes on 127.0.0.1 (jax.distributed, gloo), each with its own CPU devices."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import train as cli
from jaxpar import UserError
from jaxpar.core.mesh import layout_names, make_mesh, parse_mesh
from jaxpar.tools.launch import gloo_report

ROOT = Path(__file__).resolve().parent.parent
RUN = ["--mesh", "2x2", "--log-every", "1", "--eval-every", "5", "--batch-size", "64"]


def launch(n, *args, timeout=300):
    """`python -m jaxpar.launch -n N -- python train.py ARGS`."""
    command = [sys.executable, "-m", "jaxpar.launch", "-n", str(n), "--"]
    command += [sys.executable, str(ROOT / "train.py"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def losses(workdir, after=0):
    lines = [json.loads(x) for x in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {
        (x["step"], k): x[k]
        for x in lines
        for k in ("train_loss", "eval_loss")
        if k in x and x["step"] > after
    }


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: the same run in this single process (4 of its 8 devices)."""
    workdir = tmp_path_factory.mktemp("one")
    assert cli.main([*RUN, "--steps", "14", "--workdir", str(workdir)]) == 0
    return losses(workdir)


def assert_same(got, want):
    assert got.keys() == want.keys() and len(want) > 5
    np.testing.assert_allclose([got[k] for k in want], list(want.values()), rtol=1e-6, atol=1e-7)


def start(args, env, cwd=ROOT):
    """`python train.py ARGS` in a new process with `env` added to this one's environment (job
    variables removed first)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "OMPI_"))}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args], env={**clean, **env}, cwd=cwd,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


@pytest.mark.slow
def test_a_slurm_job_forms_without_a_coordinator(one_process, tmp_path):
    """Two tasks with the environment srun gives each (JAX's SLURM detection reads it): no
    --coordinator, the same losses as one process."""
    job = str(os.getpid() % 4096)  # the coordinator's port: 61440 + job id mod 4096
    tasks = [
        start(
            [*RUN, "--steps", "14", "--workdir", str(tmp_path)],
            {
                "SLURM_JOB_ID": job,
                "SLURM_STEP_NODELIST": "localhost",
                "SLURM_NTASKS": "2",
                "SLURM_PROCID": str(i),
                "SLURM_LOCALID": str(i),
                "SLURM_STEP_NUM_NODES": "1",
            },
        )  # fmt: skip
        for i in range(2)
    ]
    outputs = [task.communicate(timeout=300) for task in tasks]
    assert [t.returncode for t in tasks] == [0, 0], [err[-2000:] for _, err in outputs]
    assert_same(losses(tmp_path), one_process)


@pytest.mark.slow
def test_a_missing_process_is_named_within_the_init_timeout(tmp_path):
    """Process 0 alone, and process 1 alone, of 2-process jobs: one line each, exit status 2,
    nothing written, within --init-timeout (plus start-up), instead of JAX's abort."""
    began = time.monotonic()
    lone = [
        start(
            ["--mesh", "2", "--init-timeout", "3", "--workdir", str(tmp_path / f"w{i}")],
            {
                "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{29300 + os.getpid() % 500 + i}",
                "JAX_NUM_PROCESSES": "2",
                "JAX_PROCESS_ID": str(i),
            },
        )  # fmt: skip
        for i in (0, 1)
    ]
    errors = [task.communicate(timeout=120)[1] for task in lone]
    assert time.monotonic() - began < 60
    assert [t.returncode for t in lone] == [2, 2], errors
    assert all(e.count("\n") == 1 for e in errors), errors
    assert errors[0].startswith("error: process 1 of 2 never arrived at 127.0.0.1:"), errors[0]
    assert "within --init-timeout 3 s" in errors[0]
    assert errors[1].startswith("error: process 0 of the job was not reachable"), errors[1]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_two_processes_give_the_losses_of_one_and_checkpoints_move_between_them(
    one_process, tmp_path
):
    two_then_one, one_then_two = tmp_path / "a", tmp_path / "b"
    assert launch(2, *RUN, "--steps", "8", "--workdir", str(two_then_one)).returncode == 0
    assert cli.main([*RUN, "--steps", "14", "--workdir", str(two_then_one)]) == 0
    assert_same(losses(two_then_one), one_process)  # steps 1-8 on two processes, 9-14 on one
    assert cli.main([*RUN, "--steps", "8", "--workdir", str(one_then_two)]) == 0
    # with 3 steps per dispatch: each process builds its rows of the stacked batches
    proc = launch(2, *RUN, "--steps", "14", "--steps-per-dispatch", "3",
                  "--workdir", str(one_then_two))  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "resumed from step 8" in proc.stdout
    assert "[p0] final test accuracy" in proc.stdout
    assert "[p1] final test accuracy" not in proc.stdout  # one voice: process 0 reports
    assert "2048 p1" in proc.stdout  # the mesh picture shows which process owns which device
    assert "Gloo" not in proc.stdout and "peer ranks" not in proc.stdout  # no connection chatter
    assert_same(losses(one_then_two, after=8), losses_after(one_process, 8))


def test_the_launcher_drops_gloos_connection_reports_and_keeps_the_rest():
    report = (
        "[Gloo] Rank 1 is connected to 3 peer ranks. Expected number of connected peer ranks is : 3"
    )
    assert gloo_report(report + "\n")
    # two threads of one process wrote their reports' pieces into each other's (seen for real)
    assert gloo_report("[Gloo] Rank [Gloo] Rank 1 is connected to 1 peer ranks. Expected number "
                       "of connected peer ranks is : 1\n")  # fmt: skip
    assert gloo_report("1 is connected to 1 peer ranks. 0 is connected to 1 peer ranks. Expected "
                       "number of connected peer ranks is : Expected number of connected peer "
                       "ranks is : 11\n")  # fmt: skip
    assert not gloo_report("step 11/20 train_loss 2.1280\n")
    assert not gloo_report("\n") and not gloo_report("12 34\n")
    assert not gloo_report(f"step 3/9 {report}\n")  # a line with more than gloo's is kept


def test_the_relay_drops_one_blank_line_after_gloos_report_and_keeps_the_rest(capsys):
    from jaxpar.tools.launch import relay

    report = "[Gloo] Rank 1 is connected to 1 peer ranks. Expected number of connected peer "
    lines = [f"{report}ranks is : 1\n", "\n", "\n", "step 1\n", "\n", "done\n"]
    relay(type("Proc", (), {"stdout": lines})(), "[p0]")
    assert capsys.readouterr().out == "[p0] \n[p0] step 1\n[p0] \n[p0] done\n"


def losses_after(table, step):
    return {k: v for k, v in table.items() if k[0] > step}


@pytest.mark.slow
def test_killed_process_ends_the_job_quickly(tmp_path):
    command = [sys.executable, "-m", "jaxpar.launch", "-n", "2", "--", sys.executable]
    command += [str(ROOT / "train.py"), "--mesh", "2", "--steps", "100000", "--log-every", "1"]
    launcher = subprocess.Popen(
        [*command, "--workdir", str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) > 5):
        assert time.time() < deadline and launcher.poll() is None, "the job did not start"
        time.sleep(0.1)
    children = children_of(launcher.pid)
    assert len(children) == 2
    killed = time.time()
    os.kill(children[1], signal.SIGKILL)
    out, _ = launcher.communicate(timeout=60)
    assert time.time() - killed < 60
    assert launcher.returncode == 128 + signal.SIGKILL
    assert "[launch] process 1 exited with status 137; stopping the others" in out


def children_of(pid: int) -> list[int]:
    """Process ids whose parent is `pid`, oldest first (from /proc, Linux)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[1]) == pid:  # fields: state, ppid, ...
            found.append(int(stat.parent.name))
    return sorted(found)


def test_hybrid_layout_needs_its_host_count():
    assert parse_mesh("hosts2-hybrid").dcn == (1, 2, 1, 1)
    # In this single process the two-host layout is refused with the reason.
    with pytest.raises(UserError, match="is for 2 hosts but this job has 1 process;"):
        make_mesh(parse_mesh("hosts2-hybrid"))


def test_model_parallel_across_hosts_is_refused(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("data = 2\nmodel = 4\n[dcn]\nmodel = 2\n")
    with pytest.raises(UserError, match="tensor parallelism across hosts"):
        parse_mesh(str(path))


@pytest.mark.slow
@pytest.mark.parametrize("layout", [n for n in layout_names() if parse_mesh(n).dcn])
def test_hybrid_layouts_train_on_their_hosts(layout, tmp_path):
    hosts = parse_mesh(layout).hosts
    args = ["--mesh", layout, "--steps", "2", "--batch-size", "32", "--workdir", str(tmp_path)]
    proc = launch(hosts, *args)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "[p0] final test accuracy" in proc.stdout


@pytest.mark.slow
def test_a_signal_to_one_process_saves_the_whole_job(tmp_path):
    # One pod evicted: SIGTERM reaches process 1 only. The processes agree on the step through
    # the train step itself, save one checkpoint together and all exit 143.
    args = ["--mesh", "2", "--steps", "400", "--log-every", "1", "--workdir", str(tmp_path)]
    command = [sys.executable, "-m", "jaxpar.launch", "-n", "2", "--", sys.executable]
    launcher = subprocess.Popen(
        [*command, str(ROOT / "train.py"), *args], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) > 20):
        assert time.time() < deadline and launcher.poll() is None, "the job did not start"
        time.sleep(0.1)
    os.kill(children_of(launcher.pid)[1], signal.SIGTERM)
    out, _ = launcher.communicate(timeout=120)  # a hang (the defect) fails here
    assert launcher.returncode == 128 + signal.SIGTERM, out[-3000:]
    stops = {line.split("at step ")[1].split(";")[0] for line in out.splitlines() if
             "preempted: stopped by signal 15 at step" in line}  # fmt: skip
    assert "[p0] preempted" in out and "[p1] preempted" in out, out[-3000:]
    (step,) = stops  # both processes stopped after the same step
    assert (tmp_path / "checkpoints" / step).is_dir()
    args[3] = str(int(step) + 2)  # resume for two more steps, not the rest of the 400
    proc = launch(2, *args)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert f"resumed from step {step}" in proc.stdout


@pytest.mark.slow
def test_the_job_writes_to_one_default_workdir(tmp_path):
    # Process 1's clock is 9 hours ahead (another time zone): its own name would differ.
    # FSDP: each process writes its own shards of the checkpoint.
    train_py = f"{sys.executable} {ROOT / 'train.py'} --mesh fsdp=2 --steps 3"
    command = [sys.executable, "-m", "jaxpar.launch", "-n", "2", "--", "sh", "-c"]
    command.append(f'[ "$JAX_PROCESS_ID" = 1 ] && export TZ=UTC-9; exec {train_py}')
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:]
    (workdir,) = (tmp_path / "runs").iterdir()
    assert (workdir / "checkpoints" / "3").is_dir()
    assert f"workdir {workdir.relative_to(tmp_path)}" in proc.stdout
    # the checkpoint is whole: one process resumes it
    assert cli.main(["--mesh", "2", "--steps", "4", "--workdir", str(workdir)]) == 0


@pytest.mark.slow
def test_the_launcher_relays_every_line():
    lines = 200_000
    command = [sys.executable, "-m", "jaxpar.launch", "-n", "2", "--", sys.executable, "-c"]
    command.append(f"for i in range({lines}): print(i)")
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0
    out = proc.stdout.splitlines()
    for p in ("[p0]", "[p1]"):
        assert sum(line.startswith(p) for line in out) == lines
        assert f"{p} {lines - 1}" in out


HUNG = ["--mesh", "2x2", "--steps", "40", "--log-every", "1", "--eval-every", "10",
        "--batch-size", "64", "--checkpoint-every", "10"]  # fmt: skip
TIMEOUT = 10  # --step-timeout: a step of this MLP takes milliseconds


@pytest.mark.slow
def test_a_frozen_process_ends_the_job_in_its_deadline_and_the_restart_resumes(tmp_path):
    """A node frozen (SIGSTOP to process 1) leaves process 0 waiting in the step's all-reduce:
    its watchdog writes every thread's stack and exits 75 within --step-timeout, not a C++ abort
    nor an endless wait; ``--restarts 1`` starts the job again, which resumes from its checkpoint
    and writes the uninterrupted run's metrics."""
    workdir, whole = tmp_path / "w", tmp_path / "whole"
    args = [*HUNG, "--step-timeout", str(TIMEOUT), "--workdir", str(workdir)]
    command = [sys.executable, "-m", "jaxpar.launch", "-n", "2", "--restarts", "1", "--",
               sys.executable, str(ROOT / "train.py"), *args]  # fmt: skip
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, cwd=ROOT)  # fmt: skip
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) > 16):
        assert time.time() < deadline and launcher.poll() is None, "the job did not start"
        time.sleep(0.05)
    os.kill(children_of(launcher.pid)[1], signal.SIGSTOP)
    frozen = time.time()
    out, _ = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, out[-3000:]
    (hang,) = workdir.glob("hang-p0-*.txt")
    assert hang.stat().st_mtime - frozen < TIMEOUT + 5  # the deadline, and the 0.5 s it polls
    text = hang.read_text()
    assert text.startswith("process 0 hung in step for ") and " in loop\n" in text, text[-3000:]
    assert f"[p0] error: process 0 hung in step for {TIMEOUT}s" in out, out[-3000:]
    assert "[launch] process 0 exited with status 75; stopping the others" in out
    assert "[launch] the job ended with status 75; restarting it (1 of 1)" in out
    assert "resumed from step " in out, out[-3000:]
    assert cli.main([*HUNG, "--workdir", str(whole)]) == 0  # the run never stopped, here
    assert_same(losses(workdir), losses(whole))


def test_the_launcher_restarts_on_the_watchdogs_status(capsys):
    from jaxpar.run.watchdog import HANG
    from jaxpar.tools import launch

    assert launch.HANG == HANG and launch.restartable(HANG)
    assert launch.main(["-n", "2", "--restarts", "-1", "--", "true"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --restarts must be >= 0, got -1\n"


@pytest.mark.parametrize("value", ["0", "-5"])
def test_a_step_timeout_must_be_positive(value, refuses):
    refuses(f"--step-timeout {value}", f"--step-timeout must be positive seconds, got {value}")
