"""The run configuration: a frozen dataclass per concern (the ``--help`` groups and a run file's
sections), each checked by its own `check`, composed into `Config`, which checks how they meet
and is written to ``WORKDIR/config.json`` in its sections.

Every field is named as its flag (``--batch-size`` is ``cfg.optimization.batch_size``, the
``batch-size`` key of a run file's ``[optimization]``). `Config.of` builds one from the fields'
names alone, as the flags and an older, flat ``config.json`` give them.
"""

import dataclasses
import json
import math
from pathlib import Path

from jaxpar.core.errors import UserError
from jaxpar.run.storage import is_url, url_problem


def need(ok, message) -> None:
    if not ok:
        raise UserError(message)


def _at_least(section, one: tuple = (), zero: tuple = ()) -> None:
    """Refuse a field of `one` below 1 or of `zero` below 0 (None: not given)."""
    for least, names in ((1, one), (0, zero)):
        for name in names:
            value = getattr(section, name)
            word = "be at least 1" if least else "be >= 0"
            need(value is None or value >= least,
                 f"--{name.replace('_', '-')} must {word}, got {value}")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Parallelism:
    """mesh and parallelism"""

    mesh: str | None = None  # None: every device on the data axis
    steps_per_dispatch: int = 1  # >1: that many steps in one program (lax.scan), for tiny models
    grad_accum: int = 1  # microbatches per step, their gradients averaged (a memory knob)
    remat: str = "none"  # "block": recompute each transformer block in the backward pass
    microbatches: int = 0  # pipeline microbatches per step (0: one per stage)
    pipeline: str = "gpipe"  # pipeline schedule: gpipe or circular:R
    sync: str = "every-step"  # data-parallel replicas: every-step, local:H, diloco:H, stale:T
    outer_lr: float = 0.7  # DiLoCo's outer Nesterov SGD
    outer_momentum: float = 0.9

    def check(self) -> None:
        from jaxpar.modes.pipeline import parse_pipeline
        from jaxpar.modes.sync import parse_sync

        _at_least(self, one=("steps_per_dispatch", "grad_accum"), zero=("microbatches",))
        need(self.remat in ("none", "block"), f"unknown --remat '{self.remat}'; use none or block")
        parse_pipeline(self.pipeline)
        parse_sync(self.sync)
        need(0 < self.outer_lr < math.inf,
             f"--outer-lr must be positive and finite, got {self.outer_lr}")  # fmt: skip
        need(0 <= self.outer_momentum < 1,
             f"--outer-momentum must be in [0, 1), got {self.outer_momentum}")  # fmt: skip
        # Flags that would change nothing are refused rather than silently ignored.
        outer = (self.outer_lr, self.outer_momentum) != (Parallelism.outer_lr,
                                                         Parallelism.outer_momentum)  # fmt: skip
        need(self.sync.startswith("diloco:") or not outer, "--outer-lr and --outer-momentum go "
             "with --sync diloco:H; without it they change nothing")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Model:
    """model"""

    model: str = "mlp"
    patch_size: int | None = None  # ViT patch size (None: from the image size)
    precision: str = "fp32"
    init_from: str | None = None  # a workdir (its latest checkpoint) or a weights file
    freeze: str | None = None  # "backbone": only the classifier head trains
    teacher: str | None = None  # a trained workdir distilled into this model (`modes.distill`)
    distill_temperature: float = 4.0
    distill_weight: float = 0.9  # the distillation term's share of the loss
    prune_to: float | None = None  # magnitude pruning to this sparsity (`jaxpar.modes.prune`)
    prune_start: int = 0  # step the sparsity starts rising
    prune_end: int | None = None  # step it reaches --prune-to (None: 3/4 of the run)
    qat: str | None = None  # "int8": quantization-aware training (`jaxpar.modes.quantize`)
    cd_k: int = 1  # an RBM's Gibbs steps per contrastive-divergence update
    persistent: bool = False  # an RBM's chains persist from step to step (PCD)
    pretrain_epochs: int = 0  # a DBN's RBMs, each trained this long (`jaxpar.run.pretrain`)

    @property
    def rbm(self) -> bool:
        """The model is an RBM (``rbm:H``, `jaxpar.models.rbm`)."""
        return self.model.startswith("rbm:")

    @property
    def dbn(self) -> bool:
        """The model is a DBN unrolled into a classifier (``dbn:A-B``, `jaxpar.models.dbn`)."""
        return self.model.startswith("dbn:")

    @property
    def probabilities(self) -> bool:
        """The model reads pixels as probabilities in [0, 1], unnormalised: an RBM, and a DBN
        as its RBMs do (`jaxpar.data.unit_interval`)."""
        return self.rbm or self.dbn

    @property
    def samples(self) -> bool:
        """The model trains RBMs by Gibbs sampling: an RBM, or a DBN that is pretrained."""
        return self.rbm or (self.dbn and self.pretrain_epochs > 0)

    def settings(self) -> dict | None:
        """What an RBM's or a pretrained DBN's resume must keep: its sampling and pretraining
        (None for other models)."""
        if not self.samples:
            return None
        pretrained = {"pretrain_epochs": self.pretrain_epochs} if self.dbn else {}
        return {"cd_k": self.cd_k, "persistent": self.persistent, **pretrained}

    def check(self) -> None:
        from jaxpar.models import MODELS
        from jaxpar.modes.quantize import QAT

        MODELS.lookup(self.model, "model")  # a user's own: module:attribute, imported
        need(self.precision in ("fp32", "bf16"), f"unknown precision '{self.precision}'")
        need(self.patch_size is None or self.patch_size >= 1,
             f"--patch-size must be at least 1, got {self.patch_size}")  # fmt: skip
        need(
            self.freeze in (None, "backbone"),
            f"unknown --freeze {self.freeze!r}; the one choice is backbone (all but the head)",
        )
        for flag, source in (("--init-from", self.init_from), ("--teacher", self.teacher)):
            need(not is_url(source), f"{flag} {source}: reading a workdir on object storage "
                 "is not supported yet; copy it to a local folder")  # fmt: skip
        if self.init_from is not None:
            source = Path(self.init_from)
            need(source.exists(), f"--init-from {source} does not exist")
            need(
                source.is_file() or (source / "checkpoints").is_dir(),
                f"--init-from {source} has no checkpoints/ folder; name a workdir with a "
                "checkpoint, or a weights file (.safetensors, .pth)",
            )
        need(self.distill_temperature > 0,
             f"--distill-temperature must be positive, got {self.distill_temperature}")  # fmt: skip
        need(0 <= self.distill_weight <= 1,
             f"--distill-weight must be in [0, 1], got {self.distill_weight}")  # fmt: skip
        need(self.prune_to is None or 0 <= self.prune_to < 1,
             f"--prune-to must be a sparsity in [0, 1), got {self.prune_to}")  # fmt: skip
        need(self.qat in (None, *QAT), f"--qat {self.qat} is not supported; choose "
             f"{' or '.join(QAT)}")  # fmt: skip
        need(self.prune_start >= 0, f"--prune-start must be >= 0, got {self.prune_start}")
        need(self.prune_end is None or self.prune_end > self.prune_start,
             f"--prune-end {self.prune_end} must come after --prune-start "
             f"{self.prune_start}")  # fmt: skip
        for flag, given in (("--prune-start", self.prune_start != 0),
                            ("--prune-end", self.prune_end is not None)):  # fmt: skip
            need(self.prune_to is not None or not given, f"{flag} goes with --prune-to")
        distill = (self.distill_temperature, self.distill_weight) != (
            Model.distill_temperature, Model.distill_weight)  # fmt: skip
        need(self.teacher is not None or not distill, "--distill-temperature and "
             "--distill-weight go with --teacher; without it they change nothing")  # fmt: skip
        need(self.cd_k >= 1, f"--cd-k must be at least 1, got {self.cd_k}")
        need(self.pretrain_epochs >= 0,
             f"--pretrain-epochs must be at least 0, got {self.pretrain_epochs}")  # fmt: skip
        need(self.dbn or not self.pretrain_epochs, "--pretrain-epochs goes with --model "
             "dbn:A-B-C (a deep belief network's layers)")  # fmt: skip
        for flag, given in (("--cd-k", self.cd_k != 1), ("--persistent", self.persistent)):
            need(self.samples or not given, f"{flag} goes with --model rbm:H, or dbn:A-B-C with "
                 "--pretrain-epochs (an RBM's sampling)")  # fmt: skip
        need(
            not (self.dbn and self.pretrain_epochs and self.init_from),
            "--init-from with "
            "--pretrain-epochs: pretraining gives the weights the run starts from; drop one",
        )


