"""Sharded train state, the jitted train step and the eval step.

The state is the NNX state of ``(model, optimizer)`` as a pure dict of arrays, ``{0: model,
1: optimizer}`` (`nnx.to_pure_dict`), each array with an explicit `NamedSharding`. It is created
directly in those shardings (abstract shapes -> shardings -> jitted init with ``out_shardings``),
so full parameters never sit on one device. The step is one pure function: ``nnx.merge`` inside
``jax.jit``, state in and out with buffer donation. Compared with ``nnx.jit`` this avoids
re-walking the object graph on every call (DESIGN.md: 3.9-4.6 ms against 5.6-8.1 ms per step for
the MLP on one CPU device); plain dicts rather than `nnx.State` also spare JAX building `Variable`
objects for every output on every call (about 80 us per step here).
"""

import functools
from functools import partial

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxpar.core.sharding import batch_sharding, state_shardings


def _keys(seed: int):
    """Independent streams for initialisation, dropout and augmentation, from the seed alone."""
    return jax.random.split(jax.random.key(seed), 3)


def _builder(model_fn, tx, seed: int):
    def build():
        model = model_fn(rngs=nnx.Rngs(params=_keys(seed)[0]))
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    return build


def abstract_state(model_fn, tx, seed: int = 0):
    """``(graphdef, abstract_state)`` of ``(model, optimizer)``: shapes and names, no memory.

    The abstract state is an `nnx.State` whose variables carry the logical axis names.
    """
    return nnx.split(nnx.eval_shape(_builder(model_fn, tx, seed)))


def create_state(model_fn, tx, mesh, seed: int):
    """Build ``(model, optimizer)`` straight into its shardings.

    Returns ``(graphdef, state, shardings, replicated)``; `replicated` lists the dimensions that
    stayed whole because the mesh does not divide them.
    """
    graphdef, abstract = abstract_state(model_fn, tx, seed)
    shardings, replicated = state_shardings(abstract, mesh)
    return graphdef, init_state(model_fn, tx, shardings, seed), shardings, replicated


def init_state(model_fn, tx, shardings, seed: int):
    """Initialise ``(model, optimizer)`` under jit, each array created in its own sharding.

    Two programs: the model's random initialisation, whose compilation dominates a small run's
    start (2.2-2.5 s of XLA CPU compile for the MLP's six arrays, here), is the same program
    whatever the optimizer, so the persistent compilation cache serves it to every run of that
    model and mesh; the optimizer's state is built from it in a second, cheap one."""
    rngs = lambda: nnx.Rngs(params=_keys(seed)[0])  # noqa: E731
    model = jax.jit(lambda: nnx.to_pure_dict(nnx.state(model_fn(rngs=rngs()))),
                    out_shardings=shardings[0])()  # fmt: skip
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: model_fn(rngs=rngs())))

    def optimizer(model):
        return nnx.to_pure_dict(nnx.state(nnx.Optimizer(nnx.merge(graphdef, model), tx,
                                                        wrt=nnx.Param)))  # fmt: skip

    return {0: model, 1: jax.jit(optimizer, out_shardings=shardings[1])(model)}


@jax.jit
def all_finite(tree) -> jax.Array:
    """Whether every array of `tree` holds only finite numbers."""
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


def cross_entropy(logits, labels, smoothing: float = 0.0):
    """Cross-entropy against integer labels, or against labels smoothed to ``1 - smoothing``
    on the true class and ``smoothing / classes`` spread over all (``--label-smoothing``, as
    PyTorch's ``CrossEntropyLoss(label_smoothing=...)``)."""
    if not smoothing:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def step_inputs(step, batch, keys, prepare):
    """``(images, labels, example_keys)`` of a step's global batch: inputs prepared (augmented)
    on the devices, and one dropout key per example from its position in the global batch."""
    dropout_key, augment_key = (jax.random.fold_in(k, step) for k in keys)
    images = prepare(batch["image"], augment_key)  # augmented whole: per example already
    labels = batch["label"]
    example_keys = jax.vmap(partial(jax.random.fold_in, dropout_key))(jnp.arange(len(labels)))
    return images, labels, example_keys


def loss_fn(model, images, labels, keys, smoothing: float = 0.0):
    logits = model(images, train=True, rngs=keys)
    return cross_entropy(logits, labels, smoothing).mean()


def gradients(model, data, accum: int = 1, loss=loss_fn):
    """Mean `loss` and its gradient over `data` (`step_inputs`), in `accum` microbatches."""
    if accum == 1:  # BatchNorm statistics update in place
        return nnx.value_and_grad(loss)(model, *data)
    return accumulate(loss, model, data, accum)


def train_step(state, batch, *, graphdef, keys, prepare, accum=1, loss=loss_fn, teacher=None):
    """One optimizer step. Random keys depend on (seed, step, example position) only, never on
    the mesh or on `accum`: the gradient of ``accum`` microbatches is that of the whole batch.
    With a `teacher` (`jaxpar.modes.distill`), its logits on the same inputs join the data and the
    loss is the distillation loss; its parameters, ``state[4]``, pass through unchanged."""
    model, optimizer = nnx.merge(graphdef, {0: state[0], 1: state[1]})
    data = step_inputs(optimizer.step[...], batch, keys, prepare)
    if teacher is not None:
        data, loss = (*data, teacher.logits(state[4], data[0])), teacher.loss
    loss, grads = gradients(model, data, accum, loss)
    optimizer.update(model, grads)
    metrics = {"train_loss": loss, "grad_norm": optax.tree.norm(grads)}
    return {**state, **nnx.to_pure_dict(nnx.state((model, optimizer)))}, metrics


