"""Orbax checkpoints: restore onto other meshes, exact resume, preemption, kill -9, refusals."""

import json
import os
import shutil
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_same_run, cli_run, crash_at, metrics, trained, wait_for_lines
from flax import nnx

import train as cli
from jaxpar import Config
from jaxpar import train as train_run
from jaxpar.core.errors import Preempted
from jaxpar.core.mesh import make_mesh, parse_mesh
from jaxpar.core.optimizers import make_optimizer
from jaxpar.core.sharding import state_shardings
from jaxpar.core.step import abstract_state
from jaxpar.models import MODELS
from jaxpar.run.checkpoint import Checkpoints
from jaxpar.run.checkpoint import main as list_checkpoints
from jaxpar.run.loop import dispatches
from jaxpar.run.workdir import write_config

ROOT = Path(__file__).resolve().parent.parent


def restore_on(mesh_text, directory, step, optimizer="adamw"):
    mesh = make_mesh(parse_mesh(mesh_text))
    model_fn = partial(MODELS["mlp"], (8, 8, 1), 10)
    _, abstract = abstract_state(model_fn, make_optimizer(optimizer, 1e-3, weight_decay=1e-4))
    shardings, _ = state_shardings(abstract, mesh)
    return Checkpoints(directory).restore(step, nnx.to_pure_dict(abstract), shardings), shardings


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["4x1", "1x4", "1", "fsdp=8"])
def test_save_on_2x2_restore_anywhere(mesh, tmp_path):
    _, state, *_ = trained("mlp", "adamw", "2x2")
    ckpts = Checkpoints(tmp_path)
    ckpts.save(6, state, {"step": 6}, wait=True)
    ckpts.close()
    restored, shardings = restore_on(mesh, tmp_path, 6)
    saved_leaves, new_leaves = jax.tree.leaves(state), jax.tree.leaves(restored)
    assert len(saved_leaves) == len(new_leaves) > 10
    for a, b, s in zip(saved_leaves, new_leaves, jax.tree.leaves(shardings), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert b.sharding == s  # laid out for the new mesh, not the saved one


@pytest.mark.parametrize("room", [True, False])
def test_a_save_returns_before_the_state_is_donated_and_saves_it_whole(room, tmp_path,
                                                                      monkeypatch):  # fmt: skip
    """`save` hands a device copy to Orbax in a background thread; with no device memory for
    the copy (`has_room_for` false) Orbax copies to the host before `save` returns. Either way
    the state given to `save` is what is on disk, though the caller overwrites it right after."""
    import jaxpar.run.checkpoint

    monkeypatch.setattr(jaxpar.run.checkpoint, "has_room_for", lambda tree: room)
    _, state, *_ = trained("mlp", "adamw", "2x2")
    expected = jax.tree.map(np.asarray, state)
    mutated = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), donate_argnums=0)
    mutated(jax.tree.map(jnp.copy, state))  # compiled now: below it runs right after `save`
    ckpts = Checkpoints(tmp_path)
    given = jax.tree.map(jnp.copy, state)
    ckpts.save(6, given, {"step": 6})
    ckpts.save(7, mutated(given), {"step": 7})  # `given` donated at once, as by the next step
    ckpts.wait()
    assert ckpts.latest() == 7
    ckpts.close()
    restored, _ = restore_on("1", tmp_path, 6)
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))


