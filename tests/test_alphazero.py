"""AlphaZero's self-play (`jaxpar.modes.alphazero`): the same seed plays the same games on any
mesh, each device searching its own games with no collective in the compiled program, and the
value targets are the games' outcomes from each mover's view."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxpar.core.errors import UserError
from jaxpar.core.mesh import make_mesh, parse_mesh
from jaxpar.cost.collectives import collective_ops
from jaxpar.models import MLP, ResNet
from jaxpar.modes.alphazero import (
    Replay,
    Samples,
    game,
    loss,
    matcher,
    network_player,
    perfect_player,
    policy_value,
    random_player,
    rollout_player,
    rollout_value,
    selfplay,
    tic_tac_toe_values,
)

GAMES, SIMULATIONS, PLIES = 4, 8, 9


@functools.cache
def tic_tac_toe():
    env = game("tic_tac_toe")
    net = MLP(env.observation_shape, env.num_actions + 1, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(net)
    return env, graphdef, params


@functools.cache
def played(mesh_text: str, root: int = 1):
    env, graphdef, params = tic_tac_toe()
    mesh = make_mesh(parse_mesh(mesh_text, jax.device_count()))
    run = selfplay(env, graphdef, mesh, seed=0, simulations=SIMULATIONS, plies=PLIES, root=root)
    samples = run(params, 3, jnp.arange(GAMES))
    return jax.tree.map(np.asarray, samples), run, params


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["data=2,fsdp=2", "2x2", "4x1"])
def test_the_same_seed_plays_the_same_games_on_any_mesh(mesh):
    one, _, _ = played("1")
    other, _, _ = played(mesh)
    for name in ("observation", "policy", "value", "valid"):
        np.testing.assert_array_equal(getattr(one, name), getattr(other, name), err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["data=2", "4x1"])
def test_root_parallel_search_plays_the_same_games_on_any_mesh(mesh):
    """Two searches per move: on one device one after the other, on data=2 one per device, on 4
    devices two groups of two devices, each group its own games."""
    one, _, _ = played("1", root=2)
    other, run, params = played(mesh, root=2)
    for name in ("observation", "policy", "value", "valid"):
        np.testing.assert_array_equal(getattr(one, name), getattr(other, name), err_msg=name)
    plain, _, _ = played("1")
    assert not np.array_equal(one.policy, plain.policy)  # two searches' mean: another policy
    np.testing.assert_allclose(one.policy[one.valid].sum(-1), 1.0, rtol=1e-5)
    # One all-gather per move, of each member's choice: the search itself sends nothing (and the
    # games played leave their groups once, at the end).
    ops = collective_ops(run.lower(params, 3, jnp.arange(GAMES)).compile().as_text())
    games = GAMES // (parse_mesh(mesh).size // 2)  # a device's: its group's
    looped = [c for c in ops if c["count"] > 1]
    assert {c["kind"] for c in looped} == {"all-gather"}, ops
    assert sum(c["count"] for c in looped) == games * PLIES, ops


@pytest.mark.slow
def test_opening_moves_are_drawn_whatever_the_network_and_still_get_the_searchs_targets():
    env, graphdef, params = tic_tac_toe()
    mesh = make_mesh(parse_mesh("1", jax.device_count()))
    run = selfplay(env, graphdef, mesh, seed=0, simulations=SIMULATIONS, plies=PLIES, opening=PLIES)
    games = [jax.tree.map(np.asarray, run(p, 3, jnp.arange(GAMES)))
             for p in (params, jax.tree.map(lambda x: -x, params))]  # fmt: skip
    for name in ("observation", "value", "valid"):  # every move drawn: the same games
        np.testing.assert_array_equal(getattr(games[0], name), getattr(games[1], name))
    assert not np.allclose(games[0].policy, games[1].policy)  # each network's search's targets
    searched, _, _ = played("1")
    assert not np.array_equal(games[0].observation, searched.observation)


@pytest.mark.slow
def test_each_game_is_its_own_and_iterations_differ():
    one, run, params = played("1")
    alone = jax.tree.map(np.asarray, run(params, 3, jnp.arange(2, 4)))  # games 2 and 3 alone
    np.testing.assert_array_equal(alone.policy, one.policy[2:])
    later = np.asarray(run(params, 4, jnp.arange(GAMES)).policy)
    assert not np.array_equal(later, one.policy)


@pytest.mark.slow
def test_value_targets_are_the_outcomes_for_each_mover():
    samples, _, _ = played("1")
    for value, valid, policy in zip(samples.value, samples.valid, samples.policy, strict=True):
        n = int(valid.sum())
        assert 5 <= n <= PLIES and valid[:n].all() and not valid[n:].any()  # a prefix of moves
        assert value[n - 1] in (-1.0, 0.0, 1.0) and not value[n:].any()
        np.testing.assert_array_equal(value[: n - 1], -value[1:n])  # the players alternate
        np.testing.assert_allclose(policy[:n].sum(-1), 1.0, rtol=1e-6)  # distributions
    # a win is the last mover's: +1 for the move that ends the game (0 for a draw)
    last = [float(v[int(m.sum()) - 1]) for v, m in zip(samples.value, samples.valid, strict=True)]
    assert set(last) <= {0.0, 1.0}


@pytest.mark.slow
def test_the_search_runs_without_collectives():
    _, run, params = played("data=2,fsdp=2")
    text = run.lower(params, 3, jnp.arange(GAMES)).compile().as_text()
    assert "while" in text and collective_ops(text) == []


def test_an_unknown_game_is_named():
    with pytest.raises(UserError, match="--game checkers is not a pgx game; choose one of"):
        game("checkers")


@pytest.mark.slow
def test_perfect_play_never_loses_and_draws_itself():
    env = game("tic_tac_toe")
    key = jax.random.key(0)
    assert matcher(env, perfect_player, perfect_player, 200)(None, key) == {
        "win": 0.0, "draw": 1.0, "loss": 0.0}  # fmt: skip
    against_random = matcher(env, perfect_player, random_player, 1000)(None, key)
    assert against_random["loss"] == 0.0 and against_random["win"] > 0.8
    chance = matcher(env, random_player, random_player, 1000)(None, key)  # the match is fair
    assert 0.3 < chance["win"] < 0.55 and 0.3 < chance["loss"] < 0.55


@pytest.mark.parametrize("moves", [(0, 1, 2, 3, 4, 5, 7, 6), (4, 0, 8, 2, 1, 7, 5, 3)])
def test_a_rollout_from_a_last_free_cell_gives_that_moves_value(moves):
    env = game("tic_tac_toe")
    state = env.init(jax.random.key(0))
    for move in moves:
        state = env.step(state, move)
    (last,) = np.flatnonzero(state.legal_action_mask)
    cells = np.asarray(state.observation).reshape(9, 2).astype(int)
    row = (cells[:, 0] + 2 * cells[:, 1]) @ 3 ** np.arange(9)
    value = rollout_value(env, jax.random.key(1), state)
    assert value == tic_tac_toe_values()[row, last] == (1 if moves[0] == 0 else 0)  # won, drawn
    assert rollout_value(env, jax.random.key(1), env.step(state, last)) == 0.0  # it is over


@pytest.mark.slow
def test_pure_search_with_random_rollouts_rarely_loses_to_random_play():
    env = game("tic_tac_toe")
    rates = matcher(env, rollout_player(env, 100), random_player, 100)(None, jax.random.key(0))
    assert rates["win"] > 0.8 and rates["loss"] < 0.05, rates


def test_the_perfect_values_cover_every_position_reached_in_play():
    values = tic_tac_toe_values()
    reached, frontier = set(), {(0,) * 9}
    while frontier:  # every position a game reaches, the mover's marks as 1
        reached |= frontier
        frontier = {
            tuple((0, 2, 1)[c] for c in b[:m] + (1,) + b[m + 1 :])
            for b in frontier
            if values[sum(c * 3**i for i, c in enumerate(b))].max() > -2
            for m in range(9)
            if b[m] == 0
        } - reached
    assert len(reached) == 5478  # tic-tac-toe's legal positions
    rows = [sum(c * 3**i for i, c in enumerate(b)) for b in reached]
    assert sum(values[r].max() > -2 for r in rows) == 4520  # those with a move left


def test_the_replay_ring_keeps_the_last_positions_in_order():
    obs = jax.ShapeDtypeStruct((2,), jnp.int32)
    ring = Replay.empty(5, obs, actions=3)
    valid = np.array([[True, True, False], [True, False, False]])  # 2 games: 2 and 1 moves
    samples = Samples(
        observation=np.arange(12).reshape(2, 3, 2), policy=np.ones((2, 3, 3)) / 3,
        value=np.array([[1.0, -1.0, 0.0], [0.5, 0.0, 0.0]]), valid=valid,
    )  # fmt: skip
    ring = jax.jit(Replay.remember)(ring, samples)
    assert ring.filled.tolist() == [True, True, True, False, False] and int(ring.position) == 3
    assert ring.observation[:3].tolist() == [[0, 1], [2, 3], [6, 7]]  # game 0's plies, game 1's
    assert ring.value[:3].tolist() == [1.0, -1.0, 0.5]
    ring = ring.remember(samples)  # wraps: positions 3, 4, then 0
    assert int(ring.position) == 1 and ring.filled.all()
    assert ring.observation.tolist() == [[6, 7], [2, 3], [6, 7], [0, 1], [2, 3]]
    many = Replay.empty(2, obs, actions=3).remember(samples)  # 3 positions, room for 2: the last
    assert many.observation.tolist() == [[6, 7], [2, 3]] and int(many.position) == 1
    drawn = ring.sample(jax.random.key(0), 64)
    assert drawn["observation"].shape == (64, 2)
    half = Replay.empty(5, obs, actions=3).remember(samples)
    chosen = half.sample(jax.random.key(1), 200)["observation"].tolist()
    assert all(o in ([0, 1], [2, 3], [6, 7]) for o in chosen)  # only filled entries


def test_the_loss_is_cross_entropy_plus_squared_error():
    env, graphdef, params = tic_tac_toe()
    rng = np.random.default_rng(0)
    observation = rng.integers(0, 2, (6, 3, 3, 2)).astype(bool)
    policy = rng.dirichlet(np.ones(9), 6).astype(np.float32)
    value = rng.choice([-1.0, 0.0, 1.0], 6).astype(np.float32)
    batch = {"observation": observation, "policy": policy, "value": value}
    total, parts = loss(nnx.merge(graphdef, params), batch)
    out = np.asarray(nnx.merge(graphdef, params)(observation.astype(np.float32)), np.float64)
    logits = out[:, :-1] - out[:, :-1].max(-1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ce, se = -(policy * log_p).sum(-1).mean(), np.square(np.tanh(out[:, -1]) - value).mean()
    np.testing.assert_allclose([parts["policy_loss"], parts["value_loss"]], [ce, se], rtol=1e-5)
    np.testing.assert_allclose(total, ce + se, rtol=1e-5)


def test_a_resnets_running_statistics_learn_from_the_positions_that_search_then_sees():
    net = ResNet((3, 3, 2), 10, stage_sizes=(1,), width=8, rngs=nnx.Rngs(0))
    graphdef, before = nnx.graphdef(net), nnx.to_pure_dict(nnx.state(net))  # arrays: a copy
    observation = np.random.default_rng(0).integers(0, 2, (8, 3, 3, 2)).astype(bool)
    policy, value = np.full((8, 9), 1 / 9, np.float32), np.zeros(8, np.float32)
    loss(net, {"observation": observation, "policy": policy, "value": value})
    after = nnx.to_pure_dict(nnx.state(net))
    assert not np.allclose(after["stem_bn"]["mean"], before["stem_bn"]["mean"])
    legal = np.ones((8, 9), bool)  # search's network: normalised by the running statistics
    moved, _ = policy_value(graphdef, after, observation, legal)
    fresh, _ = policy_value(graphdef, before, observation, legal)
    assert not np.allclose(moved, fresh)


@pytest.mark.slow
def test_one_compiled_match_serves_any_network_parameters():
    env, graphdef, params = tic_tac_toe()
    play = matcher(env, network_player(graphdef), perfect_player, 100)
    untrained = play(params, jax.random.key(0))
    assert untrained["win"] == 0.0 and untrained["loss"] > 0.2  # no one beats perfect play
    other = jax.tree.map(lambda x: -x, params)
    assert play(other, jax.random.key(0)) != untrained  # the same program, other weights
    assert play.program._cache_size() == 1  # compiled once (jax.jit's count of its programs)