def microbatches(x, k: int):
    """Rows ``j, j + k, j + 2k, ...`` as microbatch ``j``: shape ``(k, n / k, ...)``. Each device
    holds a contiguous block of the batch, so every device holds a share of every microbatch.

    >>> microbatches(jnp.arange(6), 2).tolist()
    [[0, 2, 4], [1, 3, 5]]
    """
    return x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)


def accumulate(loss_fn, model, data, k: int):
    """Mean loss and gradient over `k` microbatches of `data`, one at a time (a `lax.scan`), so
    activation memory is that of one microbatch. BatchNorm statistics are each microbatch's."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def one(carry, micro):
        rest, loss_sum, grad_sum = carry

        def f(params):
            m = nnx.merge(graphdef, params, rest, copy=True)  # variables of this trace level
            return loss_fn(m, *micro), nnx.state(m, nnx.Not(nnx.Param))

        (loss, rest), grads = jax.value_and_grad(f, has_aux=True)(params)
        return (rest, loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    micro = jax.tree.map(partial(microbatches, k=k), data)
    (rest, loss, grads), _ = jax.lax.scan(one, (rest, jnp.float32(0), zeros), micro)
    nnx.update(model, rest)
    return loss / k, jax.tree.map(lambda g: g / k, grads)


def classification_sums(model, images, labels, mask) -> dict:
    """The loss and the correct predictions, summed over the unmasked examples: evaluation's
    ``eval_loss`` and ``eval_accuracy`` once divided by their count."""
    logits = model(images, train=False)
    return {
        "loss": jnp.sum(cross_entropy(logits, labels) * mask),
        "accuracy": jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
    }


def eval_step(state, batch, *, graphdef, prepare, sums=classification_sums):
    """`sums` of the model over the unmasked examples of a batch (``{name: sum}``: evaluation
    reports ``eval_<name>``, the sum over the test split divided by ``count``), and ``count``."""
    model, _ = nnx.merge(graphdef, {0: state[0], 1: state[1]})
    mask = batch["mask"]
    totals = sums(model, prepare(batch["image"]), batch["label"], mask)
    return {**totals, "count": jnp.sum(mask)}


def train_steps(state, batches, step=train_step):
    """`step` for each of a stack of batches (leading axis: steps), in one program."""
    return jax.lax.scan(step, state, batches)


def with_signals(step):
    """`step` that also takes each device's pending signal number (0: none) and returns their
    maximum as ``metrics["stop"]``: every process of a job reads the same value for the same
    dispatch, so all of them stop, and save, after the same step (a signal may reach only one)."""

    def stepped(state, batch, signals):
        state, metrics = step(state, batch)
        return state, {**metrics, "stop": jnp.max(signals)}

    return stepped


def under_mesh(fn, mesh):
    """`fn` traced with `mesh` as the context mesh, so models may pin an activation's layout by
    logical names (`jaxpar.models.vit.constrain`); the mesh is the step's own, never a global
    one."""

    @functools.wraps(fn)
    def traced(*args):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args)

    return traced


def signal_sharding(mesh):
    """One entry per device of the mesh, for `with_signals`."""
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh.axis_names))


def _batch_shardings(mesh, batch_ndims: dict[str, int], stacked: bool = False):
    return {
        k: batch_sharding(mesh, n + 1 if stacked else n, stacked) for k, n in batch_ndims.items()
    }


def _as_float(images, key=None):
    return images.astype(jnp.float32)


def compile_steps(
    graphdef,
    shardings,
    mesh,
    seed: int,
    image_ndim: int,
    prepare=_as_float,
    stacked=False,
    signals=False,
    accum=1,
    step=train_step,
    view=None,
    batch_ndims=None,
    loss=loss_fn,
    sums=classification_sums,
):
    """``(train_step, eval_step)`` jitted with explicit in/out shardings.

    `prepare(images, key=None)` turns stored images into model inputs on the devices (see
    `jaxpar.data.preprocess`). The train step donates the state: XLA updates parameters and
    optimizer state in place. With `stacked`, the train step is `train_steps`: batches stacked on
    a leading steps axis, metrics returned per step. With `signals`, it takes a third argument
    (see `with_signals`). `accum`: the batch is processed as that many microbatches
    (`accumulate`). `step` is one optimizer step, `view(state)` the ``{0: model, 1: optimizer}``
    that evaluation sees: a `jaxpar.modes.sync` mode's (default: `train_step` and the state itself);
    `batch_ndims` the dimensions of each array of the mode's batch (default: image and label);
    `loss(model, images, labels, example_keys)` the training loss (`loss_fn`), and
    `sums(model, images, labels, mask)` what evaluation sums (`classification_sums`).
    """
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    batch_ndims = batch_ndims or {"image": image_ndim, "label": 1}
    train_batch = _batch_shardings(mesh, batch_ndims, stacked)
    eval_batch = _batch_shardings(mesh, {"image": image_ndim, "label": 1, "mask": 1})
    keys = tuple(_keys(seed)[1:])  # computed outside jit: the step holds them as constants
    step = partial(step, graphdef=graphdef, keys=keys, prepare=prepare, accum=accum, loss=loss)
    if stacked:
        step = partial(train_steps, step=step)
    ins = (shardings, train_batch)
    if signals:
        step, ins = with_signals(step), (*ins, signal_sharding(mesh))
    # Traced under the mesh: models pin activations, and pipelines place stages, by logical names.
    step = under_mesh(step, mesh)
    train = jax.jit(step, in_shardings=ins, out_shardings=(shardings, replicated), donate_argnums=0)
    view = view or (lambda state: state)
    evaluate = jax.jit(
        under_mesh(
            lambda s, b: eval_step(view(s), b, graphdef=graphdef, prepare=prepare, sums=sums), mesh
        ),  # fmt: skip
        in_shardings=(shardings, eval_batch),
        out_shardings=replicated,
    )
    return train, evaluate
