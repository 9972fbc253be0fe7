"""``--model dbn:A-B-C --pretrain-epochs E`` (issue #33): a deep belief network's greedy layer-wise
pretraining, before the network is fine-tuned as a classifier (`jaxpar.models.dbn`).

Layer i is an ordinary run of ``--model rbm:W`` (W its width) for E epochs, in
``WORKDIR/pretrain/layer-i``: its own config, metrics, TensorBoard events and checkpoints, so a
stop in any layer resumes there, on any mesh. The first layer reads the images' pixels in [0, 1];
each next one the hidden probabilities of the one below, computed on the host in float32 from
that layer's last checkpoint, the same on any mesh. The layers train with the RBM recipe (SGD at
0.06, no momentum; `jaxpar.models.RECIPES`) and the run's --batch-size, --seed, --cd-k,
--persistent, --mesh, checkpoint and metrics flags; the other optimisation flags, --epochs and
--labeled-fraction are the fine-tuning's, which starts from the layers' weights and a fresh head.
"""

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np

from jaxpar.core.errors import UserError
from jaxpar.data import Dataset, labelled, load_dataset, pixel_range, steps_per_epoch
from jaxpar.models import RECIPES
from jaxpar.models.dbn import layer_sizes
from jaxpar.run.checkpoint import Checkpoints, check_fits, restore_model
from jaxpar.run.config import Config
from jaxpar.run.observe import say
from jaxpar.run.resume import sync
from jaxpar.run.setup import identity
from jaxpar.run.workdir import move_aside, resolve

CHUNK = 4096  # rows per host matrix product when computing a layer's features


def layer_configs(cfg: Config) -> list[Config]:
    """Each layer's run: an RBM of the layer's width in ``WORKDIR/pretrain/layer-i``."""
    recipe, root = RECIPES["rbm"], Path(cfg.checkpoint.workdir) / "pretrain"
    return [
        cfg.replace(model=f"rbm:{width}", pretrain_epochs=0, epochs=cfg.model.pretrain_epochs,
                    steps=None, optimizer="sgd", lr=recipe["lr"], momentum=recipe["momentum"],
                    weight_decay=0.0, clip_grad_norm=None, label_smoothing=0.0,
                    schedule="constant", warmup_steps=0,
                    labeled_fraction=None, eval_every=0, profile_steps=None,
                    workdir=str(root / f"layer-{i}"), restart=False)
        for i, width in enumerate(layer_sizes(cfg.model.model), 1)
    ]  # fmt: skip


def pretrain(cfg: Config, train_run) -> tuple[Config, Dataset, tuple]:
    """Train each layer of `cfg`'s DBN that is not yet trained, by ``train_run(layer_cfg, ds)``
    (one ordinary run). Returns the fine-tuning's config (its workdir resolved), its dataset,
    and ``(load, notes)``: ``load(shardings)`` places the layers' weights in the DBN's
    shardings (`jaxpar.run.init_from.starting_with`)."""
    workdir = resolve(cfg)
    if cfg.checkpoint.restart:  # the layers move aside with the rest
        if moved := move_aside(workdir, also=("pretrain",)):
            say(f"--restart: moved the previous run to {moved}")
        sync("jaxpar:pretrain-moved")
    cfg = cfg.replace(workdir=str(workdir), restart=False)
    d, o = cfg.data, cfg.optimization
    ds = data = load_dataset(d.dataset, d.data_dir, d.labels, d.resize_sources)
    steps_per_epoch(labelled(ds, d.labeled_fraction, o.seed), o.batch_size)  # the fine-tuning's
    layers, stack = layer_configs(cfg), []
    check_epochs(layers)
    for i, layer in enumerate(layers, 1):
        where = layer.checkpoint.workdir
        if (step := trained_to(layer, data)) is None:
            say(f"pretraining layer {i} of {len(layers)}: --model {layer.model.model} on "
                f"{np.prod(data.image_shape)} inputs, {layer.optimization.epochs} epochs, in "
                f"{where}")  # fmt: skip
            train_run(layer, data)
            step = trained_to(layer, data)
        else:
            say(f"layer {i} of {len(layers)} is pretrained ({where})")
        stack.append(layer_weights(where, step))
        data = upward(data, *stack[-1])
    note = f"initialised from the pretrained layers in {workdir / 'pretrain'}; a fresh head"
    return cfg, ds, (partial_loader(stack), [note])


