"""Self-play games/s: jaxpar's (`jaxpar.modes.alphazero.selfplay`) against the loop of pgx's
AlphaZero example (examples/alphazero/train.py in sotetsuk/pgx) at equal work, in one process.

Both play `--games` games of `--game` to the end with `--simulations` of Gumbel MuZero per move
and the same network (jaxpar's MLP), from fresh weights. The baseline follows pgx's example loop:
one batched search of every game per move (`mctx.gumbel_muzero_policy` over a batch of all the
games, one key for all), under a `lax.scan` over the moves, on one device. jaxpar searches each
game from its own key (so a game is the same on any mesh), `--together` games at a time per
device, split over the batch axes of a `data=N` mesh for each N of `--devices`. Contenders
alternate within each round; the median of `--rounds` is reported, and each one's ratio to the
baseline.

    python benchmarks/selfplay.py                         # tic-tac-toe, 1,024 games, 32 sims
    python benchmarks/selfplay.py --game connect_four --games 256 --devices 1
"""

import argparse
import statistics
import time

import jax

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import mctx  # noqa: E402
from flax import nnx  # noqa: E402

from jaxpar.core.mesh import make_mesh, parse_mesh  # noqa: E402
from jaxpar.models import MLP  # noqa: E402
from jaxpar.modes.alphazero import game, policy_value, searcher, selfplay  # noqa: E402
from jaxpar.modes.games import PLIES  # noqa: E402


def batched_selfplay(env, graphdef, simulations: int, plies: int, games: int):
    """pgx's example loop: every game's move in one batched search, one key per move."""
    recurrent = searcher(env, graphdef, simulations).recurrent

    @jax.jit
    def run(params, key):
        start, moves = jax.random.split(key)
        state = jax.vmap(env.init)(jax.random.split(start, games))

        def ply(state, key):
            logits, value = policy_value(graphdef, params, state.observation,
                                         state.legal_action_mask)  # fmt: skip
            out = mctx.gumbel_muzero_policy(
                params, key, mctx.RootFnOutput(prior_logits=logits, value=value, embedding=state),
                recurrent, simulations, invalid_actions=~state.legal_action_mask,
            )  # fmt: skip
            return jax.vmap(env.step)(state, out.action), (state.observation, out.action_weights)

        return jax.lax.scan(ply, state, jax.random.split(moves, plies))[1]

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--game", default="tic_tac_toe")
    parser.add_argument("--games", type=int, default=1024)
    parser.add_argument("--simulations", type=int, default=32)
    parser.add_argument("--devices", default="1,2,8", help="data=N meshes for jaxpar's")
    parser.add_argument("--together", default="8,64", help="jaxpar's games per search batch")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    env = game(args.game)
    plies = PLIES[args.game]
    net = MLP(env.observation_shape, env.num_actions + 1, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(net)
    baseline = batched_selfplay(env, graphdef, args.simulations, plies, args.games)
    contenders = {BASE: (baseline, lambda r: (params, jax.random.key(1)))}
    indices = jnp.arange(args.games)
    for n in map(int, args.devices.split(",")):
        mesh = make_mesh(parse_mesh(f"data={n}", jax.device_count()))
        for together in map(int, args.together.split(",")):
            if args.games % (n * together):
                continue
            run = selfplay(env, graphdef, mesh, 0, args.simulations, plies, together)
            contenders[f"jaxpar, data={n}, {together} together"] = (
                run, lambda r: (params, 0, indices))  # fmt: skip
    times = race(contenders, args.rounds)
    print(f"\n{args.game}, {args.games} games, {args.simulations} simulations per move, "
          f"{args.rounds} rounds (median)")  # fmt: skip
    for name, t in times.items():
        print(f"{name:40s} {args.games / t:9.1f} games/s  {times[BASE] / t:5.2f}x")


BASE = "pgx example loop (1 device)"


def race(contenders: dict, rounds: int) -> dict:
    """``{name: median seconds}`` of ``contenders`` (``{name: (run, inputs)}``: ``run(*inputs(
    r))`` for round r, 0 the compiling one, off the clock), alternating within each round."""
    for name, (run, inputs) in contenders.items():
        t = time.perf_counter()
        jax.block_until_ready(run(*inputs(0)))
        print(f"compiled and ran once: {name}, {time.perf_counter() - t:.1f} s", flush=True)
    times = {name: [] for name in contenders}
    for r in range(rounds):
        for name, (run, inputs) in contenders.items():
            t = time.perf_counter()
            jax.block_until_ready(run(*inputs(r + 1)))
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


if __name__ == "__main__":
    main()
