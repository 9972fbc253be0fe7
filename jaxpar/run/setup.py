"""A run's set-up from its `Config`: mesh, data, model, optimizer, modes and the compiled steps,
with the shardings they are laid out in (`Run`); the run's own workdir is neither read nor written.
"""

import dataclasses
import functools
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxpar.core.errors import UserError
from jaxpar.core.mesh import MeshSpec, make_mesh, parse_mesh
from jaxpar.core.optimizers import ema_view, frozen, head_paths, make_schedule, with_ema
from jaxpar.core.sharding import placed, spec_table, state_shardings
from jaxpar.core.spikes import with_spike_skipping
from jaxpar.core.step import abstract_state, compile_steps, init_state, loss_fn, under_mesh
from jaxpar.cost.collectives import collectives
from jaxpar.data import Dataset, labelled, load_dataset, preprocess, unit_interval
from jaxpar.models import MODELS, rbm, revision
from jaxpar.models.vit import check_patch_size
from jaxpar.modes.distill import with_teacher
from jaxpar.modes.games import EPOCH, AlphaZero
from jaxpar.modes.pipeline import schedule_for
from jaxpar.modes.prune import magnitude_pruning, prune_end, weight_roles
from jaxpar.modes.quantize import aware
from jaxpar.modes.sync import mode_for, param_mask
from jaxpar.run.checkpoint import FORMAT, load_teacher, versions
from jaxpar.run.config import Config
from jaxpar.run.init_from import starting_from, starting_with
from jaxpar.run.observe import say


@dataclasses.dataclass
class Run:
    """Everything fixed for a run: mesh, data, shardings, compiled steps."""

    cfg: Config
    spec: MeshSpec
    mesh: jax.sharding.Mesh
    ds: Dataset
    per_epoch: int
    total: int
    schedule: object  # step -> learning rate
    init: object  # () -> fresh state in its shardings
    abstract: object  # the state's shapes and dtypes, a pure dict (restore target)
    shardings: object
    replicated: list
    train_step: object
    eval_step: object
    train_steps: object  # several steps in one program: batches stacked on a leading axis
    compile: object  # (stacked=, signals=) -> (train_step, eval_step) jitted for this run
    mode: object  # `jaxpar.modes.mode.Mode`: how replicas agree, or federated rounds
    sync: object  # the mode's jitted every-H-steps program, or None
    batches: object  # plan -> the device batch of each dispatch (`jaxpar.modes.mode.Mode.batches`)
    ema_eval_step: object = None  # the eval step on the weights' moving average (--ema)
    evaluate: object = None  # (state, step) -> an evaluation line; None: the test split's

    def comm_bytes_per_step(self, train_program, steps: int) -> float:
        """Collective bytes per optimizer step and device, from the compiled programs: a
        dispatch of `steps` steps, plus the mode's sync program over its period."""
        train = sum(c["bytes"] for c in collectives(train_program.as_text()).values()) / steps
        return train + self.sync_bytes / (self.mode.period or 1)

    @functools.cached_property
    def sync_bytes(self) -> float:
        """Collective bytes of one run of the mode's sync program (0 without one); compiled
        for this once per run, not once per dispatch length."""
        if self.sync is None:
            return 0.0
        program = self.sync.lower(placed(self.abstract, self.shardings)).compile()
        return sum(c["bytes"] for c in collectives(program.as_text()).values())

    def synced(self, state, done: int):
        """`state` after the mode's periodic sync when step `done` ends a period (local SGD's
        average, DiLoCo's outer step), else as it is."""
        if self.sync is None or done % self.mode.period:
            return state
        return self.sync(state)

    @functools.cached_property
    def about(self) -> dict:
        """The part of every checkpoint manifest that does not change during the run."""
        return {
            **self.identity(),
            "format": FORMAT,
            "precision": self.cfg.model.precision,
            "normalization": normalization(self.cfg, self.ds),
            "mesh": str(self.spec),
            "devices": jax.device_count(),
            "processes": jax.process_count(),
            "partition_specs": {k: str(v) for k, v in spec_table(self.shardings, "0/").items()},
            "versions": versions(),
            "config": dataclasses.asdict(self.cfg),  # in sections (`Config.from_json`)
            "prune_end": prune_end(self.cfg, self.total),
        }

    def identity(self) -> dict:
        """What a checkpoint must match to resume into this run."""
        return identity(self.cfg, self.ds)

    @property
    def patch_size(self) -> int | None:
        """The ViT's patch size (it shapes the parameters); None for other models."""
        return patch_size(self.cfg, self.ds)


def patch_size(cfg: Config, ds) -> int | None:
    """A ViT's patch size on `ds` (it shapes the parameters); None for other models."""
    if not cfg.model.model.startswith("vit-"):
        return None
    return check_patch_size(ds.image_shape, cfg.model.patch_size)


