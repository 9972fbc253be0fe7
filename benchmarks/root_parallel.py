"""What root parallelism buys: K searches of S simulations put to a vote (``--root-parallel K``)
against one search of S and one of K x S, in playing strength and time per move.

A tic-tac-toe network is trained for `--iterations` (few: a weak network, where the search has
work to do), then each player plays `--games` games against perfect play and against random
play, who opens drawn per game. Every search draws Gumbel noise at `--gumbel-scale` (1, as in
self-play: without noise the K searches of a position are one search K times). The K searches
run one after the other on one device here: the strength does not depend on where they run,
and on K devices they take the time of one, plus the vote's all-gather of K x (moves + 1)
numbers. Timed as the time per position of a move in one batch of `--games` positions.

    python benchmarks/root_parallel.py                    # K = 4, S = 8
    python benchmarks/root_parallel.py --k 2 --simulations 16 --iterations 10
"""

import argparse
import tempfile
import time

import jax

jax.config.update("jax_num_cpu_devices", 4)

import jax.numpy as jnp  # noqa: E402

import jaxpar  # noqa: E402
from jaxpar.core.mesh import make_mesh, parse_mesh  # noqa: E402
from jaxpar.modes.alphazero import (  # noqa: E402
    game,
    matcher,
    perfect_player,
    random_player,
    search_player,
    searcher,
    vote,
)
from jaxpar.run.config import Config  # noqa: E402
from jaxpar.tools.predict import latest, restored  # noqa: E402


def root_player(env, graphdef, simulations: int, k: int, gumbel_scale: float):
    """K searches of each position from K keys (as `selfplay`'s members), then their vote."""
    search = searcher(env, graphdef, simulations, gumbel_scale)

    def one(params, key, state):
        members = jax.lax.map(lambda m: search(params, jax.random.fold_in(key, m), state),
                              jnp.arange(k))  # fmt: skip
        return vote(members.action[:, 0], members.action_weights[:, 0])[0]

    def player(params, key, state):
        keys = jax.random.split(key, state.current_player.shape[0])
        action = jax.vmap(lambda key, s: one(params, key, s))(keys, state)
        chosen = jax.nn.one_hot(action, state.legal_action_mask.shape[-1], dtype=bool)
        return jnp.where(chosen, 0.0, jnp.finfo(jnp.float32).min)

    return player


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--simulations", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--games", type=int, default=512)
    parser.add_argument("--gumbel-scale", type=float, default=1.0)
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="root-parallel-")
    jaxpar.train(Config.of(game="tic_tac_toe", mesh="2x2", steps=args.iterations, optimizer="adam",
                           lr=1e-3, batch_size=512, eval_examples=0, workdir=workdir))  # fmt: skip
    step, manifest = latest(workdir)
    graphdef, params, _ = restored(workdir, step, manifest, make_mesh(parse_mesh("1", 1)))
    env = game("tic_tac_toe")
    k, s, g = args.k, args.simulations, args.gumbel_scale
    players = {
        f"one search of {s}": search_player(env, graphdef, s, g),
        f"{k} searches of {s}, a vote": root_player(env, graphdef, s, k, g),
        f"one search of {k * s}": search_player(env, graphdef, k * s, g),
    }
    state = jax.vmap(env.init)(jax.random.split(jax.random.key(0), args.games))
    print(f"tic-tac-toe network after {args.iterations} iterations; {args.games} games each")
    print(f"{'player':28s} {'vs perfect: draws':>18s} {'vs random: wins/draws/losses':>30s} "
          f"{'ms per position, 1 device':>26s}")  # fmt: skip
    for name, player in players.items():
        rates = {}
        for who, other in (("perfect", perfect_player), ("random", random_player)):
            rates[who] = matcher(env, player, other, args.games)(params, jax.random.key(1))
        move = jax.jit(player)
        jax.block_until_ready(move(params, jax.random.key(2), state))  # compiled
        t = time.perf_counter()
        for i in range(5):
            jax.block_until_ready(move(params, jax.random.key(3 + i), state))
        ms = (time.perf_counter() - t) / 5 * 1e3 / args.games
        r = rates["random"]
        print(f"{name:28s} {rates['perfect']['draw']:18.1%} "
              f"{r['win']:10.1%}/{r['draw']:.1%}/{r['loss']:.1%} {ms:26.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