def check_epochs(layers: list[Config]) -> None:
    """Refuse, before any layer trains, layers pretrained for another number of epochs: each
    layer was trained on the one below as it was (``--restart`` pretrains anew)."""
    for i, layer in enumerate(layers, 1):
        if not (Path(layer.checkpoint.workdir) / "config.json").is_file():
            continue
        where, asked = layer.checkpoint.workdir, layer.optimization.epochs
        saved = Config.from_json(json.loads((Path(where) / "config.json").read_text()))
        if (epochs := saved.optimization.epochs) != asked:
            raise UserError(f"layer {i} in {where} was pretrained with --pretrain-epochs "
                            f"{epochs}, not {asked}; pass --pretrain-epochs {epochs}, or "
                            "--restart to pretrain anew")  # fmt: skip


def trained_to(layer: Config, data: Dataset) -> int | None:
    """The step of the layer's finished run (its last checkpoint, checked to be of this
    layer's run), or None while it is untrained or partly trained."""
    if not (Path(layer.checkpoint.workdir) / "checkpoints").is_dir():
        return None
    ckpts = Checkpoints(layer.checkpoint.workdir)
    try:
        step = ckpts.latest()
        if step is None:
            return None
        manifest = ckpts.manifest(step)
        check_fits(manifest, identity(layer, data), step, ckpts.directory)
    finally:
        ckpts.close()
    return step if manifest["epoch"] >= layer.optimization.epochs else None


def layer_weights(workdir, step: int) -> tuple[np.ndarray, np.ndarray]:
    """An RBM checkpoint's ``kernel`` and ``hidden_bias``, whole on the host."""
    ckpts = Checkpoints(workdir)
    try:
        model = ckpts.manager.item_metadata(step)["state"]["model"]
    finally:
        ckpts.close()
    everywhere = jax.sharding.NamedSharding(
        jax.sharding.Mesh(np.array(jax.devices()), ("all",)), jax.sharding.PartitionSpec()
    )
    abstract = {k: jax.ShapeDtypeStruct(model[k].shape, np.float32)
                for k in ("kernel", "hidden_bias")}  # fmt: skip
    weights = restore_model(workdir, step, abstract, dict.fromkeys(abstract, everywhere))
    return tuple(np.asarray(weights[k].addressable_data(0)) for k in ("kernel", "hidden_bias"))


def upward(ds: Dataset, kernel: np.ndarray, bias: np.ndarray) -> Dataset:
    """The hidden probabilities ``sigmoid(v W + c)`` of every training and test example, as the
    next layer's data (inputs in [0, 1]; the labels kept for its evaluation's bookkeeping)."""
    low, high = pixel_range(ds)

    def features(images) -> np.ndarray:
        out = []
        for start in range(0, len(images), CHUNK):
            rows = np.asarray(images[np.arange(start, min(start + CHUNK, len(images)))])
            v = np.clip((rows.reshape(len(rows), -1).astype(np.float32) - low) / (high - low), 0, 1)
            out.append((1 / (1 + np.exp(-(v @ kernel + bias)))).astype(np.float32))
        return np.concatenate(out)

    return dataclasses.replace(ds, train_images=features(ds.train_images),
                               test_images=features(ds.test_images), mean=(0.0,), std=(1.0,),
                               augment=False, pixel_range=(0.0, 1.0))  # fmt: skip


def partial_loader(stack: list[tuple[np.ndarray, np.ndarray]]):
    """``load(shardings)``: the DBN's hidden layers from the RBMs' ``(kernel, hidden_bias)``,
    each array placed in its sharding (any mesh, any process count)."""

    def put(array, sharding):
        return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

    def load(shardings):
        return {"layers": {i: {"kernel": put(w, shardings["layers"][i]["kernel"]),
                               "bias": put(c, shardings["layers"][i]["bias"])}
                           for i, (w, c) in enumerate(stack)}}  # fmt: skip

    return load
