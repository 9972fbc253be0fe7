"""AlphaZero's self-play on the mesh (the first part of ``--game``, issue #32): games of a pgx
environment, each move chosen by Gumbel MuZero search (mctx) with a policy-value network.

Each device searches its own games with no traffic between devices inside the search: the games
are split over the batch axes with `jax.shard_map` (mctx's descent is a `while_loop`; under plain
GSPMD partitioning every descent step would synchronise the devices). mctx draws its noise from
one key per call, so each game is searched as a batch of one (`jax.vmap` over the games), from
its own key: (seed, iteration, the game's global index). The same seed then plays the same games
on any mesh.

The network is any jaxpar model with ``num_actions + 1`` outputs: the policy's logits, then the
value (through tanh), both from the view of the player to move.

Evaluation plays players against each other (`matcher`): a uniformly random player, the network
without search, and for tic-tac-toe perfect play (`perfect`, exact minimax over every position).
"""

import dataclasses
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import mctx
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec

from jaxpar.core.errors import UserError
from jaxpar.core.sharding import RULES

# The random streams of a game's run, each folded into the seed's key first: apart from one another
# and from the train step's (`jaxpar.core.step`'s split of the seed's key into 3). A move's
# random opening draw folds OPENING into the move's search key.
SELFPLAY, REPLAY, EVALUATION, OPENING = 0x5E1F, 0x4E91, 0xE7A1, 0x0BE9


def stream(seed: int, tag: int) -> jax.Array:
    """The key of the random stream `tag` (`SELFPLAY`, ...) of a run seeded `seed`."""
    return jax.random.fold_in(jax.random.key(seed), tag)


def game(name: str):
    """The pgx environment `name` (``tic_tac_toe``, ``connect_four``, ``othello``, ...)."""
    import pgx  # here: importing pgx starts JAX's backend, which must wait for the device count

    if name not in pgx.available_envs():
        raise UserError(f"--game {name} is not a pgx game; choose one of "
                        f"{', '.join(pgx.available_envs())}")  # fmt: skip
    return pgx.make(name)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Samples:
    """What self-play gives for training, per game and ply (leading axes ``[games, plies]``)."""

    observation: jax.Array  # the position, from the view of the player to move
    policy: jax.Array  # the search's improved policy (the target of the network's logits)
    value: jax.Array  # the game's outcome for the player to move (+1, 0, -1)
    valid: jax.Array  # a move was made at this ply (False once the game is over)


def policy_value(graphdef, params, observation, legal):
    """The network's policy logits (illegal moves at the lowest float) and value in [-1, 1]."""
    out = nnx.merge(graphdef, params)(observation.astype(jnp.float32))
    logits = jnp.where(legal, out[..., :-1], jnp.finfo(jnp.float32).min)
    return logits, jnp.tanh(out[..., -1])


def outcomes(reward, valid, ended):
    """Each ply's value target from the mover's view, from the rewards of the moves (``[plies]``):
    the move that ends the game takes its reward, each earlier one the negated value of the next
    (the players alternate), and plies after the end 0.

    >>> import numpy as np
    >>> r = np.array([0, 0, 0, 0, 0, 1, 0, 0, 0.0])  # the sixth move wins
    >>> v, e = np.arange(9) < 6, np.arange(9) == 5
    >>> outcomes(r, v, e).tolist()
    [-1.0, 1.0, -1.0, 1.0, -1.0, 1.0, 0.0, 0.0, 0.0]
    """

    def back(later, ply):
        r, v, e = ply
        z = jnp.where(v, r + jnp.where(e, 0.0, -later), 0.0)
        return z, z

    return jax.lax.scan(back, jnp.float32(0), (reward, valid, ended), reverse=True)[1]


