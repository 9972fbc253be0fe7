"""Skipping bad steps (`jaxpar.core.spikes`, ``--skip-spikes``): a skipped step is as if its batch
had never been drawn, on every mesh and across a resume; K in a row stop the run."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import crash_at, metrics

import train as cli
from jaxpar import Config
from jaxpar import train as train_run
from jaxpar.core.spikes import DECAY, WARMUP, fresh, judged
from jaxpar.data import load_digits, train_indices
from jaxpar.modes.mode import Mode


def stats_after(losses, sigma=6.0):
    """The statistics and the verdicts after `losses`, one step each."""
    stats, verdicts = fresh(), []
    for loss in losses:
        bad, stats = judged(stats, jnp.float32(loss), jnp.float32(1.0), sigma)
        verdicts.append(bool(bad))
    return stats, verdicts


def test_the_statistics_are_a_moving_average_of_the_applied_steps():
    losses = [2.0, 1.0, 1.5, 1.2]
    stats, verdicts = stats_after(losses)
    mean, var = losses[0], 0.0
    for x in losses[1:]:
        d = x - mean
        mean, var = mean + (1 - DECAY) * d, DECAY * (var + (1 - DECAY) * d * d)
    assert verdicts == [False] * 4
    np.testing.assert_allclose([stats["mean"], stats["var"]], [mean, var], rtol=1e-6)
    assert int(stats["applied"]) == 4 and int(stats["in_a_row"]) == 0


def test_a_spike_is_judged_after_the_warmup_and_leaves_the_statistics():
    rng = np.random.default_rng(0)
    ordinary = list(1.0 + 0.01 * rng.normal(size=WARMUP + 5))
    stats, verdicts = stats_after(ordinary)
    assert not any(verdicts)
    bad, after = judged(stats, jnp.float32(5.0), jnp.float32(1.0), 6.0)
    assert bool(bad) and int(after["in_a_row"]) == 1
    assert float(after["mean"]) == float(stats["mean"]) and int(after["applied"]) == WARMUP + 5
    # The same loss before the warmup ends is applied: the mean has not settled.
    _, early = stats_after([*ordinary[:3], 5.0])
    assert early == [False] * 4


@pytest.mark.parametrize("loss,norm", [(math.nan, 1.0), (math.inf, 1.0), (1.0, math.nan)])
def test_a_non_finite_step_is_always_skipped(loss, norm):
    bad, stats = judged(fresh(), jnp.float32(loss), jnp.float32(norm), math.inf)
    assert bool(bad) and int(stats["applied"]) == 0 and int(stats["in_a_row"]) == 1


RUN = dict(steps=30, batch_size=64, log_every=1, eval_every=10, skip_spikes="3")  # fmt: skip
CORRUPT = (24, 27)  # past the warmup: finite spikes, judged by the statistics


def without(monkeypatch, skipped):
    """The runs in this test draw their batches as if the 1-based `skipped` steps' batches
    did not exist: step i reads the batch of the i-th step not skipped."""
    original = Mode.batches

    def batches(self, ds, batch_size, seed, plan, mesh, workers=0):
        drawn = [s for s in range(len(plan) + len(skipped)) if s + 1 not in skipped]
        shifted = [range(drawn[r.start], drawn[r.start] + 1) for r in plan]  # one step each
        return original(self, ds, batch_size, seed, shifted, mesh, workers)

    monkeypatch.setattr(Mode, "batches", batches)


def lines_of(workdir, key="train_loss") -> dict:
    return {x["step"]: x[key] for x in metrics(workdir) if key in x}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The run on the data without the corrupted steps' batches: 28 steps."""
    workdir = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as mp:
        without(mp, set(CORRUPT))
        train_run(Config.of(**{**RUN, "steps": RUN["steps"] - len(CORRUPT)}, mesh="1",
                            workdir=str(workdir)))  # fmt: skip
    return workdir


