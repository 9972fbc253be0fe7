"""ResNet-18/34/50 (and the CIFAR-style ResNet-8) in Flax NNX, with logical axis names.

Convolution kernels are ``(h, w, conv_in, conv_out)``; BatchNorm parameters and statistics follow
their channels (``conv_out``). Under jit with a batch sharded over the mesh, BatchNorm computes
global batch statistics: XLA inserts the cross-device reduction, so no ``axis_name`` is needed.
Inputs of at most 32 pixels get the small-image stem (3x3 conv, no pooling); larger ones the
ImageNet stem (7x7 stride-2 conv and max pooling).

Convolutions and the max pooling pad symmetrically, ``(k - 1) // 2`` on each side, as
torchvision's ResNets do, so published PyTorch weights compute the same logits here
(`jaxpar.models.pytorch`). ``SAME`` padding, which jaxpar used before (revision 1, `REVISIONS`),
pads a stride-2 layer 0 before and 1 after: the same shapes, other numbers.
"""

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpar.core.axes import axes


def _conv(cin, cout, k, stride, dtype, rngs):
    return nnx.Conv(
        cin,
        cout,
        (k, k),
        strides=stride,
        padding=[((k - 1) // 2, (k - 1) // 2)] * 2,  # symmetric, as PyTorch (not SAME's 0, 1)
        use_bias=False,
        dtype=dtype,
        kernel_init=nnx.initializers.variance_scaling(2.0, "fan_out", "normal"),
        kernel_metadata=axes(None, None, "conv_in", "conv_out"),
        rngs=rngs,
    )


def _norm(channels, dtype, rngs, zero_scale=False):
    """BatchNorm with PyTorch's momentum (0.1); parameters and statistics in float32.

    Flax computes the batch statistics in float32 whatever ``dtype`` is; ``dtype`` is only the
    output's. Performance is decided here: with bf16 outputs the activations between layers, and
    those kept for the backward pass, take half the bytes (benchmarks/gpu.py --bn-fp32 measures
    the float32-output variant).
    """
    names = axes("conv_out")
    bn = nnx.BatchNorm(
        channels,
        momentum=0.9,
        epsilon=1e-5,
        dtype=dtype,
        scale_init=nnx.initializers.zeros if zero_scale else nnx.initializers.ones,
        scale_metadata=names,
        bias_metadata=names,
        rngs=rngs,
    )
    bn.mean.set_metadata(out_sharding=names["out_sharding"])  # statistics follow channels
    bn.var.set_metadata(out_sharding=names["out_sharding"])
    return bn


def _shortcut(cin, cout, stride, dtype, rngs):
    """A 1x1 projection where the residual changes shape, else ``(None, None)``."""
    if stride == 1 and cin == cout:
        return nnx.data(None), nnx.data(None)
    return _conv(cin, cout, 1, stride, dtype, rngs), _norm(cout, dtype, rngs)


class BasicBlock(nnx.Module):
    expansion = 1

    def __init__(self, cin, width, stride, *, dtype, rngs):
        cout = width * self.expansion
        self.conv1, self.bn1 = _conv(cin, width, 3, stride, dtype, rngs), _norm(width, dtype, rngs)
        self.conv2 = _conv(width, cout, 3, 1, dtype, rngs)
        self.bn2 = _norm(cout, dtype, rngs, zero_scale=True)
        self.shortcut, self.shortcut_bn = _shortcut(cin, cout, stride, dtype, rngs)

    def __call__(self, x, train):
        y = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=not train))
        y = self.bn2(self.conv2(y), use_running_average=not train)
        if self.shortcut is not None:
            x = self.shortcut_bn(self.shortcut(x), use_running_average=not train)
        return jax.nn.relu(x + y)


class Bottleneck(nnx.Module):
    expansion = 4

    def __init__(self, cin, width, stride, *, dtype, rngs):
        cout = width * self.expansion
        self.conv1, self.bn1 = _conv(cin, width, 1, 1, dtype, rngs), _norm(width, dtype, rngs)
        self.conv2 = _conv(width, width, 3, stride, dtype, rngs)
        self.bn2 = _norm(width, dtype, rngs)
        self.conv3 = _conv(width, cout, 1, 1, dtype, rngs)
        self.bn3 = _norm(cout, dtype, rngs, zero_scale=True)
        self.shortcut, self.shortcut_bn = _shortcut(cin, cout, stride, dtype, rngs)

    def __call__(self, x, train):
        y = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=not train))
        y = jax.nn.relu(self.bn2(self.conv2(y), use_running_average=not train))
        y = self.bn3(self.conv3(y), use_running_average=not train)
        if self.shortcut is not None:
            x = self.shortcut_bn(self.shortcut(x), use_running_average=not train)
        return jax.nn.relu(x + y)


class ResNet(nnx.Module):
    """A ResNet for NHWC images; returns float32 logits.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> net = ResNet((8, 8, 1), 10, stage_sizes=(1, 1, 1), width=16, rngs=nnx.Rngs(0))
    >>> net(jnp.zeros((2, 8, 8, 1))).shape
    (2, 10)
    """

    def __init__(
        self,
        image_shape,
        num_classes,
        *,
        stage_sizes,
        block=BasicBlock,
        width=64,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        height, _, channels = image_shape
        self.small_stem = height <= 32
        k, stride = (3, 1) if self.small_stem else (7, 2)
        self.stem = _conv(channels, width, k, stride, dtype, rngs)
        self.stem_bn = _norm(width, dtype, rngs)
        blocks, cin = [], width
        for i, n in enumerate(stage_sizes):
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(block(cin, width * 2**i, stride, dtype=dtype, rngs=rngs))
                cin = width * 2**i * block.expansion
        self.blocks = nnx.List(blocks)
        self.head = nnx.Linear(
            cin,
            num_classes,
            dtype=dtype,
            kernel_metadata=axes("embed", "classes"),
            bias_metadata=axes("classes"),
            rngs=rngs,
        )

    def __call__(self, x, *, train: bool = False, rngs: jax.Array | nnx.Rngs | None = None):
        x = jax.nn.relu(self.stem_bn(self.stem(x), use_running_average=not train))
        if not self.small_stem:
            x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for block in self.blocks:
            x = block(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return self.head(x).astype(jnp.float32)


ResNet8 = partial(ResNet, stage_sizes=(1, 1, 1), width=16)
ResNet18 = partial(ResNet, stage_sizes=(2, 2, 2, 2))
ResNet34 = partial(ResNet, stage_sizes=(3, 4, 6, 3))
ResNet50 = partial(ResNet, stage_sizes=(3, 4, 6, 3), block=Bottleneck)
