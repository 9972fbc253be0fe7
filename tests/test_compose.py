"""Every cell of the declared matrix (`jaxpar.modes.compose`), generated from its declarations.

- A refused cell exits with one line that names both sides, before anything is written.
- A supported pair reduces to its parts: with one side at its `off` flags, the pair's losses are
  the other side's alone. A pair of which neither side reduces gives the same losses on another
  mesh (tensor parallel where the matrix allows it, else FSDP).
- A supported feature on a model family: the same, on that family's smallest model.
- Every mode that lays out its own state or schedule, stopped at a periodic checkpoint with a
  logging window open (``--log-every`` > 1) and resumed on another mesh, writes the
  uninterrupted run's metrics (a save once held a live list of the window).

The cells train 3 steps of batch 32 through the loop's own pieces (`setup`, the mode's
batches, `Run.train_step`, `Run.synced`) without evaluating or saving, each distinct
configuration once per session, so a feature's run alone serves all its pairs.
"""

import contextlib
import functools
import itertools
import json
import shutil
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import pytest

import jaxpar
import train as cli
from jaxpar.models import MODELS, ResNet, ViT
from jaxpar.modes import compose
from jaxpar.run.config import Config
from jaxpar.run.setup import setup

ROOT = Path(__file__).resolve().parent.parent
# Each family's test model: the smallest that has what the family's cells are about (BatchNorm;
# stacked, scanned blocks a pipeline can split), registered for this module.
MODEL = {
    "mlp": "mlp",
    "resnet": "resnet-compose",
    "vit": "vit-compose",
    "rbm": "rbm:16",
    "dbn": "dbn:16-8",
}
BASE = {"steps": 3, "batch_size": 32, "log_every": 1, "mesh": "data=2"}
WORK = Path(tempfile.mkdtemp(prefix="jaxpar-compose-"))


@pytest.fixture(scope="module", autouse=True)
def tiny_models():
    MODELS["resnet-compose"] = partial(ResNet, stage_sizes=(1,), width=8)
    MODELS["vit-compose"] = partial(ViT, width=32, depth=2, heads=2, mlp_dim=64, patch_size=2)
    yield
    del MODELS["resnet-compose"], MODELS["vit-compose"]
    shutil.rmtree(WORK, ignore_errors=True)


@functools.cache
def source(model: str, dataset: str) -> str:
    """A workdir of `model` trained 2 steps on `dataset`: a teacher, or weights to start from."""
    workdir = WORK / f"source-{model}-{abs(hash(dataset))}"
    jaxpar.train(Config.of(model=model, dataset=dataset, steps=2, batch_size=32,
                        workdir=str(workdir)))  # fmt: skip
    return str(workdir)


def flags_of(model: str, *parts: dict) -> dict:
    """`BASE` with `parts` on top for `model`; the fixtures' placeholders filled in."""
    flags = {**BASE, "model": model}
    for part in parts:
        flags.update(part)
    for key in ("teacher", "init_from"):
        if flags.get(key) in ("TEACHER", "INIT"):
            flags[key] = source(model, flags.get("dataset", "digits"))
    if "clients" in flags:  # a round is a step; its lr is the clients' SGD rate
        flags.update(rounds=flags.pop("steps"), lr=0.05)
        flags.pop("batch_size")
    return flags


@functools.cache
def _losses(items: tuple) -> np.ndarray:
    run = setup(Config.of(**dict(items)).validate())
    state, losses = run.init(), []
    plan = [range(step, step + 1) for step in range(run.total)]
    with contextlib.closing(run.batches(plan)) as batches:
        for steps, batch in zip(plan, batches, strict=True):
            state, metrics = run.train_step(state, batch)
            state = run.synced(state, steps.stop)
            losses.append(float(metrics["train_loss"]))  # blocks: one step in flight
    return np.array(losses)


def losses(flags: dict) -> np.ndarray:
    """The losses of each step of a run of `flags` (trained once per session)."""
    return _losses(tuple(sorted(flags.items())))


