"""``--game`` (`jaxpar.modes.games`): AlphaZero trained by the one loop gives the same metrics on
one device and on a 2x2 mesh, its lines say what an iteration did, and bad input exits 2 with one
line before anything is written. (Resuming on another mesh: tests/test_compose.py's resume of
every mode; the refusals of other modes: its matrix.)"""

import functools
import io
import json

import jax
import numpy as np
import pytest

import jaxpar
import train as cli
from jaxpar.core.errors import UserError
from jaxpar.modes import compose
from jaxpar.modes.alphazero import elo
from jaxpar.modes.games import GAMES, PLIES, search_batch
from jaxpar.run.checkpoint import Checkpoints
from jaxpar.run.config import Config
from jaxpar.run.setup import setup
from jaxpar.tools.play import main as play_main
from jaxpar.tools.play import play

SMALL = {**compose.BY_NAME["game"].example, "batch_size": 32, "eval_examples": 32}


@functools.cache
def trained(mesh: str, workdir: str) -> list[dict]:
    cfg = Config.of(**SMALL, mesh=mesh, steps=3, log_every=1, eval_every=2, checkpoint_every=2,
                    workdir=workdir)  # fmt: skip
    jaxpar.train(cfg)
    with open(f"{workdir}/metrics.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("games")
    return {mesh: str(base / mesh) for mesh in ("1", "2x2")}


@pytest.fixture(scope="module")
def runs(workdirs):
    return {mesh: trained(mesh, workdir) for mesh, workdir in workdirs.items()}


EXACT = ("step", "iteration", "positions", "replay_positions")
OPPONENTS = ("random", "perfect", "earlier")
RATES = [f"eval_vs_{who}_{k}_rate" for who in OPPONENTS for k in ("win", "draw", "loss")]
RATES.append("eval_vs_earlier_elo")
LOSSES = ("train_loss", "policy_loss", "value_loss", "grad_norm")


@pytest.mark.slow
def test_the_same_seed_trains_the_same_agent_on_one_device_and_on_2x2(runs):
    one, grid = runs["1"], runs["2x2"]
    assert [sorted(x) for x in one] == [sorted(x) for x in grid]
    for a, b in zip(one, grid, strict=True):
        # Self-play's games and the evaluation's are the same games: counts and rates exactly.
        assert {k: a[k] for k in (*EXACT, *RATES) if k in a} == {
            k: b[k] for k in (*EXACT, *RATES) if k in b
        }
        # The updates' products are split other ways over the devices: they round otherwise.
        got = [b[k] for k in LOSSES if k in b]
        np.testing.assert_allclose(got, [a[k] for k in LOSSES if k in a], rtol=2e-4)


@pytest.mark.slow
def test_each_line_says_what_its_iteration_did(runs):
    lines = runs["1"]
    train = [x for x in lines if "train_loss" in x]
    assert [x["iteration"] for x in train] == [1, 2, 3]
    for x in train:
        assert set(LOSSES) | {"selfplay_games_per_s", "positions", "lr"} <= set(x)
        assert 5 * 16 <= x["positions"] <= 9 * 16  # 16 games of 5 to 9 moves
        np.testing.assert_allclose(x["train_loss"], x["policy_loss"] + x["value_loss"], rtol=1e-5)
    # The ring fills with each iteration's positions, up to its size.
    filled = np.cumsum([x["positions"] for x in train])
    assert [x["replay_positions"] for x in train] == np.minimum(filled, 256).tolist()
    evaluations = [x for x in lines if "eval_vs_random_win_rate" in x]
    assert [x["step"] for x in evaluations] == [2, 3]  # every 2 iterations, and at the end
    for evaluation in evaluations:
        assert set(RATES) <= set(evaluation)
        rates = {}
        for who in OPPONENTS:
            rates[who] = {k: evaluation[f"eval_vs_{who}_{k}_rate"] for k in ("win", "draw", "loss")}
            assert sum(rates[who].values()) == pytest.approx(1.0)
        assert evaluation["eval_vs_perfect_win_rate"] == 0.0  # no one beats perfect play
        assert evaluation["eval_vs_earlier_elo"] == pytest.approx(elo(rates["earlier"], 32))


def test_elo_is_the_difference_a_score_predicts():
    even = {"win": 0.25, "draw": 0.5, "loss": 0.25}
    assert elo(even, 100) == 0.0
    ahead = elo({"win": 0.75, "draw": 0.0, "loss": 0.25}, 100)
    assert 1 / (1 + 10 ** (-ahead / 400)) == pytest.approx(0.75)  # the logistic expected score
    lost, won = (elo({"win": w, "draw": 0.0}, 100) for w in (0.0, 1.0))
    assert lost == pytest.approx(-won) and 900 < won < 1000  # half a game short of all won


@pytest.mark.slow
def test_each_evaluation_plays_the_network_of_the_previous_one(workdirs, runs):
    """The earlier network (state item 6, in the checkpoint): at step 2 the initial network, at
    step 3 the network of step 2."""
    run = setup(Config.of(**SMALL, mesh="1", steps=3, eval_every=2, workdir=workdirs["1"]))
    ckpts = Checkpoints(workdirs["1"])
    try:
        two, three = (ckpts.restore(step, run.abstract, run.shardings) for step in (2, 3))
    finally:
        ckpts.close()
    same = lambda a, b: all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))  # noqa: E731
    assert same(three[6], two[0])
    assert same(two[6], run.init()[0]) and not same(two[6], two[0])


