"""``--game``: AlphaZero as a mode of the one loop (issue #32), on `jaxpar.modes.alphazero`'s
self-play, replay ring, loss and players.

One step of the loop is one iteration: ``--selfplay-games`` games of self-play with the current
network (each searched by Gumbel MuZero with ``--simulations`` per move, split over the batch
axes with no traffic between devices inside the search), their positions written into the replay
ring, then ``--updates-per-iteration`` optimizer updates, each on ``--batch-size`` positions drawn
from the ring and split over the batch axes as any batch is. Everything random comes from the
seed, the iteration and a game's global index, so the same seed trains the same network on any
mesh and across a resume: the ring, its write position and the optimizer's step count (the
iteration is its updates divided by ``--updates-per-iteration``) are in the checkpoint.

Evaluation plays the network with search against a uniformly random player, for tic-tac-toe
against perfect play, and against the network of the previous evaluation (the first evaluation's:
the initial network), kept in the state (item 6, "earlier") and so in the checkpoint: an Elo
difference from the score of that match. ``--eval-examples`` is the number of games of each match.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxpar.core.errors import UserError
from jaxpar.core.sharding import RULES, batch_sharding
from jaxpar.data import Dataset
from jaxpar.modes.alphazero import (
    EVALUATION,
    REPLAY,
    Replay,
    elo,
    game,
    loss,
    matcher,
    perfect_player,
    random_player,
    search_player,
    selfplay,
    stream,
)
from jaxpar.modes.mode import Mode

# The games a run may name, each with the most moves a game of it is played for: two players
# alternating, perfect information. A game still going after them counts as a draw.
PLIES = {
    "tic_tac_toe": 9,
    "connect_four": 42,
    "othello": 128,  # 60 discs, and passes
    "hex": 122,  # 121 cells and the swap
    "go_9x9": 162,  # pgx ends go after twice the board's points
    "animal_shogi": 256,
    "gardner_chess": 256,
}
GAMES = tuple(PLIES)
EVAL_GAMES = 256  # games of each evaluation match unless --eval-examples says otherwise
EPOCH = 10  # iterations per "epoch": evaluation's default period
# Defaults of the training flags for a game where the images' do not suit (flags given win):
# 100 iterations of Adam with a cosine decay, updates on 512 positions; the network an MLP on
# tic-tac-toe's 9 cells, a ResNet of 3 basic blocks (ResNet-8) on the larger boards.
RECIPE = {"optimizer": "adam", "lr": 1e-3, "schedule": "cosine", "batch_size": 512, "epochs": 10,
          "model": "mlp on tic_tac_toe, else resnet8"}  # fmt: skip


def recipe(name: str) -> dict:
    """`RECIPE` for the game `name`: its network named."""
    return {**RECIPE, "model": "mlp" if name == "tic_tac_toe" else "resnet8"}


def search_batch(games: int, most: int) -> int:
    """How many games a device searches together: the greatest common divisor of `games` and
    `most` (``--search-batch``; powers of 2 suit: gcd(1024, 100) is 4), the same on every mesh,
    so the network's products round alike (`jaxpar.modes.alphazero.selfplay`). Performance is
    decided here: a device's searches run one batch after the other, and on one CPU device 8
    games together played half as many games a second as 64 (benchmarks/selfplay.py).

    >>> search_batch(1024, 64), search_batch(12, 64), search_batch(24, 16), search_batch(5, 64)
    (64, 4, 8, 1)
    """
    return math.gcd(games, most)


class AlphaZero(Mode):
    """AlphaZero's iterations (module docstring); `check` keeps the mesh the search runs on."""

    unit = "iteration"
    period = 0
    sync = None
    rate = "selfplay_games_per_s"
    eval_key = "eval_vs_random_win_rate"

    def __init__(self, settings, seed: int):
        self.settings, self.seed = settings, seed
        self.env = game(settings.game)
        self.plies = PLIES[settings.game]
        self.observation = jax.eval_shape(self.env.init, jax.random.key(0)).observation
        self.mesh = self.batch_size = None  # set by `check`

    def dataset(self) -> Dataset:
        """A stand-in for the data a run of images reads: the network's input shape (a
        position) and outputs (each move's logit, then the value); no examples."""
        shape, dtype = self.observation.shape, np.dtype(self.observation.dtype)
        empty = np.zeros((0, *shape), dtype)
        none = np.zeros(0, np.int32)
        return Dataset(f"game:{self.settings.game}", empty, none, empty, none,
                       self.env.num_actions + 1)  # fmt: skip

    def check(self, cfg, mesh) -> None:
        super().check(cfg, mesh)  # --batch-size positions split over the batch shards
        ways = math.prod(mesh.shape[a] for a in RULES["batch"])
        games, root = self.settings.selfplay_games, self.settings.root_parallel
        groups = ways // math.gcd(ways, root)  # of devices playing the same games
        most = self.settings.search_batch
        together = search_batch(games, most)
        if games % (groups * together):
            shared = f" ({ways} batch devices, --root-parallel {root})" if root > 1 else ""
            raise UserError(
                f"--selfplay-games {games} does not split over the mesh's {groups} groups of "
                f"devices{shared} in searches of {together} games (gcd of it and --search-batch "
                f"{most}): use a multiple of {groups * together}, or a --search-batch that "
                f"divides {games // groups}"
            )
        self.mesh, self.batch_size = mesh, cfg.optimization.batch_size
        self.every = cfg.metrics.eval_every or EPOCH  # iterations between evaluations

    def steps_per_epoch(self, ds, batch_size: int) -> int:
        return EPOCH

    def optimizer(self, cfg, total: int) -> optax.GradientTransformation:
        return super().optimizer(cfg, total * self.settings.updates_per_iteration)

    def batch_ndims(self, image_ndim: int) -> dict[str, int]:
        return {"games": 1}

    def games(self, mesh) -> jax.Array:
        """Every game's global index, each device holding its own (an iteration's batch)."""
        every = np.arange(self.settings.selfplay_games, dtype=np.int32)
        return jax.make_array_from_callback(every.shape, batch_sharding(mesh), every.__getitem__)

    def batches(self, ds, batch_size: int, seed: int, plan, mesh, workers: int = 0):
        games = {"games": self.games(mesh)}
        for _ in plan:
            yield games

    def abstract_batch(self, ds, batch_size: int, mesh) -> dict:
        n = self.settings.selfplay_games
        return {"games": jax.ShapeDtypeStruct((n,), jnp.int32, sharding=batch_sharding(mesh))}

    def examples_per_step(self, batch_size: int) -> float:
        return self.settings.selfplay_games

    def stamp(self, step: int) -> dict:
        return {"iteration": step}  # iterations done (the step's self-play was number step - 1)

    def replay(self) -> Replay:
        return Replay.empty(self.settings.replay_size, self.observation, self.env.num_actions)

    def layout(self, abstract, shardings, mesh, params):
        """The state with the replay ring (item 5), whole on every device (updates draw any of
        its positions), and the earlier network (item 6), laid out as the network."""
        ring = dataclasses.asdict(jax.eval_shape(self.replay))
        whole = NamedSharding(mesh, PartitionSpec())
        return ({**abstract, 5: ring, 6: abstract[0]},
                {**shardings, 5: jax.tree.map(lambda _: whole, ring), 6: shardings[0]})  # fmt: skip

    def init(self, state):
        return {**state, 5: dataclasses.asdict(self.replay()), 6: state[0]}

    def step(self, state, batch, *, graphdef, **_):
        """One iteration: self-play, the ring, then the updates."""
        s = self.settings
        model, optimizer = nnx.merge(graphdef, {0: state[0], 1: state[1]})
        network, params = nnx.split(model)
        iteration = optimizer.step[...] // s.updates_per_iteration
        # The network an evaluation plays against: the one of the iteration after the previous.
        take = iteration % self.every == 0
        earlier = jax.tree.map(lambda e, now: jnp.where(take, now, e), state[6], state[0])
        together = search_batch(s.selfplay_games, s.search_batch)
        play = selfplay(self.env, network, self.mesh, self.seed, s.simulations, self.plies,
                        together, s.root_parallel, s.opening_moves)  # fmt: skip
        samples = play(params, iteration, batch["games"])
        ring = Replay(**state[5]).remember(samples)
        trained, metrics = self.updates(graphdef, {0: state[0], 1: state[1]}, ring, iteration)
        metrics["positions"] = jnp.sum(samples.valid)
        metrics["replay_positions"] = jnp.sum(ring.filled)
        return {**state, **trained, 5: dataclasses.asdict(ring), 6: earlier}, metrics

    def updates(self, graphdef, state, ring: Replay, iteration):
        """``--updates-per-iteration`` optimizer updates of `state` (``{0: model, 1:
        optimizer}``) in one `lax.scan`, each on ``--batch-size`` positions drawn from `ring`;
        returns the state and the updates' mean metrics."""
        keys = jax.random.split(jax.random.fold_in(stream(self.seed, REPLAY), iteration),
                                self.settings.updates_per_iteration)  # fmt: skip

        def update(carry, key):
            model, optimizer = nnx.merge(graphdef, carry)
            positions = jax.tree.map(
                lambda x: jax.lax.with_sharding_constraint(x, batch_sharding(self.mesh, x.ndim)),
                ring.sample(key, self.batch_size),
            )  # an update's positions split over the batch axes, as any batch
            (total, parts), grads = nnx.value_and_grad(loss, has_aux=True)(model, positions)
            optimizer.update(model, grads)
            metrics = {"train_loss": total, "grad_norm": optax.tree.norm(grads), **parts}
            return nnx.to_pure_dict(nnx.state((model, optimizer))), metrics

        trained, metrics = jax.lax.scan(update, state, keys)
        return trained, {k: jnp.mean(v) for k, v in metrics.items()}

    def evaluator(self, network, mesh, games: int | None):
        """``(state, step) -> the evaluation line``: the network with search against each
        opponent, in `games` games (`EVAL_GAMES` if None), with keys from the seed and the step
        and the networks whole on every device: the same line on any mesh. Against the earlier
        network both sides draw their moves as self-play does (with Gumbel noise): greedy search
        against greedy search would play one game per side."""
        games = EVAL_GAMES if games is None else games
        sims = self.settings.simulations
        best, explore = (search_player(self.env, network, sims, noise) for noise in (0.0, 1.0))
        agent = lambda nets, key, state: best(nets["now"], key, state)  # noqa: E731
        opponents = {"random": (agent, random_player)}
        if self.settings.game == "tic_tac_toe":
            opponents["perfect"] = (agent, perfect_player)
        opponents["earlier"] = (
            lambda nets, key, state: explore(nets["now"], key, state),
            lambda nets, key, state: explore(nets["earlier"], key, state),
        )
        matches = {name: matcher(self.env, *players, games)
                   for name, players in opponents.items()}  # fmt: skip
        whole = NamedSharding(mesh, PartitionSpec())

        def evaluate(state, step: int) -> dict:
            nets = jax.device_put({"now": state[0], "earlier": state[6]}, whole)
            key = jax.random.fold_in(stream(self.seed, EVALUATION), step)
            line = {}
            for i, (name, match) in enumerate(matches.items()):
                rates = match(nets, jax.random.fold_in(key, i))
                line.update({f"eval_vs_{name}_{k}_rate": v for k, v in rates.items()})
                if name == "earlier":
                    line["eval_vs_earlier_elo"] = elo(rates, games)
            return line

        return evaluate

    def shown(self, line: dict) -> dict:
        shown = ("eval_vs_random_win_rate", "eval_vs_perfect_draw_rate", "eval_vs_earlier_elo")
        return {k: line[k] for k in shown if k in line}

    def summary(self, line: dict) -> str:
        rates = [f"against {who} play {line[f'eval_vs_{who}_win_rate']:.1%} won, "
                 f"{line[f'eval_vs_{who}_draw_rate']:.1%} drawn, "
                 f"{line[f'eval_vs_{who}_loss_rate']:.1%} lost"
                 for who in ("random", "perfect") if f"eval_vs_{who}_win_rate" in line]  # fmt: skip
        gain = line.get("eval_vs_earlier_elo")
        gain = "" if gain is None else f"; {gain:+.0f} Elo over the previous evaluation's network"
        return f"final play with search {'; '.join(rates)}{gain} at step {line['step']}"
