"""Device meshes from one string.

A mesh always has the four axes ``stage``, ``data``, ``fsdp`` and ``model`` (size 1 where
unused), so pipeline, data, FSDP, tensor and 2D-grid parallelism are just different sizes of the
same mesh, and one rules table (`jaxpar.core.sharding.RULES`) serves them all. ``stage`` is
outermost: with ``data`` it may span hosts; ``model`` stays inside a host.

The grammar of ``--mesh``:

- ``DxM``: data x model, e.g. ``2x2``, ``4x1``, ``1x8``;
- ``N``: N-way data parallel;
- ``data=2,fsdp=2,model=2`` or ``stage=2,data=4``: named sizes, unnamed axes are 1;
- a layout name from ``meshes/`` (``cpu8``) or a path to such a TOML file.

>>> parse_mesh("2x2")
MeshSpec(stage=1, data=2, fsdp=1, model=2, dcn=None)
>>> parse_mesh("fsdp=4,model=2").size
8
"""

import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import math
import os
import re
import tomllib
import warnings
from pathlib import Path

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from jaxpar.core.errors import UserError

AXES = ("stage", "data", "fsdp", "model")
LAYOUTS_DIR = Path(__file__).resolve().parents[2] / "meshes"
_GRAMMAR = (
    "use DxM (data x model, e.g. 2x2), N (data parallel), named sizes such as "
    "stage=2,data=2,fsdp=2,model=2, or a layout name from meshes/"
)


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    """Sizes of the mesh axes; parsing only, no JAX backend involved."""

    stage: int = 1
    data: int = 1
    fsdp: int = 1
    model: int = 1
    # Across-host (network, DCN) factor of each axis, from a layout's [dcn] table; the rest of
    # each axis stays within a host (NVLink/ICI). None: no hybrid layout.
    dcn: tuple[int, int, int, int] | None = None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.stage, self.data, self.fsdp, self.model)

    @property
    def hosts(self) -> int:
        """Processes a hybrid layout is made for (1 without a [dcn] table)."""
        return math.prod(self.dcn) if self.dcn else 1

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def __str__(self) -> str:
        text = ",".join(f"{a}={n}" for a, n in zip(AXES, self.shape, strict=True))
        return text + (f" (across hosts {'x'.join(map(str, self.dcn))})" if self.dcn else "")


def _from_sizes(sizes: dict[str, object], source: str) -> MeshSpec:
    for axis, n in sizes.items():
        if axis not in AXES:
            raise UserError(f"mesh {source}: unknown axis '{axis}'; the axes are {', '.join(AXES)}")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise UserError(
                f"mesh {source}: axis '{axis}' needs a positive integer size, got {n!r}"
            )
    return MeshSpec(**sizes)


def layout_names() -> list[str]:
    """Names of the layouts shipped in ``meshes/``."""
    return sorted(p.stem for p in LAYOUTS_DIR.glob("*.toml"))


def load_layout(path: Path) -> MeshSpec:
    """Read a layout file: ``stage``/``data``/``fsdp``/``model`` sizes, a ``description``, and
    optionally a ``[dcn]`` table with the part of each axis that spans hosts."""
    try:
        table = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"cannot read mesh layout {path}: {e}") from None
    table.pop("description", None)
    dcn_table = table.pop("dcn", None)
    spec = _from_sizes(table, f"layout {path}")
    if dcn_table is None:
        return spec
    dcn = _from_sizes(dcn_table, f"layout {path} [dcn]").shape
    for axis, total, across in zip(AXES, spec.shape, dcn, strict=True):
        if total % across:
            raise UserError(f"layout {path}: [dcn] {axis}={across} does not divide {axis}={total}")
    if dcn[AXES.index("model")] > 1:
        raise UserError(
            f"layout {path}: [dcn] model={dcn[-1]} puts tensor parallelism across hosts, which "
            "sends activations over the network in every layer; keep model within a host"
        )
    return dataclasses.replace(spec, dcn=dcn)


