"""Plan a cluster on paper: the train step's time projected onto chips this machine does not have
(``python train.py --dry-run --mesh data=64,model=8 --project h100x8:nodes=64``).

A roofline per kernel, from what XLA says about the step:

- **Kernels.** The step's program before optimisation (the same for every backend) is cut into
  the kernels a GPU or TPU compiler makes of it: every convolution, matrix product, reduction,
  scatter and loop is one, and the elementwise operations between them fuse into their consumer
  (a reduction) or into one kernel that writes a tensor a convolution or matrix product must read
  (`kernels`). The CPU's own compiled program is no guide here: it computes bfloat16
  convolutions in float32 and fuses far less (for ResNet-50 it moves 3.5x the bytes a GPU does).
- **Time of a kernel**: the larger of its FLOPs at the chip's peak and its bytes (what it reads
  plus what it writes) at the memory's bandwidth, each at an achievable fraction of the vendor's
  figure (`MATMUL_EFFICIENCY`, `MEMORY_EFFICIENCY`), and never less than the chip's floor for a
  kernel (`Chip.launch_s`). Kernels run one after another, and a step never takes less than the
  host needs to dispatch it (`DISPATCH_S`): a small model's step is launch- or dispatch-bound.
- **Collectives**: from the compiled, partitioned program (per device, loops counted per
  iteration), each over the link it crosses: within a node when all its devices sit in one node
  (the mesh's last axes are the fastest-varying, so `model` stays within a node), else between
  nodes. Ring all-reduce moves 2(n-1)/n of its bytes per device, all-gather, reduce-scatter and
  all-to-all (n-1)/n of the full array, after a latency per collective (NCCL's cost model:
  `COLLECTIVE_BASE_S` plus `HOP_S` for each of the ring's steps). Up to `OVERLAP` of the
  computation time hides them (XLA runs collectives asynchronously on GPUs and TPUs: gradient
  reductions behind the backward pass).

Work is divided evenly over the mesh's devices: per-device FLOPs and bytes are the program's
divided by the mesh size (a pipeline's idle slots are in the program: they compute on zeros,
which takes time but is not counted as useful work in the MFU).
"""

import dataclasses
import math
import re

import numpy as np

from jaxpar.core.errors import UserError


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    bf16: float  # dense peak FLOP/s in bfloat16
    fp32: float  # dense peak FLOP/s of float32 matrix products at JAX's default precision
    hbm_bytes: float
    hbm_bw: float  # bytes/s
    intra_bw: float  # bytes/s per chip and direction, between chips of one node
    inter_bw: float  # bytes/s per chip and direction, between nodes
    per_node: int  # chips per node when HARDWARE does not say
    source: str
    launch_s: float  # the least time a kernel takes, however small


# Latency floors, for small models that no roofline bounds. A GPU kernel: 2 us, the order of a
# CUDA launch that NVIDIA quotes ("a few microseconds"; assumed, not measured here). A TPU runs a
# step as one program with no launches: an assumed 1 us per fused kernel (no published figure).
# A step's dispatch from the host: 0.57 ms, the one dispatch-bound step measured on a GPU lent to
# this project (the MLP, 70 kernels, on an H200: benchmarks/gpu-runs/2026-11-26-h200-run1.log);
# it hides behind a longer step's device time (dispatch is asynchronous). A collective's
# latency: NCCL's own cost model (src/graph/tuning.cc, low-latency protocol), assumed the same on
# TPUs' ICI and DCN: a ring pays 6.6 us plus 0.6 us per step within a node and 2.7 us per step
# between nodes; an all-reduce may take NCCL's tree instead, 6.8 us plus twice (0.6 us per other
# chip of its node + 5 us per level of a binary tree over the nodes), whichever is less.
GPU_LAUNCH_S, TPU_LAUNCH_S = 2e-6, 1e-6
DISPATCH_S = 0.57e-3
COLLECTIVE_BASE_S, TREE_BASE_S = 6.6e-6, 6.8e-6
HOP_S = {False: 0.6e-6, True: 2.7e-6}  # a ring's step within a node, between nodes
TREE_HOP_S = 5e-6  # a tree's level between nodes

