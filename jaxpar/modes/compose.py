"""Which training modes compose: one declared matrix, read by the config check,
docs/composing.md's table and the tests.

A `Feature` is a mode that flags turn on (``--sync local:H``, ``--prune-to``, ``--clients``...).
Any two features are supported together unless `REFUSED` names the pair, and a feature runs on
every model family unless `FAMILY_REFUSED` names the cell; each refusal carries its reason.
`check` refuses a run that asks for a refused cell in one line (exit status 2, nothing written),
naming both sides; ``python -m jaxpar.modes.compose`` prints the matrix for docs/composing.md; and
``tests/test_compose.py`` runs every supported cell, generated from the same declarations:

- a pair reduces to its parts: with one side at its `Feature.off` flags (``--sync local:1``,
  ``--prune-to 0``...) the pair's losses are the other side's alone;
- a pair of which neither side reduces (``--qat`` with ``--freeze``) is stopped and resumed on
  another mesh, and must write the uninterrupted run's metrics.

A new mode adds one `Feature` and its refusals here; the table and the tests follow.
"""

import dataclasses
import itertools
import sys
from collections.abc import Callable

from jaxpar.core.errors import UserError

FAMILIES = {  # model family -> how `--model` names its members
    "mlp": ("mlp", "2nn"),
    "resnet": ("resnet8", "resnet18", "resnet34", "resnet50"),
    "vit": ("vit-",),
    "rbm": ("rbm:",),
    "dbn": ("dbn:",),
}


def family(model: str) -> str:
    """The family of `model` (a registered test model ``vit-test`` is a ViT).

    >>> family("resnet18"), family("vit-lite"), family("2nn")
    ('resnet', 'vit', 'mlp')
    """
    if model.startswith("vit-"):
        return "vit"
    if model.startswith(("rbm:", "dbn:")):
        return model[:3]
    return "resnet" if model.startswith("resnet") else "mlp"


def _stages(cfg) -> int:
    from jaxpar.core.mesh import parse_mesh

    return parse_mesh(cfg.parallelism.mesh).stage if cfg.parallelism.mesh else 1


def _pipeline_asked(cfg) -> str:
    """What asks for a pipeline: ``stage=2 in the mesh``, ``--microbatches 4``..."""
    asked = [f"stage={_stages(cfg)} in the mesh"] if _stages(cfg) > 1 else []
    p = cfg.parallelism
    asked += [f"--microbatches {p.microbatches}"] if p.microbatches > 1 else []
    asked += [f"--pipeline {p.pipeline}"] if p.pipeline != "gpipe" else []
    return "a pipeline (" + " and ".join(asked) + ")"


@dataclasses.dataclass(frozen=True)
class Feature:
    """A mode of training that flags turn on, and how the tests exercise it."""

    name: str  # its row and column in the matrix
    flag: str  # how errors and docs/composing.md name it
    on: Callable  # Config -> whether a run uses it
    example: dict  # Config fields that turn it on in the tests (small; TEACHER, INIT: fixtures)
    off: dict | None = None  # fields at which it equals the run without it (None: none exist)
    needs: dict = dataclasses.field(default_factory=dict)  # fields both runs of `off` need
    group: str | None = None  # features one flag chooses between (never on together)
    asked: Callable | None = None  # Config -> what in this run turned it on (else `flag`)
    # Whether `off` stays exact under BatchNorm; False where the batch statistics come from a
    # share of the batch (a replica's, a microbatch's): there the family's cell resumes instead.
    off_under_batchnorm: bool = True
    # What a resume keeps: the checkpoint manifest's fields this feature sets, which a resume
    # must match (`jaxpar.run.checkpoint.IDENTITY` is made of them), and what else it must keep.
    pins: tuple = ()
    keeps: str = ""

    def named(self, cfg) -> str:
        return self.asked(cfg) if self.asked else self.flag


def _sync(kind: str) -> Callable:
    return lambda c: c.parallelism.sync.startswith(f"{kind}:") and c.parallelism.sync != "stale:0"


