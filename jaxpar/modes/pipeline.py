"""Pipeline (hierarchical) parallelism: consecutive layers on consecutive stages of the mesh.

A model whose blocks are stacked (one array per parameter role with a leading ``layers`` axis,
as `jaxpar.models.vit.ViT` builds them) applies them through a *stack function*
``stack(block, params, x, keys, remat) -> x``. The plain one is a scan over the
layers (`jaxpar.models.vit.scan_layers`). A `Schedule` is the pipelined one, inside the same
jitted step:

- The rules map ``layers`` to the ``stage`` mesh axis, so stage ``s`` of ``S`` holds a contiguous
  run of layers, and a checkpoint is the same arrays with and without pipelining.
- The batch is cut into ``M`` microbatches (rows ``j, j + M, ...``, as gradient accumulation
  cuts it). At each of ``R * M + S - 1`` ticks every stage applies its layers to the microbatch
  it holds (one ``vmap`` over the stage axis, ``spmd_axis_name="stage"``, so each device computes
  its own stage only), then the activations move one stage on: a roll along the stage axis, which
  XLA lowers to a collective permute. Autodiff through the ticks is the backward pipeline.
- GPipe is ``R = 1``. The circular (interleaved) schedule ``R > 1`` gives each stage ``R``
  chunks of ``L / (S R)`` layers, chunk ``r`` of stage ``s`` holding layers
  ``(r S + s) L / (S R) ...``: microbatches go round the stages ``R`` times and the bubble shrinks
  from ``(S - 1) / (M + S - 1)`` to ``(S - 1) / (R M + S - 1)``. Checkpoints keep the layers in
  their natural order, so they restore on any schedule and mesh; the price is that each step
  moves the layers to their circular owners and the gradients back (an all-to-all of the stack).

Slots of the schedule where a stage holds no microbatch (the bubble) compute on zeros, selected
with ``where`` before the stage runs, so whatever the slot held (`fill`) never reaches outputs or
gradients. Examples keep their own dropout keys, and each layer its global index, so a pipelined
step computes what the sequential one does.

>>> Schedule(stages=4, microbatches=8).bubble
0.2727...
>>> Schedule(stages=4, microbatches=8, repeats=2).bubble
0.1578...
"""

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpar.core.errors import UserError
from jaxpar.core.sharding import RULES, partition_spec
from jaxpar.core.step import microbatches
from jaxpar.models.vit import scan_layers


