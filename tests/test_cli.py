"""The real entry point, end to end, and its refusals."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import train as cli
from jaxpar.core.mesh import layout_names, parse_mesh
from jaxpar.run.config import Config
from jaxpar.run.distributed import CLUSTERS, detect_cluster, job_size
from jaxpar.tools.plan import plan

ROOT = Path(__file__).resolve().parent.parent


def run(*args, cwd=None):
    """`python train.py ARGS` in a fresh process (so it picks its own device count)."""
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


def read_metrics(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_default_run_reaches_95_percent_on_2x2(tmp_path):
    proc = run("--mesh", "2x2", "--workdir", str(tmp_path / "w"))
    assert proc.returncode == 0, proc.stderr
    assert "mesh stage=1 x data=2 x fsdp=1 x model=2 (4 cpu devices)" in proc.stdout
    assert "final test accuracy" in proc.stdout
    lines = read_metrics(tmp_path / "w")
    for line in lines:
        assert isinstance(line["step"], int) and line["time"] >= 0
        assert {"train_loss", "examples_per_s"} <= line.keys() or {
            "eval_loss",
            "eval_accuracy",
        } <= line.keys()
    evals = [x for x in lines if "eval_accuracy" in x]
    assert len(evals) == 30  # one per epoch
    assert evals[-1]["step"] == 330 and evals[-1]["eval_accuracy"] >= 0.95
    config = json.loads((tmp_path / "w" / "config.json").read_text())
    assert config["parallelism"]["mesh"] == "2x2" and config["optimization"]["batch_size"] == 128


@pytest.mark.slow
@pytest.mark.parametrize("layout", [n for n in layout_names() if not parse_mesh(n).dcn])
def test_every_layout_trains(layout, tmp_path):
    """Single-host layouts; the multi-host ones run in test_multiprocess.py. Layouts with
    pipeline stages train a ViT (the MLP cannot pipeline)."""
    model = ["--model", "vit-tiny"] if parse_mesh(layout).stage > 1 else []
    args = ["--mesh", layout, *model, "--steps", "3", "--batch-size", "32"]
    assert cli.main([*args, "--workdir", str(tmp_path)]) == 0  # in this process: 8 devices
    assert read_metrics(tmp_path)[-1]["step"] == 3


BAD = {
    "--mesh 2x": "invalid mesh '2x'",
    "--mesh 0x4": "positive integer",
    "--mesh abc": "unknown mesh layout 'abc'",
    "--mesh data=2,foo=2": "unknown axis 'foo'",
    "--mesh nolayout": "unknown mesh layout 'nolayout'",
    "--mesh 16": "needs 16 devices",
    "--mesh 3x1 --batch-size 128": "not divisible by the 3 batch shards",
    "--model resnet7": "unknown model 'resnet7'",
    "--dataset nope": "unknown dataset 'nope'",
    "--batch-size 0": "--batch-size must be at least 1",
    "--lr -1": "--lr must be positive",
    "--epochs -3": "--epochs must be at least 1",
    "--data-dir /no/such/dir": "data directory /no/such/dir does not exist",
    "--data-dir /": "--data-dir with --dataset digits: that dataset is built in and reads no files",
    "--dataset synthetic:8x8x1:4 --data-dir /": "--data-dir with --dataset synthetic:8x8x1:4: that",
    "--optimizer lamb": "invalid choice: 'lamb'",
    "--batch-size 4096": "larger than the 1437 training examples",
    "--steps-per-dispatch 0": "--steps-per-dispatch must be at least 1",
    "--data-workers -1": "--data-workers must be >= 0, got -1",
    "--resize-sources": "--resize-sources goes with a mixture",
    "--clients 4 --data-workers 2": "--clients N with --data-workers N is not supported: a round",
    "--init-timeout 0": "--init-timeout must be positive, got 0",
    "--dry-run --project h100x0": "--project 'h100x0': chips per node and nodes must be at least 1",
    "--dry-run --project unknown-chip": "expected CHIP[xN][:nodes=K], CHIP one of a100, h100",
    "--project h100": "--project goes with --dry-run",
    "--json": "--json goes with --dry-run",
    # distillation
    "--teacher /no/such/run": "--teacher /no/such/run has no checkpoints/ folder",
    "--teacher /tmp --distill-temperature 0": "--distill-temperature must be positive, got 0.0",
    "--teacher /tmp --distill-weight 2": "--distill-weight must be in [0, 1], got 2.0",
    # pruning
    "--prune-to -0.1": "--prune-to must be a sparsity in [0, 1), got -0.1",
    "--prune-to 1.5": "--prune-to must be a sparsity in [0, 1), got 1.5",
    "--prune-end 5": "--prune-end goes with --prune-to",
    "--eval-examples -1": "--eval-examples must be >= 0, got -1",
    "--prune-to 0.5 --prune-start 2": "--prune-start 2 is not before the run's end at step 2",
    "--prune-to 0.5 --prune-start 8 --prune-end 4": "--prune-end 4 must come after --prune-start 8",
    # federated learning
    "--clients 0": "--clients must be at least 1, got 0",
    "--clients 5 --clients-per-round 6": "--clients-per-round 6 must be between 1 and --clients 5",
    "--clients 5 --partition shards:0": "--partition shards:0: use iid, shards:K",
    "--clients 5 --partition dirichlet:-1": "--partition dirichlet:-1: use iid",
    "--clients 5 --partition zipf": "--partition zipf: use iid",
    "--clients 200 --partition dirichlet:0.05": "with no example of the 1437; use fewer --clients",
    "--clients 5 --dp-clip 0": "--dp-clip must be positive (a norm), got 0.0",
    "--clients 5 --server-optimizer fedsgd2": "unknown --server-optimizer 'fedsgd2'; choose from",
    "--rounds 3": "--rounds goes with --clients (federated learning)",
    "--partition zipf": "--partition goes with --clients (federated learning)",
    "--clients 4 --model resnet8": "BatchNorm would normalise over the padding",
    "--clients 4 --dry-run --project h100x1": "--project does not model federated rounds",
    "--clients 4 --mesh fsdp=2": "--clients spreads clients over the data axis only",
    "--dry-run --project h100x8 --mesh 4": "--mesh 4 has 4 devices but --project h100x8 has 8",
    "--seed -1": "--seed must be in [0, 2**32)",
    "--seed 4294967296": "--seed must be in [0, 2**32)",
    # decided from the mesh's sizes, before any device is emulated
    "--mesh 20000": "not divisible by the 20000 batch shards (stage x data x fsdp); use a multiple",
    "--mesh 4096 --batch-size 4096": "at most 2048 CPU devices are emulated per process",
    "--mesh hosts2-hybrid": "rehearse it on one machine with python -m jaxpar.launch -n 2 --",
    "--schedule cosine --warmup-steps 10": "--warmup-steps 10 leaves no step of the cosine decay",
    "--model vit-lite --patch-size 5": "--patch-size 5 does not divide the 8x8 image; use one of",
    "--model vit-huge": "unknown model 'vit-huge'",
    "--patch-size 2": "--patch-size applies to the ViT models only",
    "--remat sometimes": "invalid choice: 'sometimes'",
    "--grad-accum 0": "--grad-accum must be at least 1",
    "--grad-accum 3 --batch-size 128": "--grad-accum 3 does not split the batch of 128",
    "--grad-accum 32 --mesh 8": "microbatches of 4, which do not divide over the 8 batch shards",
    # pipelines
    "--model vit-lite --mesh stage=2": "vit-lite has 7 blocks, which do not split into 2 stages",
    "--model vit-tiny --mesh stage=2 --microbatches 3": "--microbatches 3 is not a multiple of",
    "--model vit-tiny --mesh stage=2 --microbatches 6 --batch-size 64": "--microbatches 6 does "
    "not divide the batch of 64",
    "--model vit-tiny --mesh stage=2,data=4 --microbatches 32 --batch-size 64": "makes "
    "microbatches of 2, which do not divide over the 4 batch shards",
    "--model vit-tiny --mesh stage=4 --pipeline circular:2": "12 blocks, which do not split "
    "into 4 stages x 2 trips",
    "--model vit-tiny --pipeline circular:0": "--pipeline circular:0: use gpipe, or circular:R",
    "--model resnet18 --mesh stage=2": "a pipeline (stage=2 in the mesh) with --model resnet18 "
    "is not supported: its layers are not uniform",
    "--microbatches 4": "a pipeline (--microbatches 4) with --model mlp is not supported",
    "--model mlp --pipeline circular:2": "a pipeline (--pipeline circular:2) with --model mlp",
    "--lr inf": "--lr must be positive and finite, got inf",
    # values that start with a dash reach jaxpar's own checks (argparse took them for flags)
    "--profile-steps -1:3": "--profile-steps must be A:B with 0 <= A < B, got '-1:3'",
    "--lr -1e-3": "--lr must be positive and finite, got -0.001",
    "--mesh /": "mesh layout path / is a directory, not a .toml file",
    "--weight-decay inf": "--weight-decay must be a finite number >= 0, got inf",
    "--microbatches -1": "--microbatches must be >= 0",
    # low-communication data parallelism
    "--sync local:0": "--sync local:0: use every-step, local:H or diloco:H with H >= 1",
    "--sync diloco:x": "--sync diloco:x: use every-step",
    "--sync sometimes": "--sync sometimes: use every-step",
    "--sync stale:-1": "--sync stale:-1: use every-step",
    "--outer-lr -1": "--outer-lr must be positive",
    "--outer-lr 0.5": "--outer-lr and --outer-momentum go with --sync diloco:H",
    "--outer-momentum 0.5 --sync local:2": "--outer-lr and --outer-momentum go with --sync",
    "--distill-weight 0.5": "--distill-temperature and --distill-weight go with --teacher",
    "--clients 4 --schedule cosine": "--schedule and --warmup-steps do not apply to federated",
    # optimizers and the training features around them
    "--optimizer rmsprop": "invalid choice: 'rmsprop'",
    "--optimizer adamw --momentum 0.5": "--momentum is SGD's; --optimizer adamw keeps its own",
    "--optimizer adam --weight-decay 0.01": "--optimizer adam has no weight decay; use --optimizer",
    "--clip-grad-norm 0": "--clip-grad-norm must be positive and finite, got 0.0",
    "--label-smoothing 1": "--label-smoothing must be in [0, 1), got 1.0",
    "--ema 1": "--ema must be a decay in [0, 1), got 1.0",
    "--ema 0.99 --sync local:2 --mesh 2": "--sync local:H with --ema DECAY is not supported",
    "--ema 0.99 --prune-to 0.5": "--prune-to S with --ema DECAY is not supported",
    "--clients 4 --optimizer adamw": "--optimizer does not apply to federated runs (--clients)",
    "--clients 4 --clip-grad-norm 1": "--clip-grad-norm does not apply to federated runs",
    "--clients 4 --label-smoothing 0.1": "--label-smoothing does not apply to federated runs",
    "--sync local:8 --mesh 1": "the mesh has data=1: nothing to average",
    "--model vit-tiny --mesh stage=2,data=2 --sync diloco:2": "--sync diloco:H with a pipeline",
    # combinations the matrix refuses (jaxpar.modes.compose; every cell in tests/test_compose.py)
    "--prune-to 0.5 --sync local:2 --mesh 2": "--sync local:H with --prune-to S is not supported",
    "--prune-to 0.5 --freeze backbone": "--prune-to S with --freeze backbone is not supported",
    "--clients 4 --model vit-tiny --microbatches 2": "--clients N with a pipeline (--microbatches",
    "--clients 4 --model vit-tiny --pipeline circular:2": "with a pipeline (--pipeline circular:2)",
}


@pytest.mark.parametrize("args", BAD)
def test_bad_input_exits_2_with_one_line(args, tmp_path, capsys):
    workdir = tmp_path / "w"
    with pytest.raises(SystemExit) as exit_:
        sys.exit(cli.main([*args.split(), "--steps", "2", "--workdir", str(workdir)]))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and BAD[args] in err, err
    assert not workdir.exists()


@pytest.mark.slow
def test_bad_input_in_a_real_process_has_no_traceback(tmp_path):
    proc = run("--mesh", "2x", "--workdir", str(tmp_path / "w"))
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: invalid mesh '2x'") and "Traceback" not in proc.stderr


OWN_MODEL = """
from flax import nnx