_REPLICAS = "a mesh with as many data-parallel devices (one model per replica)"
FEATURES = [
    Feature("local", "--sync local:H", _sync("local"), {"sync": "local:2"},
            off={"sync": "local:1"}, needs={"momentum": 0.0}, group="sync",
            off_under_batchnorm=False, pins=("sync",), keeps=_REPLICAS),
    Feature("diloco", "--sync diloco:H", _sync("diloco"), {"sync": "diloco:2"},
            off={"sync": "diloco:1", "outer_lr": 1.0, "outer_momentum": 0.0},
            needs={"momentum": 0.0}, group="sync", off_under_batchnorm=False, pins=("sync",),
            keeps=_REPLICAS),
    Feature("stale", "--sync stale:T", _sync("stale"), {"sync": "stale:2"}, group="sync",
            pins=("sync",)),
    Feature("federated", "--clients N", lambda c: c.federated.clients is not None,
            {"clients": 8, "clients_per_round": 4, "local_batch": 16}, pins=("federated",)),
    Feature("pipeline", "a pipeline (stage > 1 in --mesh, --microbatches, --pipeline)",
            lambda c: _stages(c) > 1 or c.parallelism.microbatches > 1
            or c.parallelism.pipeline != "gpipe",
            {"mesh": "stage=2,data=2"}, off={}, asked=_pipeline_asked),
    Feature("grad_accum", "--grad-accum K", lambda c: c.parallelism.grad_accum > 1,
            {"grad_accum": 2}, off={}, off_under_batchnorm=False),
    Feature("prune", "--prune-to S", lambda c: c.model.prune_to is not None, {"prune_to": 0.5},
            off={"prune_to": 0.0}, pins=("prune_to",),
            keeps="its schedule's end (--prune-end, or 3/4 of the run that began it)"),
    Feature("distill", "--teacher DIR", lambda c: c.model.teacher is not None,
            {"teacher": "TEACHER"}, off={"distill_weight": 0.0}, pins=("teacher",)),
    Feature("qat", "--qat int8", lambda c: c.model.qat is not None, {"qat": "int8"}, pins=("qat",)),
    Feature("freeze", "--freeze backbone", lambda c: c.model.freeze is not None,
            {"freeze": "backbone"}, pins=("freeze",)),
    Feature("init_from", "--init-from", lambda c: c.model.init_from is not None,
            {"init_from": "INIT"}, keeps="nothing: it sets the first start's weights only"),
    Feature("workers", "--data-workers N", lambda c: c.data.data_workers > 0, {"data_workers": 1},
            off={}),
    Feature("mixture", "--dataset A=S,B=S (mixture)", lambda c: "=" in c.data.dataset,
            {"dataset": "synthetic:8x8x1:10=0.75,synthetic:8x8x1:5=0.25"},
            pins=("dataset",)),
    # The average never changes the training: on, the losses are the run's without it.
    Feature("ema", "--ema DECAY", lambda c: c.optimization.ema is not None, {"ema": 0.9}, off={},
            pins=("ema",)),
    # SIGMA inf skips only non-finite steps, which an ordinary run has none of.
    Feature("spikes", "--skip-spikes K", lambda c: c.optimization.skip_spikes is not None,
            {"skip_spikes": "3"}, off={"skip_spikes": "3:inf"}, pins=("spikes",)),
    Feature("game", "--game NAME", lambda c: c.game.game is not None,
            {"game": "tic_tac_toe", "simulations": 4, "selfplay_games": 16, "replay_size": 256,
             "updates_per_iteration": 2, "search_batch": 4, "eval_examples": 32},
            pins=("game",)),
]  # fmt: skip
BY_NAME = {f.name: f for f in FEATURES}

