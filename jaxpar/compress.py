"""Compress a trained run and measure what each variant costs and saves:
``python -m jaxpar.compress WORKDIR [--quantize int8|bf16] [--activations int8]
[--prune S [--finetune-epochs N]] [--mesh M] [--data-dir D]``.

The run's latest checkpoint is restored onto the mesh (the run's, from ``config.json``, unless
``--mesh``); each variant is evaluated on the test split of the run's dataset:

- ``float32``: the checkpoint as trained; always measured and listed first.
- ``int8`` (``--quantize int8``): weights quantized post-training by qwix, one scale per output
  channel (`jaxpar.quantize`: dense layers keep float inputs; convolutions quantize theirs too,
  per example, since qwix 0.1.8 quantizes a convolution only with its input).
- ``int8-act`` (``--activations int8``): every dense and convolution input quantized too, with a
  static per-tensor scale calibrated on ``--calibration-batches`` training batches (unaugmented).
- ``bf16`` (``--quantize bf16``): weights stored, and the model computing, in bfloat16.
- ``pruned-S`` (``--prune S``): the fraction S of every weight matrix and kernel, the smallest in
  magnitude, set to zero at once (vectors stay dense, as in `jaxpar.prune`). With
  ``--finetune-epochs N``, N epochs of training from the checkpoint, pruned to S by their first
  update and kept so (``train.py --init-from WORKDIR --prune-to S --prune-start 0 --prune-end
  1``, in ``WORKDIR/compress/pruned-S``); the one-shot accuracy is kept as
  ``test_accuracy_before_finetune``.

Quantized weights stay sharded: an int8 kernel is placed like its float original and its scales
like its output channels. A run trained with ``--qat int8`` quantizes with no further loss.

Each variant reports ``param_bytes`` (the model's state as served: weights, their scales and
BatchNorm statistics), ``nonzero_params`` (nonzero entries of the weights and scales),
``test_accuracy`` and ``eval_images_per_s`` (the median of timed passes over the test split, at
least 3 and 1 s of them, after one that compiles); pruned variants also the nonzeros of each
matrix and ``sparse_bytes``, their size with each matrix stored as its nonzero values plus a
bitmap. They are printed as a table and written to ``WORKDIR/compress.json`` as ``{"step": N,
"variants": [...]}``. Variants measured by earlier calls at the same step stay; a file about
another step is kept as ``compress.before-step-N.json``.
"""

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from jaxpar.errors import UserError
from jaxpar.quantize import unsupported

QUANTIZE = ("int8", "bf16")


@dataclasses.dataclass
class Trained:
    """A run's latest checkpoint, restored onto a mesh, with its test data."""

    workdir: Path
    step: int
    manifest: dict
    cfg: object  # the run's `jaxpar.config.Config`, mesh and data dir as used here
    ds: object  # `jaxpar.data.Dataset`
    spec: object  # `jaxpar.mesh.MeshSpec`
    mesh: object
    model: object  # the restored `nnx.Module`, its weights placed in their shardings


def run_config(workdir: Path, mesh: str | None, data_dir: str | None):
    """The run's `Config` from ``WORKDIR/config.json``, with `mesh` and `data_dir` when given."""
    from jaxpar.config import Config

    if not (workdir / "checkpoints").is_dir():
        raise UserError(f"{workdir} has no checkpoint to compress (no checkpoints/ folder)")
    path = workdir / "config.json"
    if not path.is_file():
        raise UserError(f"{workdir} has no config.json: name a workdir of a train.py run")
    saved = json.loads(path.read_text())
    known = {f.name for f in dataclasses.fields(Config)}
    cfg = Config(**{k: v for k, v in saved.items() if k in known})
    return dataclasses.replace(
        cfg, mesh=mesh or cfg.mesh, data_dir=data_dir or cfg.data_dir, workdir=str(workdir)
    )


def restore(cfg, **changes) -> Trained:
    """`cfg.workdir`'s latest checkpoint on `cfg.mesh`; `changes` as `jaxpar.predict.restored`'s."""
    import jax
    from flax import nnx

    from jaxpar.data import load_dataset
    from jaxpar.mesh import make_mesh, parse_mesh
    from jaxpar.predict import latest, restored

    workdir = Path(cfg.workdir)
    step, manifest = latest(workdir)
    ds = load_dataset(cfg.dataset, cfg.data_dir)
    spec = parse_mesh(cfg.mesh, jax.device_count())
    mesh = make_mesh(spec)
    graphdef, weights, _ = restored(workdir, step, manifest, mesh, **changes)
    model = nnx.merge(graphdef, weights)
    return Trained(workdir, step, manifest, cfg, ds, spec, mesh, model)


def placed(model, mesh):
    """`model` with every variable in the sharding its logical axis names give on `mesh`."""
    import jax
    from flax import nnx

    from jaxpar.sharding import state_shardings

    graphdef, state = nnx.split(model)
    shardings = state_shardings(state, mesh)[0]
    return nnx.merge(graphdef, jax.device_put(nnx.to_pure_dict(state), shardings))


