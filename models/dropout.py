"""Dropout whose masks depend on each example's own key, never on the batch it is in.

A model called with one key per example (``keys[i] = fold_in(step_key, global position of
example i)``) draws example i's masks from ``keys[i]`` alone, so cutting the global batch into
microbatches (gradient accumulation, pipeline stages) or sharding it over devices never changes
an example's masks. Each dropout site folds its own constants (a site number, a layer index) into
the example's key, so sites and layers draw different masks.
"""

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

    def one(key, row):
        for s in salt:
            key = jax.random.fold_in(key, s)
        keep = jax.random.bernoulli(key, 1.0 - rate, row.shape)
        return jnp.where(keep, row / (1.0 - rate), jnp.zeros_like(row))

    return jax.vmap(one)(keys, x)
