"""Placement: golden PartitionSpec tables, shard shapes, optimizer state, compiled collectives."""

import json
from functools import partial
from pathlib import Path

import jax
import pytest
from conftest import BATCH, digits, trained
from jax.sharding import PartitionSpec as P

import jaxpar
from jaxpar.core.mesh import CPU_XLA_FLAGS, make_mesh, parse_mesh
from jaxpar.core.optimizers import make_optimizer
from jaxpar.core.sharding import check_batch, partition_spec, path_str, spec_table, state_shardings
from jaxpar.core.step import abstract_state
from jaxpar.data import device_batch, train_indices
from jaxpar.models import MODELS

STRATEGIES = {
    "dp": "8x1",
    "fsdp": "fsdp=8",
    "tp": "1x8",
    "dp_tp": "2x4",
    "fsdp_tp": "fsdp=4,model=2",
}

# Megatron MLP: fc1 column-parallel, fc2 row-parallel; FSDP shards the `embed` dimensions.
MLP_GOLDEN = {
    "dp": {},
    "fsdp": {
        "fc1/kernel": P("fsdp", None),
        "fc2/kernel": P(None, "fsdp"),
        "fc2/bias": P("fsdp"),
        "head/kernel": P("fsdp", None),
    },
    "tp": {"fc1/kernel": P(None, "model"), "fc1/bias": P("model"), "fc2/kernel": P("model", None)},
    "fsdp_tp": {
        "fc1/kernel": P("fsdp", "model"),
        "fc1/bias": P("model"),
        "fc2/kernel": P("model", "fsdp"),
        "fc2/bias": P("fsdp"),
        "head/kernel": P("fsdp", None),
    },
}
MLP_GOLDEN["dp_tp"] = MLP_GOLDEN["tp"]  # the data axis never shards parameters
MLP_PARAMS = ["act/negative_slope", "fc1/bias", "fc1/kernel", "fc2/bias", "fc2/kernel"]
MLP_PARAMS += ["head/bias", "head/kernel"]


def param_specs(model, mesh_text):
    _, abstract = abstract_state(partial(MODELS[model], (8, 8, 1), 10), make_optimizer())
    shardings, replicated = state_shardings(abstract, make_mesh(parse_mesh(mesh_text)))
    return spec_table(shardings, "0/"), replicated


def sharded_only(table):
    return {k: v for k, v in table.items() if any(v)}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_mlp_golden_table(strategy):
    table, replicated = param_specs("mlp", STRATEGIES[strategy])
    assert sorted(table) == MLP_PARAMS
    assert sharded_only(table) == MLP_GOLDEN[strategy]
    assert replicated == []


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_resnet_golden_table(strategy):
    golden = json.loads((Path(__file__).parent / "golden" / "resnet8.json").read_text())[strategy]
    table, _ = param_specs("resnet8", STRATEGIES[strategy])
    assert {k: list(v) for k, v in table.items()} == golden


def test_indivisible_dimension_is_replicated_and_reported():
    _, replicated = param_specs("resnet8", "fsdp=8")
    assert [str(r) for r in replicated] == [
        "0/stem/kernel dim 2 (conv_in=1) is replicated: not divisible by fsdp=8"
    ]
    mesh = make_mesh(parse_mesh("fsdp=4,model=2"))
    report = []
    assert partition_spec(("embed", "hidden"), (6, 10), mesh, "w", report) == P(None, "model")
    assert [(r.path, r.dim, r.ways) for r in report] == [("w", 0, 4)]


def test_unknown_logical_name_is_an_error():
    with pytest.raises(ValueError, match="logical axis 'experts' has no rule"):
        partition_spec(("experts",), (8,), make_mesh(parse_mesh("8")))


@pytest.mark.slow
def test_shard_shapes_per_device():
    _, state, _, _, mesh = trained("mlp", "sgd", "fsdp=4,model=2")
    kernel = state[0]["fc1"]["kernel"]
    assert kernel.shape == (64, 512)
    assert {s.data.shape for s in kernel.addressable_shards} == {(16, 256)}
    assert len(kernel.addressable_shards) == 8
    _, state, _, _, _ = trained("mlp", "sgd", "8x1")
    assert {s.data.shape for s in state[0]["fc1"]["kernel"].addressable_shards} == {(64, 512)}


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_optimizer_state_keeps_parameter_sharding(optimizer):
    _, state, _, _, _ = trained("mlp", optimizer, "fsdp=4,model=2")
    params = dict(leaves_by_path(state[0]))
    moments = leaves_by_path(state[1]["opt_state"])  # paths like '0/mu/fc1/kernel'
    checked = 0
    for path, moment in moments:
        owner = [p for p in params if path.endswith("/" + p)]
        if owner:
            assert moment.sharding == params[owner[0]].sharding, path
            checked += 1
    # SGD keeps one momentum per parameter, AdamW two (mu, nu).
    assert checked == len(MLP_PARAMS) * (1 if optimizer == "sgd" else 2)


def leaves_by_path(tree):
    return [(path_str(p), x) for p, x in jax.tree_util.tree_leaves_with_path(tree)]


def compiled_text(mesh_text, **options):
    ds = digits()
    _, state, _, train_step, mesh = trained("mlp", "sgd", mesh_text)
    data = {"image": ds.train_images, "label": ds.train_labels}
    batch = device_batch(data, train_indices(ds, BATCH, 0, 0), mesh)
    return train_step.lower(state, batch).compile(**options).as_text()


def copied_parameters(hlo: str) -> list[str]:
    """Entry parameters (state and batch arrays) that the compiled step copies."""
    entry = hlo.split("\nENTRY ")[1]
    names = [line.split()[0] for line in entry.splitlines() if " parameter(" in line]
    return [name for name in names if f"copy({name})" in entry]


@pytest.mark.slow
def test_cpu_step_updates_parameters_in_place_without_copies():
    """`CPU_XLA_FLAGS` (set for the tests by conftest, as train.py sets them): region analysis
    lets XLA update the donated parameters without copying them first; without it the MLP step
    copies five of them."""
    assert copied_parameters(compiled_text("1")) == []
    without = {flag.split("=")[0].lstrip("-"): False for flag in CPU_XLA_FLAGS}
    assert len(copied_parameters(compiled_text("1", compiler_options=without))) >= 3


def test_dp_step_all_reduces_gradients_and_gathers_no_parameters():
    hlo = compiled_text("8x1")
    assert "all-reduce" in hlo
    assert "all-gather" not in hlo


@pytest.mark.slow
def test_fsdp_step_gathers_parameters():
    assert "all-gather" in compiled_text("fsdp=8")  # shows the check above can fail


def test_batch_must_divide_over_batch_axes():
    check_batch(128, make_mesh(parse_mesh("data=2,fsdp=2,model=2")))
    with pytest.raises(jaxpar.UserError, match="not divisible by the 3 batch shards"):
        check_batch(128, make_mesh(parse_mesh("3x1")))
