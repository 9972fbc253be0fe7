"""`--dry-run --project`: the kernel and collective model behind the projection, and the CLI."""

import json

import jax
import jax.numpy as jnp
import pytest

import train as cli
from jaxpar.cost.projection import (
    CHIPS,
    COLLECTIVE_BASE_S,
    DISPATCH_S,
    HOP_S,
    LINK_EFFICIENCY,
    MATMUL_EFFICIENCY,
    MEMORY_EFFICIENCY,
    OVERLAP,
    TREE_BASE_S,
    TREE_HOP_S,
    Hardware,
    Kernel,
    kernels,
    latency,
    project,
)
from jaxpar.tools.plan import format_projection


def hlo(f, *args) -> str:
    return jax.jit(f).lower(*args).as_text(dialect="hlo")


def test_elementwise_work_fuses_into_the_reduction_that_reads_a_product():
    a, b = jnp.ones((64, 32)), jnp.ones((32, 16))
    ks = kernels(hlo(lambda a, b: (jax.nn.relu(a @ b) * 2).sum(), a, b))
    assert [k.op for k in ks] == ["dot", "reduce"]
    dot, reduce = ks
    assert dot.flops == 2 * 64 * 32 * 16 and dot.dtype == "f32"
    assert dot.bytes == 4 * (64 * 32 + 32 * 16 + 64 * 16)  # reads a and b, writes a @ b
    assert reduce.bytes == 4 * (64 * 16 + 1)  # reads a @ b once, writes the sum


def test_a_scan_counts_its_body_once_per_iteration():
    x, ws = jnp.ones((8, 16), jnp.bfloat16), jnp.ones((5, 16, 16), jnp.bfloat16)
    ks = kernels(hlo(lambda x, ws: jax.lax.scan(lambda c, w: (c @ w, None), x, ws)[0], x, ws))
    dots = [k for k in ks if k.op == "dot"]
    assert len(dots) == 1 and dots[0].dtype == "bf16"
    assert dots[0].flops == 5 * 2 * 8 * 16 * 16
    # each iteration reads its own slice of the stacked weights, not all of them
    assert dots[0].bytes == 5 * 2 * (8 * 16 + 16 * 16 + 8 * 16)


def test_a_scans_kernels_count_their_launches():
    def body(c, w):
        return jnp.tanh(c @ w), None

    ks = kernels(hlo(lambda c, ws: jax.lax.scan(body, c, ws)[0], jnp.ones((4, 8)),
                     jnp.ones((12, 8, 8))))  # fmt: skip
    dots = [k for k in ks if k.op == "dot"]
    assert len(dots) == 1 and dots[0].launches == 12


def test_reductions_of_one_tensor_share_its_read():
    x = jnp.ones((256, 64))
    ks = kernels(hlo(lambda x: (x.sum(0), (x * x).sum(0)), x))
    assert sum(k.bytes for k in ks) == 4 * (256 * 64 + 2 * 64)


def test_projection_arithmetic():
    chip = CHIPS["h100"]
    hw = Hardware(chip, "h100", per_node=2, nodes=2)
    mesh = {"stage": 1, "data": 2, "fsdp": 2, "model": 1}  # fsdp within a node, data across
    flops, nbytes = 4 * 1e12, 4 * 2e9  # over 4 devices
    ks = [Kernel("dot", flops, 0.0, "bf16"), Kernel("add", 0.0, nbytes, "")]
    ops = [
        {"kind": "all-reduce", "bytes": 1e9, "count": 1, "groups": "{{0,2},{1,3}}"},
        {"kind": "all-gather", "bytes": 1e8, "count": 3, "groups": "[2,2]<=[4]"},
    ]
    q = project(ks, ops, mesh, hw, batch=64, precision="bf16")
    compute = 1e12 / (chip.bf16 * MATMUL_EFFICIENCY)
    memory = 2e9 / (chip.hbm_bw * MEMORY_EFFICIENCY)
    assert q["compute_s"] == pytest.approx(compute) and q["memory_s"] == pytest.approx(memory)
    across, within = q["collectives"]
    assert (across["axes"], across["link"], across["devices"]) == ("data", "between nodes", 2)
    # each collective pays NCCL's latency: a base, and a hop per ring step (2(n-1) for all-reduce)
    latency = COLLECTIVE_BASE_S + 2 * HOP_S[True]  # a 2-ring between 2 nodes: both steps cross
    assert across["seconds"] == pytest.approx(
        latency + 2 * 1 / 2 * 1e9 / (chip.inter_bw * LINK_EFFICIENCY)
    )
    assert (within["axes"], within["link"], within["count"]) == ("fsdp", "within a node", 3)
    latency = COLLECTIVE_BASE_S + 1 * HOP_S[False]
    assert within["seconds"] == pytest.approx(
        3 * (latency + 1 / 2 * 1e8 / (chip.intra_bw * LINK_EFFICIENCY))
    )
    comm = across["seconds"] + within["seconds"]
    assert q["hidden_s"] == pytest.approx(min(comm, OVERLAP * (compute + memory)))
    assert q["step_s"] == pytest.approx(compute + memory + comm - q["hidden_s"])
    assert q["images_per_s_per_chip"] == pytest.approx(64 / q["step_s"] / 4)
    assert q["mfu"] == pytest.approx(1e12 / q["step_s"] / chip.bf16)
    parts = {"compute": compute, "memory": memory, "communication": comm - q["hidden_s"]}
    assert q["bound"] == max(parts, key=parts.get) and q["launch_s"] == 0
    # a pipeline's idle slots are in the program's FLOPs already: time as is, MFU without them
    piped = project(ks, ops, mesh, hw, batch=64, precision="bf16", bubble=0.25)
    assert piped["step_s"] == pytest.approx(q["step_s"])
    assert piped["mfu"] == pytest.approx(0.75 * q["mfu"])
    # a ring whose pairs cross nodes in any group goes over the link between nodes
    ring = project(ks, [{"kind": "collective-permute", "bytes": 1e6, "count": 1,
                         "groups": "{{0,1},{1,2},{2,3},{3,0}}"}], mesh, hw, 64, "bf16")  # fmt: skip
    assert ring["collectives"][0]["link"] == "between nodes"