def searcher(env, graphdef, simulations: int, gumbel_scale: float = 1.0):
    """``(params, key, state) -> mctx.PolicyOutput``: Gumbel MuZero's search of one position (a
    pgx state), as a batch of one (mctx draws its noise from one key per call). `gumbel_scale`
    0: no noise, the search's best move (play to win, not to explore)."""

    def recurrent(params, key, action, state):
        mover = state.current_player
        state = jax.vmap(env.step)(state, action)
        logits, value = policy_value(graphdef, params, state.observation, state.legal_action_mask)
        out = mctx.RecurrentFnOutput(
            reward=state.rewards[jnp.arange(action.shape[0]), mover],
            discount=jnp.where(state.terminated, 0.0, -1.0),  # the other player moves next
            prior_logits=logits,
            value=jnp.where(state.terminated, 0.0, value),
        )
        return out, state

    def search(params, key, state):
        root = jax.tree.map(lambda x: x[None], state)
        logits, value = policy_value(graphdef, params, root.observation, root.legal_action_mask)
        return mctx.gumbel_muzero_policy(
            params, key, mctx.RootFnOutput(prior_logits=logits, value=value, embedding=root),
            recurrent, simulations, invalid_actions=~root.legal_action_mask,
            gumbel_scale=gumbel_scale,
        )  # fmt: skip

    search.recurrent = recurrent  # a batch of positions' step in the tree (mctx's recurrent_fn)
    return search


def play(env, graphdef, simulations: int, plies: int, parallel=None, opening: int = 0):
    """``(params, key) -> Samples`` of one game played to the end (or `plies` moves).
    `parallel`: root parallelism's ``(members, agree)`` (`selfplay`), else one search per move.
    The first `opening` moves are drawn uniformly among the legal ones (the search still gives
    their policy targets): self-play then meets the positions after every opening, not only
    after those its network prefers."""
    search = searcher(env, graphdef, simulations)

    def choose(params, key, state):
        if parallel is None:
            chosen = search(params, key, state)
            return chosen.action[0], chosen.action_weights[0]
        members, agree = parallel
        chosen = jax.lax.map(lambda m: search(params, jax.random.fold_in(key, m), state),
                             members)  # fmt: skip
        return agree(chosen.action[:, 0], chosen.action_weights[:, 0])

    def one_game(params, key):
        start, moves = jax.random.split(key)

        def ply(state, t):
            key = jax.random.fold_in(moves, t)
            action, policy = choose(params, key, state)
            if opening:
                legal = jnp.where(state.legal_action_mask, 0.0, jnp.finfo(jnp.float32).min)
                drawn = jax.random.categorical(jax.random.fold_in(key, OPENING), legal)
                action = jnp.where(t < opening, drawn, action)
            after = env.step(state, action)  # nothing happens once the game is over
            record = (
                state.observation,
                policy,
                after.rewards[state.current_player],
                ~state.terminated,
                after.terminated,
            )
            return after, record

        _, (obs, policy, reward, valid, ended) = jax.lax.scan(ply, env.init(start),
                                                              jnp.arange(plies))  # fmt: skip
        return Samples(obs, policy, outcomes(reward, valid, ended & valid), valid)

    return one_game


def vote(actions, policies):
    """Root parallelism's move from K searches of one position: the move most of them chose
    (ties: the larger summed policy), and their mean improved policy as the target.

    >>> import numpy as np
    >>> a, w = vote(np.array([2, 0, 2]), np.eye(3)[[2, 0, 2]] * 0.5 + 0.5 / 3)
    >>> int(a), np.round(np.asarray(w), 3).tolist()
    (2, [0.333, 0.167, 0.5])
    """
    k, moves = policies.shape
    votes = jax.nn.one_hot(actions, moves).sum(0)
    summed = policies.sum(0)
    return jnp.argmax(votes * (k + 1) + summed), summed / k  # votes first: summed <= k


