"""Train a Flax model over a device mesh: ``python train.py --mesh 2x2``.

A thin CLI: flags -> `jaxpar.Config` -> `jaxpar.train`. Mistakes in the flags exit with status 2
and one line on stderr; SIGTERM/SIGINT save a checkpoint and exit with 128 + the signal number
(143, 130); rerunning the same command resumes.
"""

import argparse
import json
import sys

from jaxpar.core.errors import Diverged, Preempted, UserError
from jaxpar.core.mesh import (
    check_batch_spec,
    check_hosts,
    parse_mesh,
    request_devices,
    set_xla_flags,
)
from jaxpar.core.optimizers import OPTIMIZERS
from jaxpar.models import RECIPES, recipe_for
from jaxpar.modes.games import RECIPE as GAME_RECIPE
from jaxpar.modes.games import recipe as game_recipe
from jaxpar.run.compile_cache import Cache
from jaxpar.run.config import SECTIONS, Config
from jaxpar.run.distributed import job_size, join, peer_lost

# Config's sections (`jaxpar.run.config.SECTIONS`) -> [(flag, type, or a list of choices, help)]:
# --help's groups, a run file's sections. Defaults: the sections' own.
FLAGS = {
    "parallelism": [
        (
            "--mesh",
            str,
            "DxM, N, stage=2,data=2,fsdp=2,model=2, or a layout from meshes/ (None: all on data)",
        ),  # fmt: skip
        ("--steps-per-dispatch", int, "steps run as one XLA program: >1 speeds up tiny models"),
        ("--grad-accum", int, "microbatches per step, gradients averaged: less activation memory"),
        (
            "--remat",
            ["none", "block"],
            "ViT: recompute each block's (pipeline: tick's) activations",
        ),
        ("--microbatches", int, "pipeline microbatches per step (0: one per stage of the mesh)"),
        (
            "--pipeline",
            str,
            "pipeline schedule over the stage axis: gpipe, or circular:R (R trips)",
        ),
        (
            "--sync",
            str,
            "data-parallel replicas: every-step, local:H (average every H steps), "
            "diloco:H (DiLoCo), stale:T (gradients T steps old)",
        ),  # fmt: skip
        ("--outer-lr", float, "DiLoCo's outer Nesterov SGD learning rate"),
        ("--outer-momentum", float, "DiLoCo's outer Nesterov momentum"),
    ],
    "model": [
        (
            "--model",
            str,
            "mlp, 2nn, resnet8/18/34/50, vit-tiny, vit-lite, vit-small, vit-base, rbm:H (an "
            "RBM of H hidden units), dbn:A-B-C (a deep belief network's sigmoid layers), or your "
            "own as module:attribute",
        ),
        ("--patch-size", int, "ViT patch size (None: 4 up to 64 px, 16 above)"),
        ("--precision", ["fp32", "bf16"], "compute precision (parameters stay float32)"),
        (
            "--init-from",
            str,
            "start from these weights: a workdir (its latest checkpoint, e.g. one written by "
            "python -m jaxpar.weights import) or a .safetensors/.pth file; a fresh head when the "
            "classes differ",
        ),  # fmt: skip
        (
            "--freeze",
            ["backbone"],
            "train only the classifier head (no optimizer state for the rest)",
        ),
        ("--teacher", str, "distil from this trained workdir (its latest checkpoint, frozen)"),
        ("--distill-temperature", float, "distillation temperature T"),
        ("--distill-weight", float, "A: loss = A T^2 KL(teacher/T || student/T) + (1-A) CE"),
        ("--prune-to", float, "magnitude pruning: sparsity of every weight matrix at the end"),
        ("--prune-start", int, "step the pruned fraction starts rising (cubic schedule)"),
        ("--prune-end", int, "step it reaches --prune-to (None: 3/4 of the run)"),
        ("--qat", ["int8"], "quantization-aware training: weights rounded to int8 in the step"),
        ("--cd-k", int, "an RBM's Gibbs steps per contrastive-divergence update"),
        ("--persistent", bool, "an RBM's Gibbs chains persist from step to step (PCD)"),
        (
            "--pretrain-epochs",
            int,
            "a DBN's greedy pretraining: each layer an RBM trained this many epochs (in "
            "WORKDIR/pretrain/), then the network fine-tuned from them (0: from scratch)",
        ),  # fmt: skip
    ],
    "data": [
        (
            "--dataset",
            str,
            "digits (embedded), mnist, fashion_mnist, cifar10, cifar100, imagenet2012, "
            "synthetic[:HxWxC:K], or a mixture NAME=SHARE[@ordered],NAME=SHARE...",
        ),  # fmt: skip
        ("--data-dir", str, "directory of the dataset's files (a mixture: DIR/NAME/ each)"),
        ("--labels", ["shared", "joint"], "a mixture's sources share labels, or join them"),
        ("--resize-sources", bool, "resize a mixture's sources to the first one's image shape"),
        (
            "--data-workers",
            int,
            "grain worker processes that read, decode and crop training batches (0: threads "
            "in this process); for host-decoded data such as imagenet2012",
        ),  # fmt: skip
        (
            "--labeled-fraction",
            float,
            "train on this fraction of the training split's examples, the same ones for a seed "
            "(a DBN's pretraining still reads every image)",
        ),  # fmt: skip
        (
            "--corrupt-steps",
            str,
            "for testing --skip-spikes: these steps' batches (5,9) have their images scaled by "
            "1000 (a dataset of float images)",
        ),  # fmt: skip
    ],
    "optimization": [
        ("--epochs", int, "passes over the training set"),
        ("--steps", int, "optimizer steps in all (overrides --epochs)"),
        ("--batch-size", int, "global batch size, over all devices and processes"),
        ("--optimizer", list(OPTIMIZERS), "optimizer (optax's; muon: optax.contrib's)"),
        ("--lr", float, "(peak) learning rate; federated: the clients' SGD rate"),
        ("--momentum", float, "SGD momentum"),
        ("--weight-decay", float, "weight decay (coupled L2 for SGD, decoupled for the others)"),
        ("--clip-grad-norm", float, "scale gradients to at most this global norm"),
        ("--label-smoothing", float, "train against labels smoothed by this much"),
        ("--ema", float, "also evaluate and save a moving average of the weights, this decay"),
        ("--schedule", ["constant", "cosine"], "learning-rate schedule"),
        ("--warmup-steps", int, "linear warmup steps"),
        ("--seed", int, "seed of initialisation, data order and dropout"),
        (
            "--skip-spikes",
            str,
            "K[:SIGMA]: a step whose loss is not finite or above the running mean by SIGMA "
            "(default 6) running standard deviations is not applied; K in a row stop the run",
        ),  # fmt: skip
    ],
    "federated": [
        ("--clients", int, "train federated over this many clients holding disjoint data"),
        ("--clients-per-round", int, "clients sampled per round (a function of seed and round)"),
        ("--local-epochs", int, "epochs each client trains on its own data per round"),
        ("--local-batch", int, "the clients' batch size"),
        ("--rounds", int, "rounds to train (one round is one step)"),
        ("--partition", str, "iid, shards:K (label-sorted shards) or dirichlet:ALPHA"),
        ("--server-optimizer", str, "fedavg, fedavgm, fedadam or fedyogi"),
        ("--server-lr", float, "server learning rate (None: 1 for fedavg/fedavgm, 0.01 else)"),
        ("--prox-mu", float, "FedProx: weight of the proximal term mu/2 ||w - w_round||^2"),
        ("--dp-clip", float, "DP-FedAvg: clip each client's update to this norm"),
        ("--dp-noise", float, "DP-FedAvg: noise multiplier z (std z*clip/m on the mean)"),
        ("--secure-agg", bool, "simulate secure aggregation's fixed-point sums (mod 2^32)"),
    ],
    "game": [
        (
            "--game",
            str,
            "train AlphaZero by self-play on this pgx game: tic_tac_toe, connect_four, othello, "
            "hex, go_9x9, animal_shogi, gardner_chess",
        ),  # fmt: skip
        ("--simulations", int, "simulations of Gumbel MuZero's search (mctx) per move"),
        ("--selfplay-games", int, "games of self-play per iteration, over all batch devices"),
        ("--replay-size", int, "positions the replay ring keeps"),
        ("--updates-per-iteration", int, "optimizer updates per iteration, --batch-size each"),
        (
            "--root-parallel",
            int,
            "K searches of each move with different keys, on K devices of the batch axes "
            "where there are, their choices put to a vote (1: one search)",
        ),  # fmt: skip
        (
            "--search-batch",
            int,
            "games a device searches at once: gcd(--selfplay-games, this), the same on every "
            "mesh so that the games are; larger is faster",
        ),  # fmt: skip
        (
            "--opening-moves",
            int,
            "the first moves of each self-play game drawn uniformly among the legal ones, so "
            "that every opening is explored (the search still gives their targets)",
        ),  # fmt: skip
    ],
    "checkpoint": [
        ("--workdir", str, "where the run writes (None: runs/DATE-TIME)"),
        ("--restart", bool, "start over in a used workdir, its run moved into previous-DATE-TIME/"),
        ("--checkpoint-every", int, "steps between checkpoints (0: at the end only)"),
        ("--keep", int, "checkpoints to keep"),
        (
            "--local-checkpoint-dir",
            str,
            "a fast checkpoint tier on node-local storage (/dev/shm, a local disk), beside "
            "WORKDIR/checkpoints: a restart takes the newest step of the two",
        ),  # fmt: skip
        (
            "--local-checkpoint-every",
            int,
            "steps between the local tier's saves (0: on SIGTERM/SIGINT only, written first)",
        ),  # fmt: skip
    ],
    "job": [
        (
            "--coordinator",
            str,
            "HOST:PORT of process 0 of a multi-process job (or JAX_COORDINATOR_"
            "ADDRESS); SLURM and Open MPI are detected",
        ),  # fmt: skip
        ("--num-processes", int, "processes in the job (or JAX_NUM_PROCESSES)"),
        ("--process-id", int, "this process's index in the job (or JAX_PROCESS_ID)"),
        ("--init-timeout", float, "seconds the job's processes wait for each other to start"),
        (
            "--step-timeout",
            float,
            "a hang watchdog: a step (and its batch) taking longer, or a compilation, evaluation "
            "or checkpoint save taking 10x longer, dumps every thread's stack to the workdir "
            "and exits with status 75",
        ),  # fmt: skip
        (
            "--compile-cache",
            str,
            "JAX's persistent compilation cache: a folder, or off (None: $JAXPAR_COMPILE_CACHE, "
            "else ~/.cache/jaxpar/jax)",
        ),  # fmt: skip
    ],
    "metrics": [
        ("--eval-every", int, "steps between evaluations (0: every epoch)"),
        (
            "--eval-examples",
            int,
            "evaluate on the first N examples of the test split (each source's of a mixture), "
            "the same on every mesh; 0: no evaluation at all (None: the whole split)",
        ),  # fmt: skip
        ("--log-every", int, "steps per training line of metrics.jsonl"),
        (
            "--profile-steps",
            str,
            "A:B: write a JAX profiler trace of steps A to B-1 (B excluded) to WORKDIR/profile",
        ),
        (
            "--dry-run",
            bool,
            "print the plan (parameter placement, per-device memory, collectives), "
            "then stop without training",
        ),  # fmt: skip
        (
            "--project",
            str,
            "with --dry-run: the step's time on CHIP[xN][:nodes=K] (a100, h100, h200, tpu-v5e, "
            "tpu-v5p; e.g. h100x8:nodes=4), a roofline per kernel and collective",
        ),  # fmt: skip
        ("--json", bool, "with --dry-run: print the plan as one JSON object"),
    ],
}