def identity(cfg: Config, ds) -> dict:
    """What a checkpoint of a run of `cfg` on `ds` must match to resume
    (`jaxpar.run.checkpoint.IDENTITY`: the model's and data's fields, and the modes' pins)."""
    c = cfg
    return {
        "model": c.model.model,
        "dataset": c.data.dataset,
        "image_shape": list(ds.image_shape),
        "num_classes": ds.num_classes,
        "batch_size": c.optimization.batch_size,
        "optimizer": c.optimization.optimizer,
        "seed": c.optimization.seed,
        "patch_size": patch_size(c, ds),
        "sync": None if c.parallelism.sync == "every-step" else c.parallelism.sync,
        "revision": revision(c.model.model),
        "freeze": c.model.freeze,
        "prune_to": c.model.prune_to,
        "qat": c.model.qat,
        "teacher": c.model.teacher,
        "federated": c.federated.settings(),
        "ema": c.optimization.ema is not None,  # the average rides in the optimizer state
        "spikes": c.optimization.spikes is not None,  # the statistics ride in the state
        "game": c.game.settings(),
        "rbm": c.model.settings(),
        "labeled_fraction": c.data.labeled_fraction,
    }


def normalization(cfg: Config, ds) -> dict:
    """How the model's inputs come from pixels scaled to [0, 1] (``(x - mean) / std``), for
    predict: an RBM or a DBN reads them as they are."""
    channels = ds.image_shape[-1]
    plain = cfg.model.probabilities
    return {
        "mean": [0.0] * channels if plain else [float(m) for m in ds.mean],
        "std": [1.0] * channels if plain else [float(s) for s in ds.std],
        "uint8": np.dtype(ds.train_images.dtype) == np.uint8,
    }


def setup(cfg: Config, ds: Dataset | None = None, weights: tuple | None = None) -> Run:
    """`ds`: the data, when not the one ``--dataset`` names (a DBN's layer trains on the
    features of the layers below); `weights`: ``(load, notes)`` for the model's first weights
    (a pretrained DBN's, `jaxpar.run.init_from.starting_with`)."""
    m, o, d = cfg.model, cfg.optimization, cfg.data
    spec = parse_mesh(cfg.parallelism.mesh, jax.device_count())
    mesh = make_mesh(spec)
    if cfg.game.game is not None:
        return game_setup(cfg, spec, mesh)
    ds = ds or load_dataset(d.dataset, d.data_dir, d.labels, d.resize_sources)
    ds = labelled(ds, d.labeled_fraction, o.seed)  # what the seed keeps, the same on any mesh
    mode = mode_for(cfg, spec, ds)
    mode.check(cfg, mesh)
    per_epoch = mode.steps_per_epoch(ds, o.batch_size)
    total = o.steps or o.epochs * per_epoch
    check_warmup(o, total)
    dtype = jnp.bfloat16 if m.precision == "bf16" else jnp.float32
    model_fn = partial(MODELS[m.model], ds.image_shape, ds.num_classes, dtype=dtype,
                       **model_options(cfg, spec))  # fmt: skip
    if m.qat:  # the model computes with int8-rounded weights; float ones are trained, saved
        model_fn = aware(model_fn, ds.image_shape)
    tx = mode.optimizer(cfg, total)
    # What --freeze trains and --prune-to prunes follows the parameters' logical axes.
    params = nnx.state(nnx.eval_shape(lambda: model_fn(rngs=nnx.Rngs(0))), nnx.Param)
    tx = frozen(tx, head_paths(params)) if m.freeze else tx  # only the head trains
    if m.prune_to is not None:  # masks in the optimizer state, applied after every update
        end, roles = prune_end(cfg, total), weight_roles(params)
        tx = optax.chain(tx, magnitude_pruning(m.prune_to, m.prune_start, end, roles))
    if o.ema is not None:  # outermost: the average of the parameters every update gives
        tx = with_ema(tx, o.ema)
    graphdef, abstract = abstract_state(model_fn, tx, o.seed)
    base, replicated = state_shardings(abstract, mesh)
    plain, mask = nnx.to_pure_dict(abstract), param_mask(abstract)
    abstract, shardings = mode.layout(plain, base, mesh, mask)
    fresh = partial(init_state, model_fn, tx, base, o.seed)
    if m.init_from:  # random weights, then those of --init-from (a fresh head if it differs)
        fresh = starting_from(m.init_from, m.model, ds.image_shape, fresh, plain[0], base[0], say)
    if weights:  # a DBN's pretrained layers (`jaxpar.run.pretrain`)
        fresh = starting_with(*weights, fresh, base[0], say)
    laid = jax.jit(mode.init, out_shardings=shardings)
    init, step = (lambda: laid(fresh())), mode.step
    if m.teacher:  # its parameters ride in the state, restored onto this mesh
        abstract, shardings, init, step = with_teacher(load_teacher(cfg, ds, mesh), abstract,
                                                       shardings, init, step)  # fmt: skip
    if o.spikes:  # outermost: a bad step's every change is selected away (`jaxpar.core.spikes`)
        abstract, shardings, init, step = with_spike_skipping(o.spikes[1], mesh, abstract,
                                                              shardings, init, step)  # fmt: skip
    if d.corrupted and np.issubdtype(ds.train_images.dtype, np.integer):
        raise UserError(
            f"--corrupt-steps scales images by 1000, and {d.dataset}'s are "
            f"{ds.train_images.dtype}; use a dataset of float images (digits)"
        )
    ndim = 1 + len(ds.image_shape)
    loss = partial(loss_fn, smoothing=o.label_smoothing) if o.label_smoothing else loss_fn
    prepare = unit_interval(ds) if m.probabilities else preprocess(ds)
    scoring = {"loss": loss}
    if m.rbm:  # no labels: CD as the loss, its own evaluation
        mode.reported = rbm.REPORTED
        scoring = {"loss": rbm.training_loss(m.cd_k), "sums": rbm.evaluation_sums}
    compile = partial(compile_steps, graphdef, shardings, mesh, o.seed, ndim, prepare,
                      accum=cfg.parallelism.grad_accum, step=step, view=mode.view,
                      batch_ndims=mode.batch_ndims(ndim), **scoring)  # fmt: skip
    ema_eval = None
    if o.ema is not None:
        ema_eval = compile(view=lambda state: ema_view(mode.view(state)))[1]
    sync = None
    if mode.sync is not None:  # every H steps, its own program: the loop calls it (`synced`)
        sync = jax.jit(under_mesh(mode.sync, mesh), in_shardings=(shardings,),
                       out_shardings=shardings, donate_argnums=0)  # fmt: skip
    schedule = make_schedule(o.lr, o.schedule, o.warmup_steps, total)
    batches = partial(mode.batches, ds, o.batch_size, o.seed, mesh=mesh,
                      workers=d.data_workers)  # fmt: skip
    return Run(
        cfg, spec, mesh, ds, per_epoch, total, schedule, init, abstract, shardings, replicated,
        *compile(), compile(stacked=True)[0], compile, mode, sync, batches, ema_eval,
    )  # fmt: skip


