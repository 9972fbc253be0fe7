"""Pretrained PyTorch weights (torchvision, timm) as jaxpar checkpoints, runs started from them,
and a checkpoint's weights exported back.

    python -m jaxpar.weights import resnet50.safetensors --model resnet50 --out runs/r50
    python train.py --init-from runs/r50 --model resnet50 --dataset imagenet2012 ...
    python -m jaxpar.weights export runs/r50-ft --out r50-ft.safetensors --format torch

`read_tensors` takes ``.safetensors`` (no pickle: the preferred format) or, where PyTorch is
installed, a ``.pth``/``.pt`` state dict (``torch.load(weights_only=True)``). `convert` maps the
names onto jaxpar's parameters, kernels transposed from PyTorch's ``(out, in, h, w)`` and
``(out, in)`` to jaxpar's ``(h, w, in, out)`` and ``(in, out)``:

- ResNets (torchvision and timm name them alike): ``conv1``/``bn1`` -> ``stem``/``stem_bn``;
  ``layerS.J.convK``/``bnK`` -> ``blocks/I/convK``/``bnK`` (blocks counted over the stages);
  ``downsample.0``/``.1`` -> ``shortcut``/``shortcut_bn``; ``fc`` -> ``head``; BatchNorm's
  ``running_mean``/``running_var`` -> ``mean``/``var``.
- ViTs, torchvision (``vit_b_16``) or timm (``vit_base_patch16_224``) names: the patch
  projection, class token, position embeddings, each layer's norms, fused query/key/value
  (split into jaxpar's ``query``, ``key``, ``value``, heads apart), output projection and MLP,
  stacked on jaxpar's leading ``layers`` axis; final norm and head.

Every tensor of the file is used, except BatchNorm's ``num_batches_tracked`` counters; a missing,
unused or misshapen tensor is an error that names it. The padding and GELU that make these
weights compute PyTorch's logits are `jaxpar.models.REVISIONS` 2.

`export_weights` writes the model weights of a workdir's latest checkpoint to a ``.safetensors``
file: jaxpar's own names and layouts (``--format jaxpar``, any model), or ``--format torch``,
`torch_tensors`: the inverse of `convert` (torchvision's names, or timm's for a ViT), which
``load_state_dict(strict=True)`` takes (BatchNorm fills in its ``num_batches_tracked``).
"""

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from jaxpar.checkpoint import (
    FORMAT,
    Checkpoints,
    check_revision,
    latest_manifest,
    model_of,
    restore_model,
    versions,
)
from jaxpar.errors import UserError
from jaxpar.models import MODELS, revision
from jaxpar.predict import latest
from jaxpar.sharding import path_str

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}  # of pixels in [0, 1]
IGNORED = ("num_batches_tracked",)  # BatchNorm's step counters: no part of the computation
TORCH_FIX = (
    "pip install torch (then it is read with weights_only=True), or convert it where torch is: "
    "python -c \"import torch, safetensors.torch as s; s.save_file(torch.load('F.pth', "
    "weights_only=True), 'F.safetensors')\""
)


def read_tensors(path) -> dict[str, np.ndarray]:
    """Every tensor of a ``.safetensors`` file or PyTorch state dict, as float32 numpy arrays."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{":  # safetensors: 8-byte header size, then JSON
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(path, framework="np") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
        except (SafetensorError, OSError, ValueError) as e:  # truncated or corrupt
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:100]
            raise UserError(f"{path} is a damaged .safetensors file ({first}); download or "
                            "convert it again") from None  # fmt: skip
    elif head[:2] == b"PK" or head[:1] == b"\x80":  # torch.save's zip archive, or a bare pickle
        tensors = _torch_state_dict(path)
    else:
        raise UserError(f"{path} is neither a .safetensors file nor a PyTorch state dict")
    prefix = "module."  # nn.DataParallel's
    if tensors and all(k.startswith(prefix) for k in tensors):
        tensors = {k[len(prefix) :]: v for k, v in tensors.items()}
    return {k: np.asarray(v, np.float32) for k, v in tensors.items()}


def _torch_state_dict(path: Path) -> dict:
    try:
        import torch
    except ImportError:
        raise UserError(
            f"{path} is a PyTorch pickle and torch is not installed: {TORCH_FIX}"
        ) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever torch says, it is not a plain state dict
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:100]
        raise UserError(
            f"{path} is not a PyTorch state dict torch can read safely ({first})"
        ) from None
    for key in ("state_dict", "model"):  # training scripts' checkpoints wrap the state dict
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise UserError(f"{path} holds a {type(obj).__name__} of other things, not a state dict")
    return {k: v.float().numpy() for k, v in obj.items()}


def _from_torch(a: np.ndarray) -> np.ndarray:
    """A PyTorch kernel in jaxpar's layout: convolutions HWIO, linear layers (in, out)."""
    return a.transpose(2, 3, 1, 0) if a.ndim == 4 else a.T if a.ndim == 2 else a


