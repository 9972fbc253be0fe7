"""Pipeline parallelism: a pipelined ViT computes what the sequential one does.

Equality is the contract (DESIGN.md, "Growing"): per-example outputs and gradients of the
pipelined forward pass equal the sequential ones, and training on meshes with a ``stage`` axis
gives the one-device losses and parameters. Tolerances are float32 reassociation: 1e-5 for
outputs, gradients and losses, 1e-4 for parameters after three AdamW steps.
"""

import json
import subprocess
import sys
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxpar
from jaxpar.core.mesh import make_mesh, parse_mesh
from jaxpar.core.optimizers import make_optimizer
from jaxpar.core.sharding import path_str
from jaxpar.core.step import compile_steps, create_state
from jaxpar.data import load_dataset, preprocess, train_batches
from jaxpar.models import MODELS
from jaxpar.models.vit import ViT
from jaxpar.modes.pipeline import Schedule
from jaxpar.run.checkpoint import Checkpoints
from jaxpar.run.config import Config
from jaxpar.run.loop import dispatches
from jaxpar.run.setup import setup
from jaxpar.tools.plan import format_plan, plan

ROOT = Path(__file__).resolve().parent.parent

IMAGE = (8, 8, 1)
# Depth 8 splits over 2, 4 and 8 stages; dropout on everywhere, so equality also proves that
# microbatching does not change any example's randomness.
TINY = {"width": 32, "depth": 8, "heads": 2, "mlp_dim": 64, "dropout": 0.1,
        "attention_dropout": 0.1}  # fmt: skip
MODEL = "vit-pipetest"  # TINY as a registered model, so the real loop trains it
SEED = 3


@pytest.fixture(scope="module", autouse=True)
def tiny_vit_model():
    MODELS[MODEL] = partial(ViT, **TINY)
    yield
    del MODELS[MODEL]


def forward_and_grad(stack, mesh_text, grad=True, n=16):
    """Per-example logits and (with `grad`) the parameter gradient of a fixed loss."""
    mesh = make_mesh(parse_mesh(mesh_text))
    graphdef, state = nnx.split(ViT(IMAGE, 10, **TINY, stack=stack, rngs=nnx.Rngs(0)))
    images = jax.random.normal(jax.random.key(1), (n, *IMAGE))
    labels = jnp.arange(n) % 10
    keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(2), jnp.arange(n))

    def loss(state):
        logits = nnx.merge(graphdef, state)(images, train=True, rngs=keys)
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(n), labels]), logits

    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        if not grad:
            return np.asarray(jax.jit(lambda s: loss(s)[1])(state)), None
        grads, logits = jax.jit(jax.grad(loss, has_aux=True))(state)
    return np.asarray(logits), [np.asarray(g) for g in jax.tree.leaves(grads)]


@pytest.fixture(scope="module")
def sequential():
    return forward_and_grad(None, "1")


@pytest.mark.parametrize(
    "stages, microbatches, repeats",
    [(2, 2, 1), (2, 4, 1), (4, 4, 1), (4, 8, 1), (8, 8, 1), (2, 4, 2), (4, 4, 2), (1, 4, 1)],
)
@pytest.mark.slow
def test_pipelined_forward_equals_sequential_per_example(stages, microbatches, repeats,
                                                         sequential):  # fmt: skip
    mesh = f"stage={stages},data={min(8 // stages, 16 // microbatches)}"
    logits, _ = forward_and_grad(Schedule(stages, microbatches, repeats), mesh, grad=False)
    np.testing.assert_allclose(logits, sequential[0], atol=1e-5)  # every example


