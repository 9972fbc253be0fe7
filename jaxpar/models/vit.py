"""Vision Transformer (ViT) in Flax NNX, with logical axis names and stacked, scanned blocks.

Patches (a conv with kernel = stride = patch) -> class token or mean pooling -> learned position
embeddings -> ``depth`` pre-LayerNorm encoder blocks (multi-head self-attention, MLP with exact
GELU) -> final LayerNorm -> classifier. Under tensor parallelism (``heads`` and ``mlp`` on
``model``) the query/key/value projections are column-parallel and the attention output
projection row-parallel, and likewise the MLP's two layers (Megatron): a block costs two
all-reduces.

The blocks are created stacked: every block parameter has a leading ``layers`` axis (one
``nnx.vmap`` over the layer's constructor) and the forward pass is one ``jax.lax.scan`` over it,
so tracing and compile time do not grow with the depth. ``remat=True`` recomputes each block's
activations in the backward pass instead of keeping them (``jax.checkpoint`` around the block).

Dropout (rate ``dropout``: embeddings, attention output, MLP hidden and output; rate
``attention_dropout``: attention probabilities) draws every example's masks from that example's
own key (`jaxpar.models.dropout`): call ``model(images, train=True, rngs=keys)`` with ``keys``
of shape ``(batch,)``, ``keys[i] = fold_in(step_key, global position of example i)``. A single key
is taken as the key of a whole global batch (example ``i`` gets ``fold_in(key, i)``).

Trace the train step under its mesh (`jaxpar.core.step.under_mesh`, or ``jax.set_mesh(mesh)``): the
blocks then pin the residual stream to the ``microbatch`` sharding (`constrain`), which FSDP
needs to gather weights inside the scan.

How the stacked blocks run is the ``stack`` argument: `scan_layers` (default), or a pipeline
schedule over the ``stage`` mesh axis (`jaxpar.modes.pipeline.Schedule`), which computes the same.
"""

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpar.core.axes import axes
from jaxpar.models.dropout import dropout as drop
from jaxpar.models.dropout import example_keys

# Dropout sites: folded into each example's key (after the layer index inside the blocks).
EMBED_SITE, PROBS_SITE, ATTN_SITE, HIDDEN_SITE, MLP_SITE = range(5)

_dense_init = nnx.initializers.xavier_uniform()


def _user_error(message):
    # Imported here: jaxpar's package imports the models, so a top-level import would be circular.
    from jaxpar.core.errors import UserError

    return UserError(message)


def constrain(x, *names):
    """Pin an activation's layout by logical names on the mesh the program is traced under.

    The names go through `jaxpar.core.sharding.RULES` (``batch`` -> ``data``, ``fsdp``). It takes
    effect when the step is traced inside ``jax.set_mesh(mesh)``; without a mesh in context it
    leaves `x` to XLA. Performance is decided here: without it, XLA partitions the scanned blocks
    under FSDP by keeping the weights sharded and moving the activations instead (ViT-Lite,
    batch 128, fsdp=8 on 8 CPU devices: 287 MiB of temporaries per device; with the constraint
    53 MiB, each layer's weights all-gathered as FSDP intends, and 65 MiB under data parallelism).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not {"data", "fsdp", "model"} <= set(mesh.axis_names):
        return x
    from jaxpar.core.sharding import activation_spec  # here: jaxpar imports the models

    return jax.lax.with_sharding_constraint(x, activation_spec(names, x.shape, mesh))


def default_patch_size(image_shape) -> int:
    """4 for images of at most 64 pixels, 16 above (ViT-B/16 at 224). Measured on the 8x8
    digits (docs/models.md, "ViT recipe"): patch 2's 16 tokens overfit the 1,437 images (87-91% in
    eleven runs) where patch 4 reaches 98-99%; 4 on 32x32 is the CIFAR ViTs' (ViT-Lite-7/4)."""
    return 4 if max(image_shape[:2]) <= 64 else 16