CASES = {
    "mlp": dict(model="mlp", batch_size=64, optimizer="adamw", lr=1e-3),  # dropout, Adam moments
    "resnet8": dict(model="resnet8", batch_size=64),  # BatchNorm statistics
    "vit": dict(model="vit-test", batch_size=64, optimizer="adamw", lr=1e-3),  # stacked layers
}


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_interrupted_then_resumed_on_another_mesh_equals_uninterrupted(case, tmp_path, capsys,
                                                                       request):  # fmt: skip
    if case == "vit":
        request.getfixturevalue("tiny_vit")  # registers vit-test for this test
    # --log-every 5 does not divide the stop step 9: the partial window travels in the checkpoint
    common = dict(CASES[case], log_every=5, eval_every=7)
    train_run(Config.of(**common, mesh="2x2", steps=16, workdir=str(tmp_path / "a")))
    train_run(Config.of(**common, mesh="2x2", steps=9, workdir=str(tmp_path / "b")))
    stopped = metrics(tmp_path / "b")
    assert [x["step"] for x in stopped][-2:] == [9, 9]  # the finished run's last lines
    if case == "mlp":  # a run no longer, with another flag, trains nothing and changes no file
        files = lambda: {f: f.read_bytes() for f in (tmp_path / "b").rglob("*") if f.is_file()}  # noqa: E731
        before = files()
        for steps in (4, 9):
            capsys.readouterr()
            train_run(Config.of(**{**common, "lr": 0.5}, mesh="2x2", steps=steps,
                             workdir=str(tmp_path / "b")))  # fmt: skip
            out = capsys.readouterr().out
            assert f"already at step 9 of {steps}" in out and "at step 9," in out
            assert files() == before
    # a longer --steps continues the finished run, here on another mesh
    capsys.readouterr()
    train_run(Config.of(**common, mesh="fsdp=4,model=2", steps=16, workdir=str(tmp_path / "b")))
    # every line equals the uninterrupted run's; the lines written only because the first run
    # ended at step 9 (a partial window, a final evaluation) are moved aside
    assert_same_run(metrics(tmp_path / "b"), metrics(tmp_path / "a"), after=0)
    rewound = [json.loads(x) for x in (tmp_path / "b" / "metrics.rewound.jsonl").open()]
    assert rewound == stopped[-2:]
    assert (tmp_path / "b" / "config.before-step-9.json").exists()
    # the printed train_loss is the metrics' (the mean of the last logged window)
    printed = capsys.readouterr().out.split("step 14/16 ")[1].split("train_loss ")[1].split()[0]
    logged = [x["train_loss"] for x in metrics(tmp_path / "b") if "train_loss" in x and
              x["step"] <= 14][-1]  # fmt: skip
    assert printed == f"{logged:.4f}"


def test_dispatches_end_where_evaluation_checkpoints_and_profiling_need():
    plan = dispatches(0, 20, 8, every=(7, 0, 10), marks=(3, 12))
    assert [(r.start, r.stop) for r in plan] == [(0, 3), (3, 7), (7, 10), (10, 12), (12, 14),
                                                 (14, 20)]  # fmt: skip
    assert dispatches(5, 9, 1) == [range(5, 6), range(6, 7), range(7, 8), range(8, 9)]
    assert dispatches(9, 9, 4) == []


@pytest.mark.slow
def test_several_steps_per_dispatch_give_the_same_run_and_resume(tmp_path):
    common = dict(CASES["mlp"], log_every=3, eval_every=7, checkpoint_every=5)
    train_run(Config.of(**common, mesh="2x2", steps=16, workdir=str(tmp_path / "a")))
    train_run(
        Config.of(**common, mesh="2x2", steps=9, steps_per_dispatch=4, workdir=str(tmp_path / "b"))
    )
    # resumed with another dispatch length, on another mesh
    train_run(
        Config.of(**common, mesh="2", steps=16, steps_per_dispatch=3, workdir=str(tmp_path / "b"))
    )
    assert_same_run(metrics(tmp_path / "b"), metrics(tmp_path / "a"), after=0)
    assert sorted(int(p.name) for p in (tmp_path / "b" / "checkpoints").iterdir()) == [10, 15, 16]