# Vendor figures. NVIDIA's fp32 is TF32 (JAX's default precision for float32 matrix products on
# these GPUs); a TPU's float32 products run as bfloat16 passes at default precision. Memory: what
# nvidia-smi reported on the H100 and H200 lent to this project, 80 GiB for the A100, the
# published 16 and 95 GB (read as GiB) for the TPUs. A TPU "node" is a slice of chips on one ICI
# network (tpu-v5px256:nodes=2: two slices joined by the data-center network), not a host.
CHIPS = {
    "a100": Chip("NVIDIA A100 SXM 80GB", 312e12, 156e12, 80 * 2**30, 2.039e12, 300e9, 25e9, 8,
                 "NVIDIA A100 datasheet (dense bf16/TF32, 2,039 GB/s, NVLink 600 GB/s both "
                 "ways); DGX A100: one 200 Gb/s HDR InfiniBand port per GPU", GPU_LAUNCH_S),
    "h100": Chip("NVIDIA H100 SXM5 80GB", 989e12, 494e12, 81559 * 2**20, 3.35e12, 450e9, 50e9, 8,
                 "NVIDIA H100 datasheet (dense bf16/TF32, 3.35 TB/s, NVLink 900 GB/s both "
                 "ways); DGX H100: one 400 Gb/s NDR InfiniBand port per GPU", GPU_LAUNCH_S),
    "h200": Chip("NVIDIA H200 SXM 141GB", 989e12, 494e12, 143771 * 2**20, 4.8e12, 450e9, 50e9, 8,
                 "NVIDIA H200 datasheet (dense bf16/TF32, 4.8 TB/s, NVLink 900 GB/s both ways); "
                 "a 400 Gb/s NDR InfiniBand port per GPU as in DGX H200", GPU_LAUNCH_S),
    "tpu-v5e": Chip("Google TPU v5e", 197e12, 197e12, 16 * 2**30, 819e9, 200e9, 6.25e9, 4,
                    "Google Cloud TPU v5e docs (197 TFLOP/s bf16, 16 GB at 819 GB/s, ICI 1,600 "
                    "Gb/s per chip); between slices (DCN) an assumed 200 Gb/s per 4-chip host: "
                    "Google publishes no per-chip figure", TPU_LAUNCH_S),
    "tpu-v5p": Chip("Google TPU v5p", 459e12, 459e12, 95 * 2**30, 2.765e12, 600e9, 12.5e9, 4,
                    "Google Cloud TPU v5p docs (459 TFLOP/s bf16, 95 GB at 2,765 GB/s, ICI 4,800 "
                    "Gb/s per chip); between slices (DCN) an assumed 400 Gb/s per 4-chip host: "
                    "Google publishes no per-chip figure", TPU_LAUNCH_S),
}  # fmt: skip

# Achievable fractions of the vendor's peaks: round figures, the same for every chip (dense
# bf16 matrix products reach about 70% of peak on large shapes, streaming kernels about 80-90% of
# the memory's bandwidth, collectives about 80% of the link's). A step's small convolutions and
# matrix products fall below the first through their bytes, which the roofline counts.
MATMUL_EFFICIENCY = 0.7
MEMORY_EFFICIENCY = 0.8
LINK_EFFICIENCY = 0.8
OVERLAP = 2 / 3  # share of computation time that can hide collectives (the backward pass's)


@dataclasses.dataclass(frozen=True)
class Hardware:
    chip: Chip
    key: str
    per_node: int
    nodes: int

    @property
    def chips(self) -> int:
        return self.per_node * self.nodes


_HARDWARE = re.compile(r"^([a-z0-9-]+?)(?:x(\d+))?(?::nodes=(\d+))?$")


def parse_hardware(text: str) -> Hardware:
    """``CHIP[xN][:nodes=K]``: N chips per node (the chip's usual node when left out), K nodes.

    >>> h = parse_hardware("h100x8:nodes=4")
    >>> h.chip.name, h.per_node, h.nodes, h.chips
    ('NVIDIA H100 SXM5 80GB', 8, 4, 32)
    """
    m = _HARDWARE.match(text.strip().lower())
    if not m or m[1] not in CHIPS:
        known = ", ".join(CHIPS)
        raise UserError(f"--project {text!r}: expected CHIP[xN][:nodes=K], CHIP one of {known}")
    per_node = int(m[2]) if m[2] else CHIPS[m[1]].per_node
    nodes = int(m[3]) if m[3] else 1
    if per_node < 1 or nodes < 1:
        raise UserError(f"--project {text!r}: chips per node and nodes must be at least 1")
    return Hardware(CHIPS[m[1]], m[1], per_node, nodes)


# --- the program's kernels ------------------------------------------------------------------

