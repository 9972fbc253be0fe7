"""Pretrained PyTorch weights (torchvision, timm) as jaxpar checkpoints, and a checkpoint's
weights exported back; ``--init-from`` starts a run from either (`jaxpar.run.init_from`).

    python -m jaxpar.weights import resnet50.safetensors --model resnet50 --out runs/r50
    python train.py --init-from runs/r50 --model resnet50 --dataset imagenet2012 ...
    python -m jaxpar.weights export runs/r50-ft --out r50-ft.safetensors --format torch

`import_weights` reads ``.safetensors`` (no pickle: the preferred format) or, where PyTorch is
installed, a ``.pth``/``.pt`` state dict (``torch.load(weights_only=True)``), and converts the
names and layouts (`jaxpar.models.pytorch`). `export_weights` writes the model weights of a
workdir's latest checkpoint to a ``.safetensors`` file: jaxpar's own names and layouts
(``--format jaxpar``, any model), or ``--format torch``: PyTorch's (`torch_tensors`).
"""

import argparse
import json
import os
import sys
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from jaxpar.core.errors import UserError
from jaxpar.core.sharding import path_str
from jaxpar.models import MODELS, revision
from jaxpar.models.pytorch import convert, read_tensors, sha256, torch_tensors
from jaxpar.run.checkpoint import FORMAT, Checkpoints, model_of, restore_model, versions
from jaxpar.tools.predict import latest

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}  # of pixels in [0, 1]


def normalization(mean, std, channels: int) -> dict | None:
    """How uint8 pixels become the weights' inputs: `mean`, `std` (per channel or one for all,
    of pixels in [0, 1]), ImageNet's for RGB when not given; None (unknown) otherwise."""
    if mean is None and std is None:
        if channels != 3:
            return None
        mean, std = IMAGENET["mean"], IMAGENET["std"]
    for name, values in (("--mean", mean), ("--std", std)):
        if values is None or len(values) not in (1, channels):
            raise UserError(f"{name} needs 1 or {channels} values (one per channel) with the other")
    if min(std) <= 0:
        raise UserError(f"--std must be positive, got {std}")
    return {"mean": list(mean), "std": list(std), "uint8": True}


def import_weights(file, model: str, out, image_shape=(224, 224, 3), classes=None,
                   mean=None, std=None) -> dict:  # fmt: skip
    """Write `file`'s weights as a jaxpar checkpoint (step 0, model only) in the new folder
    `out`; returns its manifest. `mean`/`std`: the normalisation the weights were trained with
    (per channel, of pixels in [0, 1]; default ImageNet's, as torchvision's and timm's ResNets)."""
    if model not in MODELS or model in ("mlp", "2nn"):
        names = ", ".join(m for m in MODELS if m not in ("mlp", "2nn"))
        raise UserError(f"--model {model} has no PyTorch counterpart to import; use one of {names}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} is not empty; name a new folder (nothing is overwritten)")
    params, about = convert(read_tensors(file), model, image_shape)
    if classes is not None and classes != about["num_classes"]:
        raise UserError(
            f"the weights' head has {about['num_classes']} classes, not --classes {classes}; "
            "import without --classes: a run with --init-from and other classes starts a fresh head"
        )
    manifest = {
        "step": 0,
        "format": FORMAT,
        "model": model,
        "revision": revision(model),
        "image_shape": list(image_shape),
        "num_classes": about["num_classes"],
        "patch_size": about["patch_size"],
        "normalization": normalization(mean, std, image_shape[-1]),
        "imported": {
            "file": str(Path(file).resolve()),
            "sha256": sha256(file),
            "names": about["names"],
        },  # fmt: skip
        "versions": versions(),
    }
    ckpts = Checkpoints(out)
    try:
        ckpts.save(0, {0: jax.tree.map(jax.numpy.asarray, params)}, manifest, wait=True)
    finally:
        ckpts.close()
    return manifest


