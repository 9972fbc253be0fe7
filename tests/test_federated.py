"""Federated learning (`jaxpar.modes.federated`): each mode's option reduces to FedAvg, FedAvg to
SGD, and a run is the same on any mesh and after a resume."""

import dataclasses
import functools
import json
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import train as cli
from jaxpar.core.step import _keys, cross_entropy
from jaxpar.data import preprocess
from jaxpar.modes.federated import partition, secure_sum, summary
from jaxpar.run.config import Config
from jaxpar.run.setup import setup

FED = ["--model", "2nn", "--lr", "0.05", "--local-batch", "16", "--eval-every", "2",
       "--log-every", "1"]  # fmt: skip


@functools.cache
def fed_run(mesh: str = "1", **options):
    """A federated run set up on digits (8 clients, 4 per round, the 2NN): its `Run`, fresh
    state and the host rows of round 0."""
    cfg = Config.of(model="2nn", clients=8, clients_per_round=4, local_batch=16, lr=0.05,
                 rounds=3, mesh=mesh, **options).validate()  # fmt: skip
    run = setup(cfg)
    return run, run.init()


def round_with(run, state, mode, host):
    """`mode`'s round on the rows `host` (as `Federated.round_rows` gives), jitted here."""
    graphdef = run.compile.args[0]  # setup's partial of compile_steps
    step = partial(mode.step, graphdef=graphdef, keys=tuple(_keys(0)[1:]),
                   prepare=preprocess(run.ds))  # fmt: skip
    images, labels = run.ds.train_images, run.ds.train_labels
    batch = {"image": images[host["rows"]], "label": labels[host["rows"]],
             **{k: host[k] for k in ("mask", "weight", "client")}}  # fmt: skip
    return jax.jit(step)(jax.device_get(state), batch)


def params(state):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(state[0])])


@pytest.mark.slow
def test_one_client_with_one_step_is_centralized_sgd():
    run, state = fed_run()
    n = len(run.ds.train_labels)
    mode = dataclasses.replace(run.mode, parts=[np.arange(n)], per_round=1, local_batch=n)
    host = mode.round_rows(0)
    assert host["rows"].shape == (1, 1, n) and host["mask"].all()
    new, metrics = round_with(run, state, mode, host)

    model, _ = nnx.merge(run.compile.args[0], jax.device_get(state))
    x = preprocess(run.ds)(run.ds.train_images)
    loss = lambda m: cross_entropy(m(x), run.ds.train_labels).mean()  # noqa: E731
    value, grads = nnx.value_and_grad(loss)(model)
    weights = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    expected = jax.tree.map(lambda p, g: p - 0.05 * g, weights, nnx.to_pure_dict(grads))
    np.testing.assert_allclose(params(new), params({0: expected}), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["train_loss"], value, rtol=1e-5)


@pytest.mark.slow
def test_fedprox_with_mu_to_zero_is_fedavg_and_mu_pulls_towards_the_global_model():
    run, state = fed_run()
    host = run.mode.round_rows(0)
    fedavg, _ = round_with(run, state, run.mode, host)
    # FedAvg skips the proximal term: a vanishing mu through it lands on FedAvg's model
    tiny, _ = round_with(run, state, dataclasses.replace(run.mode, prox_mu=1e-12), host)
    prox, _ = round_with(run, state, dataclasses.replace(run.mode, prox_mu=10.0), host)
    np.testing.assert_allclose(params(tiny), params(fedavg), rtol=1e-6, atol=1e-7)
    start = params(jax.device_get(state))
    assert np.linalg.norm(params(prox) - start) < 0.9 * np.linalg.norm(params(fedavg) - start)


def test_a_client_twice_is_a_client_of_twice_the_weight_and_order_does_not_matter():
    run, state = fed_run()
    host = run.mode.round_rows(0)
    twice = {k: v.copy() for k, v in host.items()}
    for k in ("rows", "mask", "client"):
        twice[k][1] = host[k][0]
    twice["weight"][1] = host["weight"][0]
    doubled = {k: v.copy() for k, v in host.items()}
    doubled["weight"][0], doubled["weight"][1], doubled["mask"][1] = 2 * host["weight"][0], 0, 0
    order = np.array([3, 0, 2, 1])
    permuted = {k: v[order] for k, v in host.items()}
    a, b = (params(round_with(run, state, run.mode, h)[0]) for h in (twice, doubled))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    c, d = (params(round_with(run, state, run.mode, h)[0]) for h in (host, permuted))
    np.testing.assert_allclose(c, d, rtol=1e-5, atol=1e-6)


def test_slots_trained_together_or_one_at_a_time_agree():
    run, state = fed_run()
    host = run.mode.round_rows(0)
    together = dataclasses.replace(run.mode, at_once=4)  # a batch of slots, as on accelerators
    np.testing.assert_allclose(
        params(round_with(run, state, together, host)[0]),
        params(round_with(run, state, run.mode, host)[0]),
        rtol=1e-5,
        atol=1e-5,
    )  # fmt: skip  (other batch shapes round otherwise)