def parse_mesh(text: str | None, device_count: int | None = None) -> MeshSpec:
    """Parse a ``--mesh`` value; ``None`` means every device on ``data``.

    >>> parse_mesh("8")
    MeshSpec(stage=1, data=8, fsdp=1, model=1, dcn=None)
    >>> parse_mesh("stage=2,fsdp=2").shape
    (2, 1, 2, 1)
    """
    if text is None:
        return MeshSpec(data=device_count or 1)
    text = text.strip()
    if m := re.fullmatch(r"(\d+)x(\d+)", text):
        return _from_sizes({"data": int(m[1]), "model": int(m[2])}, f"'{text}'")
    if text.isdigit():
        return _from_sizes({"data": int(text)}, f"'{text}'")
    if "=" in text:
        sizes = {}
        for part in text.split(","):
            axis, _, n = part.partition("=")
            axis = axis.strip()
            if not n.strip().isdigit():
                raise UserError(f"mesh '{text}': '{part}' is not axis=size; {_GRAMMAR}")
            if axis in sizes:
                raise UserError(f"mesh '{text}': axis '{axis}' is given twice")
            sizes[axis] = int(n)
        return _from_sizes(sizes, f"'{text}'")
    path = Path(text)
    if path.suffix == ".toml" or "/" in text:
        if not path.is_file():
            if path.is_dir():
                raise UserError(f"mesh layout path {text} is a directory, not a .toml file")
            raise UserError(f"mesh layout file {text} does not exist")
        return load_layout(path)
    if re.fullmatch(r"[A-Za-z][\w-]*", text) and (LAYOUTS_DIR / f"{text}.toml").is_file():
        return load_layout(LAYOUTS_DIR / f"{text}.toml")
    layouts = ", ".join(layout_names()) or "none"
    if re.fullmatch(r"[A-Za-z][\w-]*", text) and not re.fullmatch(r"\d*x\d*", text):
        raise UserError(f"unknown mesh layout '{text}' (layouts: {layouts}); or {_GRAMMAR}")
    raise UserError(f"invalid mesh '{text}': {_GRAMMAR} (layouts: {layouts})")


def check_batch_spec(batch_size: int, spec: MeshSpec) -> None:
    """`jaxpar.core.sharding.check_batch` from the sizes alone, before any device exists: the
    batch-sharding axes (``data`` x ``fsdp``) must divide `batch_size`."""
    from jaxpar.core.sharding import RULES

    ways = 1
    for a in RULES["batch"]:
        ways *= spec.shape[AXES.index(a)]
    if batch_size < 1 or batch_size % ways:
        raise UserError(
            f"global batch size {batch_size} is not divisible by the {ways} batch shards "
            f"({' x '.join(RULES['batch'])}); use a multiple of {ways}"
        )


def check_hosts(spec: MeshSpec, processes: int) -> None:
    """A hybrid (``[dcn]``) layout needs one process per host it was made for."""
    if spec.dcn is not None and spec.hosts != processes:
        raise UserError(
            f"mesh layout {spec} is for {spec.hosts} hosts but this job has {processes} "
            f"process{'es' if processes != 1 else ''}; launch one process per host, or "
            "rehearse it on one machine with "
            f"python -m jaxpar.launch -n {spec.hosts} -- python train.py ..."
        )


# Emulated CPU devices per process. Creating them costs time and memory that grow faster than
# the count (2 CPU cores, jax 0.10.2, `jax.devices()` alone: 2048 devices 1.1 s and 0.4 GB,
# 4096 5.7 s, 8192 24 s and 1.1 GB, 20000 over 5 minutes and 2.6 GB).
MAX_CPU_DEVICES = 2048
ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin", "libtpu")


def _installed(module: str) -> bool:
    with contextlib.suppress(ImportError, ValueError):
        return importlib.util.find_spec(module) is not None
    return False


def cpu_platform_expected() -> bool:
    """Whether JAX will compute on the CPU platform, decided before its backend starts.

    ``JAX_PLATFORMS`` (or ``jax_platforms``), when set, decides by its first entry; otherwise
    the CPU is used exactly when no accelerator plugin (CUDA, ROCm, TPU, or any other package
    registered as a JAX plugin) is installed.
    """
    if platforms := jax.config.jax_platforms:
        return platforms.split(",")[0].strip().lower() == "cpu"
    if any(_installed(m) for m in (*ACCELERATOR_PLUGINS, "jax_plugins")):
        return False
    return not importlib.metadata.entry_points(group="jax_plugins")


