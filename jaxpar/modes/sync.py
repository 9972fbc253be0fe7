"""How data-parallel replicas agree (``--sync``): every step, or communicating far less.

The replicas are the ``data`` axis groups; each is itself sharded over ``fsdp``/``model``.

- ``every-step``: synchronous SGD, the core: one gradient all-reduce per step.
- ``local:H``: local SGD. Every replica keeps its own model and optimizer state (a leading replica
  axis sharded over ``data``), takes H steps on its own share of each global batch, then the
  replicas' models are averaged (one all-reduce every H steps). Optimizer states stay per replica.
- ``diloco:H``: DiLoCo. As ``local:H`` (the inner optimizer is ``--optimizer``, per replica), and
  every H steps the averaged change ``global - mean(local)`` is the gradient of an outer Nesterov
  SGD (``--outer-lr``, ``--outer-momentum``) on one global copy of the parameters, which is then
  broadcast back to the replicas.
- ``stale:T``: bounded staleness, DistBelief's asynchronous replicas made deterministic: the
  gradient applied at step t is computed on the parameters of step t - T (a ring of the last T
  versions in the state), so a run is reproducible and shows what staleness does.

Each mode tells the one loop how its state is laid out (`layout`), what one step does (`step`),
what it does every H steps (`sync`, None without) and which model evaluation sees (`view`);
`jaxpar.modes.mode.Mode` holds what all of these share, and what a mode whose step is not a
batch of examples (`jaxpar.modes.federated`, whose step is a round) replaces: its optimizer, data
and metrics. The checkpoint holds the whole state, replica axis, global copy, outer momentum and
ring included.
Reductions: ``local:1`` with SGD without momentum and ``diloco:1`` with inner SGD and an outer SGD
of learning rate 1 without momentum are ``every-step``; so is ``stale:0``.

BatchNorm (ResNets): each replica normalises with its own share of the batch, and the statistics
are averaged with the parameters at each sync (DiLoCo too: they skip the outer optimizer). Stale
SGD's old parameters run with the current statistics and update them, as every step does.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxpar.core.errors import UserError
from jaxpar.core.mesh import parse_mesh
from jaxpar.core.sharding import (
    mapped_over,
    path_str,
)
from jaxpar.core.step import gradients, loss_fn, step_inputs, train_step
from jaxpar.modes.mode import Mode

REPLICAS = "data"  # the mesh axis whose groups are the replicas


def parse_sync(text: str) -> tuple[str, int]:
    """``--sync`` as ``(kind, H or T)``.

    >>> parse_sync("every-step"), parse_sync("diloco:8"), parse_sync("stale:0")
    (('every-step', 1), ('diloco', 8), ('stale', 0))
    """
    if text == "every-step":
        return "every-step", 1
    m = re.fullmatch(r"(local|diloco|stale):(-?\d+)", text)
    if m and (int(m[2]) >= 1 or (m[1] == "stale" and int(m[2]) == 0)):
        return m[1], int(m[2])
    raise UserError(
        f"--sync {text}: use every-step, local:H or diloco:H with H >= 1 steps between "
        "averages, or stale:T with T >= 0 steps of staleness"
    )


def mode_for(cfg, spec, ds=None):
    """The `--sync` mode of a run on the mesh sizes `spec` (its ``data`` groups: the replicas),
    or with ``--clients`` the federated mode over `ds`'s training set."""
    if cfg.federated.clients is not None:
        from jaxpar.modes.federated import make_mode

        return make_mode(cfg, spec, ds)
    sync = cfg.parallelism.sync
    kind, n = parse_sync(sync)
    replicas = spec.data
    if kind in ("local", "diloco") and replicas == 1:
        raise UserError(
            f"--sync {sync} averages data-parallel replicas, but the mesh has data=1: nothing "
            "to average; use a mesh with data > 1 (e.g. --mesh data=4)"
        )
    if kind in ("local", "diloco") and spec.stage > 1:
        raise UserError(
            f"--sync {sync} with pipeline stages (stage={spec.stage}) is not supported yet; "
            "use --sync every-step or stale:T with stage > 1"
        )
    if kind == "local":
        return Local(replicas, n)
    if kind == "diloco":
        return DiLoCo(replicas, n, cfg.parallelism.outer_lr, cfg.parallelism.outer_momentum)
    if kind == "stale" and n > 0:
        return Stale(n)
    return EveryStep()