def selfplay(env, graphdef, mesh, seed: int, simulations: int, plies: int, together: int = 1,
             root: int = 1, opening: int = 0):  # fmt: skip
    """``(params, iteration, games) -> Samples``: the games whose global indices `games` holds,
    split over the mesh's batch axes, each searched on its own device (jitted).

    A device plays its games `together` at a time (`jax.lax.map`): the network then always sees
    batches of `together` positions, whatever the mesh, and XLA's products round alike (on the
    CPU, a product over 4 rows and one over 1 row differ in their last bits, which would change a
    search). Each device's number of games must be a multiple of `together`.

    `root` > 1: root parallelism. Each move is searched `root` times with different keys (member
    m folds m into the move's key) and decided by their `vote`. The B batch devices form groups of
    d = gcd(B, root) devices that play the same games, each searching root / d of the members in
    turn; one all-gather per move brings every member's choice to its group, summed in member
    order, so the games are the same on any mesh. With `root` 1 it is the plain search, with no
    collective."""
    axes = tuple(a for a in RULES["batch"] if mesh.shape[a] > 1)
    devices = math.prod(mesh.shape[a] for a in axes)
    share = math.gcd(devices, root)  # devices that play the same games
    groups, per_device = devices // share, root // share

    def local(params, iteration, indices):
        me = jax.lax.axis_index(axes) if axes else 0
        group, part = me // share, me % share
        n = indices.shape[0] // groups
        mine = jax.lax.dynamic_slice_in_dim(indices, group * n, n)
        members = part * per_device + jnp.arange(per_device)

        def agree(actions, policies):  # this device's members -> all of the group's
            both = jnp.concatenate([actions[:, None].astype(policies.dtype), policies], -1)
            every = jax.lax.all_gather(both, axes) if axes else both[None]
            ours = every.reshape(groups, root, -1)[group]
            return vote(ours[:, 0].astype(jnp.int32), ours[:, 1:])

        one_game = play(env, graphdef, simulations, plies,
                        None if root == 1 else (members, agree), opening)  # fmt: skip
        base = jax.random.fold_in(stream(seed, SELFPLAY), iteration)
        keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(mine)
        return jax.lax.map(lambda k: one_game(params, k), keys, batch_size=together)

    # check_vma=False: mctx's while_loop starts its carry from constants the same on every
    # device and ends it with this device's values, which the check refuses.
    out = PartitionSpec(axes or None)
    sharded = jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec(),) * 3, out_specs=out,
                            check_vma=False)  # fmt: skip

    def games(params, iteration, indices):  # the first device of each group gives its games
        played = sharded(params, iteration, indices)
        return jax.tree.map(lambda x: x.reshape(groups, share, -1, *x.shape[1:])[:, 0]
                            .reshape(-1, *x.shape[1:]), played)  # fmt: skip

    return jax.jit(games)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Replay:
    """The last positions self-play gave, a ring of `size` entries (in the train state)."""

    observation: jax.Array  # [size, *observation shape]
    policy: jax.Array  # [size, actions]
    value: jax.Array  # [size]
    filled: jax.Array  # [size] bool: an entry holds a position
    position: jax.Array  # int32: where the next position goes

    @classmethod
    def empty(cls, size: int, observation, actions: int) -> "Replay":
        """`observation`: one position's shape and dtype (``jax.ShapeDtypeStruct``)."""
        return cls(jnp.zeros((size, *observation.shape), observation.dtype),
                   jnp.zeros((size, actions), jnp.float32), jnp.zeros(size, jnp.float32),
                   jnp.zeros(size, bool), jnp.int32(0))  # fmt: skip

    def remember(self, samples: Samples) -> "Replay":
        """This ring with the positions of `samples` written on, game by game (in the order of
        their global indices), ply by ply; only the last `size` when there are more."""
        size = self.filled.shape[0]
        valid = samples.valid.reshape(-1)
        rank = jnp.cumsum(valid) - 1  # a position's place among this iteration's
        count = rank[-1] + 1
        keep = valid & (rank >= count - size)
        slot = jnp.where(keep, (self.position + rank) % size, size)  # size: dropped

        def put(ring, new):
            new = new.reshape(-1, *ring.shape[1:]).astype(ring.dtype)
            return ring.at[slot].set(new, mode="drop")

        return Replay(put(self.observation, samples.observation),
                      put(self.policy, samples.policy), put(self.value, samples.value),
                      self.filled.at[slot].set(True, mode="drop"),
                      (self.position + count) % size)  # fmt: skip

    def sample(self, key, batch: int) -> dict:
        """`batch` positions drawn uniformly (with replacement) from the filled entries."""
        chosen = jax.random.choice(key, self.filled.shape[0], (batch,),
                                   p=self.filled / self.filled.sum())  # fmt: skip
        return {"observation": self.observation[chosen], "policy": self.policy[chosen],
                "value": self.value[chosen]}  # fmt: skip


def loss(model, batch: dict):
    """AlphaZero's loss on positions: cross-entropy of the network's policy against the
    search's, plus the squared error of its value against the game's outcome. Returns
    ``(loss, {"policy_loss", "value_loss"})``. In training mode: a ResNet's BatchNorm
    normalises by the positions' statistics and updates its running ones, which search uses."""
    out = model(batch["observation"].astype(jnp.float32), train=True)  # no keys: no dropout
    policy = jnp.mean(optax.softmax_cross_entropy(out[..., :-1], batch["policy"]))
    value = jnp.mean(jnp.square(jnp.tanh(out[..., -1]) - batch["value"]))
    return policy + value, {"policy_loss": policy, "value_loss": value}


