"""Dropout whose masks depend on each example's own key, never on the batch it is in.

A model called with one key per example (``keys[i] = fold_in(step_key, global position of
example i)``) draws example i's masks from ``keys[i]`` alone, so cutting the global batch into
microbatches (gradient accumulation, pipeline stages) or sharding it over devices never changes
an example's masks. Each dropout site folds its own constants (a site number, a layer index) into
the example's key, so sites and layers draw different masks.

The masks are the ones ``jax.random.bernoulli`` draws from each example's key; with JAX's default
threefry keys they are hashed here, in the dropout's own fused pass (see `dropout`), and
otherwise by `jax.random` itself (`jax_random_dropout`).
"""

import math

import jax
import jax.numpy as jnp


def example_keys(rngs: jax.Array | None, batch: int) -> jax.Array | None:
    """One key per example, shape ``(batch,)``, from what a model's ``rngs`` argument holds.

    ``None`` stays ``None`` (no dropout). A ``(batch,)`` key array is used as is. A single key
    (shape ``()``) is taken as the step's key of a whole global batch: example ``i`` gets
    ``fold_in(key, i)``, the keys a step passing per-example keys would give.

    >>> key = jax.random.key(0)
    >>> keys = example_keys(key, 3)
    >>> keys.shape
    (3,)
    >>> data = jax.random.key_data
    >>> bool((data(keys[2]) == data(jax.random.fold_in(key, 2))).all())
    True
    """
    if rngs is None:
        return None
    if not (isinstance(rngs, jax.Array) and jnp.issubdtype(rngs.dtype, jax.dtypes.prng_key)):
        raise TypeError(f"rngs must be a typed jax key array (jax.random.key), got {rngs!r}")
    if rngs.shape == ():
        return jax.vmap(jax.random.fold_in, (None, 0))(rngs, jnp.arange(batch))
    if rngs.shape != (batch,):
        raise ValueError(
            f"rngs holds keys of shape {rngs.shape}; expected one per example ({batch},)"
        )
    return rngs


def dropout(x: jax.Array, rate: float, keys: jax.Array | None, *salt) -> jax.Array:
    """Zero each element of `x` with probability `rate`, scaling the rest by ``1 / (1 - rate)``.

    `x` has the batch first and `keys` one key per example (or ``None``: no dropout, as in
    evaluation). `salt` (ints, possibly traced, e.g. a scanned layer index) is folded into each
    example's key, in order, to tell dropout sites apart. An example's mask depends only on its
    key and the salt:

    >>> keys = jax.random.split(jax.random.key(0), 4)
    >>> x = jnp.ones((4, 1000))
    >>> y = dropout(x, 0.5, keys, 7)
    >>> sorted({float(v) for v in y.ravel()})
    [0.0, 2.0]
    >>> bool((dropout(x[2:], 0.5, keys[2:], 7) == y[2:]).all())  # a part of the batch: same masks
    True
    >>> bool((dropout(x, 0.5, keys, 8) == y).all())  # another site: other masks
    False
    >>> dropout(x, 0.5, None) is x
    True
    """
    if keys is None or rate == 0.0:
        return x
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    if keys.shape != x.shape[:1] or any(jnp.ndim(s) for s in salt):
        raise ValueError(
            f"dropout needs one key per example ({x.shape[:1]}) and scalar salts; got keys of "
            f"shape {keys.shape} and salts of shapes {[jnp.shape(s) for s in salt]}"
        )
    if not _hash_is_jax_randoms(keys, x.shape[1:]):
        return jax_random_dropout(x, rate, keys, *salt)
    k1, k2 = (jax.random.key_data(keys)[:, i] for i in (0, 1))  # each example's threefry key
    for s in salt:
        k1, k2 = _threefry2x32(k1, k2, 0, s)  # jax.random.fold_in
    keep = _bernoulli(k1, k2, 1.0 - rate, x.shape[1:])
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def jax_random_dropout(x, rate: float, keys, *salt) -> jax.Array:
    """`dropout`'s result computed by ``jax.random`` per example (vmapped): the same masks, slower
    on the CPU. `dropout` uses it where its own hash would not give ``jax.random``'s bits."""

    def one(key, row):
        for s in salt:
            key = jax.random.fold_in(key, s)
        keep = jax.random.bernoulli(key, 1.0 - rate, row.shape)
        return jnp.where(keep, row / (1.0 - rate), jnp.zeros_like(row))

    return jax.vmap(one)(keys, x)


# JAX lowers its threefry hash on the CPU as a loop of five iterations, each a few separate
# passes over the (batch, features) words. Written out unrolled below, it fuses with the
# dropout's one elementwise pass: the MLP's CPU step 2-3% faster (`benchmarks/cpu_step.py`;
# not measured on GPUs, where JAX unrolls it too). The bits are JAX's own (tests/test_vit.py
# checks against jax.random) where `_hash_is_jax_randoms` says so.
ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _hash_is_jax_randoms(keys, shape) -> bool:
    """Whether `_bernoulli` gives ``jax.random.bernoulli``'s bits for these keys and rows: JAX's
    default threefry keys and partitionable counters, 32-bit floats, rows under 2**32 elements."""
    return (
        str(jax.random.key_impl(keys)) == "threefry2x32"
        and jax.config.jax_threefry_partitionable
        and not jax.config.jax_enable_x64
        and math.prod(shape) < 2**32
    )


def _threefry2x32(k1, k2, x1, x2):
    """Threefry-2x32, 20 rounds (Salmon et al. 2011), as `jax.random` computes it: key words
    `k1`, `k2` and counter words `x1`, `x2` (uint32, broadcast together) to two hashed words."""
    k1, k2, x1, x2 = (jnp.asarray(v, jnp.uint32) for v in (k1, k2, x1, x2))
    ks = (k1, k2, k1 ^ k2 ^ jnp.uint32(0x1BD11BDA))
    x1, x2 = x1 + ks[0], x2 + ks[1]
    for i in range(5):
        for r in ROTATIONS[i % 2]:
            x1 = x1 + x2
            x2 = x1 ^ ((x2 << jnp.uint32(r)) | (x2 >> jnp.uint32(32 - r)))
        x1, x2 = x1 + ks[(i + 1) % 3], x2 + ks[(i + 2) % 3] + jnp.uint32(i + 1)
    return x1, x2


def _bernoulli(k1, k2, p: float, shape) -> jax.Array:
    """``jax.random.bernoulli(key_i, p, shape)`` for each example's key words ``k1[i], k2[i]``:
    shape ``(batch, *shape)``. Same bits: the counters are the elements' row-major positions
    (built per dimension, so a row sharded over devices is hashed where it lies), the 32 random
    bits are the two hashed words xor-ed, and their top 23 make a float in [0, 1) compared with
    `p`."""
    dims = range(1, len(shape) + 1)
    strides = [math.prod(shape[d:]) for d in dims]
    positions = sum(
        jax.lax.broadcasted_iota(jnp.uint32, (1, *shape), d) * jnp.uint32(stride)
        for d, stride in zip(dims, strides, strict=True)
    )
    k1, k2 = (k.reshape(-1, *[1] * len(shape)) for k in (k1, k2))
    bits = jnp.bitwise_xor(*_threefry2x32(k1, k2, 0, positions))
    one = jnp.uint32(0x3F800000)  # 1.0f: a uniform float in [1, 2), then minus 1
    uniform = jax.lax.bitcast_convert_type((bits >> jnp.uint32(9)) | one, jnp.float32) - 1.0
    return uniform < jnp.float32(p)