def _to_torch(a: np.ndarray) -> np.ndarray:
    """A jaxpar kernel in PyTorch's layout: the inverse of `_from_torch`."""
    return a.transpose(3, 2, 0, 1) if a.ndim == 4 else a.T if a.ndim == 2 else a


LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
          "var": "running_var"}  # fmt: skip


def resnet_sources(path: str, stage_sizes) -> tuple[list[str], object]:
    """The torchvision tensor behind jaxpar ResNet parameter `path`, and how to convert it."""
    parts = path.split("/")
    if parts[0] == "blocks":
        index, stage = int(parts[1]), 0
        while index >= stage_sizes[stage]:
            index, stage = index - stage_sizes[stage], stage + 1
        layer = {"shortcut": "downsample.0", "shortcut_bn": "downsample.1"}.get(parts[2], parts[2])
        prefix = f"layer{stage + 1}.{index}.{layer}"
    else:
        prefix = {"stem": "conv1", "stem_bn": "bn1", "head": "fc"}[parts[0]]
    return [f"{prefix}.{LEAVES[parts[-1]]}"], lambda a: _from_torch(a[0])


VIT_NAMES = {  # jaxpar name: (torchvision name, timm name)
    "embed": ("conv_proj", "patch_embed.proj"),
    "cls_token": ("class_token", "cls_token"),
    "pos_embed": ("encoder.pos_embedding", "pos_embed"),
    "norm": ("encoder.ln", "norm"),
    "head": ("heads.head", "head"),
    "layer": ("encoder.layers.encoder_layer_{}.", "blocks.{}."),
    "attn_norm": ("ln_1", "norm1"),
    "qkv": ("self_attention.in_proj_", "attn.qkv."),
    "attn_out": ("self_attention.out_proj", "attn.proj"),
    "mlp_norm": ("ln_2", "norm2"),
    "mlp_in": ("mlp.0", "mlp.fc1"),
    "mlp_out": ("mlp.3", "mlp.fc2"),
}


def vit_sources(path: str, depth: int, timm: bool) -> tuple[list[str], object]:
    """The tensors behind jaxpar ViT parameter `path` (one per layer for the stacked blocks)."""
    name = lambda key: VIT_NAMES[key][timm]  # noqa: E731
    parts = path.split("/")
    if parts[0] != "blocks":
        if parts[0] == "cls_token":  # (1, 1, width)
            return [name(parts[0])], lambda a: a[0][0, 0]
        if parts[0] == "pos_embed":  # (1, tokens, width)
            return [name(parts[0])], lambda a: a[0][0]
        return [f"{name(parts[0])}.{LEAVES[parts[-1]]}"], lambda a: _from_torch(a[0])
    module, leaf = parts[1], parts[-1]
    layers = [name("layer").format(i) for i in range(depth)]
    if module in ("query", "key", "value"):  # rows [q; k; v] of the fused projection
        part = ("query", "key", "value").index(module)
        sources = [f"{p}{name('qkv')}{'weight' if leaf == 'kernel' else 'bias'}" for p in layers]

        def split(arrays):
            thirds = [np.split(a, 3)[part] for a in arrays]
            return np.stack([_from_torch(t) for t in thirds])

        return sources, split
    sources = [f"{p}{name(module)}.{LEAVES[leaf]}" for p in layers]
    return sources, lambda arrays: np.stack([_from_torch(a) for a in arrays])


