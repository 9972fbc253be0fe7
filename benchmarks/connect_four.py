"""Connect Four: an AlphaZero agent trained by ``train.py --game connect_four`` against pure Monte
Carlo tree search with random rollouts (`jaxpar.modes.alphazero.rollout_player`, 1,000
simulations a move), issue #32's goal: at least 90% of 100 games won after about 10 minutes of
training on this machine.

The agent plays with search (`--agent-simulations`, default the run's), its best move as the
run's evaluation plays; who opens is drawn per game. Without ``--workdir`` a run is trained
first, on a 2x2 mesh of 4 emulated CPU devices, with the flags after ``--`` (default `TRAIN`),
and its wall time is reported beside the result.

    python benchmarks/connect_four.py                       # train (TRAIN), then 100 games
    python benchmarks/connect_four.py --workdir runs/c4     # an agent trained before
    python benchmarks/connect_four.py -- --steps 20 --simulations 16
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ["--game", "connect_four", "--mesh", "2x2", "--simulations", "16",
         "--selfplay-games", "256", "--updates-per-iteration", "16", "--batch-size", "256",
         "--steps", "20", "--eval-every", "5", "--eval-examples", "64"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", help="an agent trained before (else one is trained)")
    parser.add_argument("--games", type=int, default=100)
    parser.add_argument("--mcts-simulations", type=int, default=1000)
    parser.add_argument("--agent-simulations", type=int, help="default: the run's")
    parser.add_argument("train", nargs="*", help="train.py's flags (after --)")
    args = parser.parse_args()
    trained = None
    workdir = args.workdir
    if workdir is None:
        workdir = tempfile.mkdtemp(prefix="connect-four-")
        flags = [*TRAIN, *args.train, "--workdir", workdir]
        print("python train.py " + " ".join(flags), flush=True)
        t = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "train.py"), *flags], check=True)
        trained = time.perf_counter() - t

    from jaxpar.modes.alphazero import matcher, rollout_player, search_player
    from jaxpar.tools.play import trained_agent

    step, settings, env, graphdef, params = trained_agent(workdir)
    sims = args.agent_simulations or settings.simulations
    agent = search_player(env, graphdef, sims)
    mcts = rollout_player(env, args.mcts_simulations)
    t = time.perf_counter()
    rates = matcher(env, agent, mcts, args.games)(params, jax.random.key(0))
    line = {
        "game": settings.game,
        "iterations": step,
        "train_s": None if trained is None else round(trained, 1),
        "agent_simulations": sims,
        "mcts_simulations": args.mcts_simulations,
        "games": args.games,
        **{f"agent_{k}_rate": v for k, v in rates.items()},
        "match_s_with_compile": round(time.perf_counter() - t, 1),
        "device": jax.devices()[0].device_kind,
    }
    print(json.dumps(line))


if __name__ == "__main__":
    main()
