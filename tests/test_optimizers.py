"""Optimizers and the training features around them: ``--optimizer`` adam, lion, adafactor and
muon, ``--clip-grad-norm``, ``--label-smoothing`` and ``--ema``.

Each reduces exactly to a run already trusted where it has such a value (Adam is AdamW without
decay; a clipping norm never reached clips nothing; a moving average never changes the
training), each gives the same losses on a data-parallel and a tensor-parallel mesh, and each
changes the run where it should (a flag that changed nothing would pass the other tests).
The EMA's resume on another mesh is in ``tests/test_compose.py`` (`TestResume`).
"""

import contextlib
import functools

import jax
import numpy as np
import pytest

import jaxpar
from jaxpar.core.optimizers import make_optimizer
from jaxpar.core.step import cross_entropy
from jaxpar.run.config import Config
from jaxpar.run.setup import setup

BASE = {"steps": 4, "batch_size": 32, "log_every": 1}
MESHES = ("data=2", "fsdp=2,model=2")


@functools.cache
def _run(items: tuple):
    """Losses of each step and the final state of a run of `items` (trained once)."""
    run = setup(Config.of(**{**BASE, **dict(items)}).validate())
    state, losses = run.init(), []
    plan = [range(step, step + 1) for step in range(run.total)]
    with contextlib.closing(run.batches(plan)) as batches:
        for _, batch in zip(plan, batches, strict=True):
            state, metrics = run.train_step(state, batch)
            losses.append(float(metrics["train_loss"]))  # blocks: one step in flight
    return np.array(losses), jax.tree.map(np.asarray, state)


def losses(mesh: str = "data=2", **flags) -> np.ndarray:
    return _run(tuple(sorted({"mesh": mesh, **flags}.items())))[0]


OPTIONS = {
    "adam": {"optimizer": "adam", "lr": 1e-3},
    "lion": {"optimizer": "lion", "lr": 1e-4, "weight_decay": 1e-2},
    "adafactor": {"optimizer": "adafactor", "lr": 1e-2},
    "muon": {"optimizer": "muon", "lr": 1e-2},
    "clip": {"clip_grad_norm": 0.05},
    "smoothing": {"label_smoothing": 0.2},
}


@pytest.mark.slow
@pytest.mark.parametrize("option", OPTIONS)
def test_each_option_changes_the_run_and_gives_the_same_losses_on_two_meshes(option):
    flags = OPTIONS[option]
    a, b = (losses(mesh, **flags) for mesh in MESHES)
    # rtol: the meshes sum the batch's gradients in other orders
    np.testing.assert_allclose(b, a, rtol=2e-4)
    assert np.all(np.isfinite(a)) and a[-1] < a[0], a  # it trains
    assert not np.allclose(a, losses()), "the option changed nothing"


@pytest.mark.slow
def test_adam_is_adamw_without_decay():
    adam = losses(optimizer="adam", lr=1e-3)
    np.testing.assert_allclose(adam, losses(optimizer="adamw", lr=1e-3), rtol=1e-6)


def test_a_clipping_norm_never_reached_clips_nothing():
    np.testing.assert_allclose(losses(clip_grad_norm=1e6), losses(), rtol=1e-6)


@pytest.mark.slow
def test_clipping_scales_the_step_to_the_norm():
    """SGD without momentum moves by lr * g * min(1, C / |g|): with C under every gradient's
    norm, the first step moves the parameters by exactly lr * C."""
    lr, clip = 0.01, 0.05
    start = _run(tuple(sorted({"mesh": "data=2", "steps": 1, "momentum": 0.0,
                               "lr": 1e-30}.items())))[1][0]  # fmt: skip
    moved = _run(tuple(sorted({"mesh": "data=2", "steps": 1, "momentum": 0.0, "lr": lr,
                               "clip_grad_norm": clip}.items())))[1][0]  # fmt: skip
    params = [p for p in jax.tree.leaves(jax.tree.map(np.subtract, moved, start)) if p.size]
    np.testing.assert_allclose(np.sqrt(sum(np.sum(p**2) for p in params)), lr * clip, rtol=1e-4)