def check_patch_size(image_shape, patch_size: int | None) -> int:
    """The patch size to use, or a `UserError` naming those that divide the image.

    >>> check_patch_size((28, 28, 1), None)
    4
    >>> check_patch_size((8, 8, 1), 3)
    Traceback (most recent call last):
    ...
    jaxpar.core.errors.UserError: --patch-size 3 does not divide the 8x8 image; use one of ...
    """
    height, width = image_shape[:2]
    given = patch_size is not None
    patch = patch_size if given else default_patch_size(image_shape)
    if not isinstance(patch, int) or patch < 1 or height % patch or width % patch:
        fits = ", ".join(
            str(p) for p in range(1, min(height, width) + 1) if not height % p + width % p
        )
        what, fix = f"--patch-size {patch}", "use"
        if not given:
            what, fix = f"the default patch size {patch}", "pass --patch-size"
        raise _user_error(f"{what} does not divide the {height}x{width} image; {fix} one of {fits}")
    return patch


def _norm(width, dtype, rngs):
    names = axes("embed")
    return nnx.LayerNorm(
        width, epsilon=1e-6, dtype=dtype, scale_metadata=names, bias_metadata=names, rngs=rngs
    )


def _dense(din, dout, names, dtype, rngs, axis=-1):
    """A `nnx.LinearGeneral`: `names` name the kernel's dimensions (in, then out)."""
    n_out = 1 if isinstance(dout, int) else len(dout)
    return nnx.LinearGeneral(
        din,
        dout,
        axis=axis,
        dtype=dtype,
        kernel_init=_dense_init,
        kernel_metadata=axes(*names),
        bias_metadata=axes(*names[-n_out:]),
        rngs=rngs,
    )