_ROUND = "a federated round is one step of its own, in which the clients train with plain SGD"
REFUSED = {  # {feature, feature} -> why the two do not run together
    **{frozenset({"federated", s}): f"{_ROUND}; --sync lays out data-parallel replicas"
       for s in ("local", "diloco", "stale")},
    **{frozenset({"federated", f}): _ROUND
       for f in ("grad_accum", "prune", "distill", "qat", "freeze")},
    frozenset({"federated", "pipeline"}): "the clients spread over the data axis only; use "
                                          "--mesh data=N and no --microbatches or --pipeline",
    frozenset({"federated", "workers"}): "a round's clients are read in the training process",
    frozenset({"federated", "mixture"}): "the clients' partition is of one dataset",
    **{frozenset({"distill", s}): "the teacher rides in the train state, which the sync modes "
                                  "lay out per replica or per step; distil with every-step sync"
       for s in ("local", "diloco", "stale")},
    **{frozenset({"pipeline", s}): "the replicas are laid out on the data axis without the "
                                   "stage axis; use every-step or stale sync with stages"
       for s in ("local", "diloco")},
    **{frozenset({"prune", s}): "each replica ranks and masks its own weights, so their "
                                "average is dense again; prune with every-step or stale sync"
       for s in ("local", "diloco")},
    **{frozenset({"ema", s}): "each replica would average its own weights, and evaluation "
                              "sees the replicas' mean; average with every-step or stale sync"
       for s in ("local", "diloco")},
    frozenset({"ema", "federated"}): _ROUND + "; the server's model is the round's average",
    frozenset({"spikes", "federated"}): _ROUND + "; not yet: a round's clients' losses are "
                                        "judged apart",
    frozenset({"ema", "prune"}): "the average of weights on their way to a mask is dense; "
                                 "prune without --ema",
    frozenset({"prune", "freeze"}): "the frozen backbone would lose weights it can no longer "
                                    "retrain; prune without --freeze, or prune the trained run "
                                    "with python -m jaxpar.compress",
}  # fmt: skip
_SELFPLAY = "not yet: an AlphaZero iteration is self-play and plain updates of one network"
REFUSED |= {  # --game with every other mode: none composes with self-play yet
    frozenset({"game", f.name}): _SELFPLAY for f in FEATURES if f.name != "game"
}  # fmt: skip
REFUSED |= {
    frozenset({"game", "federated"}): "the clients' data are examples; a game makes its own",
    frozenset({"game", "mixture"}): "a game makes its own data by self-play",
    frozenset({"game", "workers"}): "a game makes its own data by self-play, on the devices",
    frozenset({"game", "pipeline"}): "the policy-value networks (MLPs, ResNets) have no stages",
}
FAMILY_REFUSED = {  # (feature, family) -> why the feature does not run on that family
    ("pipeline", "mlp"): "its layers are not uniform: only the ViTs' stacked blocks split into "
                         "stages",
    ("pipeline", "resnet"): "its layers are not uniform: only the ViTs' stacked blocks split "
                            "into stages",
    ("federated", "resnet"): "BatchNorm would normalise over the padding of the clients' last "
                             "batches",
    ("qat", "vit"): "qwix replaces each weight as a module attribute, and a ViT's scanned "
                    "blocks are one stacked array per weight that it cannot replace",
    ("game", "vit"): "not yet: a position is no image of patches",
    **{(f, "rbm"): "not yet: an RBM trains without labels, by contrastive divergence; its "
                   "step is every-step's" for f in ("local", "diloco", "stale", "federated",
                                                     "grad_accum", "ema", "mixture")},
    ("pipeline", "rbm"): "an RBM is one layer: it has no stages",
    ("spikes", "rbm"): "not yet: an RBM's training loss is contrastive divergence's, whose "
                       "running statistics are untested",
    ("prune", "rbm"): "not yet: pruning an RBM's one weight matrix is untested",
    ("distill", "rbm"): "an RBM has no logits to match a teacher's",
    ("qat", "rbm"): "not yet: an RBM's weights are no nnx.Linear that qwix replaces",
    ("freeze", "rbm"): "an RBM has no classifier head to train alone",
    ("init_from", "rbm"): "not yet: an RBM's weights from another run",
    ("game", "rbm"): "a game's network is a policy-value network, not an RBM",
    **{(f, "dbn"): "not yet: a DBN's pretraining is plain RBM training, and its fine-tuning "
                   "is tested alone" for f in ("local", "diloco", "stale", "federated",
                                                "grad_accum", "prune", "distill", "qat", "ema",
                                                "mixture", "spikes")},
    ("pipeline", "dbn"): "its layers are not uniform: only the ViTs' stacked blocks split into "
                         "stages",
    ("freeze", "dbn"): "not yet: a head trained alone on a DBN's pretrained features is "
                       "untested",
    ("game", "dbn"): "a game's network is a policy-value network, not a DBN",
}  # fmt: skip
_VMAPPED_CONV = ("XLA's partitioner (jax 0.10.2) miscompiles convolutions vmapped over the "
                 "replicas with their channels sharded over model: the losses change; use "
                 "data and fsdp axes only")  # fmt: skip
AXIS_REFUSED = {  # (feature, family, mesh axis) -> why the feature cannot use that axis there
    ("local", "resnet", "model"): _VMAPPED_CONV,
    ("diloco", "resnet", "model"): _VMAPPED_CONV,
}


def active(cfg) -> list[Feature]:
    """The features `cfg` turns on."""
    return [f for f in FEATURES if f.on(cfg)]


