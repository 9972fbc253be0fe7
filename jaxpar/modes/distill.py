"""Knowledge distillation (``--teacher WORKDIR``): a trained jaxpar model teaches the one training.

The teacher (any model of a jaxpar checkpoint, its latest step) is restored straight into its
shardings on the run's mesh, frozen, and run in the same jitted step on the same prepared
(augmented) batch, in evaluation mode. The student's loss (Hinton et al. 2015):

    A * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - A) * cross-entropy

with T ``--distill-temperature`` and A ``--distill-weight``. The teacher's parameters ride in the
train state (``state[TEACHER]``, saved in checkpoints as ``teacher``), so a resumed run has the
same teacher whatever happens to its workdir. A = 0 is plain training, exactly.
"""

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpar.core.step import cross_entropy

TEACHER = 4  # the train state's key of the teacher's parameters


def distill_loss(student, teacher, labels, temperature: float, weight: float) -> jax.Array:
    """The mean over the batch of ``A T^2 KL(p_teacher || p_student) + (1 - A) CE``, both
    distributions at temperature T.

    >>> s, t = jnp.array([[1.0, 0.0]]), jnp.array([[0.0, 1.0]])
    >>> float(distill_loss(s, t, jnp.array([0]), 1.0, 0.0))  # A = 0: cross-entropy
    0.31326...
    """
    log_s = jax.nn.log_softmax(student / temperature)
    log_t = jax.nn.log_softmax(teacher / temperature)
    kl = jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1)
    return jnp.mean(weight * temperature**2 * kl + (1 - weight) * cross_entropy(student, labels))


@dataclasses.dataclass(frozen=True)
class Teacher:
    graphdef: object  # of the teacher's model
    abstract: dict  # its model's shapes, a pure dict
    shardings: dict  # their shardings on the run's mesh
    restore: object  # () -> its parameters, restored into their shardings
    temperature: float
    weight: float

    def params(self) -> dict:
        """The teacher's parameters, restored into their shardings."""
        return self.restore()

    def logits(self, params, images) -> jax.Array:
        model = nnx.merge(self.graphdef, params)
        return jax.lax.stop_gradient(model(images, train=False))

    def loss(self, model, images, labels, keys, teacher_logits) -> jax.Array:
        student = model(images, train=True, rngs=keys)
        return distill_loss(student, teacher_logits, labels, self.temperature, self.weight)


def with_teacher(teacher: Teacher, abstract, shardings, init, step):
    """A run's state shapes, shardings, initialiser and train step with `teacher` riding along
    (``state[TEACHER]``)."""
    abstract = {**abstract, TEACHER: teacher.abstract}
    shardings = {**shardings, TEACHER: teacher.shardings}
    return abstract, shardings, lambda: {**init(), TEACHER: teacher.params()}, partial(
        step, teacher=teacher)  # fmt: skip