def as_if_never_drawn(workdir, reference, rtol):
    """`workdir`'s run skipped exactly the corrupted steps, and each other step's loss is the
    reference's at the step it is there (the skipped batches removed)."""
    skips = [json.loads(x) for x in (workdir / "skipped.jsonl").read_text().splitlines()]
    assert [x["step"] for x in skips] == list(CORRUPT)
    ds = load_digits()
    for x in skips:
        assert x["skipped_examples"] == train_indices(ds, 64, 0, x["step"] - 1).tolist()
        assert x["skipped_loss"] > 10 * np.median(list(lines_of(reference).values()))
    assert lines_of(workdir, "skipped_loss") == {x["step"]: x["skipped_loss"] for x in skips}
    ours, theirs = lines_of(workdir), lines_of(reference)
    shift = {s: s - sum(c < s for c in CORRUPT) for s in ours}
    assert set(ours) == set(range(1, 31)) - set(CORRUPT)
    np.testing.assert_allclose([ours[s] for s in ours], [theirs[shift[s]] for s in ours],
                               rtol=rtol, atol=1e-6)  # fmt: skip
    final = metrics(workdir)[-1]
    np.testing.assert_allclose(final["eval_loss"], lines_of(reference, "eval_loss")[28], rtol=rtol)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["1", "2x2", "fsdp=2,model=2", "data=2,fsdp=2"])
def test_a_skipped_spike_is_as_if_its_batch_was_never_drawn(mesh, reference, tmp_path):
    workdir = tmp_path / "w"
    corrupt = ",".join(map(str, CORRUPT))
    train_run(Config.of(**RUN, mesh=mesh, corrupt_steps=corrupt, workdir=str(workdir)))
    # One device: the same program on the same data, to the last bit but for fusion's rounding.
    as_if_never_drawn(workdir, reference, rtol=1e-6 if mesh == "1" else 2e-5)


@pytest.mark.slow
def test_a_resumed_run_skips_the_same_steps(reference, tmp_path, monkeypatch):
    """Stopped between the two skips and resumed on another mesh: the statistics came back
    with the checkpoint, the second spike is skipped, skipped.jsonl is whole."""
    workdir = tmp_path / "w"
    cfg = Config.of(**RUN, mesh="2", corrupt_steps="24,27", checkpoint_every=25,
                    workdir=str(workdir))  # fmt: skip
    crash_at(monkeypatch, 26)
    with pytest.raises(RuntimeError, match="a crash"):
        train_run(cfg)
    monkeypatch.undo()
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["25"]
    train_run(cfg.replace(mesh="2x2"))
    as_if_never_drawn(workdir, reference, rtol=2e-5)


def test_k_skips_in_a_row_stop_the_run_with_the_divergence_message(tmp_path, capsys):
    code = cli.main(["--steps", "30", "--batch-size", "64", "--skip-spikes", "2", "--corrupt-steps",
                     "24,25,27", "--workdir", str(tmp_path / "w")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1, err
    assert (
        "at step 25; stopped, nothing of it saved (2 steps skipped in a row, --skip-spikes 2)"
        in (err)
    )
    assert [json.loads(x)["step"] for x in (tmp_path / "w" / "skipped.jsonl").read_text().split(
        "\n") if x] == [24, 25]  # fmt: skip


BAD = {
    "--skip-spikes 0": "--skip-spikes 0: K, the skips in a row that stop the run, must be at "
    "least 1",
    "--skip-spikes 3:-1": "--skip-spikes 3:-1: SIGMA must be >= 0",
    "--skip-spikes x": "--skip-spikes x: write K or K:SIGMA",
    "--corrupt-steps 0": "--corrupt-steps 0: steps count from 1",
    "--corrupt-steps 5;9": "--corrupt-steps 5;9: write steps as 5,9",
    "--corrupt-steps 5 --dataset synthetic:8x8x1:10": "--corrupt-steps scales images by 1000, "
    "and synthetic:8x8x1:10's are uint8",
    "--skip-spikes 3 --clients 4": "--clients N with --skip-spikes K is not supported",
}  # fmt: skip


@pytest.mark.parametrize("flags", BAD)
def test_bad_spike_flags_exit_2(flags, refuses):
    refuses(flags, BAD[flags])