def test_small_kernels_and_collectives_take_at_least_their_latency():
    """A model too small for any roofline: each kernel costs the chip's launch floor, each
    collective NCCL's latency, a step the host's dispatch, not the 0.00 ms step and millions of
    images/s of a roofline."""
    hw = Hardware(CHIPS["h100"], "h100", per_node=4, nodes=1)
    mesh = {"stage": 1, "data": 4, "fsdp": 1, "model": 1}
    tiny = [Kernel("dot", 4e3, 0.0, "bf16"), Kernel("add", 0.0, 4e3, "")] * 35
    ops = [{"kind": "all-reduce", "bytes": 8.0, "count": 2, "groups": "{{0,1,2,3}}"}]
    q = project(tiny, ops, mesh, hw, batch=128, precision="bf16", peak_bytes=2**20)
    assert q["compute_s"] == q["memory_s"] == 0
    assert q["launch_s"] == pytest.approx(70 * CHIPS["h100"].launch_s)
    collective = COLLECTIVE_BASE_S + 2 * 3 * HOP_S[False]  # 2(n-1) ring steps within the node
    assert q["communication_s"] == pytest.approx(2 * collective, rel=1e-3)  # 8 bytes: ~0 s
    # the device's time is less than the host needs to dispatch the step
    assert q["launch_s"] + 2 * collective < DISPATCH_S
    assert q["step_s"] == DISPATCH_S and q["bound"] == "dispatch"
    many = project(tiny * 20, ops, mesh, hw, batch=128, precision="bf16")  # 1,400 kernels
    # a small all-reduce over many nodes takes NCCL's tree (log2 of the nodes) over its ring
    assert latency("all-reduce", 64, 8) == pytest.approx(
        TREE_BASE_S + 2 * (7 * HOP_S[False] + 3 * TREE_HOP_S)
    )
    assert latency("all-reduce", 64, 8) < COLLECTIVE_BASE_S + 14 * HOP_S[True] + 112 * HOP_S[False]
    assert latency("all-gather", 16, 2) == pytest.approx(
        COLLECTIVE_BASE_S + HOP_S[True] + 14 * HOP_S[False]
    )
    assert many["step_s"] == pytest.approx(many["launch_s"] + 2 * collective - many["hidden_s"])
    assert many["bound"] == "launch" and many["step_s"] > DISPATCH_S
    text = format_projection(q)
    assert "0.14 ms in kernels at the launch floor" in text and "dispatch-bound" in text
    assert "convolutions" not in text  # the CPU's bf16 convolution note only where there are some
    # the host's dispatch is shared by the steps of one program (--steps-per-dispatch)
    eight = project(tiny, ops, mesh, hw, batch=128, precision="bf16", steps_per_dispatch=8)
    assert eight["step_s"] == pytest.approx(max(DISPATCH_S / 8, q["launch_s"] + 2 * collective
                                                - q["hidden_s"]))  # fmt: skip
    # a kernel in a scan's body launches once per iteration, each launch at the floor
    scanned = [Kernel("add", 0.0, 12 * 4e3, "", launches=12)]
    looped = project(scanned, [], mesh, hw, batch=128, precision="bf16")
    assert looped["launch_s"] == pytest.approx(12 * CHIPS["h100"].launch_s)
    # a kernel whose roofline time passes the floor takes its roofline time, floor not added
    big = project([Kernel("add", 0.0, 4e9, "")], [], mesh, hw, batch=128, precision="bf16")
    assert big["launch_s"] == 0 and big["memory_s"] > CHIPS["h100"].launch_s


@pytest.mark.slow
def test_dry_run_json_projects_onto_two_nodes(capsys):
    args = ["--dry-run", "--json", "--mesh", "data=2,fsdp=2", "--project", "h100x2:nodes=2"]
    assert cli.main(args) == 0
    plan = json.loads(capsys.readouterr().out)
    assert {"params", "per_device", "collectives", "projection"} <= set(plan)
    q = plan["projection"]
    assert q["chips"] == 4 and q["bound"] in ("compute", "memory", "launch", "communication",
                                              "dispatch")  # fmt: skip
    assert q["step_s"] > 0 and 0 < q["mfu"] < 1
    assert q["images_per_s_per_chip"] == pytest.approx(128 / q["step_s"] / 4)
    links = {(c["axes"], c["link"]) for c in q["collectives"]}
    assert ("fsdp", "within a node") in links  # parameters gathered within a node
    assert any("data" in axes and link == "between nodes" for axes, link in links)
