"""``--init-from``: a run that starts from the model weights of another run's checkpoint or of a
PyTorch weights file (`jaxpar.models.pytorch`), checked before the workdir is touched and loaded
when the run starts fresh, into any mesh's shardings."""

from pathlib import Path

import jax

from jaxpar.core.errors import UserError
from jaxpar.models.pytorch import convert, read_tensors, sha256
from jaxpar.run.checkpoint import Checkpoints, check_revision, latest_manifest, restore_model


def _flat(tree) -> dict:
    """A pure dict's leaves by key path (tuples of dict keys)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(k.key for k in path): leaf for path, leaf in leaves}


def _nest(flat: dict) -> dict:
    tree = {}
    for path, leaf in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf
    return tree


def _matching(saved: dict, abstract: dict, model: str, source) -> tuple[list, list[str]]:
    """The paths of `abstract` (a model's pure dict) that `saved` (path -> shape) provides, and
    notes. A classifier head of another shape stays out (the run starts it fresh); any other
    parameter missing or of another shape is an error naming it."""
    paths, notes = [], []
    saved = {tuple(map(str, path)): shape for path, shape in saved.items()}  # Orbax: "0", not 0
    for path, leaf in _flat(abstract).items():
        name, there = "/".join(map(str, path)), saved.get(tuple(map(str, path)))
        if there is None:
            raise UserError(f"--init-from {source} has no {name} for --model {model}")
        if tuple(there) == tuple(leaf.shape):
            paths.append(path)
        elif path[0] == "head":  # one note for the head: its class counts
            note = (
                f"a fresh classifier head ({there[-1]} classes in {source}, {leaf.shape[-1]} here)"
            )
            notes += [note] if note not in notes else []
        else:
            raise UserError(
                f"--init-from {source}: {name} is {tuple(there)} there, {tuple(leaf.shape)} "
                "here (another image shape or model size?)"
            )
    return paths, notes


def weights_from(source, model: str, image_shape, abstract: dict):
    """Check now that `source` (a workdir's latest checkpoint, or a PyTorch weights file) holds
    weights for `model` at `image_shape`; load them later, when a run starts fresh.

    `abstract`: the model's pure dict of shapes. Returns ``(load, notes)``: ``load(shardings)``
    gives a pure dict of the parameters `source` provides (all but a fresh head), each placed in
    its `NamedSharding` (any mesh, any process count); `notes` say what will be used.
    """
    source = Path(source)
    if source.is_file():
        params, _ = convert(read_tensors(source), model, image_shape)
        flat = _flat(params)
        paths, notes = _matching({p: v.shape for p, v in flat.items()}, abstract, model, source)

        def from_file(shardings):
            places = _flat(shardings)
            return _nest({
                p: jax.make_array_from_callback(flat[p].shape, places[p], lambda i, a=flat[p]: a[i])
                for p in paths
            })  # fmt: skip

        return from_file, [f"initialised from {source} (sha256 {sha256(source)[:12]})", *notes]
    step, manifest = latest_manifest(source, f"--init-from {source}")
    if manifest.get("model") != model:
        raise UserError(
            f"--init-from {source} holds {manifest.get('model')} weights, not --model {model}"
        )
    check_revision(manifest, model, f"--init-from {source}")
    ckpts = Checkpoints(source)
    try:
        meta = ckpts.manager.item_metadata(step)["state"]["model"]
        saved = {path: m.shape for path, m in _flat(meta).items()}
        paths, notes = _matching(saved, abstract, model, source)
    finally:
        ckpts.close()

    def from_checkpoint(shardings):
        flat, places = _flat(abstract), _flat(shardings)
        part = lambda tree: _nest({p: tree[p] for p in paths})  # noqa: E731
        return restore_model(source, step, part(flat), part(places))

    return from_checkpoint, [f"initialised from {source} (step {step})", *notes]


def starting_from(source, model: str, image_shape, fresh, abstract: dict, shardings: dict, say):
    """`fresh` (``() -> a new state``) with the model weights of `source` (``--init-from``):
    checked now, before the workdir is touched; loaded, and `say`-ing what is used, when the
    run starts fresh (a resume reads its own checkpoint)."""
    return starting_with(*weights_from(source, model, image_shape, abstract), fresh, shardings, say)


def starting_with(load, notes: list[str], fresh, shardings: dict, say):
    """`fresh` (``() -> a new state``) with the weights ``load(shardings)`` gives (a pure dict
    of some of the model's parameters), `say`-ing `notes` when the run starts fresh."""

    def init():
        for note in notes:
            say(note)
        return with_weights(fresh(), load(shardings))

    return init


def with_weights(state: dict, weights: dict) -> dict:
    """`state` (``{0: model, 1: optimizer}``) with the model's leaves that `weights` holds, and
    so the moving average of ``--ema`` (which starts from the weights the run starts from)."""
    flat = _flat(weights)
    if unknown := set(flat) - set(_flat(state[0])):  # a caller's bug, not a user's
        raise ValueError(f"weights for parameters the model lacks: {sorted(unknown)[:3]}")
    take = lambda path, x: flat.get(tuple(k.key for k in path), x)  # noqa: E731
    state = {**state, 0: jax.tree_util.tree_map_with_path(take, state[0])}
    opt = state[1].get("opt_state") if isinstance(state[1], dict) else None
    if isinstance(opt, dict) and "ema" in opt:
        ema = jax.tree_util.tree_map_with_path(take, opt["ema"])
        state[1] = {**state[1], "opt_state": {**opt, "ema": ema}}
    return state