def check(cfg) -> None:
    """Refuse a refused cell of the matrix that `cfg` asks for, in one line naming both sides."""
    on = active(cfg)
    for a, b in itertools.combinations(on, 2):
        if reason := REFUSED.get(frozenset({a.name, b.name})):
            raise UserError(f"{a.named(cfg)} with {b.named(cfg)} is not supported: {reason}")
    kind = family(cfg.model.model)
    for f in on:
        if reason := FAMILY_REFUSED.get((f.name, kind)):
            raise UserError(
                f"{f.named(cfg)} with --model {cfg.model.model} is not supported: {reason}"
            )
    if cfg.parallelism.mesh:
        from jaxpar.core.mesh import parse_mesh

        spec = parse_mesh(cfg.parallelism.mesh)
        for (name, of, axis), reason in AXIS_REFUSED.items():
            if of == kind and getattr(spec, axis) > 1 and BY_NAME[name] in on:
                raise UserError(f"{BY_NAME[name].named(cfg)} on a mesh with {axis}="
                                f"{getattr(spec, axis)} is not supported for --model "
                                f"{cfg.model.model}: {reason}")  # fmt: skip


def pinned() -> tuple:
    """The manifest fields that the features pin for a resume, in declaration order."""
    return tuple(dict.fromkeys(k for f in FEATURES for k in f.pins))


def families(*features: Feature) -> list[str]:
    """The model families that run all of `features`."""
    return [k for k in FAMILIES if all((f.name, k) not in FAMILY_REFUSED for f in features)]


def refused(a: Feature, b: Feature) -> str | None:
    """Why `a` and `b` do not run together, or None."""
    if reason := REFUSED.get(frozenset({a.name, b.name})):
        return reason
    if not families(a, b):
        a, b = sorted((a, b), key=FEATURES.index)
        return f"no model family runs both ({a.name}: {', '.join(families(a))}; {b.name}: " \
               f"{', '.join(families(b))})"  # fmt: skip
    return None


def exclusive(a: Feature, b: Feature) -> bool:
    """Whether one flag chooses between `a` and `b` (``--sync``): no run has both."""
    return a is b or (a.group is not None and a.group == b.group)


def supported_pairs() -> list[tuple[Feature, Feature]]:
    return [(a, b) for a, b in itertools.combinations(FEATURES, 2)
            if refused(a, b) is None and not exclusive(a, b)]  # fmt: skip


def supported_families() -> list[tuple[Feature, str]]:
    return [(f, k) for f in FEATURES for k in FAMILIES if (f.name, k) not in FAMILY_REFUSED]


def table() -> str:
    """The matrix in Markdown: ``ok`` for a tested cell, a number for a refused one (the
    numbered reasons below), ``-`` where one flag chooses between the two."""
    reasons, names = [], [f.name for f in FEATURES]

    def cell(reason):
        if reason is None:
            return "ok"
        if reason not in reasons:
            reasons.append(reason)
        return str(reasons.index(reason) + 1)

    rows = ["| | " + " | ".join([*names, *FAMILIES]) + " |",
            "|---" * (1 + len(names) + len(FAMILIES)) + "|"]  # fmt: skip
    for a in FEATURES:
        cells = ["-" if exclusive(a, b) else cell(refused(a, b)) for b in FEATURES]
        cells += [cell(FAMILY_REFUSED.get((a.name, k))) for k in FAMILIES]
        rows.append(f"| {a.name} | " + " | ".join(cells) + " |")
    rows.append("")
    rows.append("; ".join(f"{f.name}: `{f.flag}`" for f in FEATURES) + ".")
    rows.append("")
    rows += [f"{i}. {r}." for i, r in enumerate(reasons, 1)]
    rows.append("")
    rows.append("On some mesh axes:")
    rows.append("")
    rows += [f"- {name} on a {of} with {axis} > 1 is refused: {reason}."
             for (name, of, axis), reason in AXIS_REFUSED.items()]  # fmt: skip
    rows += ["", "What a resume must keep (it may change the rest: the mesh, the process count, "
             "--data-workers, --steps-per-dispatch):", ""]  # fmt: skip
    for f in FEATURES:
        kept = [f"the same `{k}`" for k in f.pins] + ([f.keeps] if f.keeps else [])
        rows.append(f"- {f.name}: {'; '.join(kept) or 'nothing'}.")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.stdout.write(table() + "\n")