BAD = {
    "--game chess": "--game chess is not supported; choose one of tic_tac_toe, connect_four",
    "--game tic_tac_toe --simulations 0": "--simulations must be at least 1, got 0",
    "--simulations 8": "--simulations goes with --game",
    "--game tic_tac_toe --selfplay-games 12 --mesh 4x1 --batch-size 32": (
        "--selfplay-games 12 does not split over the mesh's 4 groups of devices in searches of "
        "4 games (gcd of it and --search-batch 64): use a multiple of 16, or a --search-batch "
        "that divides 3"
    ),
    "--game tic_tac_toe --selfplay-games 2 --root-parallel 2 --mesh 4x1 --batch-size 32": (
        "--selfplay-games 2 does not split over the mesh's 2 groups of devices (4 batch devices, "
        "--root-parallel 2) in searches of 2 games"
    ),
    "--game tic_tac_toe --root-parallel 0": "--root-parallel must be at least 1, got 0",
    "--game tic_tac_toe --search-batch 0": "--search-batch must be at least 1, got 0",
    "--game tic_tac_toe --dataset mnist": "--game with --dataset mnist: a game makes its own data",
    "--game tic_tac_toe --steps-per-dispatch 2": "--steps-per-dispatch with --game is not",
    "--game tic_tac_toe --sync stale:2": "--sync stale:T with --game NAME is not supported",
    "--game tic_tac_toe --model vit-tiny": "--game NAME with --model vit-tiny is not supported",
}


@pytest.mark.parametrize("flags", BAD)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(flags, refuses):
    refuses(flags, BAD[flags])


def test_the_games_are_pgx_games_of_two_players_taking_turns():
    import pgx

    assert set(GAMES) <= set(pgx.available_envs())
    for name in GAMES:
        env = pgx.make(name)
        assert env.num_players == 2, name
    assert PLIES["tic_tac_toe"] == 9 and PLIES["connect_four"] == 42  # the boards' cells
    assert [search_batch(n, 8) for n in (16, 24, 6, 7)] == [8, 8, 2, 1]


def test_a_game_takes_its_recipe_where_no_flag_is_given():
    cfg = cli.parse_args(["--game", "connect_four"])
    assert (cfg.model.model, cfg.optimization.optimizer, cfg.optimization.epochs) == (
        "resnet8", "adam", 10)  # fmt: skip
    assert cli.parse_args(["--game", "tic_tac_toe"]).model.model == "mlp"
    given = cli.parse_args(["--game", "connect_four", "--model", "mlp", "--lr", "0.01"])
    assert (given.model.model, given.optimization.lr) == ("mlp", 0.01)


LINES = ((0, 1, 2), (3, 4, 5), (6, 7, 8), (0, 3, 6), (1, 4, 7), (2, 5, 8), (0, 4, 8), (2, 4, 6))


def plain_game(workdir: str, seed: int) -> tuple[list[str], list[int], str]:
    """A --plain game against the lowest free cell, opening: the lines written, every move in
    order, and the result returned."""
    moves, written = [], []

    def read() -> str:
        moves.append(min(set(range(9)) - set(moves)))
        return f"{moves[-1]}\n"

    def write(text: str) -> None:
        written.append(text)
        if text.startswith("move "):
            moves.append(int(text.split()[1]))

    result = play(workdir, human_first=True, seed=seed, plain=True, read=read, write=write)
    return "".join(written).splitlines(), moves, result


@pytest.mark.slow
def test_the_agent_plays_by_lines_and_the_result_is_the_boards(runs, workdirs):
    lines, moves, result = plain_game(workdirs["1"], seed=0)
    assert lines == [f"move {m}" for m in moves[1::2]] + [f"result {result}"]
    assert len(set(moves)) == len(moves) <= 9  # legal: each cell once
    won = [any(all(c in moves[side::2] for c in line) for line in LINES) for side in (0, 1)]
    assert result == ("win" if won[1] else "loss" if won[0] else "draw")
    assert won[0] or won[1] or len(moves) == 9  # the game went to its end
    assert plain_game(workdirs["1"], seed=0) == (lines, moves, result)  # the seed decides


@pytest.mark.slow
def test_an_illegal_move_in_plain_play_exits_2_with_one_line(runs, workdirs, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("4\n4\n4\n"))
    assert play_main([workdirs["1"], "--plain", "--human-first"]) == 2
    out, err = capsys.readouterr()
    assert out.startswith("move ") and err.count("\n") == 1
    assert "error: '4' is not a legal move here; legal moves: " in err


@pytest.mark.slow
def test_play_refuses_a_workdir_of_images(tmp_path, capsys):
    jaxpar.train(Config.of(steps=1, eval_examples=0, workdir=str(tmp_path)))
    assert play_main([str(tmp_path), "--plain"]) == 2
    assert "holds a model of images (mlp on digits), not an agent" in capsys.readouterr().err
    with pytest.raises(UserError, match="has no checkpoints/ folder"):
        play(str(tmp_path / "nothing"))


def test_a_game_takes_its_own_training_defaults_and_given_flags_win():
    o = cli.parse_args(["--game", "tic_tac_toe"]).optimization
    assert (o.optimizer, o.lr, o.schedule, o.batch_size, o.epochs) == ("adam", 1e-3, "cosine",
                                                                       512, 10)  # fmt: skip
    given = ["--game", "tic_tac_toe", "--optimizer", "sgd", "--epochs", "3"]
    o = cli.parse_args(given).optimization
    assert (o.optimizer, o.lr, o.epochs) == ("sgd", 1e-3, 3)
    assert cli.parse_args([]).optimization.optimizer == "sgd"  # images keep theirs
