"""Dropout whose masks depend on each example's own key, never on the batch it is in.

A model called with one key per example (``keys[i] = fold_in(step_key, global position of
example i)``) draws example i's masks from ``keys[i]`` alone, so cutting the global batch into
microbatches (gradient accumulation, pipeline stages) or sharding it over devices never changes
an example's masks. Each dropout site folds its own constants (a site number, a layer index) into
the example's key, so sites and layers draw different masks.
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
    words = jax.random.key_data(keys)  # (batch, 2) uint32: a threefry key per example
    for s in salt:
        words = jnp.stack(threefry2x32(words[:, 0], words[:, 1], 0, s), axis=-1)  # fold_in
    keep = bernoulli(words, 1.0 - rate, x.shape[1:])
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


# JAX lowers its threefry hash on the CPU as a loop of five iterations, each a few separate
# passes over the (batch, features) words. Written out unrolled below, it fuses with the
# dropout's one elementwise pass: the MLP's CPU step 3% faster (`benchmarks/cpu_step.py`). The
# words are JAX's own, bit for bit (tests/test_vit.py checks against jax.random).
ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def threefry2x32(k1, k2, x1, x2):
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


def bernoulli(words, p: float, shape) -> jax.Array:
    """``jax.random.bernoulli(key_i, p, shape)`` for each example's key words ``words[i]``:
    shape ``(batch, *shape)``. Same bits: counters are the element positions, the 32 random bits
    are the two hashed words xor-ed, and their top 23 make a float in [0, 1) compared with `p`."""
    positions = jax.lax.broadcasted_iota(jnp.uint32, (1, math.prod(shape)), 1)
    key = [w.reshape(-1, 1) for w in (words[:, 0], words[:, 1])]
    bits = jnp.bitwise_xor(*threefry2x32(*key, 0, positions)).reshape(-1, *shape)
    one = jnp.uint32(0x3F800000)  # 1.0f: a uniform float in [1, 2), then minus 1
    uniform = jax.lax.bitcast_convert_type((bits >> jnp.uint32(9)) | one, jnp.float32) - 1.0
    return uniform < jnp.float32(p)
