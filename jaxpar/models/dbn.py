"""A deep belief network unrolled into a classifier (issue #33): ``--model dbn:500-500-2000`` is
an MLP whose hidden layers are sigmoid units of those widths, then a linear classifier head.

Each hidden layer computes what an RBM of the stack computes of its input: the probabilities
``p(h = 1 | v) = sigmoid(v W + c)`` (`jaxpar.models.rbm.RBM.hidden_probs`). So a stack of RBMs
trained greedily, each on the probabilities of the one below (``--pretrain-epochs``,
`jaxpar.run.pretrain`), is this network's initialisation: layer i's ``kernel`` and ``bias`` are
RBM i's ``kernel`` and ``hidden_bias``, and the head starts fresh. Without pretraining it is an
ordinary sigmoid MLP with Flax's default initialisation: the baseline pretraining is measured
against. Its input is the image's pixels in [0, 1], as the RBMs read them.

Under tensor parallelism the layers alternate column- and row-parallel, as the MLP's do.
"""

import itertools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpar.core.axes import axes
from jaxpar.core.errors import UserError

# Each layer's (input, output) logical axes, alternating: the activation between a
# column-parallel layer and the next row-parallel one stays sharded over ``model``.
ROLES = (("embed", "hidden"), ("hidden", "embed"))


class DBN(nnx.Module):
    """Sigmoid hidden layers of the widths `sizes`, then the classifier head; float32 logits.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> net = DBN((8, 8, 1), 10, sizes=(16, 8), rngs=nnx.Rngs(0))
    >>> net(jnp.zeros((2, 8, 8, 1))).shape, net.features(jnp.zeros((2, 64))).shape
    ((2, 10), (2, 8))
    """

    def __init__(self, image_shape, num_classes, *, sizes, dtype=jnp.float32, rngs: nnx.Rngs):
        widths = (math.prod(image_shape), *sizes)
        self.layers = nnx.List([
            nnx.Linear(a, b, dtype=dtype, kernel_metadata=axes(*ROLES[i % 2]),
                       bias_metadata=axes(ROLES[i % 2][1]), rngs=rngs)
            for i, (a, b) in enumerate(itertools.pairwise(widths))
        ])  # fmt: skip
        last = ROLES[(len(sizes) - 1) % 2][1]
        self.head = nnx.Linear(widths[-1], num_classes, dtype=dtype,
                               kernel_metadata=axes(last, "classes"),
                               bias_metadata=axes("classes"), rngs=rngs)  # fmt: skip

    def features(self, v):
        """The top hidden layer's probabilities given flattened inputs `v` in [0, 1]: the stack
        of RBMs' upward pass."""
        for layer in self.layers:
            v = jax.nn.sigmoid(layer(v))
        return v

    def __call__(self, x, *, train: bool = False, rngs: jax.Array | None = None):
        return self.head(self.features(x.reshape(x.shape[0], -1))).astype(jnp.float32)


def layer_sizes(name: str) -> tuple[int, ...]:
    """The hidden widths of ``--model dbn:A-B-C``, refused unless whole numbers of at least 1.

    >>> layer_sizes("dbn:500-500-2000")
    (500, 500, 2000)
    """
    sizes = name.partition(":")[2].split("-")
    if not all(s.isdigit() and int(s) >= 1 for s in sizes):
        raise UserError(f"--model {name}: a DBN's layers are widths of at least 1 joined by "
                        "dashes, as in dbn:500-500-2000")  # fmt: skip
    return tuple(int(s) for s in sizes)