class Tiny(nnx.Module):
    def __init__(self, image_shape, num_classes, *, dtype=None, rngs):
        size = 1
        for n in image_shape:
            size *= n
        self.dense = nnx.Linear(size, num_classes, rngs=rngs)

    def __call__(self, images, train=False, rngs=None):
        return self.dense(images.reshape(len(images), -1))
"""
OWN_DATA = """
import numpy as np
from jaxpar.data import Dataset

def load(name, data_dir):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(96, 4, 4, 1)).astype(np.float32)
    labels = (images.mean(axis=(1, 2, 3)) > 0).astype(np.int32)
    return Dataset(name, images[:64], labels[:64], images[64:], labels[64:], num_classes=2)
"""


@pytest.mark.slow
def test_another_optimizer_than_a_recipes_drops_the_recipes_weight_decay():
    """The ViT recipe's decay (0.05) was tuned for AdamW; Adam has none (once a refusal of a
    flag the user never gave), and SGD's is coupled. The rest of the recipe stays."""
    cfg = cli.parse_args(["--model", "vit-lite", "--optimizer", "adam"]).validate()
    assert (
        cfg.optimization.optimizer,
        cfg.optimization.weight_decay,
        cfg.optimization.lr,
        cfg.optimization.schedule,
    ) == ("adam", 0.0, 1e-3, "cosine")
    cfg = cli.parse_args(["--model", "vit-lite", "--optimizer", "adamw"])
    assert cfg.optimization.weight_decay == 0.05


