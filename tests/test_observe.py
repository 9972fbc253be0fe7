"""Seeing what sharding does: the plan, TensorBoard events, plots, profiles, divergence."""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from test_sharding import MLP_GOLDEN, MLP_PARAMS

import train as cli
from jaxpar import Config
from jaxpar.run.checkpoint import Checkpoints
from jaxpar.run.observe import Window
from jaxpar.tools.plan import plan
from jaxpar.tools.plot import main as plot_main

STRATEGIES = {"dp": "8x1", "fsdp": "fsdp=8", "fsdp_tp": "fsdp=4,model=2"}


@pytest.fixture(scope="module")
def plans():
    return {s: plan(Config.of(mesh=m, batch_size=64)) for s, m in STRATEGIES.items()}


@pytest.mark.slow
def test_plan_lists_every_parameter_with_the_golden_specs(plans):
    for strategy, p in plans.items():
        assert [r["path"] for r in p["params"]] == MLP_PARAMS
        specs = {r["path"]: r["spec"] for r in p["params"] if r["sharded_ways"] > 1}
        assert specs == {k: str(v) for k, v in MLP_GOLDEN[strategy].items()}


def test_plan_memory_follows_zero_accounting(plans):
    dp, fsdp = plans["dp"]["per_device"], plans["fsdp"]["per_device"]
    assert dp["params"] == 4 * (64 * 512 + 512 + 512 * 256 + 256 + 1 + 256 * 10 + 10)
    # FSDP: 1/8 of the matrices per device; the replicated vectors add under 1%.
    assert fsdp["params"] / dp["params"] < 1.1 / 8
    assert fsdp["optimizer"] / dp["optimizer"] < 1.1 / 8
    assert 0 < fsdp["compiled_peak"] < dp["compiled_peak"]


def test_plan_shows_the_collectives(plans):
    assert set(plans["dp"]["collectives"]) == {"all-reduce"}
    assert plans["fsdp"]["collectives"]["all-gather"]["count"] >= 3


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    workdir = tmp_path / "w"
    assert cli.main(["--dry-run", "--mesh", "fsdp=4,model=2", "--workdir", str(workdir)]) == 0
    out = capsys.readouterr().out
    assert "fc1/kernel" in out and "P('fsdp', 'model')" in out and "collectives per step" in out
    assert not workdir.exists()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    args = ["--steps", "12", "--log-every", "3", "--profile-steps", "2:4", "--mesh", "2x2"]
    assert cli.main([*args, "--workdir", str(workdir)]) == 0
    return workdir


def test_tensorboard_reads_the_events(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "events"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train_loss", "eval_loss", "eval_accuracy", "lr", "examples_per_s"} <= tags
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    want = [(x["step"], x["train_loss"]) for x in lines if "train_loss" in x]
    got = [(e.step, e.value) for e in events.Scalars("train_loss")]
    assert [s for s, _ in got] == [s for s, _ in want] == [3, 6, 9, 12]
    np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-6)


def test_profile_trace_is_written(run):
    assert list((run / "profile").rglob("*.xplane.pb"))