def run_file(path: str) -> dict:
    """A run file's values as ``{Config field: value}``: sections named as in `SECTIONS`, keys
    named as the flags without their dashes (``batch-size = 64`` in ``[optimization]``).

    >>> import tempfile
    >>> text = '[optimization]\\nbatch-size = 64\\nlr = 0.1\\n[parallelism]\\nmesh = "2x2"\\n'
    >>> with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
    ...     _ = f.write(text)
    >>> sorted(run_file(f.name).items())
    [('batch_size', 64), ('lr', 0.1), ('mesh', '2x2')]
    """
    import tomllib

    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except OSError as e:
        raise UserError(f"--config {path}: {e.strerror.lower()}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"--config {path} is not valid TOML: {e}") from None
    home = {flag[2:]: (section, kind) for section, group in FLAGS.items()
            for flag, kind, _ in group}  # fmt: skip
    values = {}
    for section, keys in table.items():
        if not isinstance(keys, dict):
            where = f"[{home[section][0]}]" if section in home else f"one of {', '.join(SECTIONS)}"
            raise UserError(f"--config {path}: {section} is outside any section; put it in {where}")
        if section not in SECTIONS:
            where = f"; {section} belongs in [{home[section][0]}]" if section in home else ""
            raise UserError(f"--config {path}: unknown section [{section}]{where}; sections are "
                            f"{', '.join(SECTIONS)}")  # fmt: skip
        for key, value in keys.items():
            name = key.replace("_", "-")
            if home.get(name, (None,))[0] != section:
                where = f"; it belongs in [{home[name][0]}]" if name in home else ""
                raise UserError(f"--config {path}: [{section}] has no key {key}{where}")
            if name.replace("-", "_") in values:
                raise UserError(f"--config {path}: [{section}] gives {name} twice")
            values[name.replace("-", "_")] = _checked(value, home[name][1], f"--config {path}: "
                                                      f"[{section}] {key}")  # fmt: skip
    return values


def title(section: str) -> str:
    """A --help group's heading: the run file's section, and what it holds where that says more.

    >>> title("checkpoint"), title("data")
    ('[checkpoint] workdir and checkpoints', '[data]')
    """
    about = SECTIONS[section].__doc__
    return f"[{section}]" if about == section else f"[{section}] {about}"


TAKES = {bool: bool, int: int, float: (int, float), str: str}  # a flag's type: TOML's values


def _checked(value, kind, what: str):
    """`value` from a run file as the flag of type `kind` takes it, or a `UserError`."""
    if isinstance(kind, list):  # choices
        ok = value in kind
    else:  # TOML's true is no number here, though Python's bool is an int
        ok = isinstance(value, TAKES[kind]) and (kind is bool or not isinstance(value, bool))
    if not ok:
        names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
        expected = f"one of {', '.join(kind)}" if isinstance(kind, list) else names[kind]
        raise UserError(f"{what} must be {expected}, got {value!r}")
    return float(value) if kind is float else value


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, status 2 (argparse would also print the usage)
        self.exit(2, f"error: {message} (see --help)\n")


def parse_args(argv) -> Config:
    """Flags -> `Config`. A flag left out takes the model's recipe (`jaxpar.models.RECIPES`, e.g.
    AdamW with warmup and cosine decay for the ViTs) or a game's (`jaxpar.modes.games.RECIPE`),
    else `Config`'s default."""
    defaults = Config().flat()
    parser = Parser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", help="a run file (TOML, sections as the groups below: "
                        f"{', '.join(SECTIONS)}); flags given too override it")  # fmt: skip
    for section, flags in FLAGS.items():  # --help lists the flags by concern
        group = parser.add_argument_group(title(section))
        for flag, kind, help in flags:
            name = flag[2:].replace("-", "_")
            default = defaults[name]
            for who, recipe in (("ViTs", RECIPES["vit"]), ("RBMs", RECIPES["rbm"]),
                                ("DBNs", RECIPES["dbn"]), ("games", GAME_RECIPE)):  # fmt: skip
                help = help if name not in recipe else f"{help}; {who}: {recipe[name]}"
            if kind is bool:  # --no-FLAG turns off what a run file turned on
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=False,
                                   help=help)  # fmt: skip
            elif isinstance(kind, list):
                group.add_argument(flag, choices=kind, default=default, help=help)
            else:
                group.add_argument(flag, type=kind, default=default, help=help)
    argv = _dash_values(sys.argv[1:] if argv is None else argv)
    path = parser.parse_known_args(argv)[0].config
    from_file = run_file(path) if path else {}
    parser.set_defaults(**from_file)  # the command line's flags override the run file
    given = vars(parser.parse_args(argv))
    explicit = vars(parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(given, UNSET))))
    explicit = {k: from_file.get(k, UNSET) if v is UNSET else v for k, v in explicit.items()}
    del given["config"], explicit["config"]
    # A federated run's clients train with plain SGD at --lr: no model recipe (AdamW, warmup).
    recipe = dict(recipe_for(given["model"])) if given["clients"] is None else {}
    if given["game"] is not None:  # a game's run: its own (`jaxpar.modes.games.recipe`)
        recipe = game_recipe(given["game"])
    if explicit["optimizer"] is not UNSET and given["optimizer"] != recipe.get("optimizer"):
        recipe.pop("weight_decay", None)  # the recipe's decay was tuned for its optimizer
    if "warmup_steps" in recipe and given["steps"]:  # a short run: warm up for a tenth of it
        recipe["warmup_steps"] = min(recipe["warmup_steps"], given["steps"] // 10)
    return Config.of(**{k: recipe.get(k, v) if explicit[k] is UNSET else v
                        for k, v in given.items()})  # fmt: skip


UNSET = object()  # a flag the command line did not give


def _dash_values(argv: list) -> list:
    """``--flag -1:3`` as ``--flag=-1:3``: argparse takes a value that starts with a dash only
    when it is a plain negative number (``-1``), and otherwise says "expected one argument"
    before jaxpar's own check can name the problem (``--profile-steps -1:3``, ``--lr -1e-3``).

    >>> _dash_values(["--profile-steps", "-1:3", "--lr", "-1e-3", "--dry-run", "-1"])
    ['--profile-steps=-1:3', '--lr=-1e-3', '--dry-run', '-1']
    """
    takes_value = {flag for group in FLAGS.values() for flag, kind, _ in group if kind is not bool}
    out = []
    for arg in argv:
        number = arg[1:2].isdigit() or arg[1:2] == "."
        if out and out[-1] in takes_value and arg.startswith("-") and number:
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def main(argv=None) -> int:
    try:
        cfg = parse_args(argv).validate()
        # Before JAX starts: emulate this process's share of the mesh's devices on the CPU
        # (ignored on GPUs), then join the multi-process job if this is part of one.
        job = (cfg.job.coordinator, cfg.job.num_processes, cfg.job.process_id)
        processes = job_size(*job)[1]
        devices = processes
        if cfg.parallelism.mesh:  # what the sizes alone decide, before any device is emulated
            spec = parse_mesh(cfg.parallelism.mesh)
            check_hosts(spec, processes)
            if cfg.federated.clients is None:  # a federated round has no global batch
                check_batch_spec(cfg.optimization.batch_size, spec)
            devices = spec.size
        if devices % processes:
            raise UserError(f"mesh of {devices} devices does not split over {processes} processes")
        request_devices(devices // processes)  # refuses more CPU devices than it can emulate
        set_xla_flags()
        join(*job, timeout=cfg.job.init_timeout)
        Cache.use(cfg.job.compile_cache)  # before anything compiles
        if cfg.metrics.dry_run:
            from jaxpar.tools.plan import format_plan, plan

            p = plan(cfg)
            print(json.dumps(p, indent=1) if cfg.metrics.json else format_plan(p))
            return 0
        from jaxpar.run.loop import train

        train(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Preempted as e:
        print(f"preempted: {e}", file=sys.stderr)
        return 128 + e.signum  # the shell's convention for "ended by this signal"
    except Exception as e:  # a collective's JaxRuntimeError, or Orbax's ValueError around it
        import jax

        if not peer_lost(e) or jax.process_count() == 1:
            raise  # a bug or an environment failure: the traceback says where (exit status 1)
        print(f"error: a collective failed; another process of the job probably died ({e})",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
