"""The real entry point, end to end, and its refusals."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import train as cli
from jaxpar.mesh import layout_names, parse_mesh

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


def test_default_run_reaches_95_percent_on_2x2(tmp_path):
    proc = run("--mesh", "2x2", "--workdir", str(tmp_path / "w"))
    assert proc.returncode == 0, proc.stderr
    assert "mesh data=2 x fsdp=1 x model=2 (4 cpu devices)" in proc.stdout
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
    assert config["mesh"] == "2x2" and config["batch_size"] == 128


@pytest.mark.parametrize("layout", [n for n in layout_names() if not parse_mesh(n).dcn])
def test_every_layout_trains(layout, tmp_path):
    """Single-host layouts; the multi-host ones run in test_multiprocess.py."""
    proc = run("--mesh", layout, "--steps", "3", "--batch-size", "32", "--workdir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert read_metrics(tmp_path)[-1]["step"] == 3


def test_resnet18_on_digits(tmp_path):
    proc = run("--model", "resnet18", "--mesh", "2x2", "--steps", "2", "--workdir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert 0 <= read_metrics(tmp_path)[-1]["eval_accuracy"] <= 1


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
    "--optimizer lamb": "invalid choice: 'lamb'",
    "--batch-size 4096": "larger than the 1437 training examples",
    "--steps-per-dispatch 0": "--steps-per-dispatch must be at least 1",
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


def test_bad_input_in_a_real_process_has_no_traceback(tmp_path):
    proc = run("--mesh", "2x", "--workdir", str(tmp_path / "w"))
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: invalid mesh '2x'") and "Traceback" not in proc.stderr


def test_used_workdir_is_never_overwritten(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "time": 0.0}\n')
    assert cli.main(["--steps", "1", "--workdir", str(tmp_path)]) == 2
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "time": 0.0}\n'


def test_help_lists_every_flag_with_default():
    proc = run("--help")
    assert proc.returncode == 0
    for flag in ["--mesh", "--model", "--dataset", "--data-dir", "--epochs", "--steps",
                 "--batch-size", "--optimizer", "--lr", "--momentum", "--weight-decay", "--seed",
                 "--workdir", "--precision", "--checkpoint-every", "--eval-every"]:  # fmt: skip
        assert flag in proc.stdout
    assert "(default: 128)" in proc.stdout and "(default: 0.01)" in proc.stdout


def test_bf16_trains_as_well_as_fp32(tmp_path, capsys):
    assert cli.main(["--precision", "bf16", "--mesh", "2x2", "--workdir", str(tmp_path)]) == 0
    assert read_metrics(tmp_path)[-1]["eval_accuracy"] >= 0.95  # fp32 reaches 0.98 (above)


def test_bf16_computes_matmuls_in_bf16_and_keeps_fp32_parameters():
    from flax import nnx

    from jaxpar import Config
    from jaxpar.data import train_batches
    from jaxpar.loop import setup

    run = setup(Config(precision="bf16", mesh="2"))
    state = run.init()
    assert {x.dtype.name for x in jax.tree.leaves(nnx.to_pure_dict(run.abstract))} <= {
        "float32",
        "uint32",
    }
    batch = next(train_batches(run.ds, 128, 0, range(1), run.mesh))
    # The program jaxpar asks for (the CPU compiler then upcasts bf16 dots; GPUs run them).
    program = run.train_step.lower(state, batch).as_text()
    dots = [line for line in program.splitlines() if "dot_general" in line]
    assert dots and all("bf16" in line for line in dots)


def test_bf16_resnet_convolves_in_bf16_and_keeps_fp32_statistics():
    from jaxpar import Config
    from jaxpar.data import train_batches
    from jaxpar.loop import setup

    run = setup(Config(model="resnet8", dataset="synthetic:8x8x3:10", precision="bf16", mesh="2"))
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
    assert {x.dtype.name for x in jax.tree.leaves(state)} <= {"float32", "uint32"}
    # Activations leave BatchNorm in bf16: half the bytes between layers (benchmarks/gpu.py).
    from flax import nnx

    from models import MODELS

    net = MODELS["resnet8"]((8, 8, 3), 10, dtype=jax.numpy.bfloat16, rngs=nnx.Rngs(0))
    y = net.stem_bn(net.stem(np.ones((2, 8, 8, 3), np.float32)), use_running_average=False)
    assert y.dtype.name == "bfloat16" and net.stem_bn.mean.dtype.name == "float32"


def test_gpu_flags_respect_the_user(monkeypatch):
    import jaxpar.mesh as mesh

    monkeypatch.setattr(mesh.importlib.util, "find_spec", lambda name: name == "jax_cuda12_plugin")
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_latency_hiding_scheduler=false")
    mesh.set_gpu_flags()
    assert os.environ["XLA_FLAGS"] == "--xla_gpu_enable_latency_hiding_scheduler=false"
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    mesh.set_gpu_flags()
    assert os.environ["XLA_FLAGS"] == "--xla_dump_to=/tmp/x " + mesh.GPU_XLA_FLAGS[0]
