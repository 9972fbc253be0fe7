"""PyTorch's names and layouts for jaxpar's models: reading a ``.safetensors`` file or a state dict
(`read_tensors`), the tensors as a model's parameters (`convert`) and back (`torch_tensors`).

`convert` maps torchvision's and timm's names onto jaxpar's parameters, kernels transposed from
PyTorch's ``(out, in, h, w)`` and ``(out, in)`` to jaxpar's ``(h, w, in, out)`` and ``(in, out)``:

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
weights compute PyTorch's logits are `jaxpar.models.REVISIONS` 2. `torch_tensors` is the inverse
of `convert` (torchvision's names, or timm's for a ViT), which ``load_state_dict(strict=True)``
takes (BatchNorm fills in its ``num_batches_tracked``).
"""

import hashlib
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from jaxpar.core.errors import UserError
from jaxpar.core.sharding import path_str
from jaxpar.models import MODELS

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


def sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()
