"""The RBM (`jaxpar.models.rbm`, issue #33): the CD loss's gradient is the textbook CD update,
the pseudo-log-likelihood is the exact sum over every unit (against NumPy in float64), Gibbs
sampling draws each example's bits from its own key, whatever the batch around it; so
``--model rbm:H`` trains the same on any mesh, with or without persistent chains, which resume
on another mesh; bad input exits 2 with one line."""

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxpar
from jaxpar.core.errors import UserError
from jaxpar.models.rbm import RBM, contrastive_divergence
from jaxpar.run.checkpoint import Checkpoints
from jaxpar.run.config import Config
from jaxpar.tools.compress import main as compress_main
from jaxpar.tools.predict import predict

VISIBLE, HIDDEN, N = 12, 5, 6


def tiny(seed: int = 0):
    rbm = RBM((3, 4, 1), 10, hidden=HIDDEN, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)  # weights large enough that samples differ from the data
    rbm.kernel[...] = jnp.asarray(rng.normal(0, 0.5, (VISIBLE, HIDDEN)), jnp.float32)
    rbm.visible_bias[...] = jnp.asarray(rng.normal(0, 0.5, VISIBLE), jnp.float32)
    rbm.hidden_bias[...] = jnp.asarray(rng.normal(0, 0.5, HIDDEN), jnp.float32)
    images = jnp.asarray(rng.random((N, 3, 4, 1)), jnp.float32)
    keys = jax.random.split(jax.random.key(seed), N)
    return rbm, images, keys


def numpy_free_energy(v, w, b, c):
    return -v @ b - np.logaddexp(0, v @ w + c).sum(-1)