@pytest.mark.torch
def test_label_smoothing_is_pytorchs():
    import torch

    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(16, 10)).astype(np.float32), rng.integers(0, 10, 16)
    ours = np.asarray(cross_entropy(logits, labels, 0.1)).mean()
    theirs = torch.nn.functional.cross_entropy(
        torch.from_numpy(logits), torch.from_numpy(labels), label_smoothing=0.1
    )
    np.testing.assert_allclose(ours, theirs.item(), rtol=1e-5)


@pytest.mark.slow
def test_the_moving_average_follows_the_parameters_and_never_changes_the_training():
    decay, steps = 0.5, 3
    np.testing.assert_array_equal(losses(ema=decay), losses())
    expected = _run(tuple(sorted({"mesh": "data=2", "steps": 1, "lr": 1e-30}.items())))[1][0]
    for n in range(1, steps + 1):  # the parameters after each step
        params = _run(tuple(sorted({"mesh": "data=2", "steps": n}.items())))[1][0]
        expected = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, expected, params)
    state = _run(tuple(sorted({"mesh": "data=2", "steps": steps, "ema": decay}.items())))[1]
    ema = state[1]["opt_state"]["ema"]  # the MLP's state is all parameters
    check = lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)  # noqa: E731
    jax.tree.map(check, ema, expected)


@pytest.mark.slow
def test_a_moving_average_of_decay_0_evaluates_as_the_model(tmp_path):
    """Evaluated beside the model: at decay 0 the average is the model, so the two evaluations
    agree exactly; a resume must keep (or keep out) the average the checkpoint holds."""
    workdir = tmp_path / "w"
    line = jaxpar.train(
        Config.of(**{**BASE, "steps": 3}, mesh="2x2", ema=0.0, workdir=str(workdir))
    )
    assert line["ema_eval_loss"] == line["eval_loss"]
    assert line["ema_eval_accuracy"] == line["eval_accuracy"]
    with pytest.raises(jaxpar.UserError, match="ema=True there, False here"):
        jaxpar.train(Config.of(**{**BASE, "steps": 4}, mesh="2x2", workdir=str(workdir)))


def test_adafactor_decays_decoupled_at_the_learning_rate():
    """optax adds Adafactor's decay after its learning rate: jaxpar scales it by the rate, as
    AdamW's (a zero gradient moves p by -lr * decay * p), in one state structure."""
    params = {"w": jax.numpy.full((4, 3), 2.0)}
    zero = {"w": jax.numpy.zeros((4, 3))}
    plain, decayed = (make_optimizer("adafactor", 0.01, weight_decay=d) for d in (0.0, 0.1))
    assert jax.tree.structure(plain.init(params)) == jax.tree.structure(decayed.init(params))
    updates, _ = decayed.update(zero, decayed.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.01 * 0.1 * 2.0, rtol=1e-6)


def test_muon_is_refused_where_it_would_be_adam():
    with pytest.raises(jaxpar.UserError, match="optax's Muon orthogonalises 2-D weights only"):
        Config.of(model="resnet8", optimizer="muon").validate()


def test_the_average_starts_from_the_weights_the_run_starts_from(tmp_path):
    """--init-from loads weights after the state is built: the average must start from them,
    not from the random initialisation it replaces (at decay 0 the two evaluations agree)."""
    source = tmp_path / "source"
    trained = jaxpar.train(Config.of(**{**BASE, "steps": 3}, mesh="2", workdir=str(source)))
    line = jaxpar.train(Config.of(**{**BASE, "steps": 1}, lr=1e-30, mesh="2", ema=0.5,
                               init_from=str(source), workdir=str(tmp_path / "w")))  # fmt: skip
    assert line["eval_loss"] == trained["eval_loss"]  # lr 1e-30: the weights it started from
    assert line["ema_eval_loss"] == line["eval_loss"], line
