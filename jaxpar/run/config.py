"""The run configuration: one flat dataclass, checked once, written to ``WORKDIR/config.json``."""

import dataclasses
import json
import math
from pathlib import Path

from jaxpar.core.errors import UserError

# The federated-learning fields: any of them given without --clients is refused.
FEDERATED = ("clients_per_round", "local_epochs", "local_batch", "rounds", "partition",
             "server_optimizer", "server_lr", "prox_mu", "dp_clip", "dp_noise",
             "secure_agg")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a run depends on; defaults follow the seed program (MLP, batch 128, SGD)."""

    mesh: str | None = None  # None: every device on the data axis
    model: str = "mlp"
    dataset: str = "digits"
    data_dir: str | None = None
    labels: str = "shared"  # a mixture's label space: shared, or joint (`jaxpar.data.mixture`)
    resize_sources: bool = False  # a mixture's sources resized to the first one's image shape
    data_workers: int = 0  # grain worker processes reading training batches (0: this process)
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
    workdir: str | None = None  # None: runs/<date-time>
    precision: str = "fp32"
    checkpoint_every: int = 0  # 0: only at the end (and on SIGTERM/SIGINT)
    keep: int = 3  # checkpoints kept
    restart: bool = False  # move a previous run in --workdir aside and start over
    eval_every: int = 0  # 0: once per epoch
    eval_examples: int | None = None  # the first N of the test split (0: no evaluation)
    log_every: int = 10
    steps_per_dispatch: int = 1  # >1: that many steps in one program (lax.scan), for tiny models
    grad_accum: int = 1  # microbatches per step, their gradients averaged (a memory knob)
    remat: str = "none"  # "block": recompute each transformer block in the backward pass
    microbatches: int = 0  # pipeline microbatches per step (0: one per stage)
    pipeline: str = "gpipe"  # pipeline schedule: gpipe or circular:R
    sync: str = "every-step"  # data-parallel replicas: every-step, local:H, diloco:H, stale:T
    outer_lr: float = 0.7  # DiLoCo's outer Nesterov SGD
    outer_momentum: float = 0.9
    patch_size: int | None = None  # ViT patch size (None: from the image size)
    init_from: str | None = (
        None  # a workdir (its latest checkpoint) or a weights file to start from
    )
    freeze: str | None = None  # "backbone": only the classifier head trains
    teacher: str | None = None  # a trained workdir distilled into this model (`modes.distill`)
    distill_temperature: float = 4.0
    distill_weight: float = 0.9  # the distillation term's share of the loss
    prune_to: float | None = None  # magnitude pruning to this sparsity (`jaxpar.modes.prune`)
    prune_start: int = 0  # step the sparsity starts rising
    prune_end: int | None = None  # step it reaches --prune-to (None: 3/4 of the run)
    qat: str | None = None  # "int8": quantization-aware training (`jaxpar.modes.quantize`)
    profile_steps: str | None = None  # "A:B": JAX profiler trace of steps A to B-1
    dry_run: bool = False  # print the plan (placement, memory, collectives) and stop
    project: str | None = None  # with dry_run: CHIP[xN][:nodes=K], the step's time on that
    json: bool = False  # with dry_run: the plan as one JSON object
    coordinator: str | None = None  # HOST:PORT of process 0 in a multi-process job
    num_processes: int | None = None
    process_id: int | None = None
    init_timeout: float = 120.0  # seconds the processes of a job wait for each other to start
    # Federated learning (`jaxpar.modes.federated`): None clients is not federated.
    clients: int | None = None
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

    def validate(self) -> "Config":
        from jaxpar.core.optimizers import OPTIMIZERS
        from jaxpar.data import loader
        from jaxpar.data.mixture import LABELS, is_mixture, parse, rows_per_batch
        from jaxpar.models import MODELS
        from jaxpar.modes import compose
        from jaxpar.modes.pipeline import parse_pipeline
        from jaxpar.modes.quantize import QAT
        from jaxpar.modes.sync import parse_sync

        def need(ok, message):
            if not ok:
                raise UserError(message)

        MODELS.lookup(self.model, "model")  # a user's own: module:attribute, imported
        if is_mixture(self.dataset):  # refuses a malformed mixture, or a share of no rows
            rows_per_batch(parse(self.dataset), self.batch_size, self.dataset)
        else:
            loader(self.dataset)
        need(self.labels in LABELS, f"--labels {self.labels}: choose {' or '.join(LABELS)}")
        need(self.labels == "shared" or is_mixture(self.dataset),
             "--labels joint goes with a mixture (--dataset NAME=SHARE,...)")  # fmt: skip
        need(not self.resize_sources or is_mixture(self.dataset),
             "--resize-sources goes with a mixture (--dataset NAME=SHARE,...)")  # fmt: skip
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
        if problem := workdir_problem(self.workdir):
            raise UserError(problem)
        need(self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}")
        need(self.steps is None or self.steps >= 1, f"--steps must be at least 1, got {self.steps}")
        need(self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}")
        need(self.data_workers >= 0, f"--data-workers must be >= 0, got {self.data_workers}")
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
        need(self.optimizer == "sgd" or self.momentum == Config.momentum,
             f"--momentum is SGD's; --optimizer {self.optimizer} keeps its own moments, so "
             "--momentum would change nothing")  # fmt: skip
        need(self.optimizer != "adam" or not self.weight_decay, "--optimizer adam has no weight "
             "decay; use --optimizer adamw for decoupled decay")  # fmt: skip
        need(self.optimizer != "muon" or compose.family(self.model) == "mlp", f"--optimizer muon "
             f"with --model {self.model}: optax's Muon orthogonalises 2-D weights only, and this "
             "model's are stacked blocks or convolutions, which would train with its Adam; use "
             "it with the MLPs")  # fmt: skip
        need(self.schedule in ("constant", "cosine"), f"unknown schedule '{self.schedule}'")
        need(
            0 <= self.seed < 2**32,
            f"--seed must be in [0, 2**32) (0 to 4294967295), got {self.seed}",
        )
        need(self.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        need(self.precision in ("fp32", "bf16"), f"unknown precision '{self.precision}'")
        for flag in ("checkpoint_every", "eval_every"):
            value = getattr(self, flag)
            need(value >= 0, f"--{flag.replace('_', '-')} must be >= 0, got {value}")
        need(self.keep >= 1, f"--keep must be at least 1, got {self.keep}")
        need(self.eval_examples is None or self.eval_examples >= 0,
             f"--eval-examples must be >= 0, got {self.eval_examples}")  # fmt: skip
        need(
            self.profile_steps is None or self.profile_range() is not None,
            f"--profile-steps must be A:B with 0 <= A < B, got {self.profile_steps!r}",
        )
        need(self.log_every >= 1, f"--log-every must be at least 1, got {self.log_every}")
        need(
            self.steps_per_dispatch >= 1,
            f"--steps-per-dispatch must be at least 1, got {self.steps_per_dispatch}",
        )
        need(self.grad_accum >= 1, f"--grad-accum must be at least 1, got {self.grad_accum}")
        need(self.remat in ("none", "block"), f"unknown --remat '{self.remat}'; use none or block")
        need(self.microbatches >= 0, f"--microbatches must be >= 0, got {self.microbatches}")
        parse_pipeline(self.pipeline)
        parse_sync(self.sync)
        need(0 < self.outer_lr < math.inf,
             f"--outer-lr must be positive and finite, got {self.outer_lr}")  # fmt: skip
        need(0 <= self.outer_momentum < 1,
             f"--outer-momentum must be in [0, 1), got {self.outer_momentum}")  # fmt: skip
        need(
            self.patch_size is None or self.patch_size >= 1,
            f"--patch-size must be at least 1, got {self.patch_size}",
        )
        need(
            self.freeze in (None, "backbone"),
            f"unknown --freeze {self.freeze!r}; the one choice is backbone (all but the head)",
        )
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
        need(self.init_timeout > 0, f"--init-timeout must be positive, got {self.init_timeout:g}")
        if self.project is not None:
            from jaxpar.core.mesh import parse_mesh
            from jaxpar.cost.projection import parse_hardware

            chips = parse_hardware(self.project).chips
            devices = parse_mesh(self.mesh).size if self.mesh else chips
            need(devices == chips, f"--mesh {self.mesh} has {devices} devices but --project "
                 f"{self.project} has {chips} chips; make them equal")  # fmt: skip
        need(self.project is None or self.clients is None,
             "--project does not model federated rounds; plan them without --project")  # fmt: skip
        for flag, given in (("--project", self.project is not None), ("--json", self.json)):
            need(self.dry_run or not given, f"{flag} goes with --dry-run (a plan, no training)")
        vit = self.model.startswith("vit-")
        for flag, given in (("--patch-size", self.patch_size is not None),
                            ("--remat", self.remat != "none")):  # fmt: skip
            need(vit or not given, f"{flag} applies to the ViT models only (--model vit-...)")
        compose.check(self)  # the declared matrix of modes that run together
        self.check_federated(need)
        # Flags that would change nothing are refused rather than silently ignored.
        outer = (self.outer_lr, self.outer_momentum) != (Config.outer_lr, Config.outer_momentum)
        need(self.sync.startswith("diloco:") or not outer, "--outer-lr and --outer-momentum go "
             "with --sync diloco:H; without it they change nothing")  # fmt: skip
        distill = (self.distill_temperature, self.distill_weight) != (
            Config.distill_temperature, Config.distill_weight)  # fmt: skip
        need(self.teacher is not None or not distill, "--distill-temperature and "
             "--distill-weight go with --teacher; without it they change nothing")  # fmt: skip
        need(self.teacher is None or not self.label_smoothing, "--label-smoothing with --teacher: "
             "the teacher's soft targets take its place; use --distill-temperature and "
             "--distill-weight")  # fmt: skip
        changes = {}
        if self.project is not None and self.mesh is None:  # all the chips on the data axis
            changes["mesh"] = str(chips)
        if self.rounds is not None:
            changes["steps"] = self.rounds
        if self.clients is not None and self.clients_per_round is None:
            changes["clients_per_round"] = min(10, self.clients)
        return dataclasses.replace(self, **changes) if changes else self

    def notes(self, total: int) -> list[str]:
        """One line for each flag that this run of `total` steps takes only in part (a later,
        longer run continues it): a ramp that ends after the run."""
        from jaxpar.modes.prune import sparsity

        lines = []
        if self.prune_to and self.prune_end and self.prune_end > total:
            reached = float(sparsity(self.prune_to, self.prune_start, self.prune_end, total))
            lines.append(f"note: --prune-end {self.prune_end} is past the run's end (step "
                         f"{total}): it ends at sparsity {reached:.3g}, not --prune-to "
                         f"{self.prune_to:g}; a run continued to --steps {self.prune_end} reaches "
                         "it")  # fmt: skip
        if self.warmup_steps > total and self.clients is None:
            reached = (total - 1) / self.warmup_steps  # the rate of the run's last update
            lines.append(f"note: --warmup-steps {self.warmup_steps} is past the run's end (step "
                         f"{total}): the learning rate reaches {reached:.3g} of --lr")  # fmt: skip
        return lines

    def check_federated(self, need) -> None:
        if self.clients is None:
            given = [f for f in FEDERATED if getattr(self, f) != getattr(Config, f)]
            need(not given, f"--{given[0].replace('_', '-') if given else ''} goes with --clients "
                 "(federated learning)")  # fmt: skip
            return
        from jaxpar.core.mesh import parse_mesh
        from jaxpar.modes.federated import parse_partition, server_optimizer

        need(self.clients >= 1, f"--clients must be at least 1, got {self.clients}")
        spec = parse_mesh(self.mesh) if self.mesh else None
        need(spec is None or (spec.stage == spec.fsdp == spec.model == 1),
             f"--clients spreads clients over the data axis only; mesh {self.mesh} also uses "
             "stage, fsdp or model: use --mesh data=N")  # fmt: skip
        need(self.clients_per_round is None or 1 <= self.clients_per_round <= self.clients,
             f"--clients-per-round {self.clients_per_round} must be between 1 and --clients "
             f"{self.clients}")  # fmt: skip
        for flag in ("local_epochs", "local_batch", "rounds"):
            value = getattr(self, flag)
            need(value is None or value >= 1,
                 f"--{flag.replace('_', '-')} must be at least 1, got {value}")  # fmt: skip
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
        need(self.steps_per_dispatch == 1, "--steps-per-dispatch does not apply to federated "
             "runs (--clients): a round is one step")  # fmt: skip
        need(self.schedule == "constant" and self.warmup_steps == 0, "--schedule and "
             "--warmup-steps do not apply to federated runs (--clients): the clients train at a "
             "constant --lr; the server's rate is --server-lr")  # fmt: skip
        given = [flag for flag, on in (
            ("--optimizer", self.optimizer != "sgd"), ("--momentum", self.momentum != 0.9),
            ("--weight-decay", self.weight_decay != 0), ("--clip-grad-norm",
             self.clip_grad_norm is not None), ("--label-smoothing", self.label_smoothing != 0),
        ) if on]  # fmt: skip
        need(not given, f"{given[0] if given else ''} does not apply to federated runs "
             "(--clients): the clients train with plain SGD at --lr; the server's optimizer is "
             "--server-optimizer")  # fmt: skip

    def federated(self) -> dict | None:
        """The settings a federated checkpoint must match to resume (None: not federated)."""
        if self.clients is None:
            return None
        keys = ("clients", "clients_per_round", "local_epochs", "local_batch", "partition",
                "server_optimizer", "prox_mu", "dp_clip", "dp_noise", "secure_agg")  # fmt: skip
        return {k: getattr(self, k) for k in keys}

    def profile_range(self) -> tuple[int, int] | None:
        a, _, b = (self.profile_steps or "").partition(":")
        if not (a.isdigit() and b.isdigit() and int(a) < int(b)):
            return None
        return int(a), int(b)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


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
