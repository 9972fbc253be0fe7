"""Logical axis names -> mesh axes: the one rules table, and the shardings built from it.

Models name the role of each parameter dimension (``embed``, ``hidden``, ``conv_in``...). The table
below is the only place where those names meet the mesh axes. Because every mesh has all four axes
(size 1 where unused), pipeline, data, FSDP, tensor and 2D-grid parallelism are the same table on
meshes of different shapes:

=========  ==========================  =============================================
logical    mesh axes                   meaning
=========  ==========================  =============================================
batch      stage, data, fsdp           a batch is split over every axis but model
microbatch data, fsdp                  examples inside a layer stack: each stage's share
embed      fsdp                        dense input features: FSDP (ZeRO-3) shards them
hidden     model                       Megatron MLP: column-parallel out, row-parallel in
conv_in    fsdp                        conv input channels: FSDP shards them
conv_out   model                       conv output channels (and their BatchNorm): TP
heads      model                       attention heads: q/k/v column-, output row-parallel
head_dim   (replicated)                each head's features stay together
mlp        model                       transformer MLP: in column-, out row-parallel
seq        (replicated)                token positions (position embeddings)
layers     stage                       stacked blocks: stage s holds a contiguous run
classes    (replicated)                logits stay whole so the loss needs no gather
=========  ==========================  =============================================

A dimension whose size the mesh axes do not divide is replicated instead, and reported.

>>> from jax.sharding import AbstractMesh
>>> mesh = AbstractMesh((1, 2, 2, 4), ("stage", "data", "fsdp", "model"))  # no devices
>>> partition_spec(("embed", "hidden"), (64, 512), mesh)
P('fsdp', 'model')
>>> partition_spec(("embed", "hidden"), (5, 512), mesh)  # 5 rows do not split 2 ways
P(None, 'model')
"""

import contextlib
import contextvars
import dataclasses
import math

import jax
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxpar.core.errors import UserError

RULES: dict[str, tuple[str, ...]] = {
    "batch": ("stage", "data", "fsdp"),
    "microbatch": ("data", "fsdp"),
    "embed": ("fsdp",),
    "visible": ("fsdp",),  # an RBM's visible units (`jaxpar.models.rbm`)
    "hidden": ("model",),
    "conv_in": ("fsdp",),
    "conv_out": ("model",),
    "heads": ("model",),
    "head_dim": (),
    "mlp": ("model",),
    "seq": (),
    "layers": ("stage",),
    "classes": (),
}


@dataclasses.dataclass(frozen=True)
class Replicated:
    """A dimension the rules asked to shard that stays whole, because the sizes do not divide."""

    path: str
    dim: int
    name: str
    size: int
    axes: tuple[str, ...]
    ways: int

    def __str__(self) -> str:
        return (
            f"{self.path} dim {self.dim} ({self.name}={self.size}) is replicated: "
            f"not divisible by {'x'.join(self.axes)}={self.ways}"
        )


def partition_spec(
    names: tuple[str | None, ...] | None,
    shape: tuple[int, ...],
    mesh: Mesh,
    path: str = "",
    replicated: list[Replicated] | None = None,
) -> PartitionSpec:
    """The PartitionSpec for an array whose dimensions have these logical names.

    Mesh axes of size 1 are left out, so a data-parallel mesh gives fully replicated specs. A
    dimension the axes do not divide is replicated and appended to `replicated`.
    """
    if names is None:
        return PartitionSpec()
    if len(names) != len(shape):
        raise ValueError(f"{path}: {len(names)} logical names {names} for shape {shape}")
    sizes = dict(mesh.shape)
    spec = []
    for dim, (name, size) in enumerate(zip(names, shape, strict=True)):
        if name is None:
            spec.append(None)
            continue
        if name not in RULES:
            raise ValueError(f"{path}: logical axis '{name}' has no rule; add it to RULES")
        axes = tuple(a for a in RULES[name] if sizes[a] > 1)
        ways = 1
        for a in axes:
            ways *= sizes[a]
        if axes and size % ways:
            if replicated is not None:
                replicated.append(Replicated(path, dim, name, size, axes, ways))
            axes = ()
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


# Mesh axes that a `jax.vmap(..., spmd_axis_name=...)` being traced already maps over (e.g. the
# replicas of `jaxpar.modes.sync`): an activation's layout inside may not name them again.
_MAPPED: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("mapped", default=())