def _stage_axis() -> str:
    (axis,) = RULES["layers"]
    return axis


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A pipeline schedule: `stages` (the ``stage`` mesh axis), `microbatches` per batch, and
    `repeats` trips round the stages (1: GPipe; R > 1: circular).

    `gather`: all-gather the FSDP-sharded layer weights once per step, before the ticks, rather
    than letting XLA gather them inside every tick (`benchmarks/pipeline.py` measures both).
    `fill`: what bubble slots hold before they are masked (tests fill them with NaN).
    """

    stages: int
    microbatches: int
    repeats: int = 1
    gather: bool = True
    fill: float = 0.0

    @property
    def ticks(self) -> int:
        return self.repeats * self.microbatches + self.stages - 1

    @property
    def bubble(self) -> float:
        """Fraction of stage-ticks that hold no microbatch: ``(S - 1) / (R M + S - 1)``."""
        return (self.stages - 1) / self.ticks

    def __call__(self, block, params, x, keys, remat=False):
        S, M, R = self.stages, self.microbatches, self.repeats
        depth = jax.tree.leaves(params)[0].shape[0]
        chunk = depth // (S * R)  # layers per stage and trip
        mesh = jax.sharding.get_abstract_mesh()
        stage = _stage_axis()
        # Each stage's examples are split over these axes into replicas, each with its own copy
        # of the stage's weights: their gradients then add up locally over the ticks and are
        # reduced once per step. Performance is decided here: without the copies XLA all-reduces
        # every layer's gradient at every tick (vit-tiny, stage=4 x data=2, 8 microbatches:
        # 56 MiB of all-reduce per step instead of 5).
        replicas = tuple(a for a in RULES["microbatch"] if self.gather or a != "fsdp")
        D = 1 if mesh.empty else math.prod(mesh.shape[a] for a in replicas)

        def constrain(a, *spec):
            if mesh.empty:
                return a
            return jax.lax.with_sharding_constraint(a, jax.sharding.PartitionSpec(*spec))

        # Layers to (S, D, R, chunk, ...): stage s holds chunks (r, s) of every trip r. For
        # GPipe (R = 1) this is the stored layout; for R > 1 it moves the layers (once per step).
        variables = jax.tree.leaves(params, is_leaf=lambda v: isinstance(v, nnx.Variable))
        leaves, treedef = jax.tree.flatten(params)

        def relayout(a, var):
            a = a.reshape(R, S, chunk, *a.shape[1:]).swapaxes(0, 1)
            a = jnp.broadcast_to(a[:, None], (S, D, *a.shape[1:]))
            if mesh.empty:
                return a
            names = var.get_metadata().get("out_sharding") or (None,) * (a.ndim - 3)
            rest = tuple(partition_spec(names[1:], a.shape[4:], mesh))
            if self.gather:  # Performance is decided here: one all-gather per step, not per tick
                rest = tuple(_without_fsdp(e) for e in rest)
            return constrain(a, stage, replicas, None, None, *rest)

        staged = treedef.unflatten([relayout(a, v) for a, v in zip(leaves, variables, strict=True)])

        def split(a):  # (S, B/M, ...) -> (S, D, B/(M D), ...)
            return a.reshape(S, D, a.shape[1] // D, *a.shape[2:])

        micro = RULES["microbatch"]
        inputs = constrain(microbatches(x, M), None, micro)  # (M, B/M, ...), on every stage
        micro_keys = None if keys is None else microbatches(keys, M)
        stage_ids = jnp.arange(S)

        def run_stage(params, x, keys, item, s):
            """Stage s: its chunk of trip item // M, on (a replica's share of) its microbatch."""
            trip = jnp.clip(item, 0, R * M - 1) // M
            if R == 1:
                params = jax.tree.map(lambda a: a[0], params)
            else:  # A one-hot sum, not a[trip]: indexing by a per-stage value becomes a gather
                # whose gradient XLA all-reduces over the stages, every layer at every tick.
                pick = jax.nn.one_hot(trip, R, dtype=x.dtype)
                params = jax.tree.map(lambda a: jnp.tensordot(pick.astype(a.dtype), a, 1), params)
            first = (trip * S + s) * chunk
            return scan_layers(block, params, x, keys, first=first, pin=False)

        if remat:  # keep only each tick's stage inputs; recompute the rest in the backward pass
            run_stage = jax.checkpoint(run_stage, prevent_cse=False)
        # Every stage, and every replica of it, at once. The stage and replica axes are sharded,
        # so each device computes its own stage's share only.
        k_axis = None if keys is None else 0
        on_replicas = jax.vmap(run_stage, (0, 0, k_axis, None, None), spmd_axis_name=replicas)
        on_stages = jax.vmap(on_replicas, (0, 0, k_axis, 0, 0), spmd_axis_name=stage)

        def tick(carry, t):
            held, outputs = carry  # held: (S, B/M, ...) what each stage computed last tick
            item = t - stage_ids  # the microbatch-trip each stage works on now
            valid = (item >= 0) & (item < R * M)
            m = jnp.mod(item, M)
            # Stage 0 takes the next microbatch (fresh, or back from the last stage after a
            # trip); stage s > 0 takes what stage s - 1 held: a collective permute along `stage`.
            shifted = jnp.roll(held, 1, axis=0)
            x = jnp.where(_column(stage_ids == 0, held), outputs[m[0]][None], shifted)
            x = jnp.where(_column(valid, x), x, jnp.zeros_like(x))  # the bubble computes on zeros
            x = constrain(split(x), stage, replicas)
            k = None if micro_keys is None else split(micro_keys[m])
            held = on_stages(staged, x, k, item, stage_ids).reshape(S, *inputs.shape[1:])
            held = constrain(held, stage, micro)
            # The last stage's output goes back to the buffer (the next trip, or the result).
            last = item[-1]
            # A masked sum over the stages (an all-reduce of one microbatch), not held[-1]: XLA
            # replicates the whole of `held` to slice it.
            out = jnp.sum(jnp.where(_column(stage_ids == S - 1, held), held, 0), axis=0)
            done = jnp.where((last >= 0) & (last < R * M), out, outputs[m[-1]])
            outputs = constrain(outputs.at[m[-1]].set(done), None, micro)  # on every stage
            return (held, outputs), None

        held = jnp.full((S, *inputs.shape[1:]), self.fill, inputs.dtype)
        (_, outputs), _ = jax.lax.scan(tick, (held, inputs), jnp.arange(self.ticks))
        # Pinned here too, or the batch sharding of what follows leaks into the loop's buffer
        # and XLA all-gathers the whole buffer at every tick.
        outputs = constrain(outputs, None, micro)
        return outputs.swapaxes(0, 1).reshape(x.shape)  # rows back in batch order


