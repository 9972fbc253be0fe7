"""The seed program's MLP, with logical axis names on every parameter.

Linear(512) + ReLU, Dropout(0.5), Linear(256) + PReLU, Linear(classes). Under tensor parallelism
the first layer is column-parallel and the second row-parallel (Megatron): the 512-wide activation
stays sharded over ``model`` between them and one all-reduce joins the second layer's output.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpar.core.axes import axes
from jaxpar.models.dropout import dropout, example_keys


def _dense(din, dout, names, dtype, rngs):
    return nnx.Linear(
        din,
        dout,
        dtype=dtype,
        kernel_metadata=axes(*names),
        bias_metadata=axes(*names[1:]),
        rngs=rngs,
    )


class MLP(nnx.Module):
    """Flattens the input and returns float32 logits.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> MLP((8, 8, 1), 10, rngs=nnx.Rngs(0))(jnp.zeros((2, 8, 8, 1))).shape
    (2, 10)
    """

    def __init__(self, image_shape, num_classes, *, dtype=jnp.float32, rngs: nnx.Rngs):
        din = math.prod(image_shape)
        self.fc1 = _dense(din, 512, ("embed", "hidden"), dtype, rngs)  # column-parallel
        self.rate = 0.5
        self.fc2 = _dense(512, 256, ("hidden", "embed"), dtype, rngs)  # row-parallel
        self.act = nnx.PReLU(0.25)  # PyTorch's default slope, as in the seed
        self.head = _dense(256, num_classes, ("embed", "classes"), dtype, rngs)

    def __call__(self, x, *, train: bool = False, rngs: jax.Array | None = None):
        """`rngs`: one key per example (or one for the whole batch), used when `train` is true;
        each example's mask depends on its own key only (`jaxpar.models.dropout`)."""
        x = x.reshape(x.shape[0], -1)
        x = jax.nn.relu(self.fc1(x))
        x = dropout(x, self.rate, example_keys(rngs, x.shape[0]) if train else None)
        x = self.act(self.fc2(x))
        return self.head(x).astype(jnp.float32)


class TwoNN(nnx.Module):
    """The FedAvg paper's ``2NN`` (McMahan et al. 2017): two hidden layers of 200 with ReLU, no
    dropout; its input size follows the data (784 on MNIST: 199,210 parameters).

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> TwoNN((28, 28, 1), 10, rngs=nnx.Rngs(0))(jnp.zeros((2, 28, 28, 1))).shape
    (2, 10)
    """

    def __init__(self, image_shape, num_classes, *, dtype=jnp.float32, rngs: nnx.Rngs):
        din = math.prod(image_shape)
        self.fc1 = _dense(din, 200, ("embed", "hidden"), dtype, rngs)  # column-parallel
        self.fc2 = _dense(200, 200, ("hidden", "embed"), dtype, rngs)  # row-parallel
        self.head = _dense(200, num_classes, ("embed", "classes"), dtype, rngs)

    def __call__(self, x, *, train: bool = False, rngs: jax.Array | None = None):
        x = jax.nn.relu(self.fc1(x.reshape(x.shape[0], -1)))
        x = jax.nn.relu(self.fc2(x))
        return self.head(x).astype(jnp.float32)