def param_mask(abstract) -> dict:
    """``{path: is a parameter}`` over the model part of an abstract NNX train state, as a pure
    dict (False: BatchNorm statistics and other non-parameter variables)."""
    model = nnx.to_pure_dict(nnx.filter_state(abstract[0], nnx.Param))
    params = {path_str(k) for k, _ in jax.tree_util.tree_leaves_with_path(model)}
    return jax.tree_util.tree_map_with_path(
        lambda k, _: path_str(k) in params, nnx.to_pure_dict(abstract[0])
    )


class EveryStep(Mode):
    """Synchronous data parallelism: the state as it is, `jaxpar.core.step.train_step`."""

    period = 0  # steps between syncs (0: none)

    def layout(self, abstract, shardings, mesh, params):
        return abstract, shardings

    def init(self, state):
        return state

    step = staticmethod(train_step)
    sync = None

    @staticmethod
    def view(state):
        return state


def _replicated(tree, n: int):
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (n, *a.shape)), tree)


def _on_replicas(shardings):
    """Each sharding with a leading axis over the replicas."""
    return jax.tree.map(
        lambda s: NamedSharding(s.mesh, PartitionSpec(REPLICAS, *s.spec)), shardings
    )


@dataclasses.dataclass
class Local(Mode):
    """``local:H``: per-replica models and optimizers, averaged every H steps."""

    replicas: int
    period: int

    def layout(self, abstract, shardings, mesh, params):
        ahead = lambda a: jax.ShapeDtypeStruct((self.replicas, *a.shape), a.dtype)  # noqa: E731
        return (
            {k: jax.tree.map(ahead, abstract[k]) for k in (0, 1)},
            {k: _on_replicas(shardings[k]) for k in (0, 1)},
        )

    def init(self, state):
        return {k: _replicated(state[k], self.replicas) for k in (0, 1)}

    def step(self, state, batch, *, graphdef, keys, prepare, accum=1, loss=loss_fn):
        """Every replica one step on its share of the global batch: no communication but a
        scalar mean of the losses and gradient norms for logging."""
        step = state[1]["step"][0]
        data = step_inputs(step, batch, keys, prepare)  # global positions: same randomness
        data = jax.tree.map(lambda a: a.reshape(self.replicas, -1, *a.shape[1:]), data)

        def one(state, data):
            model, optimizer = nnx.merge(graphdef, state)
            value, grads = gradients(model, data, accum, loss)
            optimizer.update(model, grads)
            return nnx.to_pure_dict(nnx.state((model, optimizer))), value, optax.tree.norm(grads)

        replicas = {k: state[k] for k in (0, 1)}  # DiLoCo's global copy waits for the sync
        with mapped_over(REPLICAS):  # each replica's activations split over the other axes
            replicas, loss, norm = jax.vmap(one, spmd_axis_name=REPLICAS)(replicas, data)
        return {**state, **replicas}, {"train_loss": loss.mean(), "grad_norm": norm.mean()}

    def sync(self, state):
        """Average the replicas' models (parameters and BatchNorm statistics)."""
        mean = jax.tree.map(lambda a: jnp.mean(a, axis=0), state[0])
        return {**state, 0: _replicated(mean, self.replicas)}

    @staticmethod
    def view(state):
        """Evaluation sees the replicas' average."""
        return {0: jax.tree.map(lambda a: jnp.mean(a, axis=0), state[0]),
                1: jax.tree.map(lambda a: a[0], state[1])}  # fmt: skip


@dataclasses.dataclass
class DiLoCo(Local):
    """``diloco:H``: `Local` plus one global copy (state key 2) updated every H steps by an
    outer Nesterov SGD (its momentum: state key 3) on the replicas' averaged change."""

    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    params: dict | None = None  # set by `layout`

    @property
    def outer(self):
        return optax.sgd(self.outer_lr, momentum=self.outer_momentum or None, nesterov=True)

    def layout(self, abstract, shardings, mesh, params):
        self.params = params  # which model leaves are parameters (the outer optimizer's)
        laid, placed = super().layout(abstract, shardings, mesh, params)
        outer = jax.eval_shape(self.outer.init, abstract[0])
        return (
            {**laid, 2: abstract[0], 3: outer},
            {**placed, 2: shardings[0], 3: _like_params(outer, shardings[0], mesh)},
        )

    def init(self, state):
        return {**super().init(state), 2: state[0], 3: self.outer.init(state[0])}

    def sync(self, state):
        mean = jax.tree.map(lambda a: jnp.mean(a, axis=0), state[0])
        outer_grad = jax.tree.map(jnp.subtract, state[2], mean)  # global - local: descend on it
        updates, outer_state = self.outer.update(outer_grad, state[3], state[2])
        stepped = optax.apply_updates(state[2], updates)
        # BatchNorm statistics are not parameters: they take the replicas' average.
        glob = jax.tree.map(lambda p, s, m: s if p else m, self.params, stepped, mean)
        # The state's other parts (--skip-spikes' statistics) pass through.
        return {**state, 0: _replicated(glob, self.replicas), 2: glob, 3: outer_state}

    def view(self, state):
        """Evaluation sees the global copy (what the replicas restart from); between syncs, the
        copy a sync now would give, so a run that ends between syncs evaluates and reports its
        last steps too (the checkpoint keeps the state as it is: a longer run goes on exactly)."""
        at_sync = state[1]["step"][0] % self.period == 0
        now = self.sync(state)[2]
        glob = jax.tree.map(lambda g, n: jnp.where(at_sync, g, n), state[2], now)
        return {0: glob, 1: jax.tree.map(lambda a: a[0], state[1])}


