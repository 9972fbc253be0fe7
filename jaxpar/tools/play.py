"""Play a trained AlphaZero agent: ``python -m jaxpar.play WORKDIR [--simulations S]
[--human-first] [--seed N] [--plain]``.

The agent is the network of the workdir's latest checkpoint (a run of ``train.py --game``) with
Gumbel MuZero's search, ``--simulations`` per move (default: the run's), playing the search's
best move as the run's evaluation does (no exploring noise). In a terminal the board
is drawn as text and the legal moves listed; a move that is not one is answered with one line and
a new prompt. With ``--plain``, for scripts: the agent's moves are printed as lines ``move K``
(K the pgx action index), the opponent's are read one integer per line from standard input, and
the game ends with a line ``result win``, ``result draw`` or ``result loss``, from the agent's
side; a move that is not legal exits 2 with one line.
"""

import argparse
import re
import sys
from pathlib import Path

import numpy as np

from jaxpar.core.errors import UserError


def board(observation: np.ndarray, agent_moves: bool) -> str:
    """The board as text when the game's observation is two planes (the mover's stones, the
    other's): the agent's ``X``, the opponent's ``O``; an empty cell ``.``, or on a board of at
    most 9 cells (tic-tac-toe) the number of the move that takes it; else ''."""
    if observation.ndim != 3 or observation.shape[-1] != 2:
        return ""
    mine, theirs = (0, 1) if agent_moves else (1, 0)
    rows = []
    for r, row in enumerate(observation):
        cells = []
        for c, cell in enumerate(row):
            index = r * observation.shape[1] + c
            mark = "X" if cell[mine] else "O" if cell[theirs] else "."
            cells.append(mark if mark != "." or observation.shape[0] * observation.shape[1] > 9
                         else str(index))  # fmt: skip
        rows.append(" ".join(cells))
    return "\n".join(rows)


def opponent_move(read, legal: np.ndarray, plain: bool, write) -> int:
    """The opponent's next move: in `plain` mode one integer line, refused (`UserError`) unless
    legal; in a terminal asked again until it is."""
    moves = " ".join(str(a) for a in np.flatnonzero(legal))
    while True:
        if not plain:
            write(f"your move ({moves}): ")
        line = read()
        if not line:
            raise UserError("standard input ended before the game did")
        text = line.strip()
        if re.fullmatch(r"[0-9]+", text) and int(text) < len(legal) and legal[int(text)]:
            return int(text)
        problem = f"{text!r} is not a legal move here; legal moves: {moves}"
        if plain:
            raise UserError(problem)
        write(problem + "\n")


def trained_agent(workdir) -> tuple:
    """``(step, settings, env, graphdef, params)``: the agent of `workdir`'s latest checkpoint,
    its run's ``[game]`` settings and pgx environment, the network on one device; a workdir of
    images, or of a board the game does not have, is refused (`UserError`)."""
    from jaxpar.core.mesh import make_mesh, parse_mesh
    from jaxpar.modes.alphazero import game
    from jaxpar.run.config import Config
    from jaxpar.tools.predict import latest, restored

    if not (Path(workdir) / "checkpoints").is_dir():
        raise UserError(f"{workdir} has no checkpoints/ folder")
    step, manifest = latest(workdir)
    settings = Config.from_json(manifest.get("config", {})).game
    if settings.game is None:
        raise UserError(f"{workdir} holds a model of images ({manifest['model']} on "
                        f"{manifest['dataset']}), not an agent: train one with --game")  # fmt: skip
    env = game(settings.game)
    if tuple(manifest["image_shape"]) != tuple(env.observation_shape):
        raise UserError(f"{workdir}'s network reads boards of shape {manifest['image_shape']}, "
                        f"and {settings.game}'s are {list(env.observation_shape)}")  # fmt: skip
    graphdef, params, _ = restored(workdir, step, manifest, make_mesh(parse_mesh("1", 1)))
    return step, settings, env, graphdef, params


def play(workdir, simulations=None, human_first=False, seed=0, plain=False, read=None,
         write=None) -> str:  # fmt: skip
    """One game of the agent in `workdir` against moves read by `read` (default: lines of
    standard input), writing with `write` (standard output); returns the result from the
    agent's side (win, draw or loss)."""
    import jax

    from jaxpar.modes.alphazero import searcher

    if simulations is not None and simulations < 1:
        raise UserError(f"--simulations must be at least 1, got {simulations}")
    step, settings, env, graphdef, params = trained_agent(workdir)
    # The search's best move, as the run's evaluation plays: no exploring noise.
    search = jax.jit(searcher(env, graphdef, simulations or settings.simulations, 0.0))
    read, write = read or sys.stdin.readline, write or _printed
    start, key = jax.random.split(jax.random.key(seed))
    state = env.init(start)
    agent = 1 - int(state.current_player) if human_first else int(state.current_player)
    if not plain:
        write(f"{settings.game}, the agent of {workdir} (step {step}) as X; you are O\n")
    ply = 0
    while not bool(state.terminated):
        moving = int(state.current_player) == agent
        if not plain:
            drawn = board(np.asarray(state.observation), moving)
            write(f"\n{drawn}\n" if drawn else "")
        if moving:
            action = int(search(params, jax.random.fold_in(key, ply), state).action[0])
            write(f"move {action}\n" if plain else f"the agent plays {action}\n")
        else:
            action = opponent_move(read, np.asarray(state.legal_action_mask), plain, write)
        state = env.step(state, action)
        ply += 1
    reward = float(state.rewards[agent])
    result = "win" if reward > 0 else "loss" if reward < 0 else "draw"
    if not plain:
        drawn = board(np.asarray(state.observation), int(state.current_player) == agent)
        write(f"\n{drawn}\n" if drawn else "")
    write(f"result {result}\n" if plain else f"the agent's result: {result}\n")
    return result


def _printed(text: str) -> None:
    """Written now: a script reading the moves, or a prompt without a newline, waits for it."""
    sys.stdout.write(text)
    sys.stdout.flush()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxpar.play",
                                     description=__doc__.split("\n\n")[0])  # fmt: skip
    parser.add_argument("workdir", help="a workdir of train.py --game")
    parser.add_argument("--simulations", type=int, help="per move (default: the run's)")
    parser.add_argument("--human-first", action="store_true", help="you make the first move")
    parser.add_argument("--seed", type=int, default=0, help="the game's start (pgx's key); the "
                        "agent plays its search's best move, without noise")  # fmt: skip
    parser.add_argument("--plain", action="store_true",
                        help="moves as lines: 'move K' out, one integer per line in")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        play(args.workdir, args.simulations, args.human_first, args.seed, args.plain)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
