"""Compress a trained run and measure what each variant costs and saves:
``python -m jaxpar.compress WORKDIR [--quantize int8|bf16|int8,bf16] [--activations int8]
[--prune S [--finetune-epochs N]] [--save DIR] [--mesh M] [--data-dir D]``.

The run's latest checkpoint is restored onto the mesh (the run's, from ``config.json``, unless
``--mesh``); each variant is evaluated on the test split of the run's dataset:

- ``float32``: the checkpoint as trained (computing in float32 whatever its ``--precision``);
  always measured and listed first.
- ``int8`` (``--quantize int8``): weights quantized post-training by qwix, one scale per output
  channel (`jaxpar.modes.quantize`: dense layers keep float inputs; convolutions quantize theirs
  too, per example, since qwix 0.1.8 quantizes a convolution only with its input).
- ``int8-act`` (``--activations int8``): every dense and convolution input quantized too, with a
  static per-tensor scale calibrated on ``--calibration-batches`` training batches (unaugmented).
- ``bf16`` (``--quantize bf16``): weights stored, and the model computing, in bfloat16.
- ``pruned-S`` (``--prune S``): the fraction S of every weight matrix and kernel (of each layer of
  a ViT's stacks), the smallest in magnitude, set to zero at once; vectors stay dense, as in
  `jaxpar.modes.prune`. With ``--finetune-epochs N``, N epochs of training from the checkpoint,
  pruned the same way by their first update and kept so (``train.py --init-from WORKDIR
  --prune-to S --prune-start 0 --prune-end 1`` in
  ``WORKDIR/compress/pruned-S-from-step-K-N-epochs``, resumed or reused by a later call); the
  one-shot accuracy is kept as ``test_accuracy_before_finetune``.

``--save DIR`` writes the int8 model (``int8-act`` with ``--activations int8``) as a checkpoint in
the new folder DIR, which ``python -m jaxpar.predict DIR`` serves (`save_servable`).

Quantized weights stay sharded: an int8 kernel is placed like its float original and its scales
like its output channels. A run trained with ``--qat int8`` quantizes to ``int8`` with no further
loss.

Each variant reports ``param_bytes`` (the model's state as served: weights, their scales and
BatchNorm statistics), ``nonzero_params`` (nonzero stored entries: an int8 model's count holds its
scales and drops weights that round to 0), ``test_accuracy``, ``eval_images_per_s`` (the median
of timed passes over the test split, at least 3 and 1 s of them, after one that compiles) and
``eval_vs_float32`` (against the float32 of the same call: speeds compare only within a call);
pruned variants also the nonzeros of each matrix and ``sparse_bytes``, their size with each
matrix stored as its nonzero values plus a bitmap. They are printed as a table and written to
``WORKDIR/compress.json`` as ``{"step": N, "variants": [...]}``. Variants measured by earlier
calls at the same step stay; a file about another step is kept as
``compress.before-step-N.json``.
"""

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from jaxpar.core.errors import UserError
from jaxpar.modes.quantize import unsupported

QUANTIZE = ("int8", "bf16")


@dataclasses.dataclass
class Trained:
    """A run's latest checkpoint, restored onto a mesh, with its test data."""

    workdir: Path
    step: int
    manifest: dict
    cfg: object  # the run's `jaxpar.run.config.Config`, mesh and data dir as used here
    ds: object  # `jaxpar.data.Dataset`
    spec: object  # `jaxpar.core.mesh.MeshSpec`
    mesh: object
    model: object  # the restored float32 `nnx.Module`, its weights placed in their shardings


def run_config(workdir: Path, mesh: str | None, data_dir: str | None):
    """The run's `Config` from ``WORKDIR/config.json``, with `mesh` and `data_dir` when given."""
    from jaxpar.run.config import Config

    if not (workdir / "checkpoints").is_dir():
        raise UserError(f"{workdir} has no checkpoint to compress (no checkpoints/ folder)")
    path = workdir / "config.json"
    if not path.is_file():
        raise UserError(f"{workdir} has no config.json: name a workdir of a train.py run")
    cfg = Config.from_json(json.loads(path.read_text()))  # in sections, or flat as before
    return cfg.replace(mesh=mesh or cfg.parallelism.mesh, data_dir=data_dir or cfg.data.data_dir,
                       workdir=str(workdir))  # fmt: skip