def _without_fsdp(entry):
    """A PartitionSpec entry with the ``fsdp`` axis left out (the weight gathered over it)."""
    axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
    kept = tuple(a for a in axes if a != "fsdp")
    return None if not kept else kept[0] if len(kept) == 1 else kept


def _column(mask, like):
    """`mask` (one entry per stage) shaped to broadcast against `like` (stage-major)."""
    return mask.reshape(-1, *([1] * (like.ndim - 1)))


def parse_pipeline(text: str) -> int:
    """Trips round the stages for ``--pipeline``: ``gpipe`` is 1, ``circular:R`` is R.

    >>> parse_pipeline("gpipe"), parse_pipeline("circular:2")
    (1, 2)
    """
    if text == "gpipe":
        return 1
    if (m := re.fullmatch(r"circular:(\d+)", text)) and int(m[1]) >= 1:
        return int(m[1])
    raise UserError(
        f"--pipeline {text}: use gpipe, or circular:R with R >= 1 trips round the stages"
    )


def schedule_for(cfg, spec) -> Schedule | None:
    """The pipeline schedule a run's flags and mesh ask for, checked; None without one.

    A mesh with ``stage`` > 1, ``--microbatches`` > 1 or ``--pipeline circular:R`` pipelines;
    ``--microbatches`` defaults to the stage count.
    """
    from jaxpar.models import MODELS  # here: the models import jaxpar

    repeats = parse_pipeline(cfg.parallelism.pipeline)
    microbatches = cfg.parallelism.microbatches or spec.stage
    if (spec.stage, microbatches, repeats) == (1, 1, 1):
        return None
    depth = getattr(MODELS[cfg.model.model], "keywords", {}).get("depth")  # stacked models only
    ways = spec.data * spec.fsdp
    check_pipeline(cfg.model.model, depth, spec.stage, microbatches, repeats,
                   cfg.optimization.batch_size, cfg.parallelism.grad_accum, ways)  # fmt: skip
    return Schedule(spec.stage, microbatches, repeats)


def check_pipeline(model: str, depth: int | None, stages: int, microbatches: int, repeats: int,
                   batch: int, accum: int, batch_ways: int) -> None:  # fmt: skip
    """Exit-2 errors for a pipeline the model, batch or mesh cannot run (one line each)."""
    if depth is None:
        asked = [f"stage={stages} in the mesh"] if stages > 1 else []
        asked += [f"--microbatches {microbatches}"] if microbatches not in (1, stages) else []
        asked += [f"--pipeline circular:{repeats}"] if repeats > 1 else []
        raise UserError(
            f"--model {model} cannot pipeline (its layers are not uniform), which "
            f"{' and '.join(asked)} ask{'s' if len(asked) == 1 else ''} for: drop that, or use a "
            "model that can, the ViTs (vit-tiny, vit-lite, vit-small, vit-base)"
        )
    if depth % (stages * repeats):
        what = f"{stages} stages" + (f" x {repeats} trips" if repeats > 1 else "")
        raise UserError(
            f"{model} has {depth} blocks, which do not split into {what}; use a stage count "
            f"(x trips) that divides {depth}"
        )
    if microbatches % stages:
        raise UserError(
            f"--microbatches {microbatches} is not a multiple of the {stages} stages; use "
            f"{stages}, {2 * stages}, {3 * stages}, ..."
        )
    per_step = batch // accum
    if per_step % microbatches:
        raise UserError(
            f"--microbatches {microbatches} does not divide the batch of {per_step}"
            + (f" (after --grad-accum {accum})" if accum > 1 else "")
        )
    if (per_step // microbatches) % batch_ways:
        raise UserError(
            f"--microbatches {microbatches} makes microbatches of {per_step // microbatches}, "
            f"which do not divide over the {batch_ways} batch shards (data x fsdp); use fewer "
            "microbatches or a larger batch"
        )


__all__ = ["Schedule", "check_pipeline", "parse_pipeline", "schedule_for"]
