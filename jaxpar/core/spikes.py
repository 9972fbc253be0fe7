"""Skipping bad steps (``--skip-spikes K[:SIGMA]``, issue #36): a step whose loss is not finite,
or above the running mean by SIGMA running standard deviations, is not applied.

Inside the jitted step, on every device alike: the step computes as always, then every part of
the train state (parameters, the optimizer's moments and step count, a mode's own parts) is
selected back to what it was, so a skipped step is as if its batch had never been drawn (the
next step draws its dropout keys and learning rate from the same optimizer step). The running
statistics, an exponential moving average of the applied steps' losses and of their squared
deviation, live in the state (``state[SPIKES]``), so a resumed run skips exactly the steps the
uninterrupted one would; so does the count of skips in a row, which the loop stops at K
(`jaxpar.run.observe.Window`).

Performance is decided here: the choice is a `lax.cond` between the state given and the state
stepped, which XLA resolves by passing one of the two buffers on; an elementwise select over
every array instead read both states and wrote a third, 5.0% of a ResNet-18 step on a 2x2 CPU
mesh against 0.0% for the cond (`benchmarks/spikes.py`). What remains is a few scalar
operations: 0.2-0.6 ms, which shows on a 2-3 ms step of the main job's MLP.
"""

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

SPIKES = 7  # the state's item (`jaxpar.run.checkpoint.ITEMS`)
SIGMA = 6.0  # default; ordinary steps of the measured runs stayed under 0 (docs/resilience.md)
DECAY = 0.99  # the running statistics' decay: about the last 100 applied steps
WARMUP = 20  # applied steps before a finite loss may count as a spike (the mean settles)


def fresh() -> dict:
    """The statistics before the first step."""
    return {"mean": jnp.float32(0), "var": jnp.float32(0), "applied": jnp.int32(0),
            "in_a_row": jnp.int32(0)}  # fmt: skip


def judged(stats: dict, loss, grad_norm, sigma: float):
    """Whether the step of `loss` is skipped, and the statistics after it."""
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    spike = (stats["applied"] >= WARMUP) & (loss - stats["mean"] > sigma * jnp.sqrt(stats["var"]))
    bad = ~finite | spike
    first = stats["applied"] == 0
    d = jnp.where(finite, loss - stats["mean"], 0.0)
    applied = {
        "mean": jnp.where(first, loss, stats["mean"] + (1 - DECAY) * d),
        "var": jnp.where(first, 0.0, DECAY * (stats["var"] + (1 - DECAY) * d * d)),
        "applied": stats["applied"] + 1,
        "in_a_row": jnp.int32(0),
    }
    skipped = {**stats, "in_a_row": stats["in_a_row"] + 1}
    return bad, jax.tree.map(lambda s, a: jnp.where(bad, s, a), skipped, applied)


def skipping(step, sigma: float):
    """`step` (one optimizer step: ``(state, batch, **kw) -> (state, metrics)``) that keeps the
    state it was given where `judged` says so; its metrics gain ``skipped`` and
    ``skips_in_a_row``."""

    def guarded(state, batch, **kw):
        new, metrics = step(state, batch, **kw)
        bad, stats = judged(state[SPIKES], metrics["train_loss"], metrics["grad_norm"], sigma)
        kept = jax.lax.cond(bad, lambda: state, lambda: new)  # one of the two, not a select
        return {**kept, SPIKES: stats}, {**metrics, "skipped": bad,
                                          "skips_in_a_row": stats["in_a_row"]}  # fmt: skip

    return guarded


def with_spike_skipping(sigma: float, mesh, abstract, shardings, init, step):
    """A run's state shapes, shardings, initialiser and train step with the statistics riding
    along (``state[SPIKES]``, replicated)."""
    stats = fresh()
    everywhere = NamedSharding(mesh, PartitionSpec())
    abstract = {**abstract, SPIKES: jax.tree.map(lambda x: jax.ShapeDtypeStruct((), x.dtype),
                                                 stats)}  # fmt: skip
    shardings = {**shardings, SPIKES: jax.tree.map(lambda _: everywhere, stats)}
    placed = jax.jit(fresh, out_shardings=shardings[SPIKES])
    return abstract, shardings, lambda: {**init(), SPIKES: placed()}, skipping(step, sigma)