def restore_run(cfg) -> Trained:
    """`cfg`'s workdir's latest checkpoint on its mesh, in a model computing in float32 (whatever
    ``--precision`` the run trained with)."""
    import jax
    from flax import nnx

    from jaxpar.core.mesh import make_mesh, parse_mesh
    from jaxpar.data import load_dataset
    from jaxpar.tools.predict import latest, refuse_rbm, restored

    workdir = Path(cfg.checkpoint.workdir)
    step, manifest = latest(workdir)
    refuse_rbm(workdir, manifest, "compress")
    ds = load_dataset(cfg.data.dataset, cfg.data.data_dir, cfg.data.labels, cfg.data.resize_sources)
    spec = parse_mesh(cfg.parallelism.mesh, jax.device_count())
    mesh = make_mesh(spec)
    graphdef, weights, _ = restored(workdir, step, manifest, mesh, precision="fp32")
    return Trained(workdir, step, manifest, cfg, ds, spec, mesh, nnx.merge(graphdef, weights))


def resharded(model, mesh):
    """`model` with every variable in the sharding its logical axis names give on `mesh`."""
    import jax
    from flax import nnx

    from jaxpar.core.sharding import state_shardings

    graphdef, state = nnx.split(model)
    shardings = state_shardings(state, mesh)[0]
    return nnx.merge(graphdef, jax.device_put(nnx.to_pure_dict(state), shardings))


def calibration_images(trained: Trained, batches: int):
    """The first `batches` training batches of the run (seed and order as in training), prepared
    as in evaluation (normalised, not augmented), as one array."""
    import jax.numpy as jnp

    from jaxpar.data import preprocess, train_batches

    c, prepare = trained.cfg, preprocess(trained.ds)
    batches = train_batches(
        trained.ds, c.optimization.batch_size, c.optimization.seed, range(batches), trained.mesh
    )
    return jnp.concatenate([prepare(b["image"]) for b in batches])


def int8_model(trained: Trained, activations: bool, calibration):
    """The model with int8 weights (and inputs, if `activations`), placed on the mesh."""
    from jaxpar.modes.quantize import post_training

    return resharded(post_training(trained.model, calibration, activations), trained.mesh)


def bf16_model(trained: Trained):
    """The same weights, stored in bfloat16, in the model computing in bfloat16."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxpar.tools.predict import restored

    t = trained
    graphdef, weights, _ = restored(t.workdir, t.step, t.manifest, t.mesh, precision="bf16")

    def cast(a):
        return a.astype(jnp.bfloat16) if jnp.issubdtype(a.dtype, jnp.floating) else a

    return nnx.merge(graphdef, jax.tree.map(cast, weights))


def pruned_model(model, sparsity: float):
    """`model` with the fraction `sparsity` of each matrix and kernel (of each layer of a stack of
    them), the smallest weights in magnitude, set to zero: exactly that many, as
    `jaxpar.modes.prune` prunes while training."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxpar.core.sharding import path_str
    from jaxpar.modes.prune import prune_matrix, weight_roles

    graphdef, weights, rest = nnx.split(model, nnx.Param, ...)
    roles = weight_roles(weights)

    @jax.jit
    def prune(weights):
        def one(path, w):
            if (key := path_str(path)) not in roles:
                return w  # a vector: dense
            return w * prune_matrix(w, jnp.ones_like(w), sparsity, roles[key])

        return jax.tree_util.tree_map_with_path(one, weights)

    return nnx.merge(graphdef, prune(nnx.to_pure_dict(weights)), rest)