# ViT parameters whose heads jaxpar keeps on a dimension of their own: PyTorch's (width, width)
# projections reshape to (heads, head_dim) on the width's side.
HEADS_APART = {
    f"blocks/{m}/{leaf}" for m in ("query", "key", "value") for leaf in ("kernel", "bias")
}
HEADS_APART.add("blocks/attn_out/kernel")


def _torch_shape(shape) -> tuple:
    """A jaxpar kernel's shape as PyTorch lays it out (for messages)."""
    shape = tuple(shape)
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return shape[::-1] if len(shape) == 2 else shape


def model_for(tensors: dict, model: str) -> tuple[object, dict, int]:
    """``(model_fn, options, classes)`` for `tensors`: the ViT's patch size and the number of
    classes are read off the weights (the patch projection, the head)."""
    vit = model.startswith("vit-")
    head = (
        ("head.weight" if "head.weight" in tensors else "heads.head.weight") if vit else "fc.weight"
    )
    if head not in tensors:
        raise UserError(
            f"the weights hold no {head} (the classifier); they are not --model {model}"
        )
    options = {}
    if vit:
        embed = tensors.get("conv_proj.weight", tensors.get("patch_embed.proj.weight"))
        if embed is None:
            raise UserError(
                f"the weights hold neither conv_proj.weight (torchvision) nor "
                f"patch_embed.proj.weight (timm): they are not --model {model}"
            )
        options["patch_size"] = int(embed.shape[-1])
    classes = int(tensors[head].shape[0])
    return MODELS.lookup(model, "model"), options, classes


def convert(tensors: dict, model: str, image_shape) -> tuple[dict, dict]:
    """PyTorch `tensors` as the parameters of jaxpar `model` for `image_shape`.

    Returns ``(params, about)``: a pure dict of float32 numpy arrays (`nnx.to_pure_dict` layout)
    and what was read (``num_classes``, ``patch_size``, ``names``: torchvision or timm).
    """
    if any(".mlp.linear_1." in k for k in tensors):  # torchvision's names before 0.13
        tensors = {k.replace("mlp.linear_1", "mlp.0").replace("mlp.linear_2", "mlp.3"): v
                   for k, v in tensors.items()}  # fmt: skip
    fn, options, classes = model_for(tensors, model)
    abstract = nnx.eval_shape(lambda: fn(tuple(image_shape), classes, rngs=nnx.Rngs(0), **options))
    target = nnx.to_pure_dict(nnx.state(abstract))
    timm = "patch_embed.proj.weight" in tensors
    if model.startswith("vit-"):
        sources = lambda p: vit_sources(p, fn.keywords["depth"], timm)  # noqa: E731
    else:
        sources = lambda p: resnet_sources(p, fn.keywords["stage_sizes"])  # noqa: E731
    used, missing, wrong = set(), [], []

    def one(path, leaf):
        names, combine = sources(path_str(path))
        if absent := [n for n in names if n not in tensors]:
            missing.extend(absent)
            return None
        used.update(names)
        try:  # layers of unequal shapes, or a fused projection that does not split in three
            value = combine([tensors[n] for n in names])
        except ValueError:
            value = None
        if value is not None and value.shape == leaf.shape:
            return value
        if value is not None and value.size == leaf.size and path_str(path) in HEADS_APART:
            return value.reshape(leaf.shape)
        needs = _torch_shape(leaf.shape[1:] if len(names) > 1 else leaf.shape)
        odd = next((n for n in names if tensors[n].shape != tensors[names[0]].shape), names[0])
        wrong.append(f"{odd} has shape {tuple(tensors[odd].shape)}, --model {model} needs {needs}")
        return None

    params = jax.tree_util.tree_map_with_path(one, target)
    unused = sorted(k for k in tensors if k not in used and not k.endswith(IGNORED))
    where = f"--model {model} at {'x'.join(map(str, image_shape))}"
    if missing or unused:
        raise UserError(
            f"the weights do not fit {where}: {len(missing)} tensor(s) missing "
            f"({', '.join(missing[:3]) or '-'}), {len(unused)} not used "
            f"({', '.join(unused[:3]) or '-'})"
        )
    if wrong:
        small = (
            " (images of at most 32 pixels use the 3x3 stem)" if "conv1.weight" in wrong[0] else ""
        )
        raise UserError(f"{wrong[0]}{small}; check --model and --image-shape")
    about = {"num_classes": classes, "patch_size": options.get("patch_size"),
             "names": "timm" if timm else "torchvision"}  # fmt: skip
    return params, about


def sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


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


QKV = ("query", "key", "value")  # jaxpar's thirds of PyTorch's fused projection, in its order


def torch_tensors(params: dict, model: str, timm: bool = False) -> dict[str, np.ndarray]:
    """jaxpar `model`'s `params` (``{path: array}``, '/'-joined paths) under PyTorch's names and
    layouts: the inverse of `convert`, torchvision's names (a ViT's timm's with `timm`; timm's
    ResNets are named as torchvision's). Kernels are transposed back, a ViT's query, key and value
    fused into one projection (heads joined) and its stacked ``layers`` axis split per layer."""
    fn, vit = MODELS.lookup(model, "model"), model.startswith("vit-")
    out, fused = {}, {}

    def put(name, array):
        if name in out:
            raise AssertionError(f"two jaxpar parameters map to {name}")
        out[name] = array

    for path, a in params.items():
        if not vit:
            [name], _ = resnet_sources(path, fn.keywords["stage_sizes"])
            put(name, _to_torch(a))
            continue
        names, _ = vit_sources(path, fn.keywords["depth"], timm)
        parts = path.split("/")
        if parts[0] == "cls_token":  # (1, 1, width)
            put(names[0], a[None, None])
        elif parts[0] == "pos_embed":  # (1, tokens, width)
            put(names[0], a[None])
        elif parts[0] != "blocks":
            put(names[0], _to_torch(a))
        else:
            for name, layer in zip(names, a, strict=True):
                if path == "blocks/attn_out/kernel":  # (heads, head_dim, width): heads joined
                    layer = layer.reshape(-1, layer.shape[-1])
                elif path in HEADS_APART:  # (width, heads, head_dim) or (heads, head_dim)
                    layer = layer.reshape(layer.shape[0], -1) if layer.ndim == 3 else layer.ravel()
                if parts[1] in QKV:
                    fused.setdefault(name, [None] * 3)[QKV.index(parts[1])] = _to_torch(layer)
                else:
                    put(name, _to_torch(layer))
    for name, thirds in fused.items():  # rows [q; k; v]
        put(name, np.concatenate(thirds))
    return out