# Players: ``(params, key, state) -> logits`` over the moves of a batch of positions (pgx
# states); `params` are the network's (the others ignore them), an argument of the compiled
# match rather than a constant in it, so one program serves every evaluation of a run. A match
# of two networks passes both, each player taking its own.


def random_player(params, key, state):
    """Every legal move alike."""
    return jnp.where(state.legal_action_mask, 0.0, jnp.finfo(jnp.float32).min)


def network_player(graphdef):
    """The network's policy without search: its most likely legal move."""

    def player(params, key, state):
        logits, _ = policy_value(graphdef, params, state.observation, state.legal_action_mask)
        return jnp.where(logits == logits.max(-1, keepdims=True), 0.0, jnp.finfo(jnp.float32).min)

    return player


_LINES = ((0, 1, 2), (3, 4, 5), (6, 7, 8), (0, 3, 6), (1, 4, 7), (2, 5, 8), (0, 4, 8), (2, 4, 6))


@functools.cache
def tic_tac_toe_values() -> np.ndarray:
    """Every tic-tac-toe move's value under perfect play, for the player making it: row
    ``sum(cell_i * 3**i)`` of a position (a cell 0 empty, 1 the mover's, 2 the opponent's; the
    cells of pgx's observation, row by row), column the move; -2 where the move is illegal or the
    game is over. Exact minimax over every position (a fraction of a second).

    >>> values = tic_tac_toe_values()
    >>> values[0].tolist()  # the empty board: every first move draws
    [0, 0, 0, 0, 0, 0, 0, 0, 0]
    >>> values[1 + 3 + 2 * 27 + 2 * 81].tolist()  # two each in the top and middle rows: win, block
    [-2, -2, 1, -2, -2, 0, -1, -1, -1]
    """

    def won(board, mark):
        return any(all(board[i] == mark for i in line) for line in _LINES)

    def after(board, move):  # the mover marks `move`; then the other player moves
        return tuple((0, 2, 1)[c] for c in board[:move] + (1,) + board[move + 1 :])

    @functools.cache
    def value(board):  # for the player to move
        if won(board, 2):
            return -1
        if 0 not in board:
            return 0
        return max(-value(after(board, m)) for m in range(9) if board[m] == 0)

    table = np.full((3**9, 9), -2, np.int8)
    for board in itertools.product((0, 1, 2), repeat=9):
        if not (won(board, 1) or won(board, 2) or 0 not in board):
            row = sum(c * 3**i for i, c in enumerate(board))
            for m in range(9):
                if board[m] == 0:
                    table[row, m] = -value(after(board, m))
    return table


def search_player(env, graphdef, simulations: int, gumbel_scale: float = 0.0):
    """The network with search (`searcher`), each position searched from its own key: the move
    the search chooses (by default without the exploring noise of self-play)."""
    search = searcher(env, graphdef, simulations, gumbel_scale)

    def player(params, key, state):
        keys = jax.random.split(key, state.current_player.shape[0])
        action = jax.vmap(lambda k, s: search(params, k, s).action[0])(keys, state)
        chosen = jax.nn.one_hot(action, state.legal_action_mask.shape[-1], dtype=bool)
        return jnp.where(chosen, 0.0, jnp.finfo(jnp.float32).min)

    return player


def rollout_value(env, key, state):
    """The outcome of one game played on from `state` (one pgx state) by uniformly random moves,
    for the player to move at `state`: +1, 0 or -1 (0 if the game is already over)."""
    me = state.current_player

    def move(carry):
        state, key, total = carry
        key, draw = jax.random.split(key)
        action = jax.random.categorical(draw, random_player(None, None, state))
        state = env.step(state, action)
        return state, key, total + state.rewards[me]

    over = lambda carry: ~carry[0].terminated  # noqa: E731
    return jax.lax.while_loop(over, move, (state, key, jnp.zeros(())))[2]