def finetune_config(trained: Trained, sparsity: float, epochs: int):
    """The `Config` of `epochs` epochs of training from the checkpoint, its weights pruned to
    `sparsity` by the first update (ranked as `pruned_model` ranks them) and kept so, in
    ``WORKDIR/compress/<variant>-from-step-N-E-epochs``: a folder per checkpoint and length, so a
    later call resumes or reuses only the same fine-tuning."""
    from jaxpar.run.config import Model

    t = trained
    if t.cfg.federated.clients is not None:
        raise UserError(
            f"{t.workdir} is a federated run; --finetune-epochs trains centrally: prune it "
            "without fine-tuning (--finetune-epochs 0)"
        )
    out = t.workdir / "compress" / f"{variant_name(sparsity)}-from-step-{t.step}-{epochs}-epochs"
    return t.cfg.replace(
        workdir=str(out), init_from=str(t.workdir), prune_to=sparsity, prune_start=0,
        prune_end=1, epochs=epochs, steps=None, teacher=None, profile_steps=None,
        distill_temperature=Model.distill_temperature, distill_weight=Model.distill_weight,
        warmup_steps=0,  # from trained weights: no warmup (the run's could outlast the epochs)
        checkpoint_every=0, restart=False, dry_run=False, project=None, json=False,
        coordinator=None, num_processes=None, process_id=None,
    ).validate()  # fmt: skip


def variant_name(sparsity: float) -> str:
    """The variant's name: the sparsity with two decimals, or as many as it has.

    >>> variant_name(0.9), variant_name(0.875)
    ('pruned-0.90', 'pruned-0.875')
    """
    return f"pruned-{sparsity:.2f}" if round(sparsity, 2) == sparsity else f"pruned-{sparsity:g}"