def request_devices(count: int) -> None:
    """Ask for `count` emulated CPU devices, if the JAX backend has not started yet.

    Only the CPU platform reads this setting, so it is harmless on GPU hosts. Once the backend is
    up the count is fixed; `make_mesh` then says whether the mesh fits. Where the CPU platform
    will be used, more than `MAX_CPU_DEVICES` is refused.
    """
    if count > MAX_CPU_DEVICES and cpu_platform_expected():
        split = -(-count // MAX_CPU_DEVICES)
        raise UserError(
            f"the mesh needs {count} devices in this process, but at most {MAX_CPU_DEVICES} CPU "
            "devices are emulated per process (more take minutes and gigabytes to create); use "
            f"a smaller mesh, or spread it over processes: python -m jaxpar.launch -n {split} "
            "-- python train.py ..."
        )
    # Once the backend is up (tests, notebooks) the update raises: keep its devices.
    with contextlib.suppress(RuntimeError):
        jax.config.update("jax_num_cpu_devices", max(count, 1))


# Let XLA overlap collectives with computation on GPUs (NVIDIA's JAX containers set it too).
GPU_XLA_FLAGS = ("--xla_gpu_enable_latency_hiding_scheduler=true",)
# On the CPU, copy insertion with region analysis sees that a step reads its donated parameters
# before updating them in place, and copies none of them first (without it the MLP's step copies
# 5 of its 7 arrays: 2-3% of the step, `benchmarks/cpu_step.py`). Same results, bit for bit.
# XLA stops at start-up on a flag it does not know: drop one here if a later XLA removes it.
CPU_XLA_FLAGS = ("--xla_cpu_copy_insertion_use_region_analysis=true",)


def set_xla_flags() -> None:
    """Add `GPU_XLA_FLAGS` (a CUDA plugin is installed) and `CPU_XLA_FLAGS` (JAX will compute on
    the CPU, `cpu_platform_expected`) to ``XLA_FLAGS``, before JAX starts. A flag the user
    already set keeps the user's value."""
    gpu = any(_installed(p) for p in ACCELERATOR_PLUGINS if "cuda" in p)
    flags = os.environ.get("XLA_FLAGS", "")
    given = {token.split("=")[0] for token in flags.split()}
    extra = [*(GPU_XLA_FLAGS if gpu else ()), *(CPU_XLA_FLAGS if cpu_platform_expected() else ())]
    extra = [f for f in extra if f.split("=")[0] not in given]
    os.environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()


def make_mesh(spec: MeshSpec) -> Mesh:
    """Build the `jax.sharding.Mesh` for `spec` with classic (GSPMD, ``Auto``) axis types.

    The axis types are pinned so behaviour does not move with JAX's default (``Explicit`` since
    0.7, which turns sharding constraints into asserts).
    """
    devices = jax.devices()
    if spec.size > len(devices):
        platform = devices[0].platform
        fix = (
            "the CPU device count is fixed once JAX has started; start a fresh process"
            if platform == "cpu"
            else f"use a mesh of at most {len(devices)} devices or add hosts"
        )
        raise UserError(
            f"mesh {spec} needs {spec.size} devices but this job has {len(devices)} "
            f"{platform} devices; {fix}"
        )
    if spec.size < len(devices) and jax.process_count() > 1:
        raise UserError(
            f"mesh {spec} uses {spec.size} of {len(devices)} devices; a multi-process mesh must "
            "use every device"
        )
    auto = (AxisType.Auto,) * len(AXES)
    if spec.dcn is None:
        mesh = jax.make_mesh(spec.shape, AXES, axis_types=auto, devices=devices[: spec.size])
    else:
        check_hosts(spec, jax.process_count())
        within = tuple(n // d for n, d in zip(spec.shape, spec.dcn, strict=True))
        grid = mesh_utils.create_hybrid_device_mesh(
            within, spec.dcn, devices, process_is_granule=True
        )
        mesh = Mesh(grid, AXES, axis_types=auto)
    if crossing := model_crosses_hosts(mesh):
        warnings.warn(crossing, stacklevel=2)
    return mesh


def model_crosses_hosts(mesh: Mesh) -> str | None:
    """Why a tensor-parallel group spanning processes is slow, or None if every group is local."""
    procs = np.vectorize(lambda d: d.process_index)(mesh.devices)
    if (procs == procs[..., :1]).all():
        return None
    return (
        "the model axis spans several processes: tensor parallelism then sends activations over "
        "the network in every layer; put model inside a host (e.g. a [dcn] layout)"
    )


def draw_mesh(mesh: Mesh, most: int = 16) -> str:
    """A picture of the mesh: device ids at their coordinates (and process ids if several).

    Rows are (stage, data, fsdp) coordinates, columns are model coordinates; past `most` rows
    or columns, the first and last few with a count of those left out between.
    """
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    procs = np.vectorize(lambda d: d.process_index)(mesh.devices)
    many = jax.process_count() > 1
    sizes = dict(mesh.shape)
    head = " x ".join(f"{a}={sizes[a]}" for a in mesh.axis_names)
    noun = "device" if ids.size == 1 else "devices"
    lines = [f"mesh {head} ({ids.size} {mesh.devices.flat[0].platform} {noun})"]
    label = "stage,data,fsdp"
    columns = _shown(sizes["model"], most)
    cells = [f"model={m}" if m is not None else "..." for m in columns]
    width = max(len(c) for c in cells)
    lines.append(f"{label:>15}  " + "  ".join(c.rjust(width) for c in cells))
    rows = list(np.ndindex(*ids.shape[:-1]))
    for i in _shown(len(rows), most):
        if i is None:
            lines.append(f"{'...':>15}  ({len(rows) - most} rows more)")
            continue
        row = rows[i]
        cells = ["..." if m is None else str(ids[row][m]) + (f" p{procs[row][m]}" if many else "")
                 for m in columns]  # fmt: skip
        lines.append(f"{','.join(map(str, row)):>15}  " + "  ".join(c.rjust(width) for c in cells))
    return "\n".join(lines)


def _shown(n: int, most: int) -> list:
    """The indices of `n` rows to draw: all of them, or past `most` the first and last halves of
    `most` with None for those left out between.

    >>> _shown(3, 16), _shown(6, 4)
    ([0, 1, 2], [0, 1, None, 4, 5])
    """
    if n <= most:
        return list(range(n))
    return [*range(most // 2), None, *range(n - most // 2, n)]
