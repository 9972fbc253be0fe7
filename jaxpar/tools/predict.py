"""Batched inference from any checkpoint on any mesh: ``python -m jaxpar.predict WORKDIR --input
X.npy [--output LOGITS.npy] [--mesh M]``.

`X.npy` holds NHWC images of the run's image shape: ``uint8`` pixels are normalised as the run's
dataset was in training (its checkpoint manifest records how); ``float32`` arrays are taken as
model inputs already normalised. Logits (float32, ``(N, classes)``) go to ``--output``, and the
top-1 labels are printed. The model is restored from the latest checkpoint straight into the
mesh's shardings; the batch is split over the mesh's batch axes (padded to fill them).
"""

import argparse
import sys
from pathlib import Path

import numpy as np

from jaxpar.core.errors import UserError


def inputs(images: np.ndarray, manifest: dict, shape) -> np.ndarray:
    """`images` as the model's float32 inputs, or a `UserError` saying what is wrong."""
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(shape):
        raise UserError(
            f"--input holds an array of shape {images.shape}; this model takes NHWC images of "
            f"shape (N, {', '.join(map(str, shape))})"
        )
    if images.dtype == np.float32:
        return images
    if images.dtype != np.uint8:
        raise UserError(f"--input holds {images.dtype}; give uint8 pixels or float32 inputs")
    norm = manifest.get("normalization")
    if norm is None or not norm["uint8"]:
        why = "predates recorded normalisation" if norm is None else "trained on float data"
        raise UserError(f"this checkpoint {why}: give float32 inputs, normalised as in training")
    mean, std = np.asarray(norm["mean"], np.float32), np.asarray(norm["std"], np.float32)
    return (images.astype(np.float32) / 255.0 - mean) / std


def served_shape(manifest: dict, images: np.ndarray) -> tuple:
    """The image shape to build the checkpoint's model for: its own, or for a ResNet, whose
    parameters do not depend on the resolution, the images' (the same channels and the same
    stem: both at most 32 pixels high, or both above; `jaxpar.models.resnet`).

    >>> m = {"model": "resnet50", "image_shape": [224, 224, 3]}
    >>> served_shape(m, np.zeros((1, 160, 128, 3))), served_shape(m, np.zeros((1, 32, 32, 3)))
    ((160, 128, 3), (224, 224, 3))
    """
    shape = tuple(manifest["image_shape"])
    if images.ndim != 4 or not manifest["model"].startswith("resnet"):
        return shape
    height, _, channels = images.shape[1:]
    same_stem = (height <= 32) == (shape[0] <= 32)
    return tuple(images.shape[1:]) if channels == shape[2] and same_stem else shape


def latest(workdir, quantized: bool = False) -> tuple[int, dict]:
    """The step and manifest of `workdir`'s latest complete checkpoint, refused (`UserError`)
    when there is none, this version's model computes differently, or it is int8 from
    ``compress --save`` and not `quantized` (what predict serves)."""
    from jaxpar.run.checkpoint import check_revision, latest_manifest

    step, manifest = latest_manifest(Path(workdir), workdir, quantized)
    check_revision(manifest, manifest["model"], f"{workdir} step {step}")
    return step, manifest


def refuse_rbm(workdir, manifest: dict, tool: str) -> None:
    """An RBM's workdir is no classifier: `tool` refuses it (`UserError`)."""
    if manifest["model"].startswith("rbm:"):
        raise UserError(f"{workdir} holds an RBM ({manifest['model']}), which has no classes: "
                        f"{tool} serves classifiers")  # fmt: skip


def restored(workdir, step: int, manifest: dict, mesh, **changes):
    """``(graphdef, weights, shardings)`` of the model in checkpoint `step`, its weights (a pure
    dict) restored straight into their shardings on `mesh`. `changes` replace manifest entries
    (``precision="bf16"``: the same float32 weights in a model computing in bfloat16)."""
    from flax import nnx

    from jaxpar.core.sharding import state_shardings
    from jaxpar.run.checkpoint import model_of, restore_model

    build, _ = model_of({**manifest, **changes})
    graphdef, state = nnx.split(nnx.eval_shape(lambda: build(nnx.Rngs(0))))
    shardings = state_shardings(state, mesh)[0]
    return graphdef, restore_model(workdir, step, nnx.to_pure_dict(state), shardings), shardings


def predict(workdir, images: np.ndarray, mesh: str | None = None, batch_size: int = 256):
    """Logits of `images` (see `inputs`) from `workdir`'s latest checkpoint, as numpy."""
    import jax
    from flax import nnx

    from jaxpar.core.mesh import make_mesh, parse_mesh
    from jaxpar.core.sharding import RULES, batch_sharding

    step, manifest = latest(workdir, quantized=True)
    refuse_rbm(workdir, manifest, "predict")
    shape = served_shape(manifest, images)
    x = inputs(images, manifest, shape)
    device_mesh = make_mesh(parse_mesh(mesh, jax.device_count()))
    graphdef, params, shardings = restored(workdir, step, manifest, device_mesh,
                                           image_shape=list(shape))  # fmt: skip
    ways = int(np.prod([device_mesh.shape[a] for a in RULES["batch"]]))
    batch = -(-min(batch_size, len(x)) // ways) * ways  # a multiple of the batch shards
    rows = batch_sharding(device_mesh, 4)
    forward = jax.jit(
        lambda p, x: nnx.merge(graphdef, p)(x, train=False),
        in_shardings=(shardings, rows),
        out_shardings=batch_sharding(device_mesh, 2),
    )
    out = []
    for start in range(0, len(x), batch):
        chunk = x[start : start + batch]
        padded = np.concatenate([chunk, np.zeros((batch - len(chunk), *shape), np.float32)])
        out.append(np.asarray(forward(params, jax.device_put(padded, rows)))[: len(chunk)])
    return np.concatenate(out) if out else np.zeros((0, manifest["num_classes"]), np.float32)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jaxpar.predict", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("workdir", help="a workdir with a checkpoint (trained or imported)")
    parser.add_argument(
        "--input",
        required=True,
        help=".npy of NHWC images: uint8 pixels, or float32 (pixels/255 - mean)/std with the "
        "checkpoint manifest's normalization",
    )
    parser.add_argument("--output", help="where to write the logits (.npy)")
    parser.add_argument("--mesh", help="as train.py's --mesh (default: every device on data)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    args = parser.parse_args(argv)
    try:
        if not (Path(args.workdir) / "checkpoints").is_dir():
            raise UserError(f"{args.workdir} has no checkpoints/ folder")
        if args.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
        try:
            images = np.load(args.input, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise UserError(f"--input {args.input} is not a readable .npy array ({e})") from None
        if args.mesh:  # emulate the mesh's devices on a CPU, before JAX starts
            from jaxpar.core.mesh import parse_mesh, request_devices

            request_devices(parse_mesh(args.mesh).size)
        logits = predict(args.workdir, images, args.mesh, args.batch_size)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.output:
        np.save(args.output, logits)
    labels = logits.argmax(-1)
    shown = " ".join(map(str, labels[:100])) + (" ..." if len(labels) > 100 else "")
    print(f"top-1 labels of {len(labels)} images: {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