def platform() -> str:
    """The platform the program is traced for: the context mesh's, else JAX's default."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def fused_attention(attention: str, dtype, probs_dropout: bool) -> bool:
    """Whether to use cuDNN's fused attention: ``attention="cudnn"``, or ``"auto"`` on a GPU in
    bf16/fp16 without attention-probability dropout (which it cannot apply per example)."""
    if attention == "auto":
        half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        return half and not probs_dropout and platform() in ("gpu", "cuda")
    if attention not in ("xla", "cudnn"):
        raise _user_error(f"ViT attention must be auto, xla or cudnn, got {attention!r}")
    return attention == "cudnn"


def cudnn_attention(q, k, v):
    """cuDNN's fused (flash) attention, or None where it cannot run this shape. Performance is
    decided here on GPUs: it never writes the (batch, heads, seq, seq) probabilities to memory.
    Its training kernels want an even sequence length: the tokens are padded to a multiple of 8
    and the padding masked out by length."""
    tokens = q.shape[1]
    padded = -(-tokens // 8) * 8
    lengths = jnp.full((q.shape[0],), tokens, jnp.int32)
    q, k, v = (jnp.pad(a, ((0, 0), (0, padded - tokens), (0, 0), (0, 0))) for a in (q, k, v))
    try:
        y = jax.nn.dot_product_attention(
            q, k, v, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
            implementation="cudnn",
        )  # fmt: skip
    except NotImplementedError:  # a shape or version cuDNN does not support: XLA's attention
        return None
    return y[:, :tokens]


def embed_patches(conv: nnx.Conv, x, patch: int):
    """`conv` (kernel = stride = `patch`, no padding) applied as what it computes: one matrix
    product of every flattened patch with the flattened kernel. Correctness is decided here: on
    jax 0.10.2 XLA's partitioner miscompiles that strided convolution when it is vmapped over
    replicas (`jaxpar.modes.sync`) with the kernel's output channels FSDP-sharded (4x4 patches, 64
    channels: logits off by 3); the matrix product partitions correctly."""
    batch, height, width, channels = x.shape
    x = x.reshape(batch, height // patch, patch, width // patch, patch, channels)
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, height // patch, width // patch, -1)
    kernel = conv.kernel[...].astype(x.dtype).reshape(-1, conv.kernel.shape[-1])  # (p p c, out)
    return x @ kernel + conv.bias[...].astype(x.dtype)


def scan_layers(block, params, x, keys, remat=False, first=0, pin=True):
    """Apply stacked layers one after another (one ``lax.scan``): the unpipelined stack.

    `block(params, x, keys, layer)` applies one layer; `params` hold the layers on a leading
    axis; `keys` are the examples' dropout keys (or None); `first` is the global index of the
    first layer; `remat` keeps only each layer's input and recomputes the rest in the backward
    pass; `pin` pins the residual stream to the ``microbatch`` sharding (`constrain`). A pipeline
    (`jaxpar.modes.pipeline.Schedule`) is another function of the first five arguments.
    """
    depth = jax.tree.leaves(params)[0].shape[0]

    def one(x, params_and_index):
        params, index = params_and_index
        if pin:  # the residual stream: split over the examples
            x = constrain(x, "microbatch", None, None)
        return block(params, x, keys, index), None

    if remat:
        one = jax.checkpoint(one, prevent_cse=False)
    return jax.lax.scan(one, x, (params, first + jnp.arange(depth)))[0]


class Block(nnx.Module):
    """One pre-LayerNorm encoder block: ``x + attention(norm(x))``, then ``x + mlp(norm(x))``.

    Tensor parallelism: query/key/value are column-parallel over ``heads``, the output projection
    row-parallel (one all-reduce); the MLP in over ``mlp``, out row-parallel (another).
    """

    def __init__(
        self, width, heads, mlp_dim, *, dropout, attention_dropout, attention, dtype, rngs: nnx.Rngs
    ):
        head_dim = width // heads
        qkv = (width, (heads, head_dim), ("embed", "heads", "head_dim"), dtype, rngs)
        self.attn_norm = _norm(width, dtype, rngs)
        self.query, self.key, self.value = _dense(*qkv), _dense(*qkv), _dense(*qkv)
        self.attn_out = _dense(
            (heads, head_dim), width, ("heads", "head_dim", "embed"), dtype, rngs, axis=(-2, -1)
        )
        self.mlp_norm = _norm(width, dtype, rngs)
        self.mlp_in = _dense(width, mlp_dim, ("embed", "mlp"), dtype, rngs)
        self.mlp_out = _dense(mlp_dim, width, ("mlp", "embed"), dtype, rngs)
        self.dropout, self.attention_dropout = dropout, attention_dropout
        self.attention, self.dtype = attention, dtype

    def __call__(self, x, keys, layer):
        """`keys`: one key per example or None (no dropout); `layer`: this block's index."""
        y = self.attn_norm(x)
        q, k, v = self.query(y), self.key(y), self.value(y)  # (batch, seq, heads, head_dim)
        probs_dropout = self.attention_dropout and keys is not None
        y = None
        if fused_attention(self.attention, self.dtype, probs_dropout):
            y = cudnn_attention(q, k, v)  # None where cuDNN cannot run this shape
        if y is None:
            logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
            probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
            probs = drop(probs, self.attention_dropout, keys, layer, PROBS_SITE)
            y = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        y = self.attn_out(y)
        x = x + drop(y, self.dropout, keys, layer, ATTN_SITE)
        y = jax.nn.gelu(self.mlp_in(self.mlp_norm(x)), approximate=False)  # as torch and timm
        y = self.mlp_out(drop(y, self.dropout, keys, layer, HIDDEN_SITE))
        return x + drop(y, self.dropout, keys, layer, MLP_SITE)