def test_the_cd_losss_gradient_is_the_cd_update():
    for steps in (1, 3):
        rbm, images, keys = tiny()
        (_, samples), grads = nnx.value_and_grad(contrastive_divergence, has_aux=True)(
            rbm, images, keys, steps
        )
        v = np.asarray(images.reshape(N, -1), np.float64)
        s = np.asarray(samples, np.float64)
        assert set(np.unique(s)) <= {0.0, 1.0} and not np.allclose(s, v)  # binary samples
        w, c = np.asarray(rbm.kernel[...], np.float64), np.asarray(rbm.hidden_bias[...])
        h_data, h_model = 1 / (1 + np.exp(-(v @ w + c))), 1 / (1 + np.exp(-(s @ w + c)))
        # The textbook update (Hinton 2002; scikit-learn's `BernoulliRBM._fit`) is the descent
        # direction: minus the gradient.
        dw = (v.T @ h_data - s.T @ h_model) / N
        db, dc = (v - s).mean(0), (h_data - h_model).mean(0)
        np.testing.assert_allclose(-grads["kernel"][...], dw, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(-grads["visible_bias"][...], db, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(-grads["hidden_bias"][...], dc, rtol=1e-4, atol=1e-6)


def test_the_pseudo_log_likelihood_sums_every_units_conditional():
    rbm, images, _ = tiny(1)
    v = np.asarray(images.reshape(N, -1), np.float64)
    w, b = np.asarray(rbm.kernel[...], np.float64), np.asarray(rbm.visible_bias[...], np.float64)
    c = np.asarray(rbm.hidden_bias[...], np.float64)
    fe = numpy_free_energy(v, w, b, c)
    want = np.zeros(N)
    for i in range(VISIBLE):  # flip unit i of every example
        flipped = v.copy()
        flipped[:, i] = 1 - flipped[:, i]
        want += -np.logaddexp(0, -(numpy_free_energy(flipped, w, b, c) - fe))
    got = rbm.pseudo_log_likelihood(jnp.asarray(v, jnp.float32))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(rbm.free_energy(jnp.asarray(v, jnp.float32)), fe, rtol=1e-5)
    # A binary example: each term is log p(v_i | the others), so the sum is below 0.
    binary = jnp.asarray(v > 0.5, jnp.float32)
    assert (rbm.pseudo_log_likelihood(binary) < 0).all()


def test_each_examples_gibbs_samples_depend_on_its_key_only():
    rbm, images, keys = tiny(2)
    v = images.reshape(N, -1)
    whole = rbm.gibbs(v, keys, 2)
    part = rbm.gibbs(v[2:5], keys[2:5], 2)  # another batch around the same examples
    assert np.array_equal(np.asarray(part), np.asarray(whole[2:5]))
    other = rbm.gibbs(v, jax.random.split(jax.random.key(9), N), 2)
    assert not np.array_equal(np.asarray(other), np.asarray(whole))


def test_the_reconstruction_is_the_mean_field_pass_down_and_up():
    rbm, images, _ = tiny(3)
    v = np.asarray(images.reshape(N, -1), np.float64)
    w, b = np.asarray(rbm.kernel[...], np.float64), np.asarray(rbm.visible_bias[...], np.float64)
    c = np.asarray(rbm.hidden_bias[...], np.float64)
    sigmoid = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    want = sigmoid(sigmoid(v @ w + c) @ w.T + b)
    np.testing.assert_allclose(rbm.reconstruction(jnp.asarray(v, jnp.float32)), want, rtol=1e-5)
    assert rbm(images).shape == (N, HIDDEN)


SMALL = {"model": "rbm:16", "steps": 4, "batch_size": 32, "lr": 0.06, "log_every": 1,
         "eval_every": 2}  # fmt: skip


@functools.cache
def trained(mesh: str, persistent: bool, workdir: str, steps: int = 4) -> list[dict]:
    cfg = Config.of(**{**SMALL, "steps": steps}, mesh=mesh, persistent=persistent,
                    checkpoint_every=2, workdir=workdir)  # fmt: skip
    jaxpar.train(cfg)
    return [json.loads(x) for x in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


FIGURES = ("train_loss", "eval_reconstruction_error", "eval_pseudo_log_likelihood")


def figures(lines: list[dict]) -> list[list[float]]:
    return [[x[k] for k in FIGURES if k in x] for x in lines]


@pytest.mark.slow
@pytest.mark.parametrize("persistent", [False, True], ids=["cd", "pcd"])
def test_the_same_seed_trains_the_same_rbm_on_any_mesh(persistent, tmp_path):
    runs = {mesh: trained(mesh, persistent, str(tmp_path / mesh.replace(",", "-")))
            for mesh in ("1", "2x2", "fsdp=2,model=2")}  # fmt: skip
    one = runs["1"]
    assert [x["step"] for x in one if "train_loss" in x] == [1, 2, 3, 4]
    evaluation = [x for x in one if "eval_pseudo_log_likelihood" in x]
    assert [x["step"] for x in evaluation] == [2, 4] and "eval_accuracy" not in evaluation[0]
    for x in evaluation:  # a mean squared error of pixels in [0, 1]; a log-probability
        assert 0 < x["eval_reconstruction_error"] < 1 and x["eval_pseudo_log_likelihood"] < 0
    for mesh, other in runs.items():  # Gibbs draws per example: only the sums round otherwise
        np.testing.assert_allclose(np.concatenate(figures(other)), np.concatenate(figures(one)),
                                   rtol=2e-5, err_msg=mesh)  # fmt: skip


@pytest.mark.slow
def test_persistent_chains_resume_on_another_mesh_as_if_never_stopped(tmp_path):
    whole = trained("1", True, str(tmp_path / "whole"))
    workdir = str(tmp_path / "stopped")
    trained("2x2", True, workdir, steps=2)  # its checkpoint at step 2 holds the chains
    ckpts = Checkpoints(workdir)
    try:
        manifest = ckpts.manifest(2)
    finally:
        ckpts.close()
    assert manifest["rbm"] == {"cd_k": 1, "persistent": True}
    assert manifest["partition_specs"]["chains"] == "P('data', None)"  # one per example
    resumed = trained("fsdp=2,model=2", True, workdir)
    np.testing.assert_allclose(np.concatenate(figures(resumed)), np.concatenate(figures(whole)),
                               rtol=2e-5)  # fmt: skip
    # Without the chains the run differs: the persistent one is not CD from the data.
    cd = trained("1", False, str(tmp_path / "cd"))
    assert figures(cd)[2] != figures(whole)[2]


BAD = {
    "--model rbm:0": "--model rbm:0: an RBM's hidden units are a number of at least 1",
    "--model rbm:many": "--model rbm:many: an RBM's hidden units are a number of at least 1",
    "--model rbm:16 --cd-k 0": "--cd-k must be at least 1, got 0",
    "--cd-k 2": "--cd-k goes with --model rbm:H",
    "--persistent": "--persistent goes with --model rbm:H",
    "--model rbm:16 --label-smoothing 0.1": "--label-smoothing with an RBM",
    "--model rbm:16 --precision bf16": "--precision bf16 with an RBM or a pretrained DBN is not",
}


@pytest.mark.parametrize("flags", BAD)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(flags, refuses):
    refuses(flags, BAD[flags])


@pytest.mark.slow
def test_the_classifier_tools_refuse_an_rbm(tmp_path, capsys):
    workdir = tmp_path / "rbm"
    trained("1", False, str(workdir), steps=2)
    assert compress_main([str(workdir), "--quantize", "int8"]) == 2
    assert "holds an RBM (rbm:16), which has no classes" in capsys.readouterr().err
    with pytest.raises(UserError, match="predict serves classifiers"):
        predict(workdir, np.zeros((1, 8, 8, 1), np.float32))