def checkpoint_weights(workdir, step: int, manifest: dict) -> dict[str, np.ndarray]:
    """The model weights (parameters, BatchNorm statistics) of `workdir`'s checkpoint `step`,
    as float32 numpy arrays by '/'-joined path, restored on one host device."""
    build, _ = model_of({**manifest, "precision": "fp32"})  # stored in float32 whatever it ran in
    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: build(nnx.Rngs(0)))))
    try:  # the host's memory, not an accelerator's
        device = jax.local_devices(backend="cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS without cpu
        device = jax.local_devices()[0]
    one = jax.sharding.make_single_device_sharding(device)
    weights = restore_model(workdir, step, abstract, jax.tree.map(lambda _: one, abstract))
    leaves = jax.tree_util.tree_flatten_with_path(weights)[0]
    return {path_str(path): np.asarray(leaf, np.float32) for path, leaf in leaves}


EXPORTS = ("jaxpar", "torch")


def export_weights(workdir, out, fmt: str = "jaxpar", names: str | None = None,
                   force: bool = False) -> dict:  # fmt: skip
    """Write the model weights of `workdir`'s latest complete checkpoint to the ``.safetensors``
    file `out` (refused where it exists, unless `force`); returns the header's metadata.

    `fmt` ``"jaxpar"``: every model, jaxpar's '/'-joined names and layouts (ViT blocks stacked
    on a leading ``layers`` axis). ``"torch"``: ResNets and ViTs under PyTorch's names
    (`torch_tensors`; `names` ``"torchvision"``, the default, or ``"timm"``).
    """
    workdir, out = Path(workdir), Path(out)
    if fmt not in EXPORTS:
        raise UserError(f"--format must be one of {', '.join(EXPORTS)}, not {fmt!r}")
    if names is not None and fmt != "torch":
        raise UserError(f"--names {names} is for --format torch; jaxpar's names are its own")
    if names not in (None, "torchvision", "timm"):
        raise UserError(f"--names must be torchvision or timm, not {names!r}")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; name the .safetensors file to write")
    if out.exists() and not force:
        raise UserError(f"--out {out} exists; pass --force to overwrite it")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: the folder {out.parent} does not exist")
    if not workdir.is_dir():
        raise UserError(f"{workdir} does not exist")
    if not (workdir / "checkpoints").is_dir():  # before Orbax creates one
        raise UserError(f"{workdir} has no checkpoints/ folder")
    step, manifest = latest(workdir)  # refuses DiLoCo between syncs and earlier revisions
    model = manifest["model"]
    if fmt == "torch" and not (model.startswith(("resnet", "vit-")) and model in dict(MODELS)):
        raise UserError(
            f"--format torch: {model} (in {workdir}) has no PyTorch counterpart; "
            "export it with --format jaxpar"
        )
    weights = checkpoint_weights(workdir, step, manifest)
    names = (names or "torchvision") if fmt == "torch" else "jaxpar"
    tensors = torch_tensors(weights, model, names == "timm") if fmt == "torch" else weights
    shape = manifest["image_shape"]
    metadata = {"format": fmt, "model": model, "step": str(step), "names": names,
                "revision": str(manifest.get("revision", revision(model))),
                "image_shape": "x".join(map(str, shape)),
                "num_classes": str(manifest["num_classes"])}  # fmt: skip
    if manifest.get("patch_size") is not None:
        metadata["patch_size"] = str(manifest["patch_size"])
    if model.startswith("resnet") and shape[0] <= 32:  # `jaxpar.models.resnet`'s small-image stem
        metadata["stem"] = "3x3 stride 1, no max pooling"
    if manifest.get("normalization") is not None:
        metadata["normalization"] = json.dumps(manifest["normalization"])
    from safetensors.numpy import save_file

    temp = out.with_name(f".{out.name}.partial")  # renamed when complete
    try:
        save_file({k: np.require(v, np.float32, "C") for k, v in tensors.items()}, temp,
                  metadata=metadata)  # fmt: skip
        os.replace(temp, out)
    finally:
        temp.unlink(missing_ok=True)
    return metadata


def parse_shape(text: str) -> tuple[int, int, int]:
    """``HxWxC`` -> ``(H, W, C)``.

    >>> parse_shape("224x224x3")
    (224, 224, 3)
    """
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise UserError(
            f"--image-shape must be HxWxC with positive sizes, e.g. 224x224x3, not {text!r}"
        )
    return tuple(int(p) for p in parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jaxpar.weights",
        description="Import PyTorch weights as a jaxpar checkpoint, or export a checkpoint's.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="write FILE's weights to a new workdir (step 0)")
    imp.add_argument("file", help=".safetensors (preferred) or .pth/.pt state dict")
    imp.add_argument("--model", required=True, help="resnet18/34/50, resnet8, vit-...")
    imp.add_argument("--out", required=True, help="a new folder: the workdir to write")
    imp.add_argument("--image-shape", default="224x224x3", help="HxWxC the weights will see")
    imp.add_argument("--classes", type=int, help="check the head has this many classes")
    imp.add_argument("--mean", type=float, nargs="+", help="normalisation (default ImageNet's)")
    imp.add_argument("--std", type=float, nargs="+", help="normalisation (default ImageNet's)")
    exp = sub.add_parser("export", help="write WORKDIR's latest weights to a .safetensors file")
    exp.add_argument("workdir", help="a workdir with a checkpoint (trained or imported)")
    exp.add_argument("--out", required=True, help="the .safetensors file to write")
    exp.add_argument("--format", choices=EXPORTS, default="jaxpar",
                     help="jaxpar's names (any model) or PyTorch's (ResNets, ViTs)")  # fmt: skip
    exp.add_argument("--names", choices=("torchvision", "timm"),
                     help="with --format torch: whose names (default torchvision)")  # fmt: skip
    exp.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            about = export_weights(args.workdir, args.out, args.format, args.names, args.force)
        else:
            shape = parse_shape(args.image_shape)
            manifest = import_weights(args.file, args.model, args.out, shape, args.classes,
                                      args.mean, args.std)  # fmt: skip
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.command == "export":
        print(json.dumps(about))
        print(f"wrote {args.out}: {about['model']} step {about['step']}, {about['names']} names")
        return 0
    print(json.dumps({k: manifest[k] for k in ("model", "image_shape", "num_classes", "imported")}))
    print(
        f"wrote {args.out}/checkpoints/0; start a run from it: python train.py --init-from "
        f"{args.out} --model {args.model} ..."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