@pytest.mark.slow
def test_the_bubble_never_reaches_outputs_or_gradients(sequential):
    """Slots where a stage holds no microbatch start as NaN; nothing of them may leak."""
    logits, grads = forward_and_grad(Schedule(4, 4, fill=float("nan")), "stage=4,data=2")
    assert np.isfinite(logits).all() and all(np.isfinite(g).all() for g in grads)
    np.testing.assert_allclose(logits, sequential[0], atol=1e-5)
    for got, want in zip(grads, sequential[1], strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.slow
def test_fsdp_weights_gathered_per_tick_give_the_same_result(sequential):
    logits, _ = forward_and_grad(Schedule(2, 4, gather=False), "stage=2,fsdp=4", grad=False)
    np.testing.assert_allclose(logits, sequential[0], atol=1e-5)


def test_bubble_fraction():
    assert Schedule(4, 4).ticks == 7 and Schedule(4, 4).bubble == pytest.approx(3 / 7)
    assert Schedule(4, 8, repeats=2).bubble == pytest.approx(3 / 19)


def train(workdir, mesh, steps=3, params=True, **flags):
    """Train TINY with the real loop; returns (train losses per step, final parameters)."""
    cfg = Config.of(model=MODEL, mesh=mesh, steps=steps, batch_size=16, log_every=1, seed=SEED,
                 workdir=str(workdir), **flags)  # fmt: skip
    jaxpar.train(cfg)
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [line["train_loss"] for line in lines if "train_loss" in line]
    if not params:
        return np.array(losses), None
    run = setup(cfg)
    ckpts = Checkpoints(workdir)
    state = ckpts.restore(ckpts.latest(), run.abstract, run.shardings)
    ckpts.close()
    params = {path_str(k): np.asarray(a) for k, a in jax.tree_util.tree_leaves_with_path(state[0])}
    return np.array(losses), params


def assert_same_params(got, want, optimizer):
    for path, value in want.items():
        if optimizer == "adamw" and path == "blocks/key/bias":
            # Its exact gradient is zero (attention does not change when every key moves by the
            # same vector), so AdamW's normalisation turns rounding noise into steps of +-lr.
            continue
        np.testing.assert_allclose(got[path], value, atol=1e-4, err_msg=path)


def library_run(mesh_text, schedule=None, optimizer="sgd", accum=1, dispatch=1, count=3):
    """Train TINY `count` steps as the loop does (`compile_steps`, `train_batches`), without
    evaluation or checkpoints; returns (losses, parameters)."""
    ds, mesh = load_dataset("digits"), make_mesh(parse_mesh(mesh_text))
    model_fn = partial(ViT, ds.image_shape, ds.num_classes, **TINY, stack=schedule)
    tx = make_optimizer(optimizer, 0.01)
    graphdef, state, shardings, _ = create_state(model_fn, tx, mesh, SEED)
    step, _ = compile_steps(graphdef, shardings, mesh, SEED, 4, preprocess(ds), accum=accum,
                            stacked=dispatch > 1)  # fmt: skip
    plan = dispatches(0, count, dispatch)
    losses = []
    for batch in train_batches(ds, 16, SEED, plan, mesh):
        state, metrics = step(state, batch)
        losses += np.atleast_1d(np.asarray(metrics["train_loss"])).tolist()
    params = {path_str(k): np.asarray(a) for k, a in jax.tree_util.tree_leaves_with_path(state[0])}
    return np.array(losses), params


@pytest.fixture(scope="module")
def one_device():
    """The reference runs on one device, per optimizer."""
    return {opt: library_run("1", optimizer=opt) for opt in ("sgd", "adamw")}


@pytest.mark.parametrize(
    "mesh, schedule, flags",
    [
        ("stage=2,data=2,fsdp=2", (2, 2), {"optimizer": "adamw", "accum": 2}),
        ("stage=2,fsdp=2,model=2", (2, 2), {}),
        ("stage=4,data=2", (4, 8), {"dispatch": 3}),
        ("stage=8", (8, 16), {"optimizer": "adamw"}),
        ("stage=2,data=4", (2, 4, 2), {}),  # circular, 2 trips
    ],
)
@pytest.mark.slow
def test_training_on_stages_equals_one_device(mesh, schedule, flags, one_device):
    losses, params = library_run(mesh, Schedule(*schedule), **flags)
    optimizer = flags.get("optimizer", "sgd")
    want_losses, want_params = one_device[optimizer]
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    assert_same_params(params, want_params, optimizer)


@pytest.mark.slow
def test_checkpoints_move_between_pipelined_and_plain_meshes(one_device, tmp_path):
    """Stop on stages, continue without, and back: the layer stack is stored the same way. (The
    same pipelined mesh twice: its second run reuses the compiled programs.)"""
    for count, mesh in [(1, "stage=4,data=2"), (2, "data=4"), (3, "stage=4,data=2")]:
        losses, params = train(tmp_path, mesh, steps=count, params=count == 3)
    want_losses, want_params = one_device["sgd"]
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    assert_same_params(params, want_params, "sgd")


def test_layer_stack_is_split_over_stages():
    run = setup(Config.of(model=MODEL, mesh="stage=4,data=2", batch_size=16, steps=1))
    shardings = run.shardings[0]
    kernel = shardings["blocks"]["mlp_in"]["kernel"]
    assert kernel.spec[0] == "stage"
    assert kernel.shard_shape((8, 32, 64)) == (2, 32, 64)  # 2 of the 8 blocks per stage
    assert shardings["head"]["kernel"].spec == jax.sharding.PartitionSpec(None, None)


@pytest.mark.slow
def test_plan_shows_the_pipeline_and_remat_bounds_its_memory():
    cfg = Config.of(model=MODEL, mesh="stage=4,data=2", batch_size=64, microbatches=8, steps=1)
    planned = plan(cfg)
    text = format_plan(planned)
    assert "pipeline gpipe: 4 stages x 8 microbatches, 11 ticks, bubble 27.3%" in text
    line = next(x for x in text.splitlines() if x.startswith("collectives per step"))
    permutes = int(line.split("collective-permute x")[1].split()[0])
    assert permutes >= 11  # at least one per tick forward: activations move between stages
    stage = planned["pipeline"]["per_stage_bytes"]
    assert 0 < stage["layer_stack"] < stage["params"]  # embedding and head are not staged
    # --remat block keeps only each tick's stage inputs for the backward pass
    remat = plan(cfg.replace(remat="block"))["per_device"]
    assert remat["compiled_temporaries"] < 0.8 * planned["per_device"]["compiled_temporaries"]


@pytest.mark.slow
def test_the_docs_pipeline_example_compiles_without_involuntary_rematerialization():
    """docs/pipeline.md's first example: XLA once printed "Involuntary full
    rematerialization" (the class token and position embeddings broadcast from their
    FSDP-split width into the batch's layout); they are gathered whole first now."""
    args = ["--model", "vit-tiny", "--mesh", "stage=2,data=2,fsdp=2", "--microbatches", "4"]
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args, "--dry-run"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Involuntary full rematerialization" not in proc.stderr, proc.stderr
