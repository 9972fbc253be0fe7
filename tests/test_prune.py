"""Magnitude pruning while training (`jaxpar.modes.prune`): exact sparsity per layer, zeros that
stay zero through training and resume, masks sharded like their parameters, the same run on any
mesh."""

import json

import numpy as np
import pytest

import train as cli
from jaxpar.core.sharding import path_str
from jaxpar.run.checkpoint import Checkpoints
from jaxpar.run.config import Config
from jaxpar.run.setup import setup

ARGS = ["--prune-to", "0.9", "--prune-start", "2", "--prune-end", "6", "--log-every", "1",
        "--batch-size", "64", "--checkpoint-every", "4"]  # fmt: skip


def model_at(workdir, step=None):
    ckpts = Checkpoints(workdir)
    try:
        return ckpts.manager.restore(step or ckpts.latest()).state["model"]
    finally:
        ckpts.close()


def losses(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [x["train_loss"] for x in map(json.loads, lines) if "train_loss" in x]


@pytest.mark.slow
def test_pruning_is_exact_per_layer_survives_resume_and_matches_one_device(tmp_path):
    one, sharded = tmp_path / "one", tmp_path / "sharded"
    assert cli.main([*ARGS, "--steps", "8", "--mesh", "1", "--workdir", str(one)]) == 0
    assert cli.main([*ARGS, "--steps", "8", "--mesh", "2x2", "--workdir", str(sharded)]) == 0
    np.testing.assert_allclose(losses(sharded), losses(one), rtol=1e-5)
    model = model_at(sharded)
    for name, layer in model.items():
        for kind, w in layer.items():
            w = np.asarray(w)
            if w.ndim >= 2:  # exactly round(0.9 n) zeros in every matrix
                assert np.count_nonzero(w == 0) == round(0.9 * w.size), (name, kind)
            else:  # vectors stay dense
                assert np.count_nonzero(w) == w.size, (name, kind)
    # resumed on another mesh and trained on: the pruned weights stay exactly zero
    assert cli.main([*ARGS, "--steps", "12", "--mesh", "fsdp=4", "--workdir", str(sharded)]) == 0
    later = model_at(sharded, 12)
    for name, layer in model.items():
        for kind, w in layer.items():
            if np.ndim(w) >= 2:
                assert (np.asarray(later[name][kind])[np.asarray(w) == 0] == 0).all(), name
    # a checkpoint pruned cannot resume without pruning (its optimizer state holds masks)
    assert cli.main(["--steps", "14", "--mesh", "1", "--workdir", str(sharded)]) == 2


@pytest.mark.slow
def test_a_longer_continuation_keeps_the_schedule_it_began(tmp_path, capsys):
    """The default end of the ramp is 3/4 of the run: a longer --steps would move it later,
    lower the sparsity due now and revive pruned weights. Refused, naming --prune-end."""
    args = ["--prune-to", "0.9", "--batch-size", "64", "--workdir", str(tmp_path)]
    assert cli.main([*args, "--steps", "8"]) == 0  # the ramp ends at step 6
    capsys.readouterr()
    assert cli.main([*args, "--steps", "16"]) == 2
    assert "ends at step 6, and this run's would end at step 12; pass --prune-end 6" in (
        capsys.readouterr().err
    )
    assert cli.main([*args, "--steps", "10", "--prune-end", "6"]) == 0
    dense = {k: np.asarray(w) == 0 for k, w in model_at(tmp_path, 8)["fc1"].items()}
    later = model_at(tmp_path, 10)["fc1"]
    assert (np.asarray(later["kernel"])[dense["kernel"]] == 0).all()


def test_masks_are_sharded_like_their_parameters():
    run = setup(Config.of(mesh="fsdp=4,model=2", prune_to=0.5, steps=10).validate())
    params = dict(_leaves(run.shardings[0]))
    masks = {k: s for k, s in _leaves(run.shardings[1]) if "mask" in k}
    assert masks, "the optimizer state holds no masks"
    for path, sharding in masks.items():
        param = next(p for p in params if path.endswith("mask/" + p))
        assert sharding.spec == params[param].spec, path


def _leaves(tree):
    import jax

    return [(path_str(k), s) for k, s in jax.tree_util.tree_leaves_with_path(tree)]


def test_a_vits_stacked_layers_are_pruned_one_by_one_and_their_vectors_stay_dense():
    """What is pruned follows the logical axes: a ViT's kernels, each layer of a stack on its
    own; its biases, norm scales, position table and per-head q/k/v biases stay dense (they
    once were pruned for being 2-D). The head is what --freeze trains, by its classes axis."""
    import jax
    import optax
    from flax import nnx

    from jaxpar.core.optimizers import head_paths
    from jaxpar.models import ViT
    from jaxpar.modes.prune import magnitude_pruning, weight_roles

    vit = nnx.eval_shape(lambda: ViT((8, 8, 1), 10, width=32, depth=2, heads=2, mlp_dim=64,
                                     rngs=nnx.Rngs(0)))  # fmt: skip
    params = nnx.state(vit, nnx.Param)
    roles = weight_roles(params)
    assert roles["blocks/mlp_in/kernel"] and roles["blocks/query/kernel"]
    assert roles["head/kernel"] is False and roles["embed/kernel"] is False
    dense = {"pos_embed", "blocks/query/bias", "blocks/attn_norm/scale", "head/bias"}
    assert not dense & roles.keys(), dense & roles.keys()
    assert head_paths(params) == {"head/kernel", "head/bias"}

    rng = np.random.default_rng(0)
    normal = lambda *shape: rng.normal(size=shape).astype(np.float32)  # noqa: E731
    params = {"blocks": {"kernel": normal(2, 8, 8), "scale": normal(2, 8)},
              "head": {"kernel": normal(8, 4)}}  # fmt: skip
    roles = {"blocks/kernel": True, "head/kernel": False}
    tx = optax.chain(optax.sgd(0.0), magnitude_pruning(0.75, 0, 1, roles))
    zero = jax.tree.map(np.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zero, tx.init(params), params)
    new = jax.tree.map(np.asarray, optax.apply_updates(params, updates))
    assert [int((k == 0).sum()) for k in new["blocks"]["kernel"]] == [48, 48]  # each layer
    assert (new["blocks"]["scale"] == params["blocks"]["scale"]).all()  # not a weight: dense
    assert int((new["head"]["kernel"] == 0).sum()) == 24


def test_ramps_that_end_after_the_run_are_noted_with_what_the_run_reaches():
    """--prune-end or --warmup-steps past the run's end: accepted (a longer run continues the
    ramp) with one line saying what this run reaches; none when the ramp ends in the run."""
    from jaxpar.run.config import Config

    prune = Config.of(prune_to=0.5, prune_end=20).notes(10)
    assert prune == [
        "note: --prune-end 20 is past the run's end (step 10): it ends at sparsity 0.438, not "
        "--prune-to 0.5; a run continued to --steps 20 reaches it"
    ]
    assert Config.of(warmup_steps=20).notes(10) == [
        "note: --warmup-steps 20 is past the run's end (step 10): the learning rate reaches 0.45 "
        "of --lr"
    ]
    assert Config.of(prune_to=0.5, prune_end=10, warmup_steps=10).notes(10) == []