_SHAPE = re.compile(r"(pred|[a-z]+\d+)\[([\d,]*)\]")
_LINE = re.compile(r"^\s+(?:ROOT )?%?([\w.-]+) = (\(.*?\)|\S+) ([\w-]+)\((.*?)\)(.*)$")
_HEAD = re.compile(r"^(ENTRY )?%?([\w.-]+)\b.*\{$")
FREE = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "after-all",
        "opt-barrier", "optimization-barrier", "partition-id", "replica-id"}  # fmt: skip
SLICES = {"slice", "dynamic-slice", "gather"}  # read only what they select
FUSING = {"reduce", "reduce-window", "dynamic-update-slice"}  # take unwritten producers in
HEAVY = FUSING | {"convolution", "dot", "scatter", "sort", "custom-call", "select-and-scatter",
                  "fft", "while", "conditional", "rng-bit-generator", "cholesky",
                  "triangular-solve"}  # fmt: skip
PASS = {"Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape", "xla.sdy.FuncResultSharding"}


def array_bytes(hlo_type: str) -> list[int]:
    """Bytes of each array in an HLO type such as ``bf16[256,56,56,64]`` or a tuple of them."""
    itemsize = lambda t: max(int(re.sub(r"\D", "", t) or 8) // 8, 1)  # noqa: E731  f32 -> 4, pred -> 1
    return [itemsize(t) * math.prod(int(d) for d in dims.split(",") if d)
            for t, dims in _SHAPE.findall(hlo_type)]  # fmt: skip


def nbytes(hlo_type: str) -> int:
    return sum(array_bytes(hlo_type))


@dataclasses.dataclass
class Kernel:
    op: str
    flops: float
    bytes: float
    dtype: str  # of a matrix product's operands ("" for the rest)
    launches: int = 1  # times it runs in one step (a scan's body: once per iteration)


def _dims(hlo_type: str) -> list[int]:
    m = _SHAPE.search(hlo_type)
    return [int(d) for d in m[2].split(",") if d] if m else []


def _flops(op: str, out: str, operand_types: list[str], attrs: str) -> float:
    """FLOPs of a convolution or matrix product: 2 x output elements x its reduction size."""
    size = math.prod(_dims(out))
    if op == "dot":
        lhs = _dims(operand_types[0])
        contract = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", attrs)
        k = math.prod(lhs[int(d)] for d in contract[1].split(",") if d) if contract else 1
        return 2.0 * size * k
    if op == "convolution":  # per output element: the kernel's window x its input features
        rhs = _dims(operand_types[1])
        labels = re.search(r"dim_labels=\w+_(\w+)->", attrs)
        o = rhs[labels[1].index("o")] if labels else 1
        dilated = re.search(r"lhs_dilate=([\dx]+)", attrs)  # a strided convolution's gradient:
        zeros = math.prod(int(d) for d in dilated[1].split("x")) if dilated else 1  # skip zeros
        return 2.0 * size * math.prod(rhs) / max(o, 1) / zeros
    return 0.0


class Program:
    """The computations of an HLO module's text, for `kernels`."""

    def __init__(self, text: str):
        self.comps, self.entry, name = {}, None, None
        for line in text.splitlines():
            if not line.startswith((" ", "\t")) and line.rstrip().endswith("{"):
                if head := _HEAD.match(line.rstrip()):
                    name = head[2]
                    self.comps[name] = []
                    self.entry = name if head[1] else self.entry
            elif name is not None and (m := _LINE.match(line)):
                ins, hlo_type, op, operands, attrs = m.groups()
                self.comps[name].append(
                    (ins, hlo_type, op, re.findall(r"%?([A-Za-z_][\w.-]*)", operands), attrs,
                     line.lstrip().startswith("ROOT"), operands)
                )  # fmt: skip

    def trips(self, condition: str) -> int:
        """A scan's trip count: the constant its loop condition compares the counter with."""
        return max((int(ins[6]) for ins in self.comps.get(condition, ())
                    if ins[2] == "constant" and ins[6].isdigit()), default=1)  # fmt: skip


def kernels(text: str) -> list[Kernel]:
    """The kernels of one run of an HLO module (see the module's docstring), loops unrolled."""
    program = Program(text)
    return _region(program, program.entry, times=1)


def _region(program: Program, comp: str, times: int) -> list[Kernel]:
    nodes: dict[str, tuple] = {}  # id -> (type, op, operand ids, attrs)
    alias: dict[str, str] = {}
    leaves: set[str] = set()
    loops: list[tuple[str, int]] = []
    counter = [0]

    def flatten(name: str, args: list[str], prefix: str) -> str:
        root = None
        for ins, hlo_type, op, operands, attrs, is_root, raw in program.comps[name]:
            key = prefix + ins
            ids = [alias.get(prefix + o, prefix + o) for o in operands]
            if op == "parameter":
                if args:
                    alias[key] = args[int(raw)]
                else:
                    nodes[key] = (hlo_type, op, [], attrs)
                    leaves.add(key)
            elif op == "call" or (op == "custom-call" and _target(attrs) in PASS):
                if op == "call":
                    counter[0] += 1
                    callee = re.search(r"to_apply=%?([\w.-]+)", attrs)[1]
                    alias[key] = flatten(callee, ids, f"{counter[0]}/")
                else:
                    alias[key] = ids[0]
            elif op == "get-tuple-element" and nodes.get(ids[0], ("", ""))[1] == "tuple":
                index = int(re.search(r"index=(\d+)", attrs)[1])
                alias[key] = nodes[ids[0]][2][index]
            else:
                if op == "constant":
                    ids = []
                nodes[key] = (hlo_type, op, ids, attrs)
                if op == "get-tuple-element" and (
                    ids[0] in leaves or nodes[ids[0]][1] in ("while", "parameter")
                ):
                    leaves.add(key)
                if op == "while":
                    body = re.search(r"body=%?([\w.-]+)", attrs)[1]
                    condition = re.search(r"condition=%?([\w.-]+)", attrs)[1]
                    loops.append((body, program.trips(condition)))
            if is_root:
                root = alias.get(key, key)
        return root

    root = flatten(comp, [], "")
    # Which tensors are written to memory: leaves, every heavy op's result, and what a heavy op
    # that cannot fuse its producers reads, or the region returns.
    written = set(leaves) | {k for k, n in nodes.items() if n[1] in HEAVY or n[1] == "constant"}
    outputs = nodes[root][2] if root in nodes and nodes[root][1] == "tuple" else [root]
    for _, op, ids, _ in nodes.values():
        if op in HEAVY and op not in FUSING:
            for i in ids:
                written.update(nodes[i][2] if nodes.get(i, ("", ""))[1] == "tuple" else [i])
        if op == "dynamic-update-slice":
            written.add(ids[0])
    written.update(o for o in outputs if o in nodes)

    def reads(start: str, via: str | None = None) -> dict[str, int]:
        """Bytes read from each written tensor to compute `start` (fusing what is not written)."""
        out, stack, seen = {}, [(start, via)], set()
        while stack:
            k, parent = stack.pop()
            if k not in nodes or (k, parent) in seen:
                continue
            seen.add((k, parent))
            hlo_type, op, ids, _ = nodes[k]
            if k in written and k != start:
                size = 0 if op == "constant" else nbytes(hlo_type)  # constants: in the code
                if parent is not None and nodes[parent][1] in SLICES:
                    size = min(size, nbytes(nodes[parent][0]))
                out[k] = max(out.get(k, 0), size)
                continue
            if op == "tuple" and k != start:
                continue
            for i in ids[1:] if op == "dynamic-update-slice" else ids:
                stack.append((i, k))
        return out

    result, siblings = [], {}
    for k, (hlo_type, op, ids, attrs) in nodes.items():
        if k not in written or k in leaves or op in FREE or op == "while":
            continue
        read = reads(k)
        if op == "reduce" and read:  # reductions of one tensor share a kernel (multi-output
            main = max(read, key=read.get)  # fusion): its bytes are read once
            if main in siblings:
                kernel, seen = siblings[main]
                extra = {x: n for x, n in read.items() if x not in seen}
                seen.update(extra)
                kernel.bytes += (sum(extra.values()) + nbytes(hlo_type)) * times
                continue
        write = nbytes(hlo_type)
        write = nbytes(hlo_type)
        if op == "dynamic-update-slice":
            write = nbytes(nodes[ids[1]][0]) if ids[1] in nodes else write
        elif op == "custom-call":
            write = nbytes(hlo_type.split("u8[")[0])  # not a library call's scratch space
        operand_types = [nodes[i][0] if i in nodes else "" for i in ids]
        flops = _flops(op, hlo_type, operand_types, attrs)
        dtype = _SHAPE.search(operand_types[0])[1] if flops and operand_types[0] else ""
        result.append(Kernel(op, flops * times, (sum(read.values()) + write) * times, dtype,
                             times))  # fmt: skip
        if op == "reduce" and read:
            siblings[max(read, key=read.get)] = (result[-1], dict(read))
    for body, trips in loops:
        result += _region(program, body, times * trips)
    return result


def _target(attrs: str) -> str:
    m = re.search(r'custom_call_target="([^"]+)"', attrs)
    return m[1] if m else ""


# --- collectives and the link each crosses ---------------------------------------------------


def replica_groups(text: str, devices: int) -> list[list[int]]:
    """The device groups of a collective's HLO ``replica_groups`` (or a permute's pairs), in any
    of XLA's three spellings; an empty text is one group of all devices.

    >>> replica_groups("{{0,2},{1,3}}", 4)
    [[0, 2], [1, 3]]
    >>> replica_groups("[2,2]<=[2,2]T(1,0)", 4)
    [[0, 2], [1, 3]]
    >>> replica_groups("mesh['axis_0'=2,'axis_1'=2] {'axis_0'}", 4)
    [[0, 2], [1, 3]]
    """
    if not text or text == "{}":
        return [list(range(devices))]
    if text.startswith("{"):
        return [[int(i) for i in g.split(",") if i] for g in re.findall(r"\{([\d,]*)\}", text)]

    def iota(dims: str, perm: str | None):
        shape = [int(d) for d in dims.split(",")]
        ids = np.arange(math.prod(shape)).reshape(shape)
        return ids.transpose([int(p) for p in perm.split(",")]) if perm else ids

    if m := re.match(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?$", text):
        return iota(m[2], m[3]).reshape([int(d) for d in m[1].split(",")]).tolist()
    m = re.match(r"mesh\[([^\]]*)\](?:, device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\))? \{(.*)\}",
                 text)  # fmt: skip
    if m is None:
        raise UserError(f"--project cannot read the replica groups {text!r} of this XLA version")
    names = re.findall(r"'(\w+)'=\d+", m[1])
    sizes = [int(s) for s in re.findall(r"=(\d+)", m[1])]
    ids = (iota(m[2], m[3]) if m[2] else np.arange(math.prod(sizes))).reshape(sizes)
    grouped = [names.index(a) for a in re.findall(r"'(\w+)'", m[4])]
    rest = [i for i in range(len(sizes)) if i not in grouped]
    size = math.prod(sizes[i] for i in grouped)
    return ids.transpose(rest + grouped).reshape(-1, size).tolist()


def _ring_steps(kind: str, n: int) -> int:
    """Steps of a ring collective over `n` devices, each paying a hop's latency."""
    if kind == "all-reduce":
        return 2 * (n - 1)
    return 1 if kind == "collective-permute" else n - 1


def latency(kind: str, n: int, nodes: int) -> float:
    """Seconds a collective over `n` devices on `nodes` nodes takes however small (NCCL's model:
    see the constants).

    >>> round(latency("all-reduce", 8, 1) * 1e6, 1), round(latency("all-reduce", 32, 4) * 1e6, 1)
    (15.0, 35.2)
    """
    steps = _ring_steps(kind, n)
    between = min(steps, (2 if kind == "all-reduce" else 1) * (nodes - 1))
    ring = COLLECTIVE_BASE_S + (steps - between) * HOP_S[False] + between * HOP_S[True]
    if kind != "all-reduce":
        return ring
    tree = TREE_BASE_S + 2 * ((n // nodes - 1) * HOP_S[False] + math.log2(nodes) * TREE_HOP_S)
    return min(ring, tree)


def _ring_bytes(kind: str, nbytes: float, n: int) -> float:
    """Bytes a device sends for one collective over a ring of `n` devices."""
    if kind == "all-reduce":
        return 2 * (n - 1) / n * nbytes
    if kind == "reduce-scatter":  # its result is the device's 1/n share
        return (n - 1) * nbytes
    if kind in ("all-gather", "all-to-all"):  # all-gather's result is the whole array
        return (n - 1) / n * nbytes
    return nbytes  # collective-permute: one send


def project(kernel_list, ops, mesh_shape: dict, hw: Hardware, batch: int, precision: str,
            bubble: float = 0.0, peak_bytes: int | None = None,
            steps_per_dispatch: int = 1) -> dict:  # fmt: skip
    """The step's projected time on `hw` (see the module's docstring); the host's dispatch is
    shared by the `steps_per_dispatch` steps of one program.

    `kernel_list`: `kernels` of the whole program; `ops`:
    `jaxpar.cost.collectives.collective_ops` of the compiled, partitioned program (per device);
    `mesh_shape`: ``{axis: size}`` in mesh order.
    """
    chip, devices = hw.chip, math.prod(mesh_shape.values())
    compute_s = memory_s = launch_s = flops = nbytes = 0.0
    for k in kernel_list:
        peak = chip.fp32 if k.dtype == "f32" else chip.bf16
        c = k.flops / devices / (peak * MATMUL_EFFICIENCY)
        m = k.bytes / devices / (chip.hbm_bw * MEMORY_EFFICIENCY)
        if max(c, m) < k.launches * chip.launch_s:  # each launch takes the floor at least
            launch_s += k.launches * chip.launch_s
        elif c > m:
            compute_s += c
        else:
            memory_s += m
        flops, nbytes = flops + k.flops / devices, nbytes + k.bytes / devices
    # A pipeline's idle slots are in the program already: they compute on zeros. Their FLOPs
    # take time but are not useful work (MFU).
    computation_s = compute_s + memory_s + launch_s
    names, sizes = list(mesh_shape), list(mesh_shape.values())
    links: dict[tuple, dict] = {}
    for op in ops:
        groups = replica_groups(op["groups"], devices)
        n = len(groups[0]) if op["kind"] != "collective-permute" else 2
        if n < 2:
            continue
        coords = np.array(np.unravel_index(groups[0], sizes))
        axes = ",".join(a for a, c in zip(names, coords, strict=True) if len(set(c)) > 1)
        nodes = max(len({d // hw.per_node for d in g}) for g in groups)
        inter = nodes > 1  # the slowest link
        bw = (chip.inter_bw if inter else chip.intra_bw) * LINK_EFFICIENCY
        entry = links.setdefault(
            (op["kind"], axes, n, inter),
            {"kind": op["kind"], "axes": axes, "devices": n,
             "link": "between nodes" if inter else "within a node", "count": 0, "bytes": 0,
             "seconds": 0.0},
        )  # fmt: skip
        entry["count"] += op["count"]
        entry["bytes"] += op["count"] * op["bytes"]
        floor = latency(op["kind"], n, nodes)
        entry["seconds"] += op["count"] * (floor + _ring_bytes(op["kind"], op["bytes"], n) / bw)
    communication_s = sum(e["seconds"] for e in links.values())
    hidden_s = min(communication_s, OVERLAP * computation_s)
    device_s = computation_s + communication_s - hidden_s
    dispatch_s = DISPATCH_S / steps_per_dispatch
    step_s = max(device_s, dispatch_s)
    parts = {"compute": compute_s, "memory": memory_s, "launch": launch_s,
             "communication": communication_s - hidden_s}  # fmt: skip
    peak = chip.fp32 if precision == "fp32" else chip.bf16
    return {
        "hardware": f"{hw.key}x{hw.per_node}:nodes={hw.nodes}",
        "chip": chip.name,
        "chips": hw.chips,
        "source": chip.source,
        "efficiency": {"matmul": MATMUL_EFFICIENCY, "memory": MEMORY_EFFICIENCY,
                       "link": LINK_EFFICIENCY, "overlap": OVERLAP},  # fmt: skip
        "floors": {"kernel_s": chip.launch_s, "dispatch_s": dispatch_s,
                   "collective_s": COLLECTIVE_BASE_S, "tree_s": TREE_BASE_S,
                   "hop_s": HOP_S[False], "hop_between_nodes_s": HOP_S[True]},  # fmt: skip
        "flops_per_chip": flops,
        "bytes_per_chip": nbytes,
        "kernels": len(kernel_list),
        "compute_s": compute_s,
        "memory_s": memory_s,
        "launch_s": launch_s,
        "convolutions": any(k.op == "convolution" for k in kernel_list),
        "bubble": bubble,
        "collectives": sorted(links.values(), key=lambda e: -e["seconds"]),
        "communication_s": communication_s,
        "hidden_s": hidden_s,
        "step_s": step_s,
        "images_per_s": batch / step_s,
        "images_per_s_per_chip": batch / step_s / hw.chips,
        "mfu": flops * (1 - bubble) / step_s / peak,
        "bound": "dispatch" if device_s < dispatch_s else max(parts, key=parts.get),
        "memory_per_chip": {"peak_bytes": peak_bytes, "hbm_bytes": chip.hbm_bytes,
                            "fits": peak_bytes is None or peak_bytes <= chip.hbm_bytes},
    }  # fmt: skip