def lines(workdir) -> list[dict]:
    return [json.loads(x) for x in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def numbers(rows: list[dict]) -> list[tuple]:
    """What a run computed, line by line: its step, losses and accuracy (and its moving
    average's, with --ema; a game's results against random play)."""
    keys = ("train_loss", "eval_loss", "eval_accuracy", "ema_eval_loss", "ema_eval_accuracy",
            *(f"eval_vs_random_{k}_rate" for k in ("win", "draw", "loss")))  # fmt: skip
    return [(r["step"], *(r.get(k, np.nan) for k in keys)) for r in rows]


def assert_same_run(a: list[dict], b: list[dict]) -> None:
    np.testing.assert_allclose(np.array(numbers(a)), np.array(numbers(b)), rtol=2e-4)


def reduces(on: compose.Feature, other: dict, model: str) -> None:
    """`on` at its `off` flags, with `other` on, equals `other` alone."""
    reduced = losses(flags_of(model, on.example, on.needs, other, on.off))
    # rtol: runs whose batches split other ways (replicas, microbatches) round otherwise, and
    # int8 rounding (--qat) turns the last bit of a weight into a step of 1/127
    np.testing.assert_allclose(reduced, losses(flags_of(model, other, on.needs)), rtol=2e-4)


def same_on_another_mesh(flags: dict) -> None:
    np.testing.assert_allclose(losses({**flags, "mesh": other_mesh(flags)}), losses(flags),
                               rtol=2e-4)  # fmt: skip


def resumes(flags: dict, tmp_path) -> None:
    """A run stopped at a periodic checkpoint and resumed on another mesh writes the
    uninterrupted run's metrics, with a logging window open across the checkpoint."""
    flags = {**flags, "log_every": 3, "checkpoint_every": 2, "eval_every": 4, "keep": 5}
    steps = "rounds" if "rounds" in flags else "steps"
    flags[steps] = 5
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    jaxpar.train(Config.of(**flags, workdir=str(whole)))
    shutil.copytree(whole, cut)
    for later in ("4", "5"):  # as if killed after the step-2 save
        shutil.rmtree(cut / "checkpoints" / later)
    jaxpar.train(Config.of(**{**flags, "mesh": other_mesh(flags)}, workdir=str(cut)))
    assert_same_run(lines(cut), lines(whole))


def other_mesh(flags: dict) -> str:
    """A mesh to resume `flags` on: tensor parallel where the matrix allows it, else FSDP, and
    more data-parallel devices for federated clients (the data axis only)."""
    if "clients" in flags:
        return "data=4"
    for axis in ("model", "fsdp"):
        mesh = f"{flags['mesh']},{axis}=2"
        try:
            compose.check(Config.of(**{**flags, "mesh": mesh}))
            return mesh
        except jaxpar.UserError:
            continue
    raise AssertionError(f"no other mesh for {flags}")


def test_a_refused_mesh_axis_exits_2():
    for (name, kind, axis), _ in compose.AXIS_REFUSED.items():
        flags = flags_of(MODEL[kind], compose.BY_NAME[name].example, {"mesh": f"data=2,{axis}=2"})
        with pytest.raises(jaxpar.UserError, match=f"on a mesh with {axis}=2 is not supported"):
            Config.of(**flags).validate()


PAIRS = {f"{a.name}+{b.name}": (a, b) for a, b in compose.supported_pairs()}


def model_for(*features) -> str:
    """The pair's model: a ViT where one side runs on ViTs alone, else the MLP."""
    kinds = compose.families(*features)
    return MODEL["mlp" if "mlp" in kinds else kinds[0]]


@pytest.mark.slow
@pytest.mark.parametrize("pair", PAIRS)
def test_a_supported_pair_reduces_to_its_parts_or_runs_the_same_on_another_mesh(pair):
    a, b = PAIRS[pair]
    model = model_for(a, b)
    # Reduce a side that has a value of its own (--prune-to 0) before one that is the plain
    # run as it is (a pipeline): the other side's run alone is then shared by its pairs.
    reducible = sorted([(x, y) for x, y in ((a, b), (b, a)) if x.off is not None],
                       key=lambda xy: not xy[0].off)  # fmt: skip
    for x, y in reducible[:1]:
        reduces(x, y.example, model)
    if not reducible:
        same_on_another_mesh(flags_of(model, a.example, b.example))


CELLS = {f"{f.name}-{k}": (f, k) for f, k in compose.supported_families()}


@pytest.mark.slow
class TestFamilies:
    """A class: pytest-xdist's loadscope gives it a worker of its own, beside the pairs."""

    @pytest.mark.parametrize("cell", CELLS)
    def test_a_supported_feature_runs_on_its_family(self, cell):
        run_cell(*CELLS[cell])


def run_cell(feature: compose.Feature, kind: str) -> None:
    if feature.off is not None and (kind != "resnet" or feature.off_under_batchnorm):
        reduces(feature, {}, MODEL[kind])
    else:
        same_on_another_mesh(flags_of(MODEL[kind], feature.example))


REFUSALS = {
    **{f"{a.name}+{b.name}": (a, b) for a, b in itertools.combinations(compose.FEATURES, 2)
       if compose.refused(a, b) and not compose.exclusive(a, b)},
    **{f"{f}-{k}": (compose.BY_NAME[f], k) for f, k in compose.FAMILY_REFUSED},
}  # fmt: skip


@pytest.mark.parametrize("cell", REFUSALS)
def test_a_refused_cell_exits_2_naming_both_sides(cell, tmp_path, capsys):
    a, b = REFUSALS[cell]
    if isinstance(b, str):  # a model family
        flags = flags_of(MODEL[b], a.example)
    else:
        one = [f for f in (a, b) if compose.families(f) != list(compose.FAMILIES)]
        flags = flags_of(model_for(*one[:1]), a.example, b.example)
    cfg = Config.of(**flags)
    sides = [a.named(cfg), f"--model {cfg.model.model}" if isinstance(b, str) else b.named(cfg)]
    argv = [x for k, v in flags.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    workdir = tmp_path / "w"
    assert cli.main([*argv, "--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not supported" in err, err
    if isinstance(b, str) or compose.REFUSED.get(frozenset({a.name, b.name})):
        assert all(side in err for side in sides), (sides, err)
    else:  # no family runs both: the run's model is refused for one side
        assert f"--model {cfg.model.model}" in err and any(side in err for side in sides), err
    assert not workdir.exists()


def test_the_docs_hold_the_generated_matrix():
    page = (ROOT / "docs" / "composing.md").read_text()
    assert compose.table() in page, (
        "docs/composing.md's matrix is stale: paste python -m jaxpar.modes.compose"
    )


RESUMED = {"every-step": {}, **{f.name: f.example for f in compose.FEATURES if f.name in
                                ("local", "diloco", "stale", "federated", "prune",
                                 "ema", "spikes", "game")}}  # fmt: skip


@pytest.mark.slow
class TestResume:
    @pytest.mark.parametrize("mode", RESUMED)
    def test_every_mode_resumes_from_a_periodic_checkpoint_with_an_open_window(
        self, mode, tmp_path
    ):
        resumes(flags_of("mlp", RESUMED[mode]), tmp_path)


def test_a_resume_refuses_changing_exactly_what_each_feature_pins():
    """The declared pins are what tells a run with the feature from the run without it in a
    checkpoint's identity (which `check_fits` compares field by field): no more, no less."""
    from jaxpar.data import load_dataset
    from jaxpar.run.checkpoint import IDENTITY
    from jaxpar.run.setup import identity

    def of(flags: dict) -> dict:
        cfg = Config.of(**flags)
        return identity(cfg, load_dataset(cfg.data.dataset))

    for f in compose.FEATURES:
        base = {**BASE, "model": model_for(f), **f.needs}
        on, off = of({**base, **f.example}), of(base)
        assert {k for k in IDENTITY if on[k] != off[k]} == set(f.pins), f.name
        assert set(f.pins) <= set(IDENTITY), f.name


@pytest.mark.slow
def test_a_pipeline_resumes_without_its_stages_and_with_another_grad_accum(tmp_path):
    """What a resume may change beyond the pins: here the stages and --grad-accum."""
    flags = {**flags_of("vit-compose", {"mesh": "stage=2,data=2", "microbatches": 2}),
             "steps": 4, "log_every": 3, "checkpoint_every": 2, "keep": 5}  # fmt: skip
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    jaxpar.train(Config.of(**flags, workdir=str(whole)))
    shutil.copytree(whole, cut)
    shutil.rmtree(cut / "checkpoints" / "4")
    later = {**flags, "mesh": "data=2", "microbatches": 0, "grad_accum": 2}
    jaxpar.train(Config.of(**later, workdir=str(cut)))
    assert_same_run(lines(cut), lines(whole))