def test_own_model_and_dataset_by_module_name_beside_a_models_package_of_ones_own(tmp_path):
    """A project with its own ``models/`` package (which once shadowed jaxpar's) trains its own
    model on its own data by ``module:attribute`` names, and resumes them from the checkpoint."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text("raise ImportError('the user models')\n")
    (tmp_path / "mynets.py").write_text(OWN_MODEL)
    (tmp_path / "mydata.py").write_text(OWN_DATA)
    args = ["--model", "mynets:Tiny", "--dataset", "mydata:load", "--batch-size", "16",
            "--mesh", "2", "--workdir", "w"]  # fmt: skip
    first = run(*args, "--steps", "2", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    resumed = run(*args, "--steps", "4", cwd=tmp_path)
    assert resumed.returncode == 0 and "resum" in resumed.stdout + resumed.stderr, resumed.stderr
    assert [r["step"] for r in read_metrics(tmp_path / "w") if "eval_loss" in r][-1] == 4
    # The shadowing case: the project's folder first on the path (python -c, or -m, there).
    code = "import jaxpar.run.loop, jaxpar.tools.predict"
    imported = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                              text=True, timeout=300)  # fmt: skip
    assert imported.returncode == 0, imported.stderr
    wrong = run("--model", "mynets:Huge", "--steps", "2", "--workdir", "x", cwd=tmp_path)
    assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1, wrong.stderr
    assert "unknown model 'mynets:Huge' (AttributeError" in wrong.stderr


def test_paths_that_are_files_are_refused_before_anything_is_written(tmp_path, capsys):
    file = tmp_path / "file"
    file.write_text("not a directory\n")
    cases = {
        ("--workdir", str(file / "sub")): f"cannot be created: {file} is a file, not a directory",
        ("--workdir", str(file / "a" / "b")): f"{file} is a file, not a directory",
        ("--data-dir", str(file)): f"--data-dir {file} is a file, not a directory",
    }
    for args, words in cases.items():
        workdir = () if args[0] == "--workdir" else ("--workdir", str(tmp_path / "w"))
        assert cli.main([*args, *workdir, "--steps", "1"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and words in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing written
    assert file.read_text() == "not a directory\n"
    # checked by Config.validate, before the run starts (jaxpar.run.workdir refuses it only later)
    with pytest.raises(cli.UserError, match=f"--workdir {file} is a file; name a directory"):
        cli.Config.of(workdir=str(file)).validate()


JOB_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_COORDINATOR_PORT",
           *(v for names in CLUSTERS.values() for v in names))  # fmt: skip


@pytest.mark.parametrize(
    "args, env, words",
    [
        ("--num-processes 2 --process-id 1", {}, "--num-processes 2 needs --coordinator HOST:PORT"),
        ("--num-processes 3", {}, "python -m jaxpar.launch -n 3 -- python train.py"),
        ("--process-id 1", {}, "--process-id 1 needs --num-processes N and --coordinator"),
        ("", {"JAX_NUM_PROCESSES": "2"}, "JAX_NUM_PROCESSES=2 needs --coordinator HOST:PORT"),
        ("--num-processes 1 --process-id 1", {}, "must be 0 in a single-process run"),
        ("--num-processes -1", {}, "--num-processes -1: the process count must be at least 1"),
    ],
)
def test_process_flags_without_a_coordinator_are_refused(args, env, words, tmp_path, capsys,
                                                         monkeypatch):  # fmt: skip
    for name in JOB_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    workdir = tmp_path / "w"
    assert cli.main([*args.split(), "--steps", "1", "--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and words in err, err
    assert "JAX_COORDINATOR_ADDRESS" in err or "single-process" in err or "at least 1" in err
    assert not workdir.exists()


SLURM_TASK = {"SLURM_NTASKS": "4", "SLURM_JOB_ID": "8195", "SLURM_STEP_NODELIST": "gpu[007-010]",
              "SLURM_PROCID": "2", "SLURM_LOCALID": "0", "SLURM_STEP_NUM_NODES": "4"}  # fmt: skip
OMPI_TASK = {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1",
             "OMPI_COMM_WORLD_LOCAL_RANK": "1",
             "OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1,10.148.0.1:34911"}  # fmt: skip


@pytest.mark.parametrize(
    "env, detected",
    [  # JAX's port: the job id mod 4096, above 61439 (Open MPI: the job id / 4096 first)
        (SLURM_TASK, ("gpu007:61443", 4, 2, [0])),
        (OMPI_TASK, ("10.96.0.1:62624", 2, 1, [1])),
    ],
)
def test_slurm_and_open_mpi_tasks_are_detected(env, detected, monkeypatch):
    """What JAX's cluster detection makes of a task's environment (a real 2-process SLURM job:
    tests/test_multiprocess.py)."""
    for name in JOB_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert job_size() == (None, detected[1], None)
    assert tuple(detect_cluster()) == detected


@pytest.mark.parametrize("env", [SLURM_TASK, OMPI_TASK])
def test_a_partial_cluster_environment_is_refused_in_one_line(env, monkeypatch, tmp_path, capsys):
    """SLURM_NTASKS alone is what an allocation gives a script run outside srun."""
    for name in JOB_ENV:
        monkeypatch.delenv(name, raising=False)
    count = next(iter(env))
    monkeypatch.setenv(count, env[count])
    assert cli.main(["--steps", "1", "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    starter = "srun" if count.startswith("SLURM") else "mpirun"
    assert err.count("\n") == 1 and f"{count}={env[count]} makes this one of" in err, err
    assert f"start every task with {starter}" in err and "are not set" in err, err
    assert not (tmp_path / "w").exists()


def test_one_process_flags_are_a_single_process_run(monkeypatch):
    from jaxpar.run.distributed import job_size

    for name in JOB_ENV:
        monkeypatch.delenv(name, raising=False)
    assert job_size(None, 1, 0) == job_size() == (None, 1, None)
    for name, value in SLURM_TASK.items():  # JAX finds the coordinator under SLURM
        monkeypatch.setenv(name, value)
    assert job_size(None, 4, 2) == (None, 4, None)


@pytest.mark.slow
def test_a_huge_mesh_is_refused_at_once_in_a_real_process(tmp_path):
    """20,000 emulated CPU devices took over 5 minutes and 2.6 GB before failing."""
    start = time.time()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--mesh", "20000", "--batch-size", "20000"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )  # fmt: skip
    assert proc.returncode == 2 and time.time() - start < 60
    assert proc.stderr.startswith("error: the mesh needs 20000 devices in this process, but at "
                                  "most 2048 CPU devices are emulated"), proc.stderr  # fmt: skip
    assert proc.stderr.count("\n") == 1 and "python -m jaxpar.launch -n 10 --" in proc.stderr
    assert list(tmp_path.iterdir()) == []  # no runs/ folder


# What the survivor of a 2-process CPU job got when its peer was killed with SIGKILL (jax 0.10.2)
# during a step and during a checkpoint's barrier (there Orbax raises a ValueError).
PEER_DIED = [
    "UNKNOWN: Gloo all-reduce failed: [external/gloo/gloo/transport/tcp/pair.cc:538] Read error "
    "[127.0.0.1]:4785: Connection reset by peer",
    "UNKNOWN: Gloo AllGather failed: [external/gloo/gloo/transport/tcp/pair.cc:547] Connection "
    "closed by peer [127.0.0.1]:37586",
    "UNAVAILABLE: Task 1 heartbeat timeout. This indicates that the remote task has failed, got "
    "preempted, or crashed unexpectedly.",
    "INTERNAL: NCCL operation ncclAllReduce(...) failed: remote process exited or there was a "
    "network error",
]
NOT_PEERS = [
    "Profile has already been started. Only one profile may be run at a time.",
    "No profile started",
    "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1073741824 bytes.",
    "INTERNAL: Failed to execute XLA Runtime executable: run time error: custom call failed",
    "[Errno 104] Connection reset by peer",  # e.g. a remote filesystem, not a collective
]


def test_collective_failures_are_told_from_other_errors():
    from jaxpar.run.distributed import peer_lost

    for message in PEER_DIED:
        assert peer_lost(RuntimeError(message)), message
    for message in NOT_PEERS:
        assert not peer_lost(RuntimeError(message)), message
    try:  # a collective's error re-raised by a library as another kind keeps its cause
        try:
            raise RuntimeError(PEER_DIED[1])
        except RuntimeError as e:
            raise ValueError("checkpoint save failed") from e
    except ValueError as e:
        assert peer_lost(e)


@pytest.mark.parametrize("message", [PEER_DIED[0], NOT_PEERS[0]])
def test_multiprocess_errors_other_than_collectives_keep_their_traceback(
    message, tmp_path, capsys, monkeypatch
):
    import jaxpar.run.loop

    def fail(cfg):
        raise jax.errors.JaxRuntimeError(message)

    monkeypatch.setattr(jaxpar.run.loop, "train", fail)
    monkeypatch.setattr(jax, "process_count", lambda: 2)  # as in a job's process
    argv = ["--steps", "1", "--workdir", str(tmp_path / "w")]
    if message in PEER_DIED:
        assert cli.main(argv) == 1
        err = capsys.readouterr().err
        assert err == f"error: a collective failed; another process of the job probably died " \
                      f"({message})\n"  # fmt: skip
    else:
        with pytest.raises(RuntimeError, match="Profile has already been started"):
            cli.main(argv)


@pytest.mark.slow
def test_used_workdir_is_never_overwritten(tmp_path):
    """A workdir whose run saved nothing starts over, its files moved aside, not overwritten."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "time": 0.0}\n')
    assert cli.main(["--steps", "1", "--workdir", str(tmp_path)]) == 0
    (moved,) = tmp_path.glob("previous-*")
    assert (moved / "metrics.jsonl").read_text() == '{"step": 1, "time": 0.0}\n'
    assert read_metrics(tmp_path)[0]["step"] == 1 and "train_loss" in read_metrics(tmp_path)[0]


