"""A binary restricted Boltzmann machine (issue #33): visible units the image's pixels, read as
probabilities in [0, 1] (a pixel of 0.3 is on with probability 0.3, as scikit-learn's
`BernoulliRBM` reads them), hidden units binary.

Energy ``E(v, h) = -v.b - h.c - v W h``; summing the hidden units out gives the free energy
``F(v) = -v.b - sum_j softplus((v W + c)_j)``. Training needs no labels: `contrastive_divergence`
is the free energy of the data less that of the model's samples (K Gibbs steps away, their
gradient stopped), whose gradient is exactly the CD update, so optax, the rules table,
checkpoints and metrics apply as to any model. Gibbs sampling draws each example's bits from
its own key (as dropout does: one key per example from its position in the global batch), so a
sample does not depend on how the batch is split over devices.

The weight matrix's axes are ``visible`` and ``hidden`` (`jaxpar.core.sharding.RULES`: hidden
over ``model``, visible over ``fsdp``).
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpar.core.axes import axes

# What a run of an RBM evaluates on the test split, the headline first (`jaxpar.modes.mode.Mode`).
REPORTED = ("eval_pseudo_log_likelihood", "eval_reconstruction_error")


class Chains(nnx.Variable):
    """Persistent contrastive divergence's Gibbs chains: one visible sample per example of the
    batch, carried from step to step (in the model's state, so in the checkpoint too)."""


class RBM(nnx.Module):
    """`hidden` binary hidden units over the flattened image.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> rbm = RBM((8, 8, 1), 10, hidden=16, rngs=nnx.Rngs(0))
    >>> [round(f, 4) for f in rbm.free_energy(jnp.zeros((2, 64))).tolist()]  # -16 softplus(0)
    [-11.0904, -11.0904]
    """

    def __init__(self, image_shape, num_classes, *, hidden: int, chains: int = 0,
                 dtype=jnp.float32, rngs):  # fmt: skip
        """`chains`: the batch size of persistent CD (`Chains`, starting from zeros as
        scikit-learn's); 0 for CD from the data."""
        visible = math.prod(image_shape)
        weights = nnx.initializers.normal(0.01)(rngs.params(), (visible, hidden), jnp.float32)
        self.kernel = nnx.Param(weights, **axes("visible", "hidden"))
        self.visible_bias = nnx.Param(jnp.zeros(visible), **axes("visible"))
        self.hidden_bias = nnx.Param(jnp.zeros(hidden), **axes("hidden"))
        start = jnp.zeros((chains, visible))  # PCD: one chain per example of the batch
        self.chains = Chains(start, **axes("batch", None)) if chains else None  # None: CD

    def hidden_probs(self, v):
        """``p(h_j = 1 | v)`` for each hidden unit."""
        return jax.nn.sigmoid(v @ self.kernel[...] + self.hidden_bias[...])

    def visible_probs(self, h):
        """``p(v_i = 1 | h)`` for each visible unit."""
        return jax.nn.sigmoid(h @ self.kernel[...].T + self.visible_bias[...])

    def free_energy(self, v):
        """``F(v)`` of each example (rows of `v`, flattened images in [0, 1])."""
        hidden = jax.nn.softplus(v @ self.kernel[...] + self.hidden_bias[...])
        return -v @ self.visible_bias[...] - jnp.sum(hidden, axis=-1)

    def gibbs(self, v, keys, steps: int):
        """`steps` rounds of block Gibbs sampling from `v` (h drawn given v, then v given h):
        the visible samples. Each example's draws come from its own key in `keys`."""
        draw = jax.vmap(lambda key, p: jax.random.bernoulli(key, p).astype(p.dtype))
        fold = jax.vmap(jax.random.fold_in, (0, None))

        def step(t, v):
            h = draw(fold(keys, 2 * t), self.hidden_probs(v))
            return draw(fold(keys, 2 * t + 1), self.visible_probs(h))

        return jax.lax.fori_loop(0, steps, step, v)

    def reconstruction(self, v):
        """The mean-field reconstruction of `v`: ``p(v | p(h | v))``, no sampling."""
        return self.visible_probs(self.hidden_probs(v))

    def pseudo_log_likelihood(self, v):
        """Each example's pseudo-log-likelihood, ``sum_i log p(v_i | v_-i)`` over every visible
        unit: ``log sigmoid(F(v with unit i flipped) - F(v))`` summed, the flip of a
        probability ``x`` being ``1 - x``. scikit-learn's `BernoulliRBM.score_samples` estimates
        the same sum from one random unit per example (times the number of units)."""
        kernel, bias = self.kernel[...], self.visible_bias[...]
        c = self.hidden_bias[...]

        def one(v):  # an example: every flip at once, [visible, hidden]
            x = v @ kernel + c
            d = 1.0 - 2.0 * v  # the change of each unit when flipped
            softplus = jax.nn.softplus(x[None, :] + d[:, None] * kernel)
            gap = -d * bias - jnp.sum(softplus - jax.nn.softplus(x)[None, :], axis=-1)
            return jnp.sum(jax.nn.log_sigmoid(gap))

        return jax.lax.map(one, v)

    def __call__(self, x, *, train: bool = False, rngs=None):
        """The hidden units' probabilities given the images: the features an RBM gives."""
        return self.hidden_probs(x.reshape(x.shape[0], -1))


def contrastive_divergence(model: RBM, images, keys, steps: int = 1, start=None):
    """CD-`steps` as a loss: the mean free energy of the data less that of the model's samples,
    drawn by `steps` Gibbs steps from `start` (the data itself: CD; persistent chains: PCD), their
    gradient stopped. Its gradient is the CD update (scikit-learn's with `start` its chains):
    ``dL/dW = -(v' p(h | v) - s' p(h | s)) / n`` for data `v` and samples `s`. Returns ``(loss,
    samples)``."""
    v = images.reshape(images.shape[0], -1)
    samples = jax.lax.stop_gradient(model.gibbs(v if start is None else start, keys, steps))
    return jnp.mean(model.free_energy(v)) - jnp.mean(model.free_energy(samples)), samples


def training_loss(steps: int):
    """``loss(model, images, labels, example_keys)`` for the one train step: CD-`steps`, from
    the model's persistent chains when it has them (which then move to the new samples)."""

    def loss(model, images, labels, keys):
        start = None if model.chains is None else model.chains[...]
        value, samples = contrastive_divergence(model, images, keys, steps, start)
        if model.chains is not None:
            model.chains[...] = samples
        return value

    return loss


def evaluation_sums(model, images, labels, mask) -> dict:
    """Over the unmasked examples: the reconstruction's mean squared error per pixel, and the
    pseudo-log-likelihood (`REPORTED`, once divided by their count)."""
    v = images.reshape(images.shape[0], -1)
    error = jnp.mean(jnp.square(model.reconstruction(v) - v), axis=-1)
    return {"reconstruction_error": jnp.sum(error * mask),
            "pseudo_log_likelihood": jnp.sum(model.pseudo_log_likelihood(v) * mask)}  # fmt: skip


def hidden_units(name: str) -> int:
    """The H of ``--model rbm:H``, refused unless a whole number of at least 1."""
    from jaxpar.core.errors import UserError

    size = name.partition(":")[2]
    if not size.isdigit() or int(size) < 1:
        raise UserError(f"--model {name}: an RBM's hidden units are a number of at least 1, "
                        "as in rbm:500")  # fmt: skip
    return int(size)