def test_identical_clients_return_the_model_each_would_alone():
    run, state = fed_run()
    host = run.mode.round_rows(0)
    same = {k: np.repeat(v[:1], len(v), axis=0) for k, v in host.items()}
    alone = {k: v.copy() for k, v in host.items()}
    alone["weight"][1:], alone["mask"][1:] = 0, 0
    np.testing.assert_allclose(params(round_with(run, state, run.mode, same)[0]),
                               params(round_with(run, state, run.mode, alone)[0]),
                               rtol=1e-5, atol=1e-6)  # fmt: skip


def test_dp_with_infinite_clip_and_no_noise_is_fedavg_over_equal_clients():
    run, _ = fed_run()
    deltas = {"w": jax.random.normal(jax.random.key(1), (4, 5, 3))}
    equal = jnp.full(4, 7.0)
    fedavg, _ = run.mode.aggregate(deltas, equal, jax.random.key(0))
    dp = dataclasses.replace(run.mode, dp_clip=float("inf"), dp_noise=0.0)
    np.testing.assert_allclose(dp.aggregate(deltas, equal, jax.random.key(0))[0]["w"],
                               fedavg["w"], rtol=1e-6)  # fmt: skip
    clipped = dataclasses.replace(run.mode, dp_clip=0.1)
    mean, _ = clipped.aggregate(deltas, jnp.array([7.0, 1.0, 3.0, 0.0]), jax.random.key(0))
    manual = np.stack([d / max(1, np.linalg.norm(d) / 0.1) for d in np.asarray(deltas["w"])[:3]])
    np.testing.assert_allclose(mean["w"], manual.mean(0), rtol=1e-5)  # equal weights, 3 clients
    noisy = dataclasses.replace(run.mode, dp_clip=0.1, dp_noise=1.0)
    big = {"w": jnp.zeros((4, 20_000))}
    spread = np.std(noisy.aggregate(big, jnp.ones(4), jax.random.key(0))[0]["w"])
    assert abs(spread - 1.0 * 0.1 / 4) < 0.002  # std z * S / m


def test_secure_aggregation_sums_modulo_2_32_to_the_float_sum():
    values = jnp.array([[2e4], [2e4], [-2e4]])  # partial sums overflow int32; the total does not
    np.testing.assert_allclose(secure_sum(values, jnp.ones(3)), [2e4])
    run, _ = fed_run()
    deltas = {"w": 0.01 * jax.random.normal(jax.random.key(2), (4, 300))}
    weight = jnp.array([180.0, 179.0, 180.0, 0.0])
    secure = dataclasses.replace(run.mode, secure_agg=True)
    unit = 4 * secure.expected_weight / 2**16 / float(weight.sum())  # 4 clients' rounding
    mean, metrics = secure.aggregate(deltas, weight, jax.random.key(0))
    plain, _ = run.mode.aggregate(deltas, weight, jax.random.key(0))
    assert 0 < metrics["secure_agg_error"] < unit
    np.testing.assert_allclose(mean["w"], plain["w"], atol=unit)
    # large clients: the fixed point counts in units of a round's expected weight, no overflow
    big = {"w": jnp.full((2, 3), 0.8)}
    large = jnp.array([30_000.0, 30_000.0])
    np.testing.assert_allclose(secure.aggregate(big, large, jax.random.key(0))[0]["w"], 0.8,
                               rtol=1e-3)  # fmt: skip


def test_partitions_cover_every_example_once():
    labels = np.asarray(fed_run()[0].ds.train_labels)
    for text in ("iid", "shards:2", "dirichlet:0.3"):
        parts = partition(labels, 10, text, seed=0)
        assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels))), text
    stats = {t: summary(partition(labels, 10, t, 0), labels) for t in
             ("iid", "shards:2", "dirichlet:0.1")}  # fmt: skip
    assert stats["iid"]["labels"]["median"] == 10 and stats["shards:2"]["labels"]["median"] <= 3
    skewed = stats["dirichlet:0.1"]
    assert skewed["labels"]["median"] <= 6 and skewed["examples"]["max"] > 5 * skewed[
        "examples"]["min"]  # fmt: skip
    assert [len(p) for p in partition(labels, 10, "dirichlet:0.3", 0)] == [
        len(p) for p in partition(labels, 10, "dirichlet:0.3", 0)
    ]  # a function of its arguments
    mode = fed_run()[0].mode
    assert np.array_equal(mode.chosen(5), mode.chosen(5)) and len(set(mode.chosen(5))) == 4


def lines(workdir):
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def numbers(rows):
    return [(r["step"], r.get("train_loss"), r.get("eval_loss")) for r in rows]


