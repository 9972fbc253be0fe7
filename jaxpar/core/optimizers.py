"""The optimizer a run's flags describe, as one optax transformation: ``--optimizer`` (SGD,
AdamW, Adam, Lion, Adafactor, Muon) with its schedule (``--schedule``, ``--warmup-steps``),
``--clip-grad-norm``, ``--freeze backbone`` (only the head trains) and ``--ema`` (an average of
the weights in the optimizer state, `ema_view` reads it).

Each wrapper keeps the state's structure whatever its setting, so a checkpoint's layout follows
from the flags that change what it holds (`jaxpar.run.checkpoint.IDENTITY`), not from their values.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxpar.core.axes import is_head
from jaxpar.core.sharding import path_str


def make_schedule(lr=0.01, schedule="constant", warmup_steps=0, total_steps=1):
    """Learning rate as a function of the step: constant or cosine, with optional linear warmup."""
    if schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps, max(total_steps, 1))
    if warmup_steps:
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup_steps), optax.constant_schedule(lr)],
            [warmup_steps],
        )
    return optax.constant_schedule(lr)


OPTIMIZERS = ("sgd", "adamw", "adam", "lion", "adafactor", "muon")


def make_optimizer(
    name="sgd",
    lr=0.01,
    momentum=0.9,
    weight_decay=0.0,
    schedule="constant",
    warmup_steps=0,
    total_steps=1,
    clip_grad_norm=None,
):
    """An optax optimizer from `OPTIMIZERS`, optionally with linear warmup and cosine decay and
    the gradient clipped to a global norm first (``--clip-grad-norm``, as PyTorch's
    ``clip_grad_norm_``).

    SGD has momentum in PyTorch's form (v = m*v + g; p -= lr*v) and coupled L2 weight decay;
    AdamW, Lion and Muon decay decoupled (``p -= lr * decay * p``), and so does Adafactor (optax's
    defaults: factored second moments, no momentum); Adam has none. Muon orthogonalises
    the updates of 2-D weights and gives the others Adam (optax's `contrib.muon`).

    The optimizer state has the same structure whatever the weight decay, clipping, schedule
    and warmup (the learning rate is always a schedule, so a step count is always kept), so a
    run resumes with those changed. Only SGD's momentum buffer exists or not with
    ``momentum > 0``.

    >>> import jax.numpy as jnp
    >>> params = {"w": jnp.zeros(2)}
    >>> a = make_optimizer().init(params)
    >>> b = make_optimizer(weight_decay=1e-4, schedule="cosine", warmup_steps=5, total_steps=9,
    ...                    clip_grad_norm=1.0).init(params)
    >>> jax.tree.structure(a) == jax.tree.structure(b)
    True
    """
    lr = make_schedule(lr, schedule, warmup_steps, total_steps)
    decay = weight_decay or 0.0
    tx = {
        "adamw": lambda: optax.adamw(lr, weight_decay=decay),
        "adam": lambda: optax.adam(lr),
        "lion": lambda: optax.lion(lr, weight_decay=decay),
        # optax applies Adafactor's decay after the learning rate: scale it by the rate here;
        # kept at a decay of 0 too, so the state has one structure whatever the decay
        "adafactor": lambda: optax.adafactor(lr, weight_decay_rate=lambda n: decay * lr(n)),
        "muon": lambda: optax.contrib.muon(lr, weight_decay=decay, adam_weight_decay=decay),
        # Coupled L2 as in torch.optim.SGD(weight_decay=...); identity keeps the same state.
        "sgd": lambda: optax.chain(
            optax.add_decayed_weights(decay) if decay else optax.identity(),
            optax.sgd(lr, momentum=momentum or None),
        ),
    }[name]()
    return clipped(tx, clip_grad_norm) if clip_grad_norm else tx


def clipped(tx, max_norm: float):
    """`tx` on gradients scaled to a global norm of at most `max_norm`. Stateless, so `tx`'s
    state keeps its structure: a run may resume with clipping changed.

    >>> import jax.numpy as jnp
    >>> tx = clipped(optax.sgd(1.0), 1.0)
    >>> params = {"w": jnp.zeros(2)}
    >>> tx.update({"w": jnp.array([3.0, 4.0])}, tx.init(params), params)[0]["w"].tolist()
    [-0.6000000238418579, -0.800000011920929]
    """
    clip = optax.clip_by_global_norm(max_norm)

    def update(updates, state, params=None, **extra):
        updates, _ = clip.update(updates, clip.init(params))
        return tx.update(updates, state, params, **extra)

    return optax.GradientTransformationExtraArgs(tx.init, update)


class Averaged(NamedTuple):
    """`with_ema`'s state: the wrapped optimizer's, and the parameters' moving average."""

    inner: optax.OptState
    ema: optax.Params


def with_ema(tx, decay: float):
    """`tx` that also keeps an exponential moving average of the parameters it updates:
    ``ema = decay * ema + (1 - decay) * params`` after every step, from the initial parameters
    (``--ema DECAY``). It lives in the optimizer state (``opt_state/ema`` of the state's part
    1), so it is sharded like the parameters, saved with them and restored on any mesh; it
    never changes the training. `ema_view` evaluates it.

    >>> import jax.numpy as jnp
    >>> tx = with_ema(optax.sgd(1.0), decay=0.5)
    >>> params = {"w": jnp.zeros(1)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.ones(1)}, state, params)  # params -> -1
    >>> state.ema["w"].tolist()
    [-0.5]
    """

    def init(params):
        return Averaged(tx.init(params), jax.tree.map(jnp.copy, params))

    def update(updates, state, params=None, **extra):
        updates, inner = tx.update(updates, state.inner, params, **extra)
        new = optax.apply_updates(params, updates)
        return updates, Averaged(inner, optax.incremental_update(new, state.ema, 1 - decay))

    return optax.GradientTransformationExtraArgs(init, update)


def ema_view(state: dict) -> dict:
    """``{0: model, 1: optimizer}`` with the model's parameters replaced by their moving
    average (`with_ema`); BatchNorm statistics stay the live model's."""

    def overlay(model, ema):
        if not isinstance(ema, dict):
            return ema
        return {k: overlay(v, ema[k]) if k in ema else v for k, v in model.items()}

    return {0: overlay(state[0], state[1]["opt_state"]["ema"]), 1: state[1]}


def head_paths(params: nnx.State) -> frozenset[str]:
    """The classifier head's parameters (an abstract model's `nnx.Param` state), by their
    logical axes (`jaxpar.core.axes.is_head`: a ``classes`` axis)."""
    found = set()

    def one(path, var):
        if is_head(var.get_metadata().get("out_sharding") or ()):
            found.add(path_str(path).removesuffix("/.value"))

    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    jax.tree_util.tree_map_with_path(one, params, is_leaf=is_var)
    return frozenset(found)


def frozen(tx, trains: frozenset[str]):
    """`tx` for the parameters at the paths `trains` only (`head_paths`): the others get no
    update and `tx` keeps no state for them (``optax.multi_transform``; ``--freeze backbone``).

    >>> import jax.numpy as jnp
    >>> params = {"head": {"w": jnp.zeros(2)}, "body": {"w": jnp.zeros(3)}}
    >>> state = frozen(optax.adam(1e-3), frozenset({"head/w"})).init(params)
    >>> [x.shape for x in jax.tree.leaves(state) if x.ndim]  # Adam's moments: head only
    [(2,), (2,)]
    """

    def labels(params):
        key = lambda path: path_str(path).removesuffix("/.value")  # noqa: E731
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "train" if key(path) in trains else "frozen", params
        )

    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