@dataclasses.dataclass(frozen=True)
class Data:
    """data"""

    dataset: str = "digits"
    data_dir: str | None = None
    labels: str = "shared"  # a mixture's label space: shared, or joint (`jaxpar.data.mixture`)
    resize_sources: bool = False  # a mixture's sources resized to the first one's image shape
    data_workers: int = 0  # grain worker processes reading training batches (0: this process)
    labeled_fraction: float | None = None  # train on this fraction of the labelled examples
    corrupt_steps: str | None = None  # "5,9": those steps' batches scaled by 1000 (testing)

    @property
    def corrupted(self) -> frozenset:
        """The steps of ``--corrupt-steps`` (`jaxpar.run.spikes`).

        >>> sorted(Data(corrupt_steps="9,5").corrupted)
        [5, 9]
        """
        return frozenset(int(s) for s in (self.corrupt_steps or "").split(",") if s)

    def check(self) -> None:
        from jaxpar.data import loader
        from jaxpar.data.mixture import LABELS, is_mixture

        if not is_mixture(self.dataset):  # a mixture: checked with the batch size (`Config`)
            loader(self.dataset)
        need(self.labels in LABELS, f"--labels {self.labels}: choose {' or '.join(LABELS)}")
        need(self.labels == "shared" or is_mixture(self.dataset),
             "--labels joint goes with a mixture (--dataset NAME=SHARE,...)")  # fmt: skip
        need(not self.resize_sources or is_mixture(self.dataset),
             "--resize-sources goes with a mixture (--dataset NAME=SHARE,...)")  # fmt: skip
        fraction = self.labeled_fraction
        need(fraction is None or 0 < fraction <= 1,
             f"--labeled-fraction must be in (0, 1], got {fraction}")  # fmt: skip
        need(fraction is None or not is_mixture(self.dataset), "--labeled-fraction with a "
             "mixture is not supported: its sources' shares are of whole datasets")  # fmt: skip
        if self.data_dir is not None:
            need(
                Path(self.data_dir).exists(),
                f"data directory {self.data_dir} does not exist; create it or fix --data-dir",
            )
            need(
                Path(self.data_dir).is_dir(),
                f"--data-dir {self.data_dir} is a file, not a directory; pass the directory "
                "that holds the dataset's files",
            )
            built_in = self.dataset.split(":")[0] in ("digits", "synthetic")
            need(is_mixture(self.dataset) or not built_in,
                 f"--data-dir with --dataset {self.dataset}: that dataset is built in and reads "
                 "no files; drop --data-dir")  # fmt: skip
        need(self.data_workers >= 0, f"--data-workers must be >= 0, got {self.data_workers}")
        try:
            steps = self.corrupted
        except ValueError:
            raise UserError(f"--corrupt-steps {self.corrupt_steps}: write steps as 5,9") from None
        need(all(s >= 1 for s in steps), f"--corrupt-steps {self.corrupt_steps}: steps count "
             "from 1")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Optimization:
    """optimization"""

    epochs: int = 30
    steps: int | None = None  # overrides epochs when set
    batch_size: int = 128  # global, over all devices and processes
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    clip_grad_norm: float | None = None  # gradients scaled to at most this global norm
    label_smoothing: float = 0.0  # the training loss's targets: 1 - E on the label, E/classes
    ema: float | None = None  # decay of a moving average of the weights, evaluated and saved
    schedule: str = "constant"
    warmup_steps: int = 0
    seed: int = 0
    skip_spikes: str | None = None  # K[:SIGMA]: skip bad steps, stop after K in a row

    @property
    def spikes(self) -> tuple[int, float] | None:
        """``(K, SIGMA)`` of ``--skip-spikes`` (`jaxpar.core.spikes`), or None.

        >>> Optimization(skip_spikes="3").spikes, Optimization(skip_spikes="5:4.5").spikes
        ((3, 6.0), (5, 4.5))
        """
        if self.skip_spikes is None:
            return None
        from jaxpar.core.spikes import SIGMA

        k, _, sigma = self.skip_spikes.partition(":")
        return int(k), float(sigma) if sigma else SIGMA

    def check(self) -> None:
        from jaxpar.core.optimizers import OPTIMIZERS

        need(self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}")
        need(self.steps is None or self.steps >= 1, f"--steps must be at least 1, got {self.steps}")
        need(self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}")
        need(
            self.optimizer in OPTIMIZERS,
            f"unknown optimizer '{self.optimizer}'; choose from {', '.join(OPTIMIZERS)}",
        )
        need(0 < self.lr < math.inf, f"--lr must be positive and finite, got {self.lr}")
        need(0 <= self.momentum < 1, f"--momentum must be in [0, 1), got {self.momentum}")
        need(0 <= self.weight_decay < math.inf,
             f"--weight-decay must be a finite number >= 0, got {self.weight_decay}")  # fmt: skip
        need(
            self.clip_grad_norm is None or 0 < self.clip_grad_norm < math.inf,
            f"--clip-grad-norm must be positive and finite, got {self.clip_grad_norm}",
        )
        need(0 <= self.label_smoothing < 1,
             f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")  # fmt: skip
        need(self.ema is None or 0 <= self.ema < 1,
             f"--ema must be a decay in [0, 1), got {self.ema}")  # fmt: skip
        if self.skip_spikes is not None:
            try:
                k, sigma = self.spikes
            except ValueError:
                raise UserError(f"--skip-spikes {self.skip_spikes}: write K or K:SIGMA (3, "
                                "3:6)") from None  # fmt: skip
            need(k >= 1, f"--skip-spikes {self.skip_spikes}: K, the skips in a row that stop "
                 "the run, must be at least 1")  # fmt: skip
            need(sigma >= 0, f"--skip-spikes {self.skip_spikes}: SIGMA must be >= 0 (inf: "
                 "skip non-finite steps only)")  # fmt: skip
        need(self.optimizer == "sgd" or self.momentum == Optimization.momentum,
             f"--momentum is SGD's; --optimizer {self.optimizer} keeps its own moments, so "
             "--momentum would change nothing")  # fmt: skip
        need(self.optimizer != "adam" or not self.weight_decay, "--optimizer adam has no weight "
             "decay; use --optimizer adamw for decoupled decay")  # fmt: skip
        need(self.schedule in ("constant", "cosine"), f"unknown schedule '{self.schedule}'")
        need(
            0 <= self.seed < 2**32,
            f"--seed must be in [0, 2**32) (0 to 4294967295), got {self.seed}",
        )
        need(self.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {self.warmup_steps}")


@dataclasses.dataclass(frozen=True)
class Federated:
    """federated learning (jaxpar.modes.federated)"""

    clients: int | None = None  # None: not federated
    clients_per_round: int | None = None  # None: 10, or every client when fewer
    local_epochs: int = 1
    local_batch: int = 10
    rounds: int | None = None  # sets steps: one step is one round
    partition: str = "iid"  # iid, shards:K, dirichlet:ALPHA
    server_optimizer: str = "fedavg"  # fedavg, fedavgm, fedadam, fedyogi
    server_lr: float | None = None  # None: the server optimizer's usual rate
    prox_mu: float = 0.0  # FedProx's proximal term
    dp_clip: float | None = None  # DP-FedAvg: each client's update clipped to this norm
    dp_noise: float = 0.0  # DP-FedAvg: noise multiplier
    secure_agg: bool = False  # simulate secure aggregation's fixed-point sums

    def check(self) -> None:
        if self.clients is None:
            given = [f.name for f in dataclasses.fields(self)
                     if getattr(self, f.name) != f.default]  # fmt: skip
            need(not given, f"--{given[0].replace('_', '-') if given else ''} goes with --clients "
                 "(federated learning)")  # fmt: skip
            return
        from jaxpar.modes.federated import parse_partition, server_optimizer

        need(self.clients >= 1, f"--clients must be at least 1, got {self.clients}")
        need(self.clients_per_round is None or 1 <= self.clients_per_round <= self.clients,
             f"--clients-per-round {self.clients_per_round} must be between 1 and --clients "
             f"{self.clients}")  # fmt: skip
        _at_least(self, one=("local_epochs", "local_batch", "rounds"))
        parse_partition(self.partition)
        server_optimizer(self.server_optimizer, self.server_lr)
        need(self.server_lr is None or 0 < self.server_lr < math.inf,
             f"--server-lr must be positive and finite, got {self.server_lr}")  # fmt: skip
        need(0 <= self.prox_mu < math.inf,
             f"--prox-mu must be a finite number >= 0, got {self.prox_mu}")  # fmt: skip
        need(self.dp_clip is None or self.dp_clip > 0,
             f"--dp-clip must be positive (a norm), got {self.dp_clip}")  # fmt: skip
        need(self.dp_noise >= 0, f"--dp-noise must be >= 0, got {self.dp_noise}")
        need(
            not self.dp_noise or self.dp_clip is not None,
            "--dp-noise needs --dp-clip: the noise is a multiple of the clipping norm",
        )

    def settings(self) -> dict | None:
        """What a federated checkpoint must match to resume (None: not federated)."""
        if self.clients is None:
            return None
        keys = ("clients", "clients_per_round", "local_epochs", "local_batch", "partition",
                "server_optimizer", "prox_mu", "dp_clip", "dp_noise", "secure_agg")  # fmt: skip
        return {k: getattr(self, k) for k in keys}


@dataclasses.dataclass(frozen=True)
class Game:
    """games and search (jaxpar.modes.games)"""

    game: str | None = None  # a pgx game: AlphaZero self-play and training (None: images)
    simulations: int = 32  # of Gumbel MuZero's search per move
    selfplay_games: int = 1024  # per iteration, over all the batch devices
    replay_size: int = 65536  # positions the replay ring keeps
    updates_per_iteration: int = 64  # optimizer updates on --batch-size positions each
    root_parallel: int = 1  # searches per move, on devices of the batch axes, then a vote
    search_batch: int = 64  # games a device searches at once (at most; the same on any mesh)
    opening_moves: int = 1  # first moves of a self-play game drawn at random (exploration)

    def check(self) -> None:
        if self.game is None:
            given = [f.name for f in dataclasses.fields(self)
                     if getattr(self, f.name) != f.default]  # fmt: skip
            need(not given, f"--{given[0].replace('_', '-') if given else ''} goes with --game")
            return
        from jaxpar.modes.games import GAMES

        need(self.game in GAMES, f"--game {self.game} is not supported; choose one of "
             f"{', '.join(GAMES)}")  # fmt: skip
        _at_least(self, one=("simulations", "selfplay_games", "replay_size",
                             "updates_per_iteration", "root_parallel",
                             "search_batch"), zero=("opening_moves",))  # fmt: skip

    def settings(self) -> dict | None:
        """What a game's checkpoint must match to resume (None: no game)."""
        if self.game is None:
            return None
        return {
            "game": self.game,
            "replay_size": self.replay_size,
            "updates_per_iteration": self.updates_per_iteration,  # the iteration's count
            # The state's parts: 2 since it keeps the earlier network an evaluation plays (item
            # 6); a checkpoint of layout 1 (none) is refused by name, not as unreadable.
            "layout": 2,
        }


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """workdir and checkpoints"""

    workdir: str | None = None  # None: runs/<date-time>
    restart: bool = False  # move a previous run in --workdir aside and start over
    checkpoint_every: int = 0  # 0: only at the end (and on SIGTERM/SIGINT)
    keep: int = 3  # checkpoints kept
    local_checkpoint_dir: str | None = None  # a fast node-local tier (`jaxpar.run.tiers`)
    local_checkpoint_every: int = 0  # steps between its saves (0: on a signal only)

    def check(self) -> None:
        remote = is_url(self.workdir)  # object storage (`jaxpar.run.storage`)
        if problem := url_problem(self.workdir) if remote else workdir_problem(self.workdir):
            raise UserError(problem)
        need(self.checkpoint_every >= 0,
             f"--checkpoint-every must be >= 0, got {self.checkpoint_every}")  # fmt: skip
        need(self.keep >= 1, f"--keep must be at least 1, got {self.keep}")
        local, every = self.local_checkpoint_dir, self.local_checkpoint_every
        need(every >= 0, f"--local-checkpoint-every must be >= 0, got {every}")
        need(local is not None or not every, "--local-checkpoint-every goes with "
             "--local-checkpoint-dir DIR (node-local storage such as /dev/shm)")  # fmt: skip
        need(not is_url(local), f"--local-checkpoint-dir {local}: name a node-local folder "
             "(such as /dev/shm); object storage goes in --workdir")  # fmt: skip
        need(local is None or not Path(local).exists() or Path(local).is_dir(),
             f"--local-checkpoint-dir {local} is a file; name a directory")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Job:
    """jobs (several processes or hosts)"""

    coordinator: str | None = None  # HOST:PORT of process 0 in a multi-process job
    num_processes: int | None = None
    process_id: int | None = None
    init_timeout: float = 120.0  # seconds the processes of a job wait for each other to start
    step_timeout: float | None = None  # a hang watchdog's deadline (`jaxpar.run.watchdog`)
    compile_cache: str | None = None  # a folder, or "off" (None: `jaxpar.run.compile_cache`)

    def check(self) -> None:
        need(self.init_timeout > 0, f"--init-timeout must be positive, got {self.init_timeout:g}")
        need(self.step_timeout is None or self.step_timeout > 0,
             f"--step-timeout must be positive seconds, got {self.step_timeout}")  # fmt: skip
        cache = self.compile_cache
        need(cache != "", "--compile-cache needs a folder, or off")
        need(cache in (None, "off") or not Path(cache).expanduser().is_file(),
             f"--compile-cache {cache} is a file; name a folder, or off")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Metrics:
    """observing"""

    eval_every: int = 0  # 0: once per epoch
    eval_examples: int | None = None  # the first N of the test split (0: no evaluation)
    log_every: int = 10
    profile_steps: str | None = None  # "A:B": JAX profiler trace of steps A to B-1
    dry_run: bool = False  # print the plan (placement, memory, collectives) and stop
    project: str | None = None  # with dry_run: CHIP[xN][:nodes=K], the step's time on that
    json: bool = False  # with dry_run: the plan as one JSON object

    def check(self) -> None:
        need(self.eval_every >= 0, f"--eval-every must be >= 0, got {self.eval_every}")
        need(self.eval_examples is None or self.eval_examples >= 0,
             f"--eval-examples must be >= 0, got {self.eval_examples}")  # fmt: skip
        need(
            self.profile_steps is None or self.profile_range() is not None,
            f"--profile-steps must be A:B with 0 <= A < B, got {self.profile_steps!r}",
        )
        need(self.log_every >= 1, f"--log-every must be at least 1, got {self.log_every}")
        for flag, given in (("--project", self.project is not None), ("--json", self.json)):
            need(self.dry_run or not given, f"{flag} goes with --dry-run (a plan, no training)")

    def profile_range(self) -> tuple[int, int] | None:
        a, _, b = (self.profile_steps or "").partition(":")
        if not (a.isdigit() and b.isdigit() and int(a) < int(b)):
            return None
        return int(a), int(b)


# A run file's sections and config.json's, in the --help's order: the name -> its dataclass.
SECTIONS = {"parallelism": Parallelism, "model": Model, "data": Data,
            "optimization": Optimization, "federated": Federated, "game": Game,
            "checkpoint": Checkpoint,
            "job": Job, "metrics": Metrics}  # fmt: skip
# Each field's section, by the field's (the flag's) name.
HOME = {f.name: name for name, kind in SECTIONS.items() for f in dataclasses.fields(kind)}


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a run depends on, in sections; defaults follow the seed program (MLP, batch
    128, SGD)."""

    parallelism: Parallelism = Parallelism()
    model: Model = Model()
    data: Data = Data()
    optimization: Optimization = Optimization()
    federated: Federated = Federated()
    game: Game = Game()
    checkpoint: Checkpoint = Checkpoint()
    job: Job = Job()
    metrics: Metrics = Metrics()

    @classmethod
    def of(cls, **fields) -> "Config":
        """A config from fields by their (the flags') names: ``Config.of(lr=0.1, mesh="2x2")``."""
        return cls().replace(**fields)

    def replace(self, **fields) -> "Config":
        """This config with the fields named (by their flags' names) changed."""
        if unknown := sorted(set(fields) - set(HOME)):
            raise TypeError(f"Config has no field {unknown[0]!r}")
        sections = {}
        for name, value in fields.items():
            sections.setdefault(HOME[name], {})[name] = value
        return dataclasses.replace(self, **{
            s: dataclasses.replace(getattr(self, s), **changes) for s, changes in sections.items()
        })  # fmt: skip

    def flat(self) -> dict:
        """Every field by its name, the sections dissolved (the flags' view)."""
        return {k: v for s in SECTIONS for k, v in dataclasses.asdict(getattr(self, s)).items()}

    @classmethod
    def from_json(cls, saved: dict) -> "Config":
        """A config from ``config.json``: in sections, or flat as before sections (fields this
        version does not know are left out)."""
        if any(isinstance(saved.get(s), dict) for s in SECTIONS):
            saved = {k: v for s in SECTIONS for k, v in saved.get(s, {}).items()}
        return cls.of(**{k: v for k, v in saved.items() if k in HOME})

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    def validate(self) -> "Config":
        """Each section checks its own fields; then how they meet. Returns the config with what
        some flags imply filled in (--rounds sets the steps, --project the mesh)."""
        from jaxpar.data.mixture import is_mixture, parse, rows_per_batch
        from jaxpar.modes import compose

        for name in SECTIONS:
            getattr(self, name).check()
        m, o, p, f = self.model, self.optimization, self.parallelism, self.federated
        if is_mixture(self.data.dataset):  # refuses a malformed mixture, or a share of no rows
            rows_per_batch(parse(self.data.dataset), o.batch_size, self.data.dataset)
        need(o.optimizer != "muon" or compose.family(m.model) == "mlp", f"--optimizer muon "
             f"with --model {m.model}: optax's Muon orthogonalises 2-D weights only, and this "
             "model's are stacked blocks or convolutions, which would train with its Adam; use "
             "it with the MLPs")  # fmt: skip
        project = self.metrics.project
        if project is not None:
            from jaxpar.core.mesh import parse_mesh
            from jaxpar.cost.projection import parse_hardware

            chips = parse_hardware(project).chips
            devices = parse_mesh(p.mesh).size if p.mesh else chips
            need(devices == chips, f"--mesh {p.mesh} has {devices} devices but --project "
                 f"{project} has {chips} chips; make them equal")  # fmt: skip
        need(project is None or f.clients is None,
             "--project does not model federated rounds; plan them without --project")  # fmt: skip
        vit = m.model.startswith("vit-")
        for flag, given in (("--patch-size", m.patch_size is not None),
                            ("--remat", p.remat != "none")):  # fmt: skip
            need(vit or not given, f"{flag} applies to the ViT models only (--model vit-...)")
        need(not (m.pretrain_epochs and is_url(self.checkpoint.workdir)),
             "--pretrain-epochs with a --workdir on object storage is not supported yet: "
             "pretrain in a local --workdir")  # fmt: skip
        compose.check(self)  # the declared matrix of modes that run together
        if f.clients is not None:
            self.check_federated()
        if self.game.game is not None:
            self.check_game()
        need(not (m.rbm and o.label_smoothing), "--label-smoothing with an RBM: it trains "
             "without labels")  # fmt: skip
        need(not (m.samples and m.precision != "fp32"), "--precision bf16 with an RBM or a "
             "pretrained DBN is not supported: Gibbs sampling computes in float32")  # fmt: skip
        need(not (m.rbm and self.data.labeled_fraction), "--labeled-fraction with an RBM: it "
             "trains without labels (a DBN's pretraining reads every image)")  # fmt: skip
        need(m.teacher is None or not o.label_smoothing, "--label-smoothing with --teacher: "
             "the teacher's soft targets take its place; use --distill-temperature and "
             "--distill-weight")  # fmt: skip
        changes = {}
        if project is not None and p.mesh is None:  # all the chips on the data axis
            changes["mesh"] = str(chips)
        if f.rounds is not None:
            changes["steps"] = f.rounds
        if f.clients is not None and f.clients_per_round is None:
            changes["clients_per_round"] = min(10, f.clients)
        return self.replace(**changes) if changes else self

    def check_federated(self) -> None:
        """What a federated run (``--clients``) refuses of the other sections."""
        from jaxpar.core.mesh import parse_mesh

        p, o = self.parallelism, self.optimization
        spec = parse_mesh(p.mesh) if p.mesh else None
        need(spec is None or (spec.stage == spec.fsdp == spec.model == 1),
             f"--clients spreads clients over the data axis only; mesh {p.mesh} also uses "
             "stage, fsdp or model: use --mesh data=N")  # fmt: skip
        need(p.steps_per_dispatch == 1, "--steps-per-dispatch does not apply to federated "
             "runs (--clients): a round is one step")  # fmt: skip
        need(o.schedule == "constant" and o.warmup_steps == 0, "--schedule and "
             "--warmup-steps do not apply to federated runs (--clients): the clients train at a "
             "constant --lr; the server's rate is --server-lr")  # fmt: skip
        given = [flag for flag, on in (
            ("--optimizer", o.optimizer != "sgd"), ("--momentum", o.momentum != 0.9),
            ("--weight-decay", o.weight_decay != 0), ("--clip-grad-norm",
             o.clip_grad_norm is not None), ("--label-smoothing", o.label_smoothing != 0),
        ) if on]  # fmt: skip
        need(not given, f"{given[0] if given else ''} does not apply to federated runs "
             "(--clients): the clients train with plain SGD at --lr; the server's optimizer is "
             "--server-optimizer")  # fmt: skip

    def check_game(self) -> None:
        """What a game's run (``--game``) refuses of the other sections: it makes its own data,
        one iteration is one step, and the policy-value network trains on the mover's positions
        without labels to smooth."""
        d, o, p = self.data, self.optimization, self.parallelism
        need(d == Data(), f"--game with --dataset {d.dataset}: a game makes its own data by "
             "self-play; drop the data flags")  # fmt: skip
        need(p.steps_per_dispatch == 1, "--steps-per-dispatch with --game is not supported "
             "yet: one iteration is one dispatch")  # fmt: skip
        need(not o.label_smoothing, "--label-smoothing with --game: the policy's targets are "
             "the search's visit distribution, already soft")  # fmt: skip

    def notes(self, total: int) -> list[str]:
        """One line for each flag that this run of `total` steps takes only in part (a later,
        longer run continues it): a ramp that ends after the run."""
        from jaxpar.modes.prune import sparsity

        m, o = self.model, self.optimization
        lines = []
        if m.prune_to and m.prune_end and m.prune_end > total:
            reached = float(sparsity(m.prune_to, m.prune_start, m.prune_end, total))
            lines.append(f"note: --prune-end {m.prune_end} is past the run's end (step "
                         f"{total}): it ends at sparsity {reached:.3g}, not --prune-to "
                         f"{m.prune_to:g}; a run continued to --steps {m.prune_end} reaches "
                         "it")  # fmt: skip
        if o.warmup_steps > total and self.federated.clients is None:
            reached = (total - 1) / o.warmup_steps  # the rate of the run's last update
            lines.append(f"note: --warmup-steps {o.warmup_steps} is past the run's end (step "
                         f"{total}): the learning rate reaches {reached:.3g} of --lr")  # fmt: skip
        return lines


def workdir_problem(workdir: str | None) -> str | None:
    """Why `workdir` (None: the default ``runs/DATE-TIME``) cannot be a directory, or None.

    Checked before anything is written: the path itself, or its nearest existing ancestor, is a
    file rather than a directory.
    """
    path = Path(workdir) if workdir else Path("runs/DATE-TIME")
    flag = f"--workdir {workdir}" if workdir else f"the default workdir {path.parent}/"
    try:
        if path.exists():
            return None if path.is_dir() else f"{flag} is a file; name a directory"
        ancestor = next((p for p in path.absolute().parents if p.exists()), None)
    except OSError:  # e.g. a folder we may not read: the run itself reports what it meets
        return None
    if ancestor is not None and not ancestor.is_dir():
        return (
            f"{flag} cannot be created: {ancestor} is a file, not a directory; "
            "choose a --workdir outside it"
        )
    return None