@pytest.mark.slow
def test_the_same_run_on_1_4_and_8_devices(tmp_path):
    args = [*FED, "--clients", "12", "--clients-per-round", "5", "--rounds", "4"]
    runs = {}
    for mesh in ("1", "4x1", "8x1"):  # 5 clients a round: padded to 8 slots on 4 and 8 devices
        assert cli.main([*args, "--mesh", mesh, "--workdir", str(tmp_path / mesh)]) == 0
        runs[mesh] = lines(tmp_path / mesh)
    values = lambda rows: [x for r in numbers(rows) for x in r if x is not None]  # noqa: E731
    for mesh in ("4x1", "8x1"):
        assert [r["step"] for r in runs[mesh]] == [r["step"] for r in runs["1"]]
        np.testing.assert_allclose(values(runs[mesh]), values(runs["1"]), rtol=2e-5)
    assert all("round" in r for r in runs["1"])
    summary_ = json.loads((tmp_path / "1" / "partition.json").read_text())
    assert summary_["clients"] == 12 and sum(summary_["examples_per_client"]) == 1437


@pytest.mark.slow
def test_a_run_stopped_and_resumed_equals_the_uninterrupted_one(tmp_path):
    args = [*FED, "--clients", "8", "--clients-per-round", "3", "--server-optimizer", "fedavgm",
            "--checkpoint-every", "1", "--mesh", "2x1"]  # fmt: skip
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert cli.main([*args, "--rounds", "4", "--workdir", str(whole)]) == 0
    assert cli.main([*args, "--rounds", "2", "--workdir", str(parts)]) == 0
    assert cli.main([*args, "--rounds", "4", "--workdir", str(parts)]) == 0
    a, b = lines(whole), lines(parts)
    assert numbers(a) == numbers(b)
    trained = [r for r in a if "train_loss" in r][-1]
    assert trained["bytes_per_round"] == 2 * trained["bytes_up_per_client"] * 3
    # another federated setting cannot resume it
    assert cli.main([*args, "--rounds", "6", "--clients", "9", "--workdir", str(parts)]) == 2
    # with secure aggregation, training lines report its error against the float sum
    secure = tmp_path / "secure"
    assert cli.main([*args, "--rounds", "2", "--secure-agg", "--workdir", str(secure)]) == 0
    errors = [r["secure_agg_error"] for r in lines(secure) if "train_loss" in r]
    assert errors and all(0 <= e < 1e-4 for e in errors)


@pytest.mark.slow
def test_the_adaptive_server_optimizers_take_adam_and_yogi_steps():
    for name, make in (("fedadam", optax.adam), ("fedyogi", optax.yogi)):
        run, state = fed_run(server_optimizer=name)
        host = run.mode.round_rows(0)
        new, metrics = round_with(run, state, run.mode, host)
        # the server's first step: the optimizer applied to minus the clients' mean update
        fedavg_run, fedavg_state = fed_run()
        mean_update = params(round_with(fedavg_run, fedavg_state, fedavg_run.mode, host)[0]) - (
            params(jax.device_get(fedavg_state)))  # fmt: skip
        tx = make(0.01, b1=0.9, b2=0.99, eps=1e-3)
        step, _ = tx.update(-mean_update, tx.init(mean_update))
        np.testing.assert_allclose(
            params(new) - params(jax.device_get(state)), step, rtol=1e-4, atol=5e-7
        )  # parameters ~0.1: float32's rounding
        assert np.isfinite(metrics["train_loss"])


@pytest.mark.slow
def test_dp_fedavg_runs_end_to_end_and_the_mode_is_built_by_field(tmp_path, capsys):
    """`make_mode` once passed its fields by position: the round count landed in `at_once`
    (every client trained at once on a CPU) and DP-FedAvg's privacy budget saw 0 rounds."""
    args = [*FED, "--clients", "8", "--clients-per-round", "4", "--rounds", "3", "--dp-clip",
            "1.0", "--dp-noise", "0.5", "--mesh", "2x1", "--workdir", str(tmp_path)]  # fmt: skip
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "privacy: epsilon" in out and "after 3 rounds" in out, out
    assert "round 3/3 epoch" in out and "step 3/3" not in out, out  # it counts rounds
    mode = fed_run("2x1", dp_clip=1.0, dp_noise=0.5)[0].mode
    assert (mode.rounds, mode.at_once, mode.dp_noise, mode.dp_clip) == (3, None, 0.5, 1.0)
    assert (mode.per_round, mode.local_batch, mode.shards) == (4, 16, 2)


@pytest.mark.slow
def test_clients_on_a_data_axis_that_does_not_divide_the_batch_size(tmp_path):
    """--batch-size is unused by a federated run, so evaluation splits by the mesh instead (a
    mesh of data=5 once crashed on the evaluation batches of 128 rows)."""
    args = [*FED, "--clients", "5", "--rounds", "2", "--mesh", "data=5"]
    assert cli.main([*args, "--workdir", str(tmp_path)]) == 0
    assert [r["step"] for r in lines(tmp_path) if "eval_loss" in r] == [2]