def evaluate(trained: Trained, model, passes: int = 3, seconds: float = 1.0):
    """Test accuracy of `model`, and its evaluation speed in images/s: the median of timed passes
    over the test split (at least `passes`, and more until `seconds` have passed), after one
    that compiles; no speed (None) for ``passes=0``."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxpar.data import preprocess
    from jaxpar.run.evaluation import evaluation_batches

    t = trained
    graphdef, state = nnx.split(model)
    prepare = preprocess(t.ds)

    @jax.jit
    def sums(state, batch):
        logits = nnx.merge(graphdef, state)(prepare(batch["image"]), train=False)
        hits = (jnp.argmax(logits, -1) == batch["label"]) * batch["mask"]
        return jnp.stack([jnp.sum(hits), jnp.sum(batch["mask"])])

    batches = evaluation_batches(t)  # the run's own evaluation batches, kept where they fit

    def one_pass():  # sums stay on the devices: one host sync per pass
        return np.asarray(sum(sums(state, b) for b in batches()))

    correct, count = one_pass()
    times = []
    while passes and (len(times) < passes or sum(times) < seconds):
        start = time.perf_counter()
        one_pass()
        times.append(time.perf_counter() - start)
    return float(correct / count), float(count / statistics.median(times)) if times else None


def sizes(model, sparse: bool = False) -> dict:
    """Bytes of the model's state and its nonzero weights (int8 values and their scales counted
    as stored); with `sparse`, the nonzeros of each matrix (or stack of them) and the bytes of a
    sparse encoding: each such matrix as its nonzero values plus a bitmap, the rest dense."""
    import jax
    from flax import nnx

    from jaxpar.core.sharding import path_str
    from jaxpar.modes.prune import weight_roles

    state, params = nnx.state(model), nnx.state(model, nnx.Param)
    roles = weight_roles(params)
    weights = {path_str(p): w for p, w in jax.tree_util.tree_leaves_with_path(
        nnx.to_pure_dict(params))}  # fmt: skip
    nonzero = {k: int(np.count_nonzero(np.asarray(w))) for k, w in weights.items()}
    out = {
        "param_bytes": sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(state)),
        "nonzero_params": sum(nonzero.values()),
    }
    if sparse:
        matrices = {k: w for k, w in weights.items() if k in roles}
        out["layers"] = {k: [nonzero[k], w.size] for k, w in matrices.items()}
        saved = sum(w.size * w.dtype.itemsize - nonzero[k] * w.dtype.itemsize - -(-w.size // 8)
                    for k, w in matrices.items())  # fmt: skip
        out["sparse_bytes"] = out["param_bytes"] - saved
    return out


def measure(trained: Trained, name: str, model, seconds: float = 1.0, **extra) -> dict:
    accuracy, speed = evaluate(trained, model, seconds=seconds)
    return {
        "name": name,
        **sizes(model, sparse=name.startswith("pruned")),
        "test_accuracy": accuracy,
        "eval_images_per_s": speed,
        **extra,
    }


def record(workdir: Path, step: int, variants: list[dict]) -> list[dict]:
    """Add `variants` to ``WORKDIR/compress.json`` (replacing those of the same name) and return
    all of them, ``float32`` first."""
    from jaxpar.run.workdir import free_name

    path, earlier = workdir / "compress.json", []
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("step") == step:
            earlier = saved["variants"]
        else:
            path.rename(free_name(workdir, f"compress.before-step-{step}", ".json"))
    names = {v["name"] for v in variants}
    merged = [v for v in earlier if v["name"] not in names] + variants
    merged.sort(key=lambda v: v["name"] != "float32")  # stable: the rest keep their order
    path.write_text(json.dumps({"step": step, "variants": merged}, indent=1) + "\n")
    return merged


def table(variants: list[dict]) -> str:
    base = next(v for v in variants if v["name"] == "float32")["param_bytes"]
    rows = ["variant          param bytes   x float   nonzero params   test acc   eval images/s"
            "   x float"]  # fmt: skip
    for v in variants:
        rows.append(
            f"{v['name']:<14} {v['param_bytes']:>13,} {v['param_bytes'] / base:>9.3f} "
            f"{v['nonzero_params']:>16,} {v['test_accuracy']:>10.4f} "
            f"{v['eval_images_per_s']:>15,.0f} {v['eval_vs_float32']:>9.2f}"
        )
        if v.get("finetune_epochs"):
            n = v["finetune_epochs"]
            rows.append(f"  before fine-tuning ({n} epoch{'s' * (n != 1)}): test acc "
                        f"{v['test_accuracy_before_finetune']:.4f}")  # fmt: skip
        if "sparse_bytes" in v:
            rows.append(f"  as sparse (values + bitmaps): {v['sparse_bytes']:,} bytes")
            rows += [f"  {k}: {n:,} of {size:,} nonzero" for k, (n, size) in v["layers"].items()]
    return "\n".join(rows)


def save_servable(t: Trained, model, out: Path, activations: bool) -> None:
    """The int8 `model` as a checkpoint (its step's, model only) in the new folder `out`, which
    ``python -m jaxpar.predict OUT`` serves: int8 weights, their scales (and static input
    scales), restored into the same model built again from the manifest."""
    from flax import nnx

    from jaxpar.run.checkpoint import Checkpoints

    kept = ("step", "format", "model", "revision", "image_shape", "num_classes", "patch_size",
            "normalization", "versions")  # fmt: skip
    manifest = {k: t.manifest.get(k) for k in kept}
    manifest["quantization"] = {"weights": "int8", "activations": activations}
    manifest["compressed"] = {"from": str(t.workdir.resolve()), "step": t.step}
    ckpts = Checkpoints(out)
    try:
        ckpts.save(t.step, {0: nnx.to_pure_dict(nnx.state(model))}, manifest, wait=True)
    finally:
        ckpts.close()


def compress(cfg, quantize=(), activations=None, prune=None, finetune_epochs=0,
             calibration_batches=4, seconds=1.0, say=print, save=None) -> list[dict]:  # fmt: skip
    """Measure the float original and the variants asked for, in this order and this call (their
    speeds compare within it), each timed for `seconds`; record and return all the workdir's
    variants. `save`: a new folder for the int8 model (with int8 inputs if `activations`)."""
    from functools import partial

    from jaxpar.run.loop import train

    if "int8" in quantize and unsupported(cfg.model.model):
        raise UserError(unsupported(cfg.model.model))
    t = restore_run(cfg)
    tuning = finetune_config(t, prune, finetune_epochs) if finetune_epochs else None
    say(f"{t.workdir} step {t.step}: {t.manifest['model']} on {t.cfg.data.dataset}, mesh {t.spec}")
    timed = partial(measure, seconds=seconds)
    variants = [timed(t, "float32", t.model)]
    if "int8" in quantize:
        calibration = calibration_images(t, calibration_batches)
        variants.append(timed(t, "int8", model := int8_model(t, False, calibration)))
        if activations == "int8":
            variants.append(timed(t, "int8-act", model := int8_model(t, True, calibration)))
        if save is not None:
            save_servable(t, model, save, activations == "int8")
            say(f"{variants[-1]['name']} model saved in {save}: python -m jaxpar.predict {save}")
    if "bf16" in quantize:
        variants.append(timed(t, "bf16", bf16_model(t)))
    if prune is not None:
        model = pruned_model(t.model, prune)
        extra = {"finetune_epochs": finetune_epochs}
        if tuning is not None:
            extra["test_accuracy_before_finetune"] = evaluate(t, model, passes=0)[0]
            train(tuning)
            model = restore_run(cfg.replace(workdir=tuning.checkpoint.workdir)).model
        variants.append(timed(t, variant_name(prune), model, **extra))
    for v in variants:
        v["eval_vs_float32"] = v["eval_images_per_s"] / variants[0]["eval_images_per_s"]
    return record(t.workdir, t.step, variants)


def check(args) -> None:
    kinds = args.quantize.split(",") if args.quantize else []
    for kind in kinds:
        if kind not in QUANTIZE:
            supported = " or ".join(QUANTIZE)
            raise UserError(f"--quantize {kind} is not supported; choose {supported} (or both)")
    if args.activations is not None and args.activations != "int8":
        raise UserError(f"--activations {args.activations} is not supported; choose int8")
    if args.activations and "int8" not in kinds:
        raise UserError("--activations int8 goes with --quantize int8")
    if args.prune is not None and not 0 < args.prune < 1:
        raise UserError(f"--prune must be a sparsity in (0, 1), got {args.prune}")
    if args.finetune_epochs < 0:
        raise UserError(f"--finetune-epochs must be >= 0, got {args.finetune_epochs}")
    if args.finetune_epochs and args.prune is None:
        raise UserError("--finetune-epochs goes with --prune")
    if args.time < 0:
        raise UserError(f"--time must be >= 0 seconds, got {args.time}")
    if args.calibration_batches < 1:
        raise UserError(f"--calibration-batches must be >= 1, got {args.calibration_batches}")
    if args.save is not None and "int8" not in kinds:
        raise UserError("--save writes the int8 model: add --quantize int8")
    if args.save is not None and args.save.exists() and not args.save.is_dir():
        raise UserError(f"--save {args.save} is a file; name a new folder")
    if args.save is not None and args.save.exists() and any(args.save.iterdir()):
        raise UserError(f"--save {args.save} is not empty; name a new folder (nothing is "
                        "overwritten)")  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jaxpar.compress", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("workdir", type=Path, help="a train.py workdir with a checkpoint")
    parser.add_argument("--quantize", help=f"post-training: {', '.join(QUANTIZE)} or int8,bf16")
    parser.add_argument("--activations", help="int8: quantize layer inputs too (static scales)")
    parser.add_argument("--calibration-batches", type=int, default=4,
                        help="training batches that set the static input scales")  # fmt: skip
    parser.add_argument("--prune", type=float, help="one-shot magnitude pruning to this sparsity")
    parser.add_argument("--finetune-epochs", type=int, default=0,
                        help="epochs of training after --prune, the mask kept")  # fmt: skip
    parser.add_argument("--time", type=float, default=1.0,
                        help="seconds timing each variant (3 passes at least)")  # fmt: skip
    parser.add_argument("--mesh", help="as train.py's --mesh (default: the run's)")
    parser.add_argument("--data-dir", help="the dataset's folder (default: the run's)")
    parser.add_argument(
        "--save", type=Path, help="a new folder: the int8 model as a checkpoint predict serves"
    )
    args = parser.parse_args(argv)
    try:
        check(args)
        cfg = run_config(args.workdir, args.mesh, args.data_dir)
        from jaxpar.core.mesh import check_batch_spec, parse_mesh, request_devices

        spec = parse_mesh(cfg.parallelism.mesh) if cfg.parallelism.mesh else None
        if spec is not None:
            check_batch_spec(
                cfg.optimization.batch_size, spec
            )  # the evaluation batches split as training's
        request_devices(spec.size if spec else 1)  # before JAX starts
        quantize = tuple(args.quantize.split(",")) if args.quantize else ()
        variants = compress(cfg, quantize, args.activations, args.prune, args.finetune_epochs,
                            args.calibration_batches, args.time, save=args.save)  # fmt: skip
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(variants))
    print(f"written to {args.workdir / 'compress.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