def calibration_images(t: Trained, batches: int):
    """The first `batches` training batches of the run (seed and order as in training), prepared
    as in evaluation (normalised, not augmented), as one array."""
    import jax.numpy as jnp

    from jaxpar.data import preprocess, train_batches

    prepare = preprocess(t.ds)
    c = t.cfg
    batches = train_batches(t.ds, c.batch_size, c.seed, range(batches), t.mesh)
    return jnp.concatenate([prepare(b["image"]) for b in batches])


def int8(t: Trained, activations: bool, calibration):
    """`t.model` with int8 weights (and inputs, if `activations`), placed on `t.mesh`."""
    from jaxpar.quantize import post_training

    return placed(post_training(t.model, calibration, activations), t.mesh)


def bf16(t: Trained):
    """The same weights, stored in bfloat16, in the model computing in bfloat16."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    b = restore(t.cfg, precision="bf16")
    graphdef, state = nnx.split(b.model)
    cast = lambda a: a.astype(jnp.bfloat16) if jnp.issubdtype(a.dtype, jnp.floating) else a  # noqa: E731
    return nnx.merge(graphdef, jax.tree.map(cast, state))


def pruned(model, sparsity: float):
    """`model` with the fraction `sparsity` of each matrix and kernel, the smallest weights in
    magnitude, set to zero (exactly, per matrix: `jaxpar.prune.keep_largest`)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxpar.prune import keep_largest

    graphdef, weights, rest = nnx.split(model, nnx.Param, ...)
    prune = lambda w: w * keep_largest(w, jnp.ones_like(w), sparsity) if w.ndim >= 2 else w  # noqa: E731
    return nnx.merge(graphdef, jax.jit(lambda ws: jax.tree.map(prune, ws))(weights), rest)


def finetune(t: Trained, sparsity: float, epochs: int) -> Path:
    """Train `epochs` epochs from `t`'s checkpoint, its weights pruned to `sparsity` by the first
    update and kept so (``--prune-to S --prune-start 0 --prune-end 1``); returns the workdir."""
    from jaxpar.loop import train

    if t.cfg.clients is not None:
        raise UserError(
            f"{t.workdir} is a federated run; --finetune-epochs trains centrally: prune it "
            "without fine-tuning (--finetune-epochs 0)"
        )
    out = t.workdir / "compress" / f"pruned-{sparsity:.2f}"
    cfg = dataclasses.replace(
        t.cfg, workdir=str(out), init_from=str(t.workdir), prune_to=sparsity, prune_start=0,
        prune_end=1, epochs=epochs, steps=None, teacher=None, profile_steps=None,
        checkpoint_every=0, restart=False, dry_run=False, project=None, json=False,
    )  # fmt: skip
    train(cfg.validate())
    return out