@contextlib.contextmanager
def mapped_over(*axes: str):
    """Trace inside this block what a vmap over `axes` (its ``spmd_axis_name``) applies."""
    token = _MAPPED.set(_MAPPED.get() + axes)
    try:
        yield
    finally:
        _MAPPED.reset(token)


def activation_spec(names, shape, mesh) -> PartitionSpec:
    """`partition_spec` for an activation, leaving out the axes an enclosing vmap maps over."""
    mapped = set(_MAPPED.get())
    spec = []
    for entry in partition_spec(names, shape, mesh):
        axes = tuple(a for a in ((entry,) if isinstance(entry, str) else entry or ()) if
                     a not in mapped)  # fmt: skip
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def state_shardings(abstract_state: nnx.State, mesh: Mesh):
    """`NamedSharding` for every variable of an (abstract) NNX state, from its logical names.

    Returns ``(shardings, replicated)``: a pure dict (`nnx.to_pure_dict` layout) with a
    `NamedSharding` for each variable, and the list of dimensions that stayed replicated because
    they do not divide. Optimizer state inherits its parameter's names, so it is sharded like the
    parameter.
    """
    replicated: list[Replicated] = []

    def one(path, var):
        if isinstance(var.get_raw_value(), optax.MaskedNode):  # no state (a frozen parameter)
            return optax.MaskedNode()
        names = var.get_metadata().get("out_sharding")
        # Optimizer state repeats its parameter's names: report each parameter once.
        report = None if isinstance(var, nnx.OptState) else replicated
        if report is None and names is not None and len(names) != len(var.shape):
            names = None  # Adafactor's factored moments (a row, a column): small, replicated
        spec = partition_spec(names, var.shape, mesh, path_str(path), report)
        return NamedSharding(mesh, spec)

    shardings = jax.tree_util.tree_map_with_path(
        one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
    return nnx.to_pure_dict(shardings), replicated


def placed(abstract, shardings):
    """Shapes and dtypes of `abstract` (a pure dict of arrays or `ShapeDtypeStruct`s) with these
    shardings: what a jitted step is lowered with, or a restore targets. Nothing is allocated."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


def spec_table(shardings, prefix: str = "") -> dict[str, PartitionSpec]:
    """``{path: PartitionSpec}`` for a sharding tree, keeping the paths that start with `prefix`."""
    table = {}
    for path, s in jax.tree_util.tree_leaves_with_path(shardings):
        key = path_str(path)
        if key.startswith(prefix):
            table[key[len(prefix) :]] = s.spec
    return table


def batch_sharding(mesh: Mesh, ndim: int = 1, stacked: bool = False) -> NamedSharding:
    """Leading (batch) dimension over ``RULES['batch']``, every other dimension whole.

    `stacked`: the batch is the second dimension, after one that indexes the steps of a
    multi-step dispatch (each device holds its rows of every step).
    """
    spec = (None, RULES["batch"]) if stacked else (RULES["batch"],)
    return NamedSharding(mesh, PartitionSpec(*spec, *([None] * (ndim - len(spec)))))


def check_batch(batch_size: int, mesh: Mesh) -> None:
    """Fail with a clear message unless the batch-sharding axes divide `batch_size`."""
    ways = 1
    for a in RULES["batch"]:
        ways *= mesh.shape[a]
    if batch_size < 1 or batch_size % ways:
        raise UserError(
            f"global batch size {batch_size} is not divisible by the {ways} batch shards "
            f"({' x '.join(RULES['batch'])}); use a multiple of {ways}"
        )


def check_microbatches(batch_size: int, accum: int, mesh) -> None:
    """Each of the `accum` microbatches must be whole and split evenly over the batch shards."""
    ways = math.prod(mesh.shape[a] for a in RULES["batch"])
    if batch_size % accum:
        raise UserError(
            f"--grad-accum {accum} does not split the batch of {batch_size} into equal "
            f"microbatches; use a divisor of {batch_size}"
        )
    if (batch_size // accum) % ways:
        raise UserError(
            f"--grad-accum {accum} makes microbatches of {batch_size // accum}, which do not "
            f"divide over the {ways} batch shards; use a batch size that is a multiple of "
            f"{accum * ways}"
        )
