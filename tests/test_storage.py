"""Workdirs on object storage (`jaxpar.run.storage`), against a local S3 server: moto's, started
on the loopback address for this module, with the environment a user sets (``AWS_*``)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import time

import pytest
from conftest import ROOT, assert_same_run, cli_run, crash_at, metrics, wait_for_lines

import train as cli
from jaxpar import Config
from jaxpar import train as train_run
from jaxpar.core.errors import Preempted
from jaxpar.run.checkpoint import main as list_checkpoints
from jaxpar.run.storage import COMMITTED, Remote
from jaxpar.tools.plot import main as plot

BUCKET = "runs"


@pytest.fixture(scope="module", autouse=True)
def mirrors(tmp_path_factory):
    """The local mirrors in the test's folder, not the user's cache."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("JAXPAR_MIRRORS", str(tmp_path_factory.mktemp("mirrors")))
        yield


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def made(fs, bucket: str, server=None):
    """`fs` with `bucket` created, once the server (a process, if given) answers."""
    for _ in range(100):
        try:
            fs.mkdir(bucket)
            return fs
        except Exception:  # noqa: BLE001 - not listening yet
            assert server is None or server.poll() is None, f"{server.args[0]} exited"
            time.sleep(0.1)
    raise AssertionError(f"the server never answered: {fs}")


@pytest.fixture(scope="module")
def s3():
    """A local S3 server (moto's), its bucket, and the environment pointing every process at it
    as a user's would (``AWS_*``); the filesystem to look at the store with."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        env.setenv("AWS_ACCESS_KEY_ID", "test")
        env.setenv("AWS_SECRET_ACCESS_KEY", "test")
        env.setenv("AWS_REGION", "us-east-1")
        try:
            yield made(Remote(f"s3://{BUCKET}/x").fs, BUCKET)
        finally:
            server.stop()


@pytest.fixture(scope="module")
def gcs():
    """A local Cloud Storage emulator (gcp-storage-emulator) and its bucket, reached as a user
    reaches one: ``STORAGE_EMULATOR_HOST``."""
    port = free_port()
    server = subprocess.Popen(
        ["gcp-storage-emulator", "start", "--host", "127.0.0.1", "--port", str(port),
         "--in-memory"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    with pytest.MonkeyPatch.context() as env:
        env.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
        # gcsfs asks Google's storage-control gRPC service a bucket's type: not in the emulator.
        env.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        try:
            yield made(Remote(f"gs://{BUCKET}/x").fs, BUCKET, server)
        finally:
            server.kill()
            server.wait()


def stored_metrics(fs, key: str) -> list[dict]:
    return [json.loads(x) for x in fs.cat(f"{key}/metrics.jsonl").decode().splitlines()]


def stored_steps(fs, key: str) -> list[str]:
    return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{key}/checkpoints"))


RUN = dict(model="mlp", batch_size=64, steps=12, log_every=1, eval_every=6,
           checkpoint_every=5, keep=2, mesh="2")  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference")
    train_run(Config.of(**RUN, workdir=str(workdir)))
    return metrics(workdir)


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_stopped_on_the_store_resumed_on_another_mesh_as_if_never_stopped(
    scheme, request, reference, monkeypatch, capsys
):
    """A SIGTERM saves and uploads; the mirror lost (another node), the run resumes from the
    store on another mesh with the uninterrupted run's losses; the store keeps --keep steps."""
    fs = request.getfixturevalue({"s3": "s3", "gs": "gcs"}[scheme])
    url, key = f"{scheme}://{BUCKET}/a", f"{BUCKET}/a"
    crash_at(monkeypatch, 7, signal.SIGTERM)
    with pytest.raises(Preempted, match=f"checkpoint saved in {url}/checkpoints/7;"):
        train_run(Config.of(**RUN, workdir=url))
    monkeypatch.undo()
    assert stored_steps(fs, key) == ["5", "7"]
    assert all(fs.exists(f"{key}/checkpoints/{s}/{COMMITTED}") for s in (5, 7))
    assert {"config.json", "metrics.jsonl", "events"} <= {p.rsplit("/")[-1] for p in fs.ls(key)}
    assert [x["step"] for x in stored_metrics(fs, key)][-1] == 7

    shutil.rmtree(Remote(url).mirror)
    train_run(Config.of(**{**RUN, "mesh": "2x2"}, workdir=url))
    out = capsys.readouterr().out
    assert f"resumed from step 7 (saved on mesh stage=1,data=2,fsdp=1,model=1) in {url}/" in out
    assert f"workdir {url}" in out
    assert_same_run(stored_metrics(fs, key), reference, after=0)
    assert stored_steps(fs, key) == ["10", "12"]  # --keep 2


@pytest.mark.slow
def test_a_step_without_its_marker_is_never_read_and_restart_moves_the_run_aside(
    s3, reference, capsys
):
    """An upload cut short (files, no marker) is not a checkpoint: the run resumes from the
    step before and uploads the step again. --restart moves the store's files aside."""
    url, key = f"s3://{BUCKET}/b", f"{BUCKET}/b"
    cfg = Config.of(**RUN, workdir=url)
    train_run(cfg)
    s3.rm(f"{key}/checkpoints/12/{COMMITTED}")  # as if killed while uploading step 12
    train_run(cfg)
    assert "resumed from step 10 " in capsys.readouterr().out
    assert s3.exists(f"{key}/checkpoints/12/{COMMITTED}")
    assert_same_run(stored_metrics(s3, key), reference, after=0)

    train_run(cfg.replace(restart=True))
    assert "--restart: moved the previous run to" in capsys.readouterr().out
    (previous,) = [p for p in s3.ls(key) if "previous-" in p]
    assert stored_steps(s3, previous) == ["10", "12"]
    assert s3.exists(f"{previous}/checkpoints/12/{COMMITTED}")
    assert_same_run(stored_metrics(s3, previous), reference, after=0)
    assert_same_run(stored_metrics(s3, key), reference, after=0)  # the new run, from step 0


