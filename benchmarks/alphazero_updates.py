"""Training positions/s of a game's run: jaxpar's updates (`jaxpar.modes.games.AlphaZero.updates`:
``--updates-per-iteration`` updates in one `lax.scan`, each drawing its positions from the replay
ring on the devices) against the training loop of pgx's AlphaZero example (examples/alphazero/
train.py in sotetsuk/pgx: the iteration's samples shuffled on the host, then one jitted update
per minibatch, dispatched from Python) at equal work, in one process.

Both run `--updates` updates of `--batch-size` positions of `--game` with Adam on the same
network (the game's default: the MLP on tic-tac-toe, ResNet-8 else) from the same weights; the
positions are random boards with random targets (the time of an update does not depend on
them). The baseline runs on one device, jaxpar's on a ``data=N`` mesh for each N of
`--devices`. Contenders alternate within each round; the median of `--rounds` is reported, and
each one's ratio to the baseline.

    python benchmarks/alphazero_updates.py                     # tic-tac-toe, 64 x 512 positions
    python benchmarks/alphazero_updates.py --game connect_four --updates 16 --devices 1,2
"""

import argparse
from functools import partial

import jax

jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402
from selfplay import BASE, race  # noqa: E402  benchmarks/selfplay.py, beside this script

from jaxpar.core.mesh import make_mesh, parse_mesh  # noqa: E402
from jaxpar.core.step import create_state  # noqa: E402
from jaxpar.models import MODELS  # noqa: E402
from jaxpar.modes.alphazero import Replay, game, loss  # noqa: E402
from jaxpar.modes.games import AlphaZero, recipe  # noqa: E402
from jaxpar.run.config import Config  # noqa: E402


def positions(env, n: int, seed: int = 0) -> dict:
    """`n` random positions with random targets, as numpy arrays."""
    rng = np.random.default_rng(seed)
    shape, actions = env.observation_shape, env.num_actions
    return {
        "observation": rng.integers(0, 2, (n, *shape)).astype(bool),
        "policy": rng.dirichlet(np.ones(actions), n).astype(np.float32),
        "value": rng.choice([-1.0, 0.0, 1.0], n).astype(np.float32),
    }


def pgx_loop(graphdef, batch_size: int, updates: int):
    """pgx's example: shuffle on the host, then one dispatch per minibatch."""

    @jax.jit  # no donation: every round starts from the same weights, as jaxpar's
    def train(state, minibatch):
        model, optimizer = nnx.merge(graphdef, state)
        (_, parts), grads = nnx.value_and_grad(loss, has_aux=True)(model, minibatch)
        optimizer.update(model, grads)
        return nnx.to_pure_dict(nnx.state((model, optimizer))), parts

    def run(state, samples, seed):
        order = np.random.default_rng(seed).permutation(len(samples["value"]))
        shuffled = {k: v[order].reshape(updates, batch_size, *v.shape[1:])
                    for k, v in samples.items()}  # fmt: skip
        for i in range(updates):
            state, parts = train(state, {k: v[i] for k, v in shuffled.items()})
        return state, parts

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--game", default="tic_tac_toe")
    parser.add_argument("--updates", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--devices", default="1,2,8", help="data=N meshes for jaxpar's")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    env = game(args.game)
    model = recipe(args.game)["model"]
    model_fn = partial(MODELS[model], env.observation_shape, env.num_actions + 1)
    tx = optax.adam(1e-3)
    n = args.updates * args.batch_size
    samples = positions(env, n)
    one = make_mesh(parse_mesh("data=1", jax.device_count()))
    graphdef, start, _, _ = create_state(model_fn, tx, one, 0)
    base = pgx_loop(graphdef, args.batch_size, args.updates)
    contenders = {BASE: (base, lambda r: (start, samples, r))}
    for d in map(int, args.devices.split(",")):
        mesh = make_mesh(parse_mesh(f"data={d}", jax.device_count()))
        cfg = Config.of(game=args.game, batch_size=args.batch_size, model=model,
                        updates_per_iteration=args.updates, replay_size=n)  # fmt: skip
        mode = AlphaZero(cfg.game, 0)
        mode.check(cfg, mesh)
        graphdef, state, _, _ = create_state(model_fn, tx, mesh, 0)
        ring = Replay(samples["observation"], samples["policy"], samples["value"],
                      np.ones(n, bool), np.int32(0))  # fmt: skip
        ring = jax.device_put(ring, NamedSharding(mesh, PartitionSpec()))  # whole, as in a run
        updates = jax.jit(partial(mode.updates, graphdef))
        contenders[f"jaxpar, data={d}, one scan"] = (updates, lambda i, s=state, r=ring: (s, r, i))
    times = race(contenders, args.rounds)
    print(f"\n{args.game} ({model}), {args.updates} updates of {args.batch_size} positions, "
          f"{args.rounds} rounds (median)")  # fmt: skip
    for name, t in times.items():
        print(f"{name:40s} {n / t:10.0f} positions/s  {times[BASE] / t:5.2f}x")


if __name__ == "__main__":
    main()