@pytest.mark.slow
def test_help_lists_every_flag_with_default():
    proc = run("--help")
    assert proc.returncode == 0
    for flag in ["--mesh", "--model", "--dataset", "--data-dir", "--epochs", "--steps",
                 "--batch-size", "--optimizer", "--lr", "--momentum", "--weight-decay", "--seed",
                 "--workdir", "--precision", "--checkpoint-every", "--eval-every"]:  # fmt: skip
        assert flag in proc.stdout
    words = " ".join(proc.stdout.split())  # argparse wraps the help to the terminal's width
    assert "(default: 128)" in words and "(default: 0.01)" in words
    # grouped by concern, each flag under its group's heading
    headings = [x[:-1] for x in proc.stdout.splitlines() if x.endswith(":") and x[0] != " "]
    assert headings[1:] == [cli.title(s) for s in cli.FLAGS], headings
    section = proc.stdout.split("[parallelism] mesh and parallelism:")[1].split("\n[model]:")[0]
    assert "--sync" in section and "--microbatches" in section and "--lr " not in section


@pytest.mark.slow
def test_an_evaluation_before_the_first_logged_window_prints_the_loss_so_far(tmp_path, capsys):
    args = ["--steps", "4", "--log-every", "4", "--eval-every", "2", "--mesh", "1"]
    assert cli.main([*args, "--workdir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.split("step 2/4 ")[1].split("train_loss ")[1].split()[0]
    assert 0 < float(printed) < 10, printed  # the mean of steps 1-2, not nan (no window yet)


@pytest.mark.slow
def test_freezing_a_random_backbone_is_noted(tmp_path, capsys):
    args = ["--steps", "1", "--freeze", "backbone", "--mesh", "1", "--workdir", str(tmp_path)]
    assert cli.main(args) == 0
    assert "note: --freeze backbone without --init-from" in capsys.readouterr().out


@pytest.mark.slow
def test_bf16_trains_as_well_as_fp32(tmp_path, capsys):
    assert cli.main(["--precision", "bf16", "--mesh", "2x2", "--workdir", str(tmp_path)]) == 0
    assert read_metrics(tmp_path)[-1]["eval_accuracy"] >= 0.95  # fp32 reaches 0.98 (above)


# float32 parameters and optimizer moments, uint32 RNG keys, optax's int32 step count
STATE_DTYPES = {"float32", "uint32", "int32"}


@pytest.mark.slow
def test_bf16_computes_matmuls_in_bf16_and_keeps_fp32_parameters():

    from jaxpar import Config
    from jaxpar.data import train_batches
    from jaxpar.run.setup import setup

    run = setup(Config.of(precision="bf16", mesh="2"))
    state = run.init()
    assert {x.dtype.name for x in jax.tree.leaves(run.abstract)} <= STATE_DTYPES
    batch = next(train_batches(run.ds, 128, 0, range(1), run.mesh))
    # The program jaxpar asks for (the CPU compiler then upcasts bf16 dots; GPUs run them).
    program = run.train_step.lower(state, batch).as_text()
    dots = [line for line in program.splitlines() if "dot_general" in line]
    assert dots and all("bf16" in line for line in dots)


@pytest.mark.slow
def test_bf16_resnet_convolves_in_bf16_and_keeps_fp32_statistics():
    from jaxpar import Config
    from jaxpar.data import train_batches
    from jaxpar.run.setup import setup

    run = setup(
        Config.of(model="resnet8", dataset="synthetic:8x8x3:10", precision="bf16", mesh="2")
    )
    state = run.init()
    batch = next(train_batches(run.ds, 16, 0, range(1), run.mesh))
    program = run.train_step.lower(state, batch).as_text().splitlines()
    convs = [line for line in program if "convolution" in line]
    assert convs and all("bf16" in line for line in convs)

    def stats(state):  # BatchNorm's running mean and variance, by path
        leaves = jax.tree_util.tree_leaves_with_path(state[0])
        return {str(p): np.asarray(x) for p, x in leaves if p[-1].key in ("mean", "var")}

    before = stats(state)
    state, metrics = run.train_step(state, batch)
    after = stats(state)
    assert np.isfinite(float(metrics["train_loss"]))
    assert before and {x.dtype.name for x in after.values()} == {"float32"}
    assert all(not np.array_equal(before[k], after[k]) for k in before)  # updated, in float32
    assert {x.dtype.name for x in jax.tree.leaves(state)} <= STATE_DTYPES
    # Activations leave BatchNorm in bf16: half the bytes between layers (benchmarks/gpu.py).
    from flax import nnx

    from jaxpar.models import MODELS

    net = MODELS["resnet8"]((8, 8, 3), 10, dtype=jax.numpy.bfloat16, rngs=nnx.Rngs(0))
    y = net.stem_bn(net.stem(np.ones((2, 8, 8, 3), np.float32)), use_running_average=False)
    assert y.dtype.name == "bfloat16" and net.stem_bn.mean.dtype.name == "float32"


def test_xla_flags_respect_the_user(monkeypatch):
    import jaxpar.core.mesh as mesh

    def installed(cuda: bool, cpu: bool, user: str):
        found = lambda n: n if cuda and "cuda12" in n else None  # noqa: E731
        monkeypatch.setattr(mesh.importlib.util, "find_spec", found)
        monkeypatch.setattr(mesh, "cpu_platform_expected", lambda: cpu)
        monkeypatch.setenv("XLA_FLAGS", user)
        mesh.set_xla_flags()
        return os.environ["XLA_FLAGS"]

    gpu, cpu = mesh.GPU_XLA_FLAGS[0], mesh.CPU_XLA_FLAGS[0]
    assert installed(True, False, "--xla_dump_to=/tmp/x") == f"--xla_dump_to=/tmp/x {gpu}"
    assert installed(False, True, "--xla_dump_to=/tmp/x") == f"--xla_dump_to=/tmp/x {cpu}"
    assert installed(True, True, "") == f"{gpu} {cpu}"  # e.g. JAX_PLATFORMS=cpu beside CUDA
    for flag in (gpu, cpu):  # the user's own value wins, matched flag by flag
        mine = flag.replace("true", "false")
        assert installed(True, True, mine) == " ".join([mine, *{gpu, cpu} - {flag}])
    assert installed(False, True, f"--xla_dump_to=/tmp/{cpu[2:]}") == (
        f"--xla_dump_to=/tmp/{cpu[2:]} {cpu}"
    )  # a path that holds a flag's name is not that flag


@pytest.mark.slow
def test_grad_accum_is_a_memory_knob_not_a_change_of_the_run(tmp_path):
    # the MLP's dropout draws from each example's key: 4 microbatches give the same losses
    losses = {}
    for k in (1, 4):
        args = ["--mesh", "2x2", "--steps", "6", "--log-every", "1", "--batch-size", "64"]
        assert cli.main([*args, "--grad-accum", str(k), "--workdir", str(tmp_path / str(k))]) == 0
        losses[k] = [x["train_loss"] for x in read_metrics(tmp_path / str(k)) if "train_loss" in x]
    assert len(losses[1]) == 6 and np.ptp(losses[1]) > 1e-3
    np.testing.assert_allclose(losses[4], losses[1], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_remat_and_grad_accum_lower_the_planned_peak_memory():
    peak = {
        flags: plan(Config.of(mesh="1", model="vit-lite", batch_size=128, **dict(flags)))[
            "per_device"
        ]["compiled_peak"]
        for flags in ((), (("remat", "block"),), (("grad_accum", 4),))
    }
    plain = peak[()]
    assert peak[(("remat", "block"),)] < 0.8 * plain
    assert peak[(("grad_accum", 4),)] < 0.8 * plain


@pytest.mark.slow
def test_vit_learns_the_digits_with_its_recipe(tmp_path):
    # only --model: the ViT recipe (AdamW, warmup, cosine) and the default patch (4 on 8x8)
    args = ["--model", "vit-lite", "--mesh", "1", "--steps", "66"]
    assert cli.main([*args, "--eval-every", "66", "--workdir", str(tmp_path)]) == 0
    config = json.loads((tmp_path / "config.json").read_text())["optimization"]
    assert (config["optimizer"], config["schedule"], config["lr"]) == ("adamw", "cosine", 1e-3)
    assert config["warmup_steps"] == 6  # a tenth of a short run
    assert read_metrics(tmp_path)[-1]["eval_accuracy"] >= 0.95


@pytest.mark.slow
def test_evaluation_can_be_limited_to_a_fixed_subset_or_left_out(tmp_path, capsys):
    """--eval-examples N: the first N test examples, the same on every mesh; 0: no evaluation
    (a 3-step fine-tune once spent 586 s evaluating 10,000 images after 18 s of training)."""
    args = ["--steps", "4", "--batch-size", "32", "--eval-every", "2", "--eval-examples", "50"]
    evals = {}
    for mesh in ("1", "2x2"):
        assert cli.main([*args, "--mesh", mesh, "--workdir", str(tmp_path / mesh)]) == 0
        evals[mesh] = [x for x in read_metrics(tmp_path / mesh) if "eval_loss" in x]
    assert [x["step"] for x in evals["1"]] == [2, 4]
    for a, b in zip(evals["1"], evals["2x2"], strict=True):
        assert a["eval_accuracy"] == b["eval_accuracy"]  # counts of 50 examples: exact
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-5)
        assert round(a["eval_accuracy"] * 50, 6) == int(round(a["eval_accuracy"] * 50))
    whole = tmp_path / "whole"
    assert cli.main([*args[:6], "--workdir", str(whole)]) == 0
    assert [x["eval_loss"] for x in read_metrics(whole) if "eval_loss" in x] != [
        x["eval_loss"] for x in evals["1"]
    ]  # the subset is not the whole split
    capsys.readouterr()
    none = tmp_path / "none"
    assert cli.main([*args[:6], "--eval-examples", "0", "--workdir", str(none)]) == 0
    assert not [x for x in read_metrics(none) if "eval_loss" in x]
    assert "without evaluating (--eval-examples 0)" in capsys.readouterr().out