def check_warmup(o, total: int) -> None:
    if o.schedule == "cosine" and o.warmup_steps >= total:
        raise UserError(
            f"--warmup-steps {o.warmup_steps} leaves no step of the cosine decay in a run of "
            f"{total} steps; use fewer warmup steps or more --steps/--epochs"
        )


def game_setup(cfg: Config, spec: MeshSpec, mesh) -> Run:
    """A run of AlphaZero on ``--game`` (`jaxpar.modes.games`): its network is ``--model`` with
    a position as input and each move's logit and the value as outputs; a step is an iteration
    of ``--updates-per-iteration`` optimizer updates."""
    m, o = cfg.model, cfg.optimization
    mode = AlphaZero(cfg.game, o.seed)
    mode.check(cfg, mesh)
    ds = mode.dataset()
    total = o.steps or o.epochs * EPOCH
    updates = cfg.game.updates_per_iteration
    check_warmup(o, total * updates)
    dtype = jnp.bfloat16 if m.precision == "bf16" else jnp.float32
    model_fn = partial(MODELS[m.model], ds.image_shape, ds.num_classes, dtype=dtype)
    tx = mode.optimizer(cfg, total)
    graphdef, abstract = abstract_state(model_fn, tx, o.seed)
    base, replicated = state_shardings(abstract, mesh)
    abstract, shardings = mode.layout(nnx.to_pure_dict(abstract), base, mesh, None)
    fresh = partial(init_state, model_fn, tx, base, o.seed)
    laid = jax.jit(mode.init, out_shardings=shardings)
    compile = partial(compile_steps, graphdef, shardings, mesh, o.seed, 1 + len(ds.image_shape),
                      step=mode.step, batch_ndims=mode.batch_ndims(0))  # fmt: skip
    rate = make_schedule(o.lr, o.schedule, o.warmup_steps, total * updates)
    network = nnx.graphdef(nnx.eval_shape(lambda: model_fn(rngs=nnx.Rngs(0))))
    evaluate = mode.evaluator(network, mesh, cfg.metrics.eval_examples)
    return Run(
        cfg, spec, mesh, ds, EPOCH, total, lambda step: rate(step * updates), lambda: laid(fresh()),
        abstract, shardings, replicated, *compile(), compile(stacked=True)[0], compile, mode, None,
        partial(mode.batches, ds, o.batch_size, o.seed, mesh=mesh), evaluate=evaluate,
    )  # fmt: skip


def model_options(cfg: Config, spec: MeshSpec) -> dict:
    """The model arguments that flags and mesh set: the ViT's patch size, rematerialisation and
    how its layer stack runs (a pipeline schedule over the ``stage`` axis, or one scan); a
    persistent RBM's chains, one per example of the batch."""
    stack = schedule_for(cfg, spec)  # also refuses a pipeline for the models that cannot
    if cfg.model.persistent:
        return {"chains": cfg.optimization.batch_size}
    if not cfg.model.model.startswith("vit-"):
        return {}
    return {
        "patch_size": cfg.model.patch_size,
        "remat": cfg.parallelism.remat == "block",
        "stack": stack,
    }