@pytest.mark.slow
def test_kill_9_on_s3_resumes_from_the_last_uploaded_step(s3, tmp_path, reference):
    url, key = f"s3://{BUCKET}/c", f"{BUCKET}/c"
    flags = ["--mesh", "2", "--batch-size", "64", "--log-every", "1", "--eval-every", "6",
             "--checkpoint-every", "5", "--keep", "2"]  # fmt: skip
    long = [*flags, "--steps", "60", "--workdir", url]
    proc = cli_run(*long)
    wait_for_lines(Remote(url).mirror, 25, proc)
    proc.kill()
    proc.communicate()
    steps = [int(s) for s in stored_steps(s3, key)]
    complete = [s for s in steps if s3.exists(f"{key}/checkpoints/{s}/{COMMITTED}")]
    assert complete and complete[-1] % 5 == 0, steps
    whole = tmp_path / "whole"
    assert cli.main([*flags, "--steps", "60", "--workdir", str(whole)]) == 0
    proc = cli_run(*long)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert f"resumed from step {complete[-1]} " in out
    assert_same_run(stored_metrics(s3, key), metrics(whole), after=0)


@pytest.mark.slow
def test_checkpoint_and_plot_read_a_url(s3, tmp_path, capsys):
    url = f"s3://{BUCKET}/d"
    train_run(Config.of(**RUN, workdir=url))
    capsys.readouterr()
    assert list_checkpoints([url]) == 0
    out = capsys.readouterr().out
    assert "step 12: model mlp on digits" in out and f"{url}/checkpoints/12" in out
    assert plot([url, "-o", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").stat().st_size > 0


def docs_recipe(marker: str) -> str:
    """The shell block of docs/checkpoints.md that starts a server with `marker`."""
    text = (ROOT / "docs" / "checkpoints.md").read_text()
    return next(b for b in (c.split("```")[0] for c in text.split("```bash\n")[1:]) if marker in b)


@pytest.mark.slow
@pytest.mark.parametrize("marker", ["moto_server", "gcp-storage-emulator"])
def test_the_docs_server_recipes_work_as_pasted(marker, tmp_path):
    """Each recipe, pasted into a shell at the repository's root (nothing of the tests'
    servers or environment), trains its run on the server it starts."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "STORAGE_EMULATOR", "GCSFS_"))}  # fmt: skip
    env["JAXPAR_MIRRORS"] = str(tmp_path)
    script = "set -e\ntrap 'kill $(jobs -p) 2>/dev/null' EXIT\n" + docs_recipe(marker)
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    scheme = "s3" if marker == "moto_server" else "gs"
    assert f"workdir {scheme}://runs/first" in proc.stdout


def refused(argv: list[str], message: str, capsys) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


BAD = {
    "--workdir ftp://host/run": "unknown storage scheme ftp://; name a local folder, "
    "s3://BUCKET/PATH or gs://BUCKET/PATH",
    "--workdir s3://": "--workdir s3:// names no bucket",
    "--workdir s3://missing/run": "bucket missing does not exist at http://127.0.0.1:",
    "--workdir s3://runs/e --local-checkpoint-dir s3://runs/shm": "--local-checkpoint-dir "
    "s3://runs/shm: name a node-local folder",
    "--workdir s3://runs/e --init-from s3://runs/a": "--init-from s3://runs/a: reading a "
    "workdir on object storage is not supported yet",
    "--workdir s3://runs/e --model dbn:16 --pretrain-epochs 1": "--pretrain-epochs with a "
    "--workdir on object storage is not supported yet",
}  # fmt: skip


@pytest.mark.parametrize("flags", BAD)
def test_bad_storage_flags_exit_2_and_write_nothing(flags, s3, capsys):
    mirrors = sorted(os.listdir(os.environ["JAXPAR_MIRRORS"]))
    refused(flags.split(), BAD[flags], capsys)
    assert not s3.exists(f"{BUCKET}/e")
    assert sorted(os.listdir(os.environ["JAXPAR_MIRRORS"])) == mirrors


def test_an_unreachable_store_or_no_credentials_exit_2_within_seconds(s3, monkeypatch, capsys):
    url = f"s3://{BUCKET}/f"
    mirror = Remote(url).mirror
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    start = time.time()
    refused(["--workdir", url, "--steps", "1"], f"cannot reach bucket {BUCKET} at {dead}", capsys)
    assert time.time() - start < 30  # bounded retries, not minutes
    monkeypatch.undo()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    refused(["--workdir", url, "--steps", "1"], "no AWS credentials found; set "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY", capsys)  # fmt: skip
    assert not mirror.exists()
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "/nonexistent.json")
    refused(["--workdir", f"gs://{BUCKET}/f", "--steps", "1"], "no Google credentials found; "
            "run `gcloud auth application-default login`", capsys)  # fmt: skip