def test_plot_writes_a_png(run, tmp_path):
    out = tmp_path / "curves.png"
    assert plot_main([str(run), str(run), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert plot_main([str(tmp_path / "nothing"), "-o", str(out)]) == 2


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    args = ["--lr", "1e6", "--steps", "40", "--checkpoint-every", "1", "--log-every", "1"]
    assert cli.main([*args, "--workdir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the ") and " at step " in err and err.count("\n") == 1
    bad_step = int(err.split("at step ")[1].split(";")[0].split()[0])
    saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert saved and max(saved) < bad_step
    ckpts = Checkpoints(Path(tmp_path))
    assert ckpts.latest() == max(saved)
    ckpts.close()
    assert f"resume from the last checkpoint (step {max(saved)}) with a lower --lr" in err
    # before any checkpoint, the advice is to start over
    assert cli.main([*args[:4], "--workdir", str(tmp_path / "new")]) == 1
    assert "no checkpoint was saved yet: rerun with --restart" in capsys.readouterr().err


@pytest.mark.slow
def test_profile_range_is_clamped_to_the_run(tmp_path):
    # an end past the last step: the trace stops, and is written, at the last step
    assert cli.main(["--steps", "4", "--profile-steps", "1:100", "--workdir", str(tmp_path)]) == 0
    assert len(list((tmp_path / "profile").rglob("*.xplane.pb"))) == 1
    # a resume inside the range (step 4 of 2:6) traces the rest of it
    assert cli.main(["--steps", "8", "--profile-steps", "2:6", "--workdir", str(tmp_path)]) == 0
    assert len(list((tmp_path / "profile").rglob("*.xplane.pb"))) == 2


def test_examples_per_s_counts_training_time_only(monkeypatch):
    clock = type("Clock", (), {"now": 0.0, "time": lambda self: self.now})()
    monkeypatch.setattr("jaxpar.run.observe.time", clock)  # the metrics window's clock only
    written = []

    def write(self, step, **values):  # a line takes 1 s (TensorBoard's writer opened before)
        written.append(values)
        clock.now += 1.0

    log = type("Log", (), {"write": write})()
    window = Window(log, Config.of(batch_size=10, log_every=2), 6, [], lambda step: 0.1)
    window.start()  # t=0
    metrics = {"train_loss": jnp.float32(1.0), "grad_norm": jnp.float32(1.0), "stop": jnp.int32(0)}
    window.push(1, metrics)
    clock.now = 1.0
    with window.paused("compile"):  # compilation, evaluation or a checkpoint: 5 s
        clock.now = 6.0
    window.push(2, metrics)  # reads step 1
    clock.now = 8.0
    window.flush()  # step 2 written: 2 steps in 8 s, less 5 s paused
    assert written[0]["examples_per_s"] == 2 * 10 / 3
    window.push(3, metrics)  # at 9: steps 3-4 ran while the line was written
    window.push(4, metrics)
    clock.now += 4.0
    window.flush()
    assert written[1]["examples_per_s"] == 2 * 10 / 5  # from 8, before the write
    window.push(5, metrics)
    window.push(6, metrics)
    clock.now += 3.0
    window.flush()
    assert written[2]["examples_per_s"] == 2 * 10 / 4  # from 13


def test_lines_inside_one_dispatch_share_its_time(monkeypatch):
    """A dispatch of several steps holding several lines (``--steps-per-dispatch`` above
    ``--log-every``): each line gets its steps' share of the dispatch's time, not the moments
    between writing them."""
    clock = type("Clock", (), {"now": 0.0, "time": lambda self: self.now})()
    monkeypatch.setattr("jaxpar.run.observe.time", clock)
    written = []
    log = type("Log", (), {"write": lambda self, step, **values: written.append(values)})()
    window = Window(log, Config.of(batch_size=10, log_every=1), 4, [], lambda step: 0.1)
    window.start()
    two = {"train_loss": jnp.ones(2), "grad_norm": jnp.ones(2), "stop": jnp.int32(0)}
    window.push(2, two)
    clock.now = 4.0
    window.push(4, two)  # steps 1-2 read at 4 s: 2 s each
    clock.now = 5.0
    window.flush()  # steps 3-4 in 1 s
    assert [w["examples_per_s"] for w in written] == [5.0, 5.0, 20.0, 20.0]


@pytest.mark.slow
def test_plan_shows_a_tensor_parallel_vit_block_s_all_reduces():
    p = plan(Config.of(mesh="1x4", model="vit-lite", batch_size=64))  # vit-lite: 4 heads
    specs = {r["path"]: r["spec"] for r in p["params"]}
    assert specs["blocks/query/kernel"] == "P(None, None, 'model', None)"
    # attention out and MLP out are row-parallel: one all-reduce each in the scanned block
    assert p["collectives"]["all-reduce"]["count"] >= 2