class ViT(nnx.Module):
    """A Vision Transformer for NHWC images; returns float32 logits.

    ``dtype`` is the compute dtype; parameters stay float32. ``pool="cls"`` classifies from a
    learned class token, ``"mean"`` from the mean of the patch tokens.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> vit = ViT((8, 8, 1), 10, width=32, depth=2, heads=2, mlp_dim=64, rngs=nnx.Rngs(0))
    >>> vit(jnp.zeros((2, 8, 8, 1))).shape
    (2, 10)
    >>> vit.blocks.query.kernel.shape  # (layers, embed, heads, head_dim)
    (2, 32, 2, 16)
    """

    def __init__(
        self,
        image_shape,
        num_classes,
        *,
        width,
        depth,
        heads,
        mlp_dim,
        patch_size=None,
        pool="cls",
        dropout=0.0,
        attention_dropout=0.0,
        attention="auto",
        remat=False,
        stack=None,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if pool not in ("cls", "mean"):
            raise _user_error(f"ViT pooling must be 'cls' or 'mean', got {pool!r}")
        if width % heads:
            raise _user_error(f"{heads} attention heads do not divide the width {width}")
        for name, rate in (("dropout", dropout), ("attention dropout", attention_dropout)):
            if not 0.0 <= rate < 1.0:
                raise _user_error(f"{name} rate must be in [0, 1), got {rate}")
        height, wide, channels = image_shape
        self.patch = patch = check_patch_size(image_shape, patch_size)
        tokens = (height // patch) * (wide // patch) + (pool == "cls")
        self.pool, self.depth, self.remat, self.dtype = pool, depth, remat, dtype
        self.stack = stack
        self.dropout = dropout

        self.embed = nnx.Conv(
            channels,
            width,
            (patch, patch),
            strides=(patch, patch),
            padding="VALID",
            dtype=dtype,
            kernel_init=nnx.initializers.lecun_normal(),
            kernel_metadata=axes(None, None, None, "embed"),
            bias_metadata=axes("embed"),
            rngs=rngs,
        )
        self.cls_token = (
            nnx.Param(jnp.zeros((width,)), **axes("embed")) if pool == "cls" else nnx.data(None)
        )
        self.pos_embed = nnx.Param(
            nnx.initializers.normal(0.02)(rngs.params(), (tokens, width)), **axes("seq", "embed")
        )

        # One block per layer, created by one vmapped constructor: every parameter gets a leading
        # axis of size `depth`, and Flax prepends the logical name 'layers' to its names.
        @nnx.split_rngs(splits=depth)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def blocks(rngs):
            return Block(
                width,
                heads,
                mlp_dim,
                dropout=dropout,
                attention_dropout=attention_dropout,
                attention=attention,
                dtype=dtype,
                rngs=rngs,
            )

        self.blocks = blocks(rngs)
        self.norm = _norm(width, dtype, rngs)
        self.head = nnx.Linear(
            width,
            num_classes,
            dtype=dtype,
            kernel_metadata=axes("embed", "classes"),
            bias_metadata=axes("classes"),
            rngs=rngs,
        )

    def __call__(self, x, *, train: bool = False, rngs: jax.Array | None = None):
        """`rngs`: one key per example, shape ``(batch,)`` (see `jaxpar.models.dropout`); used when
        `train` is true and a dropout rate is set."""
        keys = example_keys(rngs, x.shape[0]) if train else None
        x = embed_patches(self.embed, x.astype(self.dtype), self.patch)  # (b, h/p, w/p, width)
        batch, width = x.shape[0], x.shape[-1]
        x = constrain(x.reshape(batch, -1, width), "batch", None, None)
        # The class token and position embeddings are small: gathered whole before they meet
        # the batch. Broadcast from their FSDP-split width straight into the batch's layout,
        # XLA's partitioner replicated the broadcast result instead ("Involuntary full
        # rematerialization" on stage=2,data=2,fsdp=2).
        if self.cls_token is not None:
            token = constrain(self.cls_token[...].astype(x.dtype), None)
            cls = constrain(jnp.broadcast_to(token, (batch, 1, width)), "batch", None, None)
            x = jnp.concatenate([cls, x], axis=1)
        x = x + constrain(self.pos_embed[...].astype(x.dtype), None, None)
        x = drop(x, self.dropout, keys, EMBED_SITE)

        graphdef, stacked = nnx.split(self.blocks)

        def block(params, x, keys, index):
            return nnx.merge(graphdef, params)(x, keys, index)

        x = (self.stack or scan_layers)(block, stacked, x, keys, remat=self.remat)

        x = self.norm(x)
        x = x[:, 0] if self.pool == "cls" else x.mean(axis=1)
        return self.head(x).astype(jnp.float32)


ViTTiny = partial(ViT, width=192, depth=12, heads=3, mlp_dim=768)
ViTLite = partial(ViT, width=256, depth=7, heads=4, mlp_dim=512)
ViTSmall = partial(ViT, width=384, depth=12, heads=6, mlp_dim=1536)
ViTBase = partial(ViT, width=768, depth=12, heads=12, mlp_dim=3072)