def checkpoint_weights(workdir, step: int, manifest: dict) -> dict[str, np.ndarray]:
    """The model weights (parameters, BatchNorm statistics) of `workdir`'s checkpoint `step`,
    as float32 numpy arrays by '/'-joined path, restored on one host device."""
    build, _ = model_of({**manifest, "precision": "fp32"})  # stored in float32 whatever it ran in
    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: build(nnx.Rngs(0)))))
    try:  # the host's memory, not an accelerator's
        device = jax.local_devices(backend="cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS without cpu
        device = jax.local_devices()[0]
    one = jax.sharding.SingleDeviceSharding(device)
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


def _flat(tree) -> dict:
    """A pure dict's leaves by key path (tuples of dict keys)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(k.key for k in path): leaf for path, leaf in leaves}


def _nest(flat: dict) -> dict:
    tree = {}
    for path, leaf in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf
    return tree


def _matching(saved: dict, abstract: dict, model: str, source) -> tuple[list, list[str]]:
    """The paths of `abstract` (a model's pure dict) that `saved` (path -> shape) provides, and
    notes. A classifier head of another shape stays out (the run starts it fresh); any other
    parameter missing or of another shape is an error naming it."""
    paths, notes = [], []
    saved = {tuple(map(str, path)): shape for path, shape in saved.items()}  # Orbax: "0", not 0
    for path, leaf in _flat(abstract).items():
        name, there = "/".join(map(str, path)), saved.get(tuple(map(str, path)))
        if there is None:
            raise UserError(f"--init-from {source} has no {name} for --model {model}")
        if tuple(there) == tuple(leaf.shape):
            paths.append(path)
        elif path[0] == "head":  # one note for the head: its class counts
            note = (
                f"a fresh classifier head ({there[-1]} classes in {source}, {leaf.shape[-1]} here)"
            )
            notes += [note] if note not in notes else []
        else:
            raise UserError(
                f"--init-from {source}: {name} is {tuple(there)} there, {tuple(leaf.shape)} "
                "here (another image shape or model size?)"
            )
    return paths, notes


def weights_from(source, model: str, image_shape, abstract: dict):
    """Check now that `source` (a workdir's latest checkpoint, or a PyTorch weights file) holds
    weights for `model` at `image_shape`; load them later, when a run starts fresh.

    `abstract`: the model's pure dict of shapes. Returns ``(load, notes)``: ``load(shardings)``
    gives a pure dict of the parameters `source` provides (all but a fresh head), each placed in
    its `NamedSharding` (any mesh, any process count); `notes` say what will be used.
    """
    source = Path(source)
    if source.is_file():
        params, _ = convert(read_tensors(source), model, image_shape)
        flat = _flat(params)
        paths, notes = _matching({p: v.shape for p, v in flat.items()}, abstract, model, source)

        def from_file(shardings):
            places = _flat(shardings)
            return _nest({
                p: jax.make_array_from_callback(flat[p].shape, places[p], lambda i, a=flat[p]: a[i])
                for p in paths
            })  # fmt: skip

        return from_file, [f"initialised from {source} (sha256 {sha256(source)[:12]})", *notes]
    step, manifest = latest_manifest(source, f"--init-from {source}")
    if manifest.get("model") != model:
        raise UserError(
            f"--init-from {source} holds {manifest.get('model')} weights, not --model {model}"
        )
    check_revision(manifest, model, f"--init-from {source}")
    ckpts = Checkpoints(source)
    try:
        meta = ckpts.manager.item_metadata(step)["state"]["model"]
        saved = {path: m.shape for path, m in _flat(meta).items()}
        paths, notes = _matching(saved, abstract, model, source)
    finally:
        ckpts.close()

    def from_checkpoint(shardings):
        flat, places = _flat(abstract), _flat(shardings)
        part = lambda tree: _nest({p: tree[p] for p in paths})  # noqa: E731
        return restore_model(source, step, part(flat), part(places))

    return from_checkpoint, [f"initialised from {source} (step {step})", *notes]


def starting_from(source, model: str, image_shape, fresh, abstract: dict, shardings: dict, say):
    """`fresh` (``() -> a new state``) with the model weights of `source` (``--init-from``):
    checked now, before the workdir is touched; loaded, and `say`-ing what is used, when the
    run starts fresh (a resume reads its own checkpoint)."""
    load, notes = weights_from(source, model, image_shape, abstract)

    def init():
        for note in notes:
            say(note)
        return with_weights(fresh(), load(shardings))

    return init


def with_weights(state: dict, weights: dict) -> dict:
    """`state` (``{0: model, 1: optimizer}``) with the model's leaves that `weights` holds, and
    so the moving average of ``--ema`` (which starts from the weights the run starts from)."""
    flat = _flat(weights)
    take = lambda path, x: flat.get(tuple(k.key for k in path), x)  # noqa: E731
    state = {**state, 0: jax.tree_util.tree_map_with_path(take, state[0])}
    opt = state[1].get("opt_state") if isinstance(state[1], dict) else None
    if isinstance(opt, dict) and "ema" in opt:
        ema = jax.tree_util.tree_map_with_path(take, opt["ema"])
        state[1] = {**state[1], "opt_state": {**opt, "ema": ema}}
    return state


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