# Evaluating every step makes a SIGTERM during an evaluation likely: it must still save.
RUN = ["--mesh", "2", "--steps", "120", "--log-every", "1", "--eval-every", "1"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference")
    assert cli.main([*RUN, "--workdir", str(workdir)]) == 0
    return metrics(workdir)


@pytest.mark.slow
def test_sigterm_saves_and_the_same_command_resumes(reference, tmp_path):
    """SIGTERM to the whole process group, as a terminal or a scheduler sends it, reaches the
    --data-workers processes too: they leave it to the trainer, which saves. The resumed run
    reads in its own process: the same batches."""
    proc = cli_run(*RUN, "--data-workers", "2", "--workdir", str(tmp_path), start_new_session=True)
    wait_for_lines(tmp_path, 30, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    stopped = int(err.split("at step ")[1].split(";")[0])
    assert "checkpoint saved in" in err and (tmp_path / "checkpoints" / str(stopped)).is_dir()
    assert "Traceback" not in err, err  # no worker died of the signal
    proc = cli_run(*RUN, "--workdir", str(tmp_path))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert f"resumed from step {stopped}" in out
    assert_same_run(metrics(tmp_path), reference, after=stopped)


@pytest.mark.slow
def test_kill_9_during_async_saves_resumes_from_last_complete(reference, tmp_path):
    proc = cli_run(*RUN, "--checkpoint-every", "1", "--workdir", str(tmp_path))
    wait_for_lines(tmp_path, 25, proc)
    proc.kill()  # SIGKILL: no handler runs, an asynchronous save is usually in flight
    proc.communicate()
    complete = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert complete
    # Make sure an incomplete save is present, whatever the kill interrupted: a copy of the
    # latest step under Orbax's temporary name, with its array data missing.
    fake = tmp_path / "checkpoints" / f"{complete[-1] + 50}.orbax-checkpoint-tmp"
    shutil.copytree(tmp_path / "checkpoints" / str(complete[-1]), fake, dirs_exist_ok=True)
    shutil.rmtree(fake / "state" / "d", ignore_errors=True)
    proc = cli_run(*RUN, "--workdir", str(tmp_path))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert f"resumed from step {complete[-1]}" in out
    assert_same_run(metrics(tmp_path), reference, after=complete[-1])


@pytest.mark.slow
def test_a_run_killed_before_its_first_save_reruns_in_place(reference, tmp_path):
    """kill -9 (the OOM killer, a lost node) under the default --checkpoint-every 0 leaves no
    checkpoint: the same command starts over, its files moved aside, as a requeue expects."""
    proc = cli_run(*RUN, "--workdir", str(tmp_path))
    wait_for_lines(tmp_path, 10, proc)
    proc.kill()
    proc.communicate()
    assert (tmp_path / "config.json").exists()
    assert not any((tmp_path / "checkpoints").glob("[0-9]*"))
    proc = cli_run(*RUN, "--workdir", str(tmp_path))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert f"the previous run in {tmp_path} saved no checkpoint: its files moved to" in out, out
    (moved,) = tmp_path.glob("previous-*")
    assert len(metrics(moved)) >= 10 and (moved / "config.json").exists()
    assert_same_run(metrics(tmp_path), reference, after=0)


def test_a_signal_before_the_first_step_stops_at_once_and_the_rerun_starts_over(
    tmp_path, monkeypatch, capsys
):
    """SIGTERM while the run sets up (data, compilation, workdir) once killed it with no message
    and left a workdir the same command refused."""
    import jaxpar.run.loop

    setup = jaxpar.run.loop.setup

    def interrupted(*args):
        run = setup(*args)
        os.kill(os.getpid(), signal.SIGTERM)
        return run

    args = ["--steps", "2", "--workdir", str(tmp_path)]
    monkeypatch.setattr(jaxpar.run.loop, "setup", interrupted)
    assert cli.main(args) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert err == ("preempted: stopped by signal 15 before the first step; nothing was saved; "
                   "rerun the same command to start over\n")  # fmt: skip
    monkeypatch.setattr(jaxpar.run.loop, "setup", setup)
    assert cli.main(args) == 0
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_mismatched_model_is_refused_and_nothing_deleted(tmp_path, capsys):
    assert cli.main(["--steps", "3", "--workdir", str(tmp_path)]) == 0
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    assert cli.main(["--steps", "6", "--model", "resnet8", "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "checkpoint step 3" in err and "model='mlp' there, 'resnet8' here" in err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def _overwrite(folder: Path):
    """Every file of `folder` replaced by 20 random bytes (the array data of process 0)."""
    for f in folder.rglob("*"):
        if f.is_file():
            f.write_bytes(os.urandom(20))


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["removed", "overwritten"])
def test_corrupt_checkpoint_names_step_and_path(damage, tmp_path):
    assert cli.main(["--steps", "3", "--workdir", str(tmp_path)]) == 0
    state = tmp_path / "checkpoints" / "3" / "state"
    shutil.rmtree(state / "d") if damage == "removed" else _overwrite(state / "ocdbt.process_0")
    proc = cli_run("--steps", "6", "--workdir", str(tmp_path))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    # one line: no traceback, no leftover reads reported by Orbax's threads or asyncio
    assert err.count("\n") == 1, err
    assert err.startswith(f"error: checkpoint step 3 at {tmp_path / 'checkpoints' / '3'} ")
    assert len(err) < 400 and "<bound method" not in err  # the root cause's words, cut short


@pytest.mark.slow
def test_restart_moves_the_old_run_aside(tmp_path):
    assert cli.main(["--steps", "3", "--workdir", str(tmp_path)]) == 0
    # continued with another flag (config history) and a profile inside the range of the run
    assert cli.main(["--steps", "5", "--lr", "0.02", "--profile-steps", "3:4",
                     "--workdir", str(tmp_path)]) == 0  # fmt: skip
    old = (tmp_path / "metrics.jsonl").read_text()
    assert cli.main(["--steps", "2", "--restart", "--workdir", str(tmp_path)]) == 0
    (previous,) = tmp_path.glob("previous-*")
    assert (previous / "metrics.jsonl").read_text() == old
    assert (previous / "checkpoints" / "5").is_dir()
    assert (previous / "config.before-step-3.json").is_file()
    assert list((previous / "profile").rglob("*.xplane.pb"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["checkpoints", "config.json", "events", "metrics.jsonl", previous.name]
    )
    assert metrics(tmp_path)[-1]["step"] == 2


def test_checkpoints_are_listed(tmp_path, capsys):
    assert cli.main(["--steps", "3", "--workdir", str(tmp_path)]) == 0
    capsys.readouterr()
    assert list_checkpoints([str(tmp_path)]) == 0
    listing = capsys.readouterr().out
    assert (
        "step 3: model mlp on digits [8, 8, 1], batch 128, saved on mesh "
        "stage=1,data=8,fsdp=1,model=1" in listing
    )


def test_optimizer_flags_may_change_on_resume_and_momentum_is_named(tmp_path, capsys):
    assert cli.main(["--steps", "3", "--workdir", str(tmp_path)]) == 0
    changed = ["--weight-decay", "1e-4", "--schedule", "cosine", "--warmup-steps", "1"]
    assert (
        cli.main(["--steps", "5", *changed, "--momentum", "0.8", "--workdir", str(tmp_path)]) == 0
    )
    assert "resumed from step 3" in capsys.readouterr().out
    assert cli.main(["--steps", "7", "--momentum", "0", "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--momentum 0.8" in err and "--momentum 0.0" in err


def test_config_history_is_never_overwritten(tmp_path):
    first, second, third = (Config.of(lr=lr) for lr in (0.1, 0.2, 0.3))
    write_config(tmp_path, first, 0)
    write_config(tmp_path, second, 3)  # two resumes from the same checkpoint, step 3
    write_config(tmp_path, third, 3)
    lr = lambda name: json.loads((tmp_path / name).read_text())["optimization"]["lr"]  # noqa: E731
    assert lr("config.before-step-3.json") == 0.1
    assert lr("config.before-step-3-2.json") == 0.2
    assert lr("config.json") == 0.3


@pytest.mark.slow
def test_checkpoint_listing_as_json_prints_json_alone(tmp_path):
    assert cli.main(["--steps", "3", "--workdir", str(tmp_path)]) == 0
    proc = subprocess.run(
        [sys.executable, "-m", "jaxpar.checkpoint", str(tmp_path), "--json"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    (manifest,) = json.loads(proc.stdout)
    assert manifest["step"] == 3 and manifest["path"].endswith("checkpoints/3")
    assert manifest["model"] == "mlp" and manifest["partition_specs"]


def docs_block(marker: str) -> str:
    """The ```python block of docs/checkpoints.md holding `marker`, as a user would paste it."""
    blocks = (ROOT / "docs" / "checkpoints.md").read_text().split("```python\n")[1:]
    return next(b.split("```")[0] for b in blocks if marker in b)


@pytest.mark.slow
def test_the_docs_orbax_recipe_works_as_pasted_with_a_relative_path(tmp_path):
    workdir = tmp_path / "runs" / "NAME"
    assert cli.main(["--steps", "330", "--mesh", "1", "--workdir", str(workdir)]) == 0
    code = docs_block("PyTreeCheckpointer")
    assert '"runs/NAME/checkpoints/330/state"' in code  # relative: run from the workdir's parent
    code += '\nimport sys\nassert "jaxpar" not in sys.modules\n'
    code += 'print(kernel.shape, int(state["optimizer"]["step"]))\n'
    env = {**os.environ, "PYTHONPATH": ""}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["(64,", "512)", "330"]


@pytest.mark.slow
def test_kill_9_resumes_from_the_local_tier(reference, tmp_path):
    """The local tier every 5 steps, the persistent one at the end only: kill -9 loses under
    three intervals, and the rerun resumes from the local tier as if never stopped.

    The bound: a save is handed to Orbax in the background, and Orbax starts it once the one
    before has finished; the training thread waits for that hand-over only at the next save.
    So when training passes step s, step s - 10 is complete, and a kill before step s + 5 loses
    at most 14 steps (15 counting the metrics line that lags a dispatch). On a loaded machine
    saves take longer than 5 steps of this MLP, and a bound of one interval failed now and then.
    """
    local = tmp_path / "shm"
    flags = [*RUN, "--local-checkpoint-dir", str(local), "--local-checkpoint-every", "5",
             "--workdir", str(tmp_path / "w")]  # fmt: skip
    proc = cli_run(*flags)
    wait_for_lines(tmp_path / "w", 40, proc)
    proc.kill()
    proc.communicate()
    reached = metrics(tmp_path / "w")[-1]["step"]
    assert not (tmp_path / "w" / "checkpoints").exists() or not any(
        p.name.isdigit() for p in (tmp_path / "w" / "checkpoints").iterdir()
    )
    (folder,) = local.iterdir()  # the run's own folder in the local directory
    steps = sorted(int(p.name) for p in (folder / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and steps[-1] % 5 == 0 and reached - steps[-1] <= 15, (steps, reached)
    proc = cli_run(*flags)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert f"resumed from step {steps[-1]} (saved on mesh " in out
    assert f"in {folder / 'checkpoints'}" in out
    assert_same_run(metrics(tmp_path / "w"), reference, after=steps[-1])


TIERS = dict(model="mlp", batch_size=64, steps=12, log_every=1, eval_every=6,
             checkpoint_every=5, local_checkpoint_every=4, mesh="2")  # fmt: skip


@pytest.mark.slow
def test_a_restart_takes_the_newest_step_of_either_tier(tmp_path, monkeypatch, capsys):
    local = tmp_path / "shm"
    whole = dict(TIERS, local_checkpoint_every=0, workdir=str(tmp_path / "whole"))
    train_run(Config.of(**whole))
    cfg = Config.of(**TIERS, workdir=str(tmp_path / "w"), local_checkpoint_dir=str(local))
    crash_at(monkeypatch, 10)  # saved: local 4 and 8, persistent 5
    with pytest.raises(RuntimeError, match="a crash"):
        train_run(cfg)
    monkeypatch.undo()
    (folder,) = local.iterdir()
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["4", "8"]
    assert sorted(p.name for p in (tmp_path / "w" / "checkpoints").iterdir()) == ["5"]
    train_run(cfg)
    assert f"resumed from step 8 (saved on mesh stage=1,data=2,fsdp=1,model=1) in {folder}" in (
        capsys.readouterr().out
    )
    assert_same_run(metrics(tmp_path / "w"), metrics(tmp_path / "whole"), after=0)

    # The local tier lost (another node): the persistent step, the same run.
    other = cfg.replace(workdir=str(tmp_path / "v"))
    crash_at(monkeypatch, 10)
    with pytest.raises(RuntimeError, match="a crash"):
        train_run(other)
    monkeypatch.undo()
    shutil.rmtree(next(p for p in local.iterdir() if p.name.startswith("v-")))
    train_run(other)
    out = capsys.readouterr().out
    assert (
        f"resumed from step 5 (saved on mesh stage=1,data=2,fsdp=1,model=1) in {tmp_path}/v/" in out
    )
    assert_same_run(metrics(tmp_path / "v"), metrics(tmp_path / "whole"), after=0)

    # --restart moves the local tier aside with the run: nothing deleted, nothing resumed.
    train_run(cfg.replace(restart=True))
    out = capsys.readouterr().out
    assert "moved the previous run's local checkpoints to" in out and "resumed" not in out
    assert any(p.name.startswith(f"{folder.name}.previous-") for p in local.iterdir())


@pytest.mark.slow
def test_a_signal_saves_the_local_tier_then_the_persistent_one(tmp_path, monkeypatch):
    local = tmp_path / "shm"
    cfg = Config.of(**TIERS, workdir=str(tmp_path / "w"), local_checkpoint_dir=str(local))
    crash_at(monkeypatch, 7, signal.SIGTERM)  # no tier is due at step 7
    with pytest.raises(Preempted):
        train_run(cfg)
    (folder,) = local.iterdir()
    assert "7" in [p.name for p in (folder / "checkpoints").iterdir()]
    assert "7" in [p.name for p in (tmp_path / "w" / "checkpoints").iterdir()]


LOCAL_BAD = {
    "--local-checkpoint-every 5": "--local-checkpoint-every goes with --local-checkpoint-dir",
    "--local-checkpoint-every -1 --local-checkpoint-dir DIR": "--local-checkpoint-every must "
    "be >= 0, got -1",
    "--local-checkpoint-dir FILE": "--local-checkpoint-dir FILE is a file",
}  # fmt: skip


@pytest.mark.parametrize("flags", LOCAL_BAD)
def test_bad_local_tier_flags_exit_2(flags, refuses, tmp_path):
    (tmp_path / "FILE").write_text("")
    flags_here = flags.replace("DIR", str(tmp_path / "d")).replace("FILE", str(tmp_path / "FILE"))
    refuses(flags_here, LOCAL_BAD[flags].replace("FILE", str(tmp_path / "FILE")))
