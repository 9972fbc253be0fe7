"""Magnitude pruning while training (``--prune-to S``): an optax wrapper whose state holds masks.

Zhu and Gupta's gradual schedule (2017): the sparsity of every weight matrix or kernel rises from 0
at step ``--prune-start`` to S at ``--prune-end`` along ``S * (1 - (1 - t)**3)`` and stays there.
Every `EVERY` steps while it rises, and at its end, each such parameter keeps its
``n - round(sparsity * n)`` largest weights by magnitude; after every update the rest are set to
exactly zero. A weight once pruned stays pruned (it ranks as zero).
What is pruned follows the logical axes the models carry (`jaxpar.core.axes.is_weight`): weight
matrices and kernels; biases, BatchNorm and LayerNorm scales, the PReLU slope, position
embeddings and per-head attention biases stay dense. A weight that stacks layers on its leading
axis (logical name ``layers``: a ViT's blocks) is pruned layer by layer, each slice to the
sparsity on its own. The masks live
in the optimizer state, so they are sharded like their parameters and saved in checkpoints: a
resumed run prunes on from where it stopped.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxpar.core.axes import is_weight
from jaxpar.core.errors import UserError
from jaxpar.core.sharding import path_str

EVERY = 10  # steps between re-rankings while the sparsity rises


class PruneState(NamedTuple):
    mask: optax.Params  # 1 kept, 0 pruned; shaped like the parameters
    count: jax.Array  # updates applied


def sparsity(target: float, start: int, end: int, step) -> jax.Array:
    """The sparsity after `step` updates: 0 up to `start`, `target` from `end` on, cubic between.

    >>> [round(float(sparsity(0.9, 10, 20, s)), 4) for s in (0, 10, 15, 20, 99)]
    [0.0, 0.0, 0.7875, 0.9, 0.9]
    """
    t = jnp.clip((step - start) / max(end - start, 1), 0.0, 1.0)
    return target * (1 - (1 - t) ** 3)


def keep_largest(weights: jax.Array, mask: jax.Array, fraction) -> jax.Array:
    """The mask keeping all but ``round(fraction * n)`` of `weights`, the smallest in magnitude
    (pruned ones count as zero; ties broken by position, so the count is exact)."""
    magnitude = (jnp.abs(weights) * mask).ravel()
    ranks = jnp.argsort(jnp.argsort(magnitude, stable=True), stable=True)
    pruned = jnp.round(fraction * magnitude.size).astype(jnp.int32)
    return (ranks >= pruned).reshape(weights.shape).astype(weights.dtype)


def _key(path) -> str:
    return path_str(path).removesuffix("/.value")  # the optimizer sees `Variable` values


def weight_roles(params: nnx.State) -> dict[str, bool]:
    """The weight matrices and kernels among the parameters (an abstract model's `nnx.Param`
    state), by the logical axes they carry (`jaxpar.core.axes.is_weight`): ``{path: whether its
    leading axis stacks layers}``. Biases, scales, position tables and per-head vectors are not
    in it: they stay dense."""
    found = {}

    def one(path, var):
        names = var.get_metadata().get("out_sharding") or ()
        if is_weight(names):
            found[_key(path)] = names[0] == "layers"

    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    jax.tree_util.tree_map_with_path(one, params, is_leaf=is_var)
    return found


def prune_matrix(weights: jax.Array, mask: jax.Array, fraction, stacked: bool) -> jax.Array:
    """The new mask of one weight matrix or kernel: `keep_largest`, for each layer of a stack."""
    keep = jax.vmap(keep_largest, in_axes=(0, 0, None)) if stacked else keep_largest
    return keep(weights, mask, fraction)


def magnitude_pruning(
    target: float, start: int, end: int, weights: dict[str, bool] | None = None
) -> optax.GradientTransformation:
    """Chain it after an optimizer: its updates land pruned weights on exactly zero. `weights`:
    the parameters to prune (`weight_roles`: path -> stacks layers); None, for plain arrays
    without axis names: every array of two or more dimensions, unstacked.

    >>> params = {"w": jnp.arange(1.0, 11.0).reshape(2, 5), "b": jnp.ones(5)}
    >>> tx = optax.chain(optax.sgd(0.0), magnitude_pruning(0.5, 0, 1))
    >>> updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    >>> new = optax.apply_updates(params, updates)
    >>> new["w"].tolist(), new["b"].tolist()  # half of the matrix, the smallest; vectors dense
    ([[0.0, 0.0, 0.0, 0.0, 0.0], [6.0, 7.0, 8.0, 9.0, 10.0]], [1.0, 1.0, 1.0, 1.0, 1.0])
    """

    def init(params):
        return PruneState(jax.tree.map(jnp.ones_like, params), jnp.zeros([], jnp.int32))

    def update(updates, state, params):
        fraction = sparsity(target, start, end, state.count + 1)

        # Ranks the weights before this update: pruned at its first update, a trained
        # checkpoint loses the weights a one-shot prune of it would (`jaxpar.tools.compress`).
        def mask(path, p, m):
            if weights is None:
                return prune_matrix(p, m, fraction, False) if p.ndim >= 2 else m
            key = _key(path)
            return prune_matrix(p, m, fraction, weights[key]) if key in weights else m

        # Ranking every weight costs two sorts per matrix: only every `EVERY` steps while the
        # sparsity rises, and at its end (a pruned weight ranks as zero: at a constant sparsity
        # the masks would not change).
        step = state.count + 1
        rising = (fraction != sparsity(target, start, end, state.count)) & (
            (step % EVERY == 0) | (step >= end))  # fmt: skip
        new = lambda: jax.tree_util.tree_map_with_path(mask, params, state.mask)  # noqa: E731
        masks = jax.lax.cond(rising, new, lambda: state.mask)
        updates = jax.tree.map(lambda p, u, m: (p + u) * m - p, params, updates, masks)
        return updates, PruneState(masks, state.count + 1)

    return optax.GradientTransformation(init, update)


def prune_end(cfg, total: int) -> int | None:
    """The step the sparsity reaches --prune-to: --prune-end, else 3/4 of the run (None: no
    pruning). Saved in the manifest: a longer continuation keeps the schedule it began."""
    m = cfg.model
    if m.prune_to is None:
        return None
    if m.prune_start >= total:
        raise UserError(f"--prune-start {m.prune_start} is not before the run's end at step "
                        f"{total}: nothing would be pruned; start earlier")  # fmt: skip
    return m.prune_end or max(m.prune_start + 1, total * 3 // 4)


def check_prune_schedule(saved: dict, cfg, total: int, step: int, directory) -> None:
    """A continuation (a longer --steps) keeps the pruning schedule it began: a new end would
    lower the sparsity due at this step and revive pruned weights."""
    before, now = saved.get("prune_end"), prune_end(cfg, total)
    if before is not None and now != before:
        raise UserError(
            f"checkpoint step {step} in {directory} prunes on a schedule that ends at step "
            f"{before}, and this run's would end at step {now}; pass --prune-end {before} to go "
            "on with it"
        )