def _like_params(opt_state, param_shardings, mesh):
    """Shardings for an optimizer state whose subtrees mirror the parameters (momentum), else
    replicated (counters)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    leaves = jax.tree.leaves(param_shardings)
    structure = jax.tree.structure(param_shardings)

    def place(sub):
        if jax.tree.structure(sub) == structure:
            return jax.tree.unflatten(structure, leaves)
        return jax.tree.map(lambda _: replicated, sub)

    return jax.tree.map(place, opt_state, is_leaf=lambda x: jax.tree.structure(x) == structure)


@dataclasses.dataclass
class Stale(Mode):
    """``stale:T``: gradients computed on the parameters of T steps ago (state key 2: a ring of
    the last T model states, slot ``step % T`` holding step ``step - T``'s). BatchNorm
    statistics are not parameters: the stale forward pass normalises with its batch's own and
    updates the current running averages, as every-step SGD does."""

    period_steps: int
    period = 0  # no periodic sync
    params: dict | None = None  # set by `layout`: which model leaves are parameters

    def layout(self, abstract, shardings, mesh, params):
        self.params = params if params is not None else jax.tree.map(lambda _: True, abstract[0])
        T = self.period_steps
        ring = jax.tree.map(lambda a: jax.ShapeDtypeStruct((T, *a.shape), a.dtype), abstract[0])
        ahead = jax.tree.map(
            lambda s: NamedSharding(s.mesh, PartitionSpec(None, *s.spec)), shardings[0]
        )
        return {**abstract, 2: ring}, {**shardings, 2: ahead}

    def init(self, state):
        return {**state, 2: _replicated(state[0], self.period_steps)}

    def step(self, state, batch, *, graphdef, keys, prepare, accum=1, loss=loss_fn):
        step = state[1]["step"]
        slot = step % self.period_steps
        # The parameters of step - T, with the current BatchNorm statistics.
        old = jax.tree.map(lambda p, r, c: r[slot] if p else c, self.params, state[2], state[0])
        ring = jax.tree.map(lambda r, c: r.at[slot].set(c), state[2], state[0])
        stale, _ = nnx.merge(graphdef, {0: old, 1: state[1]})
        value, grads = gradients(stale, step_inputs(step, batch, keys, prepare), accum, loss)
        stats = nnx.to_pure_dict(nnx.state(stale))  # the statistics its forward pass updated
        current = jax.tree.map(lambda p, c, s: c if p else s, self.params, state[0], stats)
        model, optimizer = nnx.merge(graphdef, {0: current, 1: state[1]})
        optimizer.update(model, grads)
        new = nnx.to_pure_dict(nnx.state((model, optimizer)))
        return {**state, **new, 2: ring}, {"train_loss": value,
                                           "grad_norm": optax.tree.norm(grads)}  # fmt: skip

    sync = None

    @staticmethod
    def view(state):
        return {0: state[0], 1: state[1]}


__all__ = ["DiLoCo", "EveryStep", "Local", "Mode", "Stale", "mode_for", "parse_sync"]


def check_replicas(saved: dict, mode, spec, sync: str, step: int, directory) -> None:
    """A checkpoint with a model per replica (``--sync local:H``/``diloco:H``) resumes only on a
    mesh with as many replicas (``data``); other axes may change."""
    if getattr(mode, "replicas", None) is None:
        return
    before = parse_mesh(saved["mesh"]).data
    if before != spec.data:
        raise UserError(
            f"checkpoint step {step} in {directory} holds {before} replicas (--sync "
            f"{sync} on data={before}); this mesh has data={spec.data}: resume on a "
            f"mesh with data={before} (fsdp and model may change)"
        )