def evaluate(t: Trained, model, passes: int = 3, seconds: float = 1.0):
    """Test accuracy of `model`, and its evaluation speed in images/s: the median of timed passes
    over the test split (at least `passes`, and more until `seconds` have passed), after one
    that compiles; no speed (None) for ``passes=0``."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxpar.data import eval_batch_size, eval_batches, preprocess

    graphdef, state = nnx.split(model)
    prepare = preprocess(t.ds)

    @jax.jit
    def sums(state, batch):
        logits = nnx.merge(graphdef, state)(prepare(batch["image"]), train=False)
        hits = (jnp.argmax(logits, -1) == batch["label"]) * batch["mask"]
        return jnp.stack([jnp.sum(hits), jnp.sum(batch["mask"])])

    size = eval_batch_size(t.cfg.batch_size, len(t.ds.test_labels))
    batches = lambda: eval_batches(t.ds, size, t.mesh)  # noqa: E731
    if isinstance(t.ds.test_images, np.ndarray):  # the split fits in memory: keep it on devices
        kept = list(batches())
        batches = lambda: kept  # noqa: E731

    def one_pass():
        return np.sum([np.asarray(sums(state, b)) for b in batches()], 0)

    correct, count = one_pass()
    times = []
    while passes and (len(times) < passes or sum(times) < seconds):
        start = time.perf_counter()
        one_pass()
        times.append(time.perf_counter() - start)
    return float(correct / count), float(count / statistics.median(times)) if times else None


def sizes(model, sparse: bool = False) -> dict:
    """Bytes of the model's state, nonzero weights; with `sparse`, per matrix nonzeros and the
    bytes of a sparse encoding (nonzero values and a bitmap per matrix; the rest dense)."""
    import jax
    from flax import nnx

    from jaxpar.sharding import path_str

    state = nnx.state(model)
    weights = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    nonzero = {path_str(p): int(np.count_nonzero(np.asarray(w))) for p, w in weights}
    out = {
        "param_bytes": sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(state)),
        "nonzero_params": sum(nonzero.values()),
    }
    if sparse:
        matrices = {path_str(p): w for p, w in weights if w.ndim >= 2}
        out["layers"] = {k: [nonzero[k], w.size] for k, w in matrices.items()}
        out["sparse_bytes"] = out["param_bytes"] - sum(
            w.size * w.dtype.itemsize - (nonzero[k] * w.dtype.itemsize + math.ceil(w.size / 8))
            for k, w in matrices.items()
        )
    return out


def measure(t: Trained, name: str, model, **extra) -> dict:
    accuracy, speed = evaluate(t, model)
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
    from jaxpar.workdir import free_name

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
    rows = ["variant          param bytes   x float   nonzero params   test acc   eval images/s"]
    for v in variants:
        rows.append(
            f"{v['name']:<14} {v['param_bytes']:>13,} {v['param_bytes'] / base:>9.3f} "
            f"{v['nonzero_params']:>16,} {v['test_accuracy']:>10.4f} "
            f"{v['eval_images_per_s']:>15,.0f}"
        )
        if v.get("finetune_epochs"):
            rows.append(f"  before fine-tuning ({v['finetune_epochs']} epochs): test acc "
                        f"{v['test_accuracy_before_finetune']:.4f}")  # fmt: skip
        if "sparse_bytes" in v:
            rows.append(f"  as sparse (values + bitmaps): {v['sparse_bytes']:,} bytes")
            rows += [f"  {k}: {n:,} of {size:,} nonzero" for k, (n, size) in v["layers"].items()]
    return "\n".join(rows)


def compress(cfg, quantize=None, activations=None, prune=None, finetune_epochs=0,
             calibration_batches=4, say=print) -> list[dict]:  # fmt: skip
    """Measure the float original and the variants asked for; record and return them all."""
    if quantize == "int8" and unsupported(cfg.model):
        raise UserError(unsupported(cfg.model))
    t = restore(cfg)
    say(f"{t.workdir} step {t.step}: {t.manifest['model']} on {t.cfg.dataset}, mesh {t.spec}")
    variants = [measure(t, "float32", t.model)]
    if quantize == "int8":
        calibration = calibration_images(t, calibration_batches)
        variants.append(measure(t, "int8", int8(t, False, calibration)))
        if activations == "int8":
            variants.append(measure(t, "int8-act", int8(t, True, calibration)))
    if quantize == "bf16":
        variants.append(measure(t, "bf16", bf16(t)))
    if prune is not None:
        name, model = f"pruned-{prune:.2f}", pruned(t.model, prune)
        if not finetune_epochs:
            variants.append(measure(t, name, model, finetune_epochs=0))
        else:
            before = evaluate(t, model, passes=0)[0]
            tuned = finetune(t, prune, finetune_epochs)
            model = restore(dataclasses.replace(cfg, workdir=str(tuned))).model
            variants.append(measure(t, name, model, finetune_epochs=finetune_epochs,
                                    test_accuracy_before_finetune=before))  # fmt: skip
    return record(t.workdir, t.step, variants)


def check(args) -> None:
    if args.quantize is not None and args.quantize not in QUANTIZE:
        raise UserError(
            f"--quantize {args.quantize} is not supported; choose {' or '.join(QUANTIZE)}"
        )
    if args.activations is not None and args.activations != "int8":
        raise UserError(f"--activations {args.activations} is not supported; choose int8")
    if args.activations and args.quantize != "int8":
        raise UserError("--activations int8 goes with --quantize int8")
    if args.prune is not None and not 0 < args.prune < 1:
        raise UserError(f"--prune must be a sparsity in (0, 1), got {args.prune}")
    if args.finetune_epochs < 0:
        raise UserError(f"--finetune-epochs must be >= 0, got {args.finetune_epochs}")
    if args.finetune_epochs and args.prune is None:
        raise UserError("--finetune-epochs goes with --prune")
    if args.calibration_batches < 1:
        raise UserError(f"--calibration-batches must be >= 1, got {args.calibration_batches}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", type=Path, help="a train.py workdir with a checkpoint")
    parser.add_argument("--quantize", help=f"post-training: {' or '.join(QUANTIZE)}")
    parser.add_argument("--activations", help="int8: quantize layer inputs too (static scales)")
    parser.add_argument("--calibration-batches", type=int, default=4,
                        help="training batches that set the static input scales")  # fmt: skip
    parser.add_argument("--prune", type=float, help="one-shot magnitude pruning to this sparsity")
    parser.add_argument("--finetune-epochs", type=int, default=0,
                        help="epochs of training after --prune, the mask kept")  # fmt: skip
    parser.add_argument("--mesh", help="as train.py's --mesh (default: the run's)")
    parser.add_argument("--data-dir", help="the dataset's folder (default: the run's)")
    args = parser.parse_args(argv)
    try:
        check(args)
        cfg = run_config(args.workdir, args.mesh, args.data_dir)
        from jaxpar.mesh import parse_mesh, request_devices

        request_devices(parse_mesh(cfg.mesh).size if cfg.mesh else 1)  # before JAX starts
        variants = compress(cfg, args.quantize, args.activations, args.prune,
                            args.finetune_epochs, args.calibration_batches)  # fmt: skip
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(variants))
    print(f"written to {args.workdir / 'compress.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