def rollout_player(env, simulations: int, exploration: float = 0.5):
    """Pure Monte Carlo tree search: no network, each leaf valued by one random game played to
    the end from it (`rollout_value`), every move alike a priori, no root noise; the most visited
    move, ties drawn at random. The classic baseline that an AlphaZero agent should beat
    (benchmarks/connect_four.py). The descent is mctx's PUCT, against values scaled to [0, 1],
    with ``pb_c_init`` `exploration` times the number of moves: its exploration term's weight
    (``pb_c_init`` times the uniform prior over the legal moves) is `exploration` while every
    move is legal, and grows as the board fills. On tic-tac-toe at 200 simulations, 0.5 lost 1%
    of 200 games to random play, and 1.25 / 9 (mctx's default ``pb_c_init``) 5.5%."""

    def recurrent(params, key, action, state):
        mover = state.current_player
        state = jax.vmap(env.step)(state, action)
        value = jax.vmap(rollout_value, (None, 0, 0))(env, jax.random.split(key, 1), state)
        out = mctx.RecurrentFnOutput(
            reward=state.rewards[jnp.arange(action.shape[0]), mover],
            discount=jnp.where(state.terminated, 0.0, -1.0),  # the other player moves next
            prior_logits=random_player(None, None, state),
            value=value,
        )
        return out, state

    def search(key, state):  # one position, as a batch of one
        root = jax.tree.map(lambda x: x[None], state)
        first, key = jax.random.split(key)
        value = rollout_value(env, first, state)[None]
        out = mctx.muzero_policy(
            None, key,
            mctx.RootFnOutput(prior_logits=random_player(None, None, root), value=value,
                              embedding=root),
            recurrent, simulations, invalid_actions=~root.legal_action_mask,
            dirichlet_fraction=0.0, pb_c_init=exploration * env.num_actions,
        )  # fmt: skip
        visits = out.action_weights[0]
        return jnp.where(visits == visits.max(), 0.0, jnp.finfo(jnp.float32).min)

    def player(params, key, state):
        return jax.vmap(search)(jax.random.split(key, state.current_player.shape[0]), state)

    return player


def perfect_player(params, key, state):
    """Tic-tac-toe's perfect play: any of the best moves (`tic_tac_toe_values`)."""
    cells = state.observation.reshape(*state.observation.shape[:-3], 9, 2).astype(jnp.int32)
    rows = (cells[..., 0] + 2 * cells[..., 1]) @ (3 ** jnp.arange(9))
    values = jnp.asarray(tic_tac_toe_values())[rows].astype(jnp.float32)
    best = values == values.max(-1, keepdims=True)
    return jnp.where(best & state.legal_action_mask, 0.0, jnp.finfo(jnp.float32).min)


def elo(rates: dict, games: int) -> float:
    """The Elo difference that a match's score predicts (a win 1, a draw 1/2), the score kept
    half a game inside 0 and 1 so that a match all won or lost gives a finite estimate.

    >>> round(elo({"win": 0.75, "draw": 0.0, "loss": 0.25}, 100), 1)
    190.8
    >>> elo({"win": 0.0, "draw": 1.0, "loss": 0.0}, 100), round(elo({"win": 1.0, "draw": 0.0}, 100))
    (0.0, 920)
    """
    score = rates["win"] + rates["draw"] / 2
    score = min(max(score, 0.5 / games), 1 - 0.5 / games)
    return 400 * math.log10(score / (1 - score))


def matcher(env, first, second, games: int):
    """``(params, key) -> {"win", "draw", "loss"}``: `games` games of player `first` against
    player `second`, each sampling its moves from its logits, who opens drawn per game; the rates
    are `first`'s. Compiled once, for any `params`."""

    @jax.jit
    def play(params, key):
        start, sides, key = jax.random.split(key, 3)
        state = jax.vmap(env.init)(jax.random.split(start, games))
        first_is = jax.random.bernoulli(sides, 0.5, (games,)).astype(jnp.int32)  # its player id

        def move(carry):
            state, key, score = carry
            key, a, b, draw_a, draw_b = jax.random.split(key, 5)  # a player's own, its move's
            mine = state.current_player == first_is
            ours = jax.random.categorical(draw_a, first(params, a, state))
            theirs = jax.random.categorical(draw_b, second(params, b, state))
            action = jnp.where(mine, ours, theirs)
            state = jax.vmap(env.step)(state, action)
            return state, key, score + state.rewards[jnp.arange(games), first_is]

        done = lambda carry: ~carry[0].terminated.all()  # noqa: E731
        return jax.lax.while_loop(done, move, (state, key, jnp.zeros(games)))[2]

    def rates(params, key) -> dict:
        score = np.asarray(play(params, key).addressable_data(0))  # replicated
        return {"win": float((score > 0).mean()), "draw": float((score == 0).mean()),
                "loss": float((score < 0).mean())}  # fmt: skip

    rates.program = play
    return rates
