"""The RBM (`jaxpar.models.rbm`, issue #33): the CD loss's gradient is the textbook CD update,
the pseudo-log-likelihood is the exact sum over every unit (against NumPy in float64), and
Gibbs sampling draws each example's bits from its own key, whatever the batch around it."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpar.models.rbm import RBM, contrastive_divergence

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
